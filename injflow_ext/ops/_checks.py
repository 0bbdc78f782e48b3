"""Argument checks shared by the op wrappers: each error names the argument and what was
expected and received."""

from __future__ import annotations

import torch

from .._extension import check_device

FLOAT_DTYPES = (torch.float32, torch.float64)
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def autocast_float32(*tensors):
    """The ops' behaviour under ``torch.autocast``: they run in float32. Inside an autocast
    region of a tensor's device, a float16/bfloat16 tensor is cast up to float32 (float64 and
    float32 are left alone, as autocast does); outside one, every tensor is returned unchanged
    (so a low-precision input still gets the dtype error). ``None`` entries pass through."""
    return tuple(
        t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION_DTYPES
        and torch.is_autocast_enabled(t.device.type) else t
        for t in tensors)


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, shape=None,
                 like: torch.Tensor | None = None) -> None:
    """`shape` may hold None for free dimensions; `like` requires same dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions"
                         + (f" {shape_str(shape)}" if shape is not None else "")
                         + f", got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            raise ValueError(f"{op}: {name} must have shape {shape_str(shape)}, got "
                             f"{tuple(t.shape)}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} must have dtype {like.dtype} like the other inputs, "
                            f"got {t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{op}: {name} must be on {like.device} like the other inputs, got "
                             f"{t.device}")
    check_device(name, op, t)


def shape_str(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
