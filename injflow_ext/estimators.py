"""The volume term ``log det(JᵀJ)`` of a decoder ``g: R^d -> R^D`` at ``u``, ``J = ∂g/∂u``,
exactly or by a stochastic estimate of its gradient (docs/design.md §1). This module is the one
place of that math; models and training call it.

- ``method="exact"``: J from d tangents in one pass, then ``gram_logdet`` (fused Gram,
  Cholesky, log-diagonal; backward ``2 J G⁻¹``).
- ``method="hutchinson"``: probes ``ε (B, K, d)`` (normal or Rademacher), ``ξ = G⁻¹ε`` by batched
  CG with the matrix-free product ``G v = Jᵀ(J v)`` (a JVP then a VJP), then the surrogate
  ``s = mean_k <J sg(ξ_k), J ε_k>``: its value is not ``log det G``, its gradient is an unbiased
  estimate (up to CG error) of ``∇ log det G``.

Decoders: anything with ``jvp_packed(UV (B, 1+K, d)) -> (B, 1+K, D)`` (the library's flows;
fast path), or any callable ``u (B, d) -> x (B, D)`` acting on each sample independently, e.g. a
user's ``nn.Module`` (generic path through ``torch.func``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .ops import cg_solve, gram_logdet

__all__ = ["logdet_jtj", "LogdetResult", "decoder_jacobian"]


@dataclass
class LogdetResult:
    """What :func:`logdet_jtj` returns.

    value: ``(B,)``; exact: ``log det(JᵀJ)``; hutchinson: the surrogate whose gradient
        estimates ``∇ log det(JᵀJ)`` (its value is not the log-determinant).
    decoded: ``g(u)`` ``(B, D)``, computed on the way (differentiable).
    diagnostics: exact: ``jitter`` and ``status`` per sample (see ``gram_logdet``);
        hutchinson: ``cg_iterations``, ``cg_residual_norm``, ``cg_converged`` per sample and probe.
    """

    value: torch.Tensor
    decoded: torch.Tensor
    method: str
    diagnostics: dict = field(default_factory=dict)


def _has_fast_path(decoder) -> bool:
    return callable(getattr(decoder, "jvp_packed", None))


def fast_decoder(decoder):
    """The decoder the fast path can run: itself when it has ``jvp_packed``; for a bound
    ``decode`` method of a model with a ``decoder`` that has one (``model.decode`` of a
    RectangularFlow, what users write first), that decoder; else the callable unchanged."""
    if _has_fast_path(decoder):
        return decoder
    owner = getattr(decoder, "__self__", None)
    if owner is not None and getattr(decoder, "__name__", None) == "decode":
        inner = getattr(owner, "decoder", None)
        if _has_fast_path(inner):
            return inner
    return decoder


# what a library op says when reached under a torch.func transform
_FUNCTORCH_MESSAGE = "functorch"


def _generic(fn, *args):
    """Run a torch.func transform of a user's decoder; a library op inside it (which torch.func
    cannot transform) becomes an error that says what to pass instead."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        if _FUNCTORCH_MESSAGE in str(exc):
            raise TypeError(
                "logdet_jtj: this decoder runs injflow_ext ops inside torch.func transforms, "
                "which cannot differentiate them (first-order custom autograd). Pass a decoder "
                "with jvp_packed instead: model.decoder (or model.decode) of a RectangularFlow, "
                "or a flow from injflow_ext.nn") from exc
        raise


def _push_tangents(decoder, u: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g(u) (B, D), J V (B, K, D))`` for tangents ``V (B, K, d)``, differentiable."""
    if _has_fast_path(decoder):
        YV = decoder.jvp_packed(torch.cat([u.unsqueeze(1), V], dim=1))
        return YV[:, 0], YV[:, 1:]
    outs = [_generic(torch.func.jvp, decoder, (u,), (V[:, k],)) for k in range(V.shape[1])]
    if not outs:
        return decoder(u), u.new_zeros(u.shape[0], 0, 0)
    return outs[0][0], torch.stack([o[1] for o in outs], dim=1)


def decoder_jacobian(decoder, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g(u) (B, D), J (B, D, d))`` with all d tangents in one pass (fast path) or by
    ``torch.func.jacfwd`` (generic path). Differentiable w.r.t. u and the decoder's parameters."""
    B, d = u.shape
    if _has_fast_path(decoder):
        eye = torch.eye(d, dtype=u.dtype, device=u.device).expand(B, d, d)
        x, JV = _push_tangents(decoder, u, eye)
        return x, JV.mT
    x = decoder(u)
    J = _generic(torch.func.vmap(torch.func.jacfwd(
        lambda ui: decoder(ui.unsqueeze(0)).squeeze(0))), u)
    return x, J


def _probes(B: int, K: int, d: int, kind: str, like: torch.Tensor,
            generator: torch.Generator | None) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(B, K, d, dtype=like.dtype, device=like.device, generator=generator)
    if kind == "rademacher":
        bits = torch.randint(0, 2, (B, K, d), device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ValueError(f"logdet_jtj: probe must be 'normal' or 'rademacher', got {kind!r}")


def _tracing_or_capturing(t: torch.Tensor) -> bool:
    """True under torch.compile tracing or while a CUDA graph captures on the current stream:
    then no host synchronisation is allowed."""
    if torch.compiler.is_compiling():
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _gram_matvec(decoder, u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v (B, d, K) -> Jᵀ(J v) (B, d, K)`` without forming J: one JVP with K tangents, then K
    VJPs through one graph of the primal decoder (no gradient to the parameters is kept)."""
    u0 = u.detach().requires_grad_(True)
    with torch.enable_grad():
        x0 = decoder(u0) if not _has_fast_path(decoder) else decoder.jvp_packed(u0.unsqueeze(1))[:, 0]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, JV = _push_tangents(decoder, u0.detach(), v.mT)      # (B, K, D)
        cols = []
        # the VJPs run in the graph's dtype: under torch.autocast (this runs inside the forward
        # pass) the backward ops would otherwise see low-precision operands
        with torch.autocast(u0.device.type, enabled=False):
            for k in range(JV.shape[1]):
                g, = torch.autograd.grad(x0, u0, JV[:, k], retain_graph=True)
                cols.append(g)
        return torch.stack(cols, dim=-1)                             # (B, d, K)

    return matvec


def logdet_jtj(decoder, u: torch.Tensor, method: str = "exact", *, hutchinson_samples: int = 1,
               probe: str = "normal", cg_rtol: float = 1e-5, cg_max_iter: int | None = None,
               cg_check_every="auto", generator: torch.Generator | None = None,
               **gram_kwargs) -> LogdetResult:
    """Volume term of the decoder at ``u (B, d)``; see the module docstring.

    Args:
        decoder: a flow with ``jvp_packed`` (``model.decoder``; ``model.decode`` of a
            RectangularFlow takes the same fast path) or a callable ``(B, d) -> (B, D)`` of
            plain PyTorch ops (through ``torch.func``).
        u: ``(B, d)`` latent points (may carry gradient, e.g. from an encoder).
        method: "exact" or "hutchinson".
        hutchinson_samples: probes K per sample.
        probe: "normal" or "rademacher".
        cg_rtol, cg_max_iter: CG tolerance and cap (default d iterations).
        cg_check_every: stop CG once every system converged, testing every this many
            iterations (a host synchronisation each); None: never test, run the cap.
            "auto": every iteration when running eagerly (a test costs one synchronisation,
            far less than the matvec it can save: a JVP and a VJP through the decoder), never
            while a CUDA graph is being captured or ``torch.compile`` traces (no host syncs
            there; the cap with device-side masking of converged systems).
        generator: random generator for the probes.
        gram_kwargs: passed to ``gram_logdet`` (e.g. ``max_relative_jitter``).
    """
    if not isinstance(u, torch.Tensor) or u.dim() != 2:
        raise ValueError(f"logdet_jtj: u must be a tensor (B, d), got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    decoder = fast_decoder(decoder)
    if method == "exact":
        x, J = decoder_jacobian(decoder, u)
        if J.shape[-2] < J.shape[-1]:
            raise ValueError(f"logdet_jtj: the decoder must map R^d to R^D with D >= d, got J of "
                             f"shape {tuple(J.shape)}")
        value, info = gram_logdet(J, return_info=True, **gram_kwargs)
        return LogdetResult(value, x, method, {"jitter": info.jitter, "status": info.status})
    if method == "hutchinson":
        if not isinstance(hutchinson_samples, int) or hutchinson_samples < 1:
            raise ValueError(f"logdet_jtj: hutchinson_samples must be a positive int, got "
                             f"{hutchinson_samples!r}")
        B, d = u.shape
        K = hutchinson_samples
        eps = _probes(B, K, d, probe, u, generator)                  # (B, K, d)
        if cg_check_every == "auto":
            cg_check_every = None if _tracing_or_capturing(u) else 1
        res = cg_solve(_gram_matvec(decoder, u), eps.mT.contiguous(), rtol=cg_rtol,
                       max_iter=cg_max_iter, check_every=cg_check_every)
        xi = res.x.mT.detach()                                       # (B, K, d), sg(ξ)
        x, JV = _push_tangents(decoder, u, torch.cat([eps, xi], dim=1))
        J_eps, J_xi = JV[:, :K], JV[:, K:]
        value = (J_xi * J_eps).sum(-1).mean(-1)
        return LogdetResult(value, x, method, {"cg_iterations": res.iterations,
                                               "cg_residual_norm": res.residual_norm,
                                               "cg_converged": res.converged})
    raise ValueError(f"logdet_jtj: method must be 'exact' or 'hutchinson', got {method!r}")
