"""injflow_ext: fast ops and models for injective ("rectangular") normalizing flows.

Ops (CPU and CUDA, float32/float64, autograd, ``torch.compile``):
    gram_logdet(J)  log det(JᵀJ) per batch element, J: (..., D, d)
"""

from ._extension import build_info
from .ops import GramLogdetInfo, gram_logdet

__version__ = "0.1.0"

__all__ = ["build_info", "gram_logdet", "GramLogdetInfo", "__version__"]
