"""Thin Python wrappers of the compiled ops, with their autograd and fake (meta) kernels.

The math of each op lives in its kernels (``csrc/cpu``, ``csrc/cuda``); here are only argument
checks that give clear errors, reshaping of batch dimensions, and the registrations that make
the ops differentiable and traceable by ``torch.compile``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._extension import _C, check_device
from ._checks import autocast_float32

__all__ = ["gram_logdet", "GramLogdetInfo", "GRAM_OK", "GRAM_JITTERED", "GRAM_FAILED"]

# Per-sample status codes of gram_logdet (csrc/gram_logdet.h).
# per-sample status codes of the kernels (csrc/gram_logdet.h), exported by the extension
GRAM_OK, GRAM_JITTERED, GRAM_FAILED = (_C.GRAM_STATUS_CODES[k] for k in ("ok", "jittered",
                                                                        "failed"))


class GramLogdetInfo(NamedTuple):
    """Per-sample diagnostics of :func:`gram_logdet`, shaped like the batch.

    jitter: absolute value λ added to the diagonal of G = JᵀJ before its Cholesky
        factorisation (0 where none was needed); float64 when the factorisation ran in float64.
    status: int32, 0 = factorised as is, 1 = factorised after adding jitter, 2 = failed even with
        the largest allowed jitter (G is zero or not finite; the logdet there is -inf or NaN and
        its gradient is zero).
    """

    jitter: torch.Tensor
    status: torch.Tensor

    @property
    def failed(self) -> torch.Tensor:
        return self.status == GRAM_FAILED

    @property
    def jittered(self) -> torch.Tensor:
        return self.status == GRAM_JITTERED


def _batch_indices(mask: torch.Tensor) -> list:
    """Batch indices (tuples for multi-dimensional batches) where mask is true (host sync)."""
    idx = mask.nonzero().tolist()
    return [tuple(i) if len(i) != 1 else i[0] for i in idx]


def _check_gram_logdet_args(J, max_relative_jitter):
    if not isinstance(J, torch.Tensor):
        raise TypeError(f"gram_logdet: J must be a torch.Tensor of shape (..., D, d), got "
                        f"{type(J).__name__}")
    if J.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"gram_logdet: J must be float32 or float64, got {J.dtype}"
                        + (" (convert with J.double() or J.float())"
                           if J.is_floating_point() or J.is_complex() else ""))
    if J.dim() < 2:
        raise ValueError(f"gram_logdet: J must have shape (..., D, d) with at least 2 dimensions, "
                         f"got shape {tuple(J.shape)}")
    D, d = J.shape[-2], J.shape[-1]
    if D == 0 or d == 0:
        raise ValueError(f"gram_logdet: J must have D >= 1 and d >= 1 in its shape (..., D, d), "
                         f"got shape {tuple(J.shape)}")
    if d > D:
        raise ValueError(f"gram_logdet: J must have shape (..., D, d) with d <= D (JᵀJ is "
                         f"singular otherwise), got D={D}, d={d}; did you pass Jᵀ?")
    if not (0.0 <= float(max_relative_jitter) <= 1.0):
        raise ValueError(f"gram_logdet: max_relative_jitter must be in [0, 1], got "
                         f"{max_relative_jitter}")
    check_device("J", "gram_logdet", J)


def gram_logdet(J: torch.Tensor, *, return_info: bool = False, check: bool = False,
                accumulate_float64: bool = True, max_relative_jitter: float = 1e-3):
    """``log det(JᵀJ)`` for each matrix of a batch, differentiable (``∂/∂J = 2 J (JᵀJ)⁻¹``).

    Args:
        J: ``(..., D, d)`` with ``1 <= d <= D``, float32 or float64, on CPU or CUDA.
        return_info: also return a :class:`GramLogdetInfo` with the jitter used and a status
            per sample.
        check: raise ``ValueError`` if J has non-finite values or if a factorisation failed,
            naming the batch indices. This synchronises with the device; leave it off inside
            ``torch.compile``/CUDA graphs and inspect ``info`` instead.
        accumulate_float64: for float32 ``J``, accumulate ``G = JᵀJ`` and factorise it in
            float64 (default). float64 ``J`` always uses float64.
        max_relative_jitter: if the Cholesky factorisation of G fails, ``λ·I`` is added with
            ``λ = r·tr(G)/d`` for ``r = 100·eps, 1000·eps, ...`` up to this value (a bounded
            number of attempts, never an endless retry). 0 disables jitter.

    Returns:
        ``logdet`` of shape ``(...)`` in J's dtype, or ``(logdet, info)`` with ``return_info``.
        A sample whose G is exactly zero gives ``-inf`` (status 2); non-finite input gives NaN
        (status 2); gradients of failed samples are zero.

    Double backward is supported (through a PyTorch-ops formula for the second derivative).
    Under ``torch.autocast`` a float16/bfloat16 ``J`` is cast to float32 first.
    """
    J, = autocast_float32(J)
    _check_gram_logdet_args(J, max_relative_jitter)
    batch, (D, d) = J.shape[:-2], J.shape[-2:]
    if check:
        finite = torch.isfinite(J).flatten(-2).all(-1)
        if not bool(finite.all()):
            raise ValueError(f"gram_logdet: J has non-finite values (NaN or inf) at batch "
                             f"indices {_batch_indices(~finite)[:20]}")
    J3 = J.reshape(-1, D, d)
    logdet, jitter, status, _ = torch.ops.injflow.gram_logdet.default(
        J3, bool(accumulate_float64), float(max_relative_jitter))
    logdet = logdet.reshape(batch)
    info = GramLogdetInfo(jitter.reshape(batch), status.reshape(batch))
    if check:
        failed = info.failed
        if bool(failed.any()):
            raise ValueError(
                f"gram_logdet: G = JᵀJ could not be factorised even with jitter "
                f"{max_relative_jitter}·tr(G)/d at batch indices {_batch_indices(failed)[:20]}: "
                "J is zero or overflows there. Check the decoder's Jacobian for those samples.")
    return (logdet, info) if return_info else logdet


# ----------------------------------------------------------------------------- registrations

for _device_type in ("cpu", "cuda"):  # float32 under autocast (see ops/tangent.py)
    torch.library.register_autocast("injflow::gram_logdet", _device_type, torch.float32)


def _factor_dtype(J: torch.Tensor, accumulate_float64: bool) -> torch.dtype:
    return torch.float64 if (J.dtype == torch.float64 or accumulate_float64) else torch.float32


@torch.library.register_fake("injflow::gram_logdet")
def _gram_logdet_fake(J, accumulate_float64, max_relative_jitter):
    torch._check(J.dim() == 3, lambda: f"gram_logdet: J must be (B, D, d), got {J.shape}")
    torch._check(J.shape[2] <= J.shape[1],
                 lambda: f"gram_logdet: J must be (B, D, d) with d <= D, got {tuple(J.shape)}")
    B, _, d = J.shape
    f = _factor_dtype(J, accumulate_float64)
    return (J.new_empty(B), J.new_empty(B, dtype=f), J.new_empty(B, dtype=torch.int32),
            J.new_empty(B, d, d, dtype=f))


@torch.library.register_fake("injflow::gram_logdet_backward")
def _gram_logdet_backward_fake(grad, J, L, status):
    return torch.empty_like(J, memory_format=torch.contiguous_format)


def _gram_logdet_setup_context(ctx, inputs, output):
    J, _, _ = inputs
    _, jitter, status, L = output
    ctx.save_for_backward(J, L, status)
    ctx.mark_non_differentiable(jitter, status, L)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the diagnostics and L


def _gram_logdet_backward(ctx, grad_logdet, _grad_jitter, _grad_status, _grad_L):
    J, L, status = ctx.saved_tensors
    grad_J = None
    if ctx.needs_input_grad[0] and grad_logdet is not None:
        grad_J = torch.ops.injflow.gram_logdet_backward.default(grad_logdet, J, L, status)
    return grad_J, None, None


torch.library.register_autograd("injflow::gram_logdet", _gram_logdet_backward,
                                setup_context=_gram_logdet_setup_context)


def _gram_inverse_for_double_backward(J, L, status):
    """M = (JᵀJ + λI)⁻¹ with the forward's jitter λ, built from J with torch ops so that it is
    differentiable in J; zero for failed samples. Shapes: J (B, D, d) -> M (B, d, d)."""
    acc = L.dtype
    Ja = J.to(acc)
    G = Ja.mT @ Ja
    failed = status == GRAM_FAILED
    LLt = L @ L.mT
    lam = (torch.diagonal(LLt, dim1=-2, dim2=-1) - torch.diagonal(G, dim1=-2, dim2=-1)).mean(-1)
    eye = torch.eye(G.shape[-1], dtype=acc, device=G.device)
    lam = torch.where(failed, torch.ones_like(lam), lam.detach())
    G = torch.where(failed[:, None, None], eye.expand_as(G), G)
    M = torch.linalg.inv(G + lam[:, None, None] * eye)
    return torch.where(failed[:, None, None], torch.zeros_like(M), M)


def _gram_logdet_backward_setup_context(ctx, inputs, output):
    grad, J, L, status = inputs
    ctx.save_for_backward(grad, J, L, status)


def _gram_logdet_double_backward(ctx, C):
    """VJP of Y = 2 g J M (M = (JᵀJ + λI)⁻¹) with cotangent C (B, D, d):
    ∂/∂g = 2 tr(Cᵀ J M);  ∂/∂J = 2 g [C M − J (P + Pᵀ)],  P = M Cᵀ J M."""
    grad, J, L, status = ctx.saved_tensors
    acc = L.dtype
    M = _gram_inverse_for_double_backward(J, L, status)
    Ja, Ca, g = J.to(acc), C.to(acc), grad.to(acc)
    JM = Ja @ M
    d_grad = d_J = None
    if ctx.needs_input_grad[0]:
        d_grad = (2 * (Ca * JM).sum((-2, -1))).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        P = M @ Ca.mT @ JM
        d_J = (2 * g[:, None, None] * (Ca @ M - Ja @ (P + P.mT))).to(J.dtype)
    return d_grad, d_J, None, None


torch.library.register_autograd("injflow::gram_logdet_backward", _gram_logdet_double_backward,
                                setup_context=_gram_logdet_backward_setup_context)
