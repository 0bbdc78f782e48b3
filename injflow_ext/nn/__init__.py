"""Bijections (``nn.Module``s) with forward, inverse, log|det| and batched tangents."""

from .base import Bijection
from .layers import (ActNorm, AffineCoupling, InvertibleLinear, Permutation, Reverse,
                     Sequential)
from .mlp import MLP

__all__ = ["Bijection", "AffineCoupling", "ActNorm", "Permutation", "Reverse",
           "InvertibleLinear", "Sequential", "MLP"]
