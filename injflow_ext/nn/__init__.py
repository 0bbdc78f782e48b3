"""Bijections (``nn.Module``s) with forward, inverse, log|det| and batched tangents, and tangent
rules for plain ``torch.nn`` modules (:func:`tangent`)."""

from .base import Bijection
from .image import (
    ChannelActNorm,
    ConvAffineCoupling,
    ConvNet,
    InvertibleConv1x1,
    LogitPixels,
    Squeeze,
    Unsqueeze,
    image_flow,
)
from .layers import ActNorm, AffineCoupling, FixedAffine, InvertibleLinear, Permutation, Reverse, Sequential
from .mlp import MLP, set_mlp_path
from .plain import ElementwiseAffine, Residual
from .rules import Tangent, TangentRuleWarning, tangent
from .spline import ElementwiseSpline

__all__ = ["Bijection", "AffineCoupling", "ActNorm", "Permutation", "Reverse",
           "InvertibleLinear", "FixedAffine", "ElementwiseSpline", "Sequential", "MLP",
           "set_mlp_path", "Squeeze", "ChannelActNorm", "InvertibleConv1x1", "ConvNet",
           "ConvAffineCoupling", "image_flow", "LogitPixels", "Unsqueeze", "tangent", "Tangent",
           "TangentRuleWarning", "Residual", "ElementwiseAffine"]
