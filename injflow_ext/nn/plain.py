"""Plain ``torch.nn`` building blocks with fast tangent rules (:func:`injflow_ext.nn.tangent`):
a residual block and a fixed elementwise affine map. They are ordinary modules (``forward(x)``
returns a tensor), for the encoders and decoders of free-form models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Residual", "ElementwiseAffine"]


class Residual(nn.Module):
    """``x + block(x)`` for a ``block`` that keeps the shape of its input.

    The tangent rule is ``(x, v) -> (x + block(x), v + block′(x) v)``, with ``block``'s own
    rules inside (a run of Linear and activation layers is one fused op). With ``zero_init``
    the block's last layer that has a weight starts at zero, so the block starts as the
    identity."""

    def __init__(self, block: nn.Module, zero_init: bool = False):
        super().__init__()
        self.block = block
        if zero_init:
            last = [m for m in block.modules() if isinstance(getattr(m, "weight", None),
                                                               torch.Tensor)]
            if not last:
                raise ValueError("Residual: zero_init needs a layer with a weight in the block")
            with torch.no_grad():
                last[-1].weight.zero_()
                if getattr(last[-1], "bias", None) is not None:
                    last[-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, *shape) -> x + block(x) (B, *shape)``."""
        return x + self.block(x)


class ElementwiseAffine(nn.Module):
    """A fixed (not trained) ``x ↦ x · scale + shift`` per feature of the last dimension, e.g.
    the data's standardisation at the data end of a decoder; :meth:`inverse_module` is the map
    back. ``shift``, ``scale``: ``(n,)`` (buffers, saved in the state dict)."""

    def __init__(self, shift: Sequence[float] | torch.Tensor, scale: Sequence[float] | torch.Tensor):
        super().__init__()
        shift = torch.as_tensor(shift, dtype=torch.get_default_dtype()).flatten()
        scale = torch.as_tensor(scale, dtype=torch.get_default_dtype()).flatten()
        if shift.shape != scale.shape:
            raise ValueError(f"ElementwiseAffine: shift and scale must have the same shape, got "
                             f"{tuple(shift.shape)} and {tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
            raise ValueError("ElementwiseAffine: scale must be finite and non-zero")
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, n) -> x · scale + shift (B, n)``."""
        return x * self.scale + self.shift

    def inverse_module(self) -> ElementwiseAffine:
        """The map ``y ↦ (y − shift) / scale`` as another ElementwiseAffine."""
        return ElementwiseAffine(-self.shift / self.scale, 1 / self.scale)

    def extra_repr(self) -> str:
        return f"features={self.shift.numel()}"
