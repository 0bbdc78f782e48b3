"""The compiled ops behind thin Python wrappers, one module per op family.

Each module checks arguments (clear errors naming the argument), reshapes batch dimensions,
calls ``torch.ops.injflow.*``, and registers the op's autograd and fake (meta) kernels.
"""

from .cg import CGResult, cg_solve
from .gram_logdet import GRAM_FAILED, GRAM_JITTERED, GRAM_OK, GramLogdetInfo, gram_logdet
from .tangent import (
                      ACTIVATIONS,
                      COUPLING_SCALES,
                      MLP_PATHS,
                      FusedMlp,
                      tangent_affine_coupling,
                      tangent_conv2d,
                      tangent_conv2d_packed,
                      tangent_coupling_packed,
                      tangent_epilogue_packed,
                      tangent_linear,
                      tangent_linear_packed,
                      tangent_mlp,
)

__all__ = [
    "gram_logdet", "GramLogdetInfo", "GRAM_OK", "GRAM_JITTERED", "GRAM_FAILED",
    "tangent_linear", "tangent_linear_packed", "tangent_mlp", "MLP_PATHS", "FusedMlp",
    "tangent_affine_coupling", "tangent_conv2d", "tangent_conv2d_packed",
    "tangent_epilogue_packed",
    "tangent_coupling_packed", "ACTIVATIONS", "COUPLING_SCALES", "cg_solve", "CGResult",
]
