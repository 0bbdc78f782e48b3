"""Batched conjugate gradients on many small SPD systems, one fused kernel per iteration.

The solution is not differentiated: inputs are detached and the result carries no autograd
history (the volume-term estimators use it as a constant, ``sg(ξ)`` in docs/design.md §1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .._extension import _C
from ._checks import autocast_float32, check_tensor

__all__ = ["cg_solve", "CGResult", "CG_RUNNING", "CG_CONVERGED", "CG_BREAKDOWN"]

# Per-system status codes (csrc/cg.h)
# per-system status codes of the kernels (csrc/cg.h), exported by the extension
CG_RUNNING, CG_CONVERGED, CG_BREAKDOWN = (_C.CG_STATUS_CODES[k] for k in ("running",
                                                                         "converged",
                                                                         "breakdown"))


class CGResult(NamedTuple):
    """Result of :func:`cg_solve`; per-system fields are ``(N,)`` for ``b (N, d)`` and
    ``(N, K)`` for ``b (N, d, K)``.

    x: the solution, shaped like b.
    iterations: int32, CG iterations each system ran.
    residual_norm: ``‖b − A x‖`` as tracked by the CG recursion.
    converged: bool, ``residual_norm <= max(rtol·‖b‖, atol)``.
    breakdown: bool, the system met zero or negative curvature ``pᵀAp <= 0`` (A is not SPD
        there) and stopped; its x is the last iterate, never NaN from finite input.
    """

    x: torch.Tensor
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    converged: torch.Tensor
    breakdown: torch.Tensor


MatVec = Callable[[torch.Tensor], torch.Tensor]


def cg_solve(A: torch.Tensor | MatVec, b: torch.Tensor, *, x0: torch.Tensor | None = None,
             rtol: float = 1e-5, atol: float = 0.0, max_iter: int | None = None,
             check_every: int | None = None) -> CGResult:
    """Solve ``A x = b`` for a batch of small SPD systems by conjugate gradients.

    Args:
        A: ``(N, d, d)`` SPD matrices, or a callable ``matvec(v) -> A v`` on tensors shaped
            like ``b`` (e.g. ``v -> Jᵀ(J v)`` built from a JVP and a VJP).
        b: ``(N, d)`` or ``(N, d, K)`` (K right-hand sides per system), float32/float64.
        x0: initial guess shaped like b (default zeros).
        rtol, atol: stop a system once ``‖r‖ <= max(rtol·‖b‖, atol)``.
        max_iter: iteration cap (default ``d``: exact in exact arithmetic).
        check_every: test every this many iterations whether all systems stopped, and stop
            early (one host synchronisation per test). None (default): never synchronise, run
            ``max_iter`` iterations (converged systems stay unchanged), so the solve can be
            captured in a CUDA graph or compiled.

    Each iteration is one fused kernel for all systems (``pᵀAp``, ``α``, x and r updates,
    ``rᵀr``, convergence and breakdown tests, ``β``, p update, and ``A p`` itself for a tensor
    ``A`` with one right-hand side), plus a batched GEMM for a tensor ``A`` with K > 1
    right-hand sides or the callable's matvec.
    """
    op = "cg_solve"
    b, x0 = autocast_float32(b, x0)
    if isinstance(A, torch.Tensor):
        A, = autocast_float32(A)
    check_tensor(op, "b", b)
    if b.dim() not in (2, 3):
        raise ValueError(f"{op}: b must be (N, d) or (N, d, K), got shape {tuple(b.shape)}")
    single = b.dim() == 2
    b3 = (b.detach().unsqueeze(-1) if single else b.detach()).contiguous()
    N, d, K = b3.shape

    def to_user(v):
        return v.squeeze(-1) if single else v

    A_dense = None
    if isinstance(A, torch.Tensor):
        check_tensor(op, "A", A, shape=(N, d, d), like=b)
        A_dense = A.detach().contiguous()

        def matvec3(v):
            return torch.bmm(A_dense, v)
    elif callable(A):
        def matvec3(v):
            out = A(to_user(v))
            if not isinstance(out, torch.Tensor) or out.shape != to_user(v).shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"{op}: the matvec callable must return a tensor shaped like b "
                                 f"{tuple(to_user(v).shape)}, got {got}")
            out = out.detach()
            return (out.unsqueeze(-1) if single else out).to(b3.dtype)
    else:
        raise TypeError(f"{op}: A must be a tensor (N, d, d) or a callable matvec, got "
                        f"{type(A).__name__}")
    if x0 is not None:
        check_tensor(op, "x0", x0, shape=tuple(b.shape), like=b)
    if max_iter is None:
        max_iter = d
    if not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"{op}: max_iter must be a non-negative int, got {max_iter!r}")
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"{op}: check_every must be None or a positive int, got {check_every!r}")
    if rtol < 0 or atol < 0:
        raise ValueError(f"{op}: rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")

    if x0 is None:
        x = torch.zeros_like(b3)
        r = b3.clone()
    else:
        x = (x0.detach().unsqueeze(-1) if single else x0.detach()).clone().contiguous()
        r = (b3 - matvec3(x)).contiguous()
    p, rs, tol2, status, iterations = torch.ops.injflow.cg_init.default(r, b3, float(rtol),
                                                                        float(atol))
    # Dense A with one right-hand side: the matvec is fused into the step kernel (Ap is its
    # workspace). With K > 1 right-hand sides sharing A, a batched GEMM (A P) beats recomputing
    # A's rows per right-hand side, so the matvec stays separate.
    fuse_matvec = A_dense is not None and K == 1
    Ap = torch.empty_like(p) if fuse_matvec else None
    for it in range(max_iter):
        if not fuse_matvec:
            Ap = matvec3(p).contiguous()
        torch.ops.injflow.cg_step.default(x, r, p, Ap, A_dense if fuse_matvec else None, rs,
                                          tol2, status, iterations)
        if check_every is not None and (it + 1) % check_every == 0:
            if not bool((status == CG_RUNNING).any()):
                break
    per_system = (N,) if single else (N, K)
    return CGResult(
        x=to_user(x),
        iterations=iterations.reshape(per_system),
        residual_norm=rs.sqrt().reshape(per_system),
        converged=(status == CG_CONVERGED).reshape(per_system),
        breakdown=(status == CG_BREAKDOWN).reshape(per_system),
    )


# ----------------------------------------------------------------------------- registrations

@torch.library.register_fake("injflow::cg_init")
def _cg_init_fake(r, b, rtol, atol):
    torch._check(r.dim() == 3 and r.shape == b.shape,
                 lambda: f"cg_init: r and b must both be (N, d, K), got {tuple(r.shape)} and "
                         f"{tuple(b.shape)}")
    N, _, K = r.shape
    return (torch.empty_like(r, memory_format=torch.contiguous_format), r.new_empty(N, K),
            r.new_empty(N, K), r.new_empty(N, K, dtype=torch.int32),
            r.new_empty(N, K, dtype=torch.int32))


@torch.library.register_fake("injflow::cg_step")
def _cg_step_fake(x, r, p, Ap, A, rs, tol2, status, iterations):
    return None
