"""injflow_ext: fast ops and models for injective ("rectangular") normalizing flows.

Ops (CPU and CUDA, float32/float64, autograd, ``torch.compile``):
    gram_logdet(J)                      log det(JᵀJ) per batch element, J: (..., D, d)
    tangent_linear(x, V, W, b, act)     linear + activation on a primal and K tangents
    tangent_mlp(XV, weights, biases)    a whole MLP on a primal and K tangents
    tangent_affine_coupling(...)        affine coupling on a primal and K tangents
    tangent_conv2d(x, V, weight, b, act) 2-D convolution + activation on a primal and K tangents
    cg_solve(A, b)                      batched conjugate gradients, fused iterations

Library: injflow_ext.nn (bijections with batched tangents), injflow_ext.estimators.logdet_jtj
(exact / Hutchinson / encoder-surrogate volume term), injflow_ext.flows
(``RectangularFlow(ambient, latent_dim, prior, base)``,
``FreeFormFlow(encoder, decoder, latent_dim, base, prior)``, bases, builders),
injflow_ext.train (the objectives' registry and ``TrainStep``). The command line and its
datasets, loop, evaluation and plots build on these and are not imported here.
"""

# Order matters: the compiled extension loads first, so that an unbuilt checkout fails with the
# message that says how to build it; then the ops, then what builds on them.
from ._extension import build_info
from .ops import (CGResult, GramLogdetInfo, cg_solve, gram_logdet, tangent_affine_coupling,
                  tangent_conv2d, tangent_conv2d_packed, tangent_coupling_packed,
                  tangent_epilogue_packed, tangent_linear, tangent_linear_packed, tangent_mlp)

from . import estimators, nn  # noqa: E402  (after the ops they build on)
from . import flows  # noqa: E402
from .flows import FreeFormFlow, InjectiveFlow, RectangularFlow, StandardNormal, StudentT  # noqa: E402
from . import train  # noqa: E402
from .train import (ExactObjective, FifObjective, HutchinsonObjective, Objective,  # noqa: E402
                    SurrogateObjective, TrainStep, TwoStepObjective, make_objective)
from .train.runs import load_run  # noqa: E402

__version__ = build_info()["version"]

__all__ = ["build_info", "gram_logdet", "GramLogdetInfo", "tangent_linear",
           "tangent_linear_packed", "tangent_mlp", "tangent_affine_coupling", "tangent_coupling_packed",
           "tangent_conv2d", "tangent_conv2d_packed", "tangent_epilogue_packed",
           "cg_solve", "CGResult", "RectangularFlow", "FreeFormFlow", "InjectiveFlow",
           "StandardNormal", "StudentT", "TrainStep",
           "Objective", "ExactObjective", "HutchinsonObjective", "SurrogateObjective",
           "TwoStepObjective", "FifObjective", "make_objective", "load_run", "estimators", "nn", "flows",
           "train", "__version__"]
