"""The volume term ``log det(JᵀJ)`` of a decoder ``g: R^d -> R^D`` at ``u``, ``J = ∂g/∂u``,
exactly or by a stochastic estimate of its gradient (docs/design.md §1). This module is the one
place of that math; models and training call it.

- ``method="exact"``: J from d tangents in one pass, then ``gram_logdet`` (fused Gram,
  Cholesky, log-diagonal; backward ``2 J G⁻¹``).
- ``method="hutchinson"``: probes ``ε (B, K, d)`` (normal or Rademacher), ``ξ = G⁻¹ε`` by batched
  CG with the matrix-free product ``G v = Jᵀ(J v)`` (a JVP then a VJP), then the surrogate
  ``s = mean_k <J sg(ξ_k), J ε_k>``: its value is not ``log det G``, its gradient is an unbiased
  estimate (up to CG error) of ``∇ log det G``.
- ``method="surrogate"`` (the encoder-Jacobian estimator of free-form injective flows,
  docs/design.md §1): probes ``v (B, K, d)``, ``w_k = sg(v_kᵀ f′(x))`` from one backward pass
  through the encoder f (no graph kept), and ``s = 2 mean_k <w_k, J v_k>`` with ``J v_k`` from one
  tangent pass through the decoder (1 + K rows). ``f′ g′ = I`` on the manifold, so
  ``E ∇s = 2 tr(f′ ∇J)``, which is ``∇ log det G = 2 tr(J⁺ ∇J)`` where ``f′ = J⁺`` and biased
  elsewhere (docs/experiments.md measures how much). No CG, no Gram matrix.

:func:`encoder_volume_surrogate` is the other side of that estimator, the loss of Free-form
Injective Flows (FIF; Sorrenson et al., ICLR 2024; vislearn/FFF ``fff/loss.py``): the gradient
goes to the *encoder*, ``s = mean_k v_kᵀ f′(x) sg(g′(z) v_k)`` at ``z = f(x)``, and the decoder
learns from the reconstruction alone (docs/design.md §1).

Decoders: anything with ``jvp_packed(UV (B, 1+K, d)) -> (B, 1+K, D)`` (the library's flows;
fast path); any ``torch.nn.Module`` ``u (B, d) -> x (B, D)`` (fast path through the tangent rules
of :func:`injflow_ext.nn.tangent`: a run of Linear and activation layers is one fused op, a
module without a rule runs ``torch.func.jvp`` of itself alone); or any other callable acting on
each sample independently (generic path through ``torch.func``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .nn.rules import tangent
from .ops import cg_solve, gram_logdet

__all__ = ["logdet_jtj", "LogdetResult", "decoder_jacobian", "orthonormal_probes",
           "encoder_vjp", "encoder_volume_surrogate", "EncoderSurrogateResult"]


@dataclass
class LogdetResult:
    """What :func:`logdet_jtj` returns.

    value: ``(B,)``; exact: ``log det(JᵀJ)``; hutchinson and surrogate: a surrogate whose
        gradient estimates ``∇ log det(JᵀJ)`` (its value is not the log-determinant; the
        encoder surrogate's value estimates ``2 tr(f′J)``, which is 2d on the manifold).
    decoded: ``g(u)`` ``(B, D)``, computed on the way (differentiable).
    diagnostics: exact: ``jitter`` and ``status`` per sample (see ``gram_logdet``);
        hutchinson: ``cg_iterations``, ``cg_residual_norm``, ``cg_converged`` per sample and probe;
        surrogate: none.
    """

    value: torch.Tensor
    decoded: torch.Tensor
    method: str
    diagnostics: dict = field(default_factory=dict)


def _has_fast_path(decoder) -> bool:
    return callable(getattr(decoder, "jvp_packed", None))


def fast_decoder(decoder, name: str = "decoder"):
    """The decoder the fast path can run: itself when it has ``jvp_packed``; a plain
    ``torch.nn.Module`` with its tangent rules (:func:`injflow_ext.nn.tangent`); for a bound
    ``decode`` method of a model with a ``decoder`` that has one (``model.decode`` of a
    RectangularFlow, what users write first), that decoder; else the callable unchanged."""
    if _has_fast_path(decoder):
        return decoder
    if isinstance(decoder, torch.nn.Module):
        return tangent(decoder, name)   # ``name`` starts the layer paths of its errors
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
    B = u.shape[0]
    if _has_fast_path(decoder):
        YV = decoder.jvp_packed(torch.cat([u.unsqueeze(1), V], dim=1))
        YV = YV.reshape(B, YV.shape[1], -1)      # a decoder of images: flat outputs
        return YV[:, 0], YV[:, 1:]
    outs = [_generic(torch.func.jvp, decoder, (u,), (V[:, k],)) for k in range(V.shape[1])]
    if not outs:
        return decoder(u).reshape(B, -1), u.new_zeros(B, 0, 0)
    return outs[0][0].reshape(B, -1), torch.stack([o[1].reshape(B, -1) for o in outs], dim=1)


def decoder_jacobian(decoder, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g(u) (B, D), J (B, D, d))`` with all d tangents in one pass (fast path) or by
    ``torch.func.jacfwd`` (generic path). Differentiable w.r.t. u and the decoder's parameters.
    A decoder whose outputs are shaped (e.g. images ``(B, C, H, W)``) is seen flat."""
    B, d = u.shape
    if _has_fast_path(decoder):
        eye = torch.eye(d, dtype=u.dtype, device=u.device).expand(B, d, d)
        x, JV = _push_tangents(decoder, u, eye)
        return x, JV.mT
    x = decoder(u).reshape(B, -1)
    J = _generic(torch.func.vmap(torch.func.jacfwd(
        lambda ui: decoder(ui.unsqueeze(0)).reshape(-1))), u)
    return x, J


def _probes(B: int, K: int, d: int, kind: str, like: torch.Tensor,
            generator: torch.Generator | None) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(B, K, d, dtype=like.dtype, device=like.device, generator=generator)
    if kind == "rademacher":
        bits = torch.randint(0, 2, (B, K, d), device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ValueError(f"logdet_jtj: probe must be 'normal' or 'rademacher', got {kind!r}")


def orthonormal_probes(B: int, K: int, d: int, like: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, K, d)``: per sample K orthonormal directions, uniformly random (Gram–Schmidt of
    Gaussian vectors, i.e. Haar-distributed), scaled by ``√d`` so that ``E[v vᵀ] = I``; with
    ``K = d`` the probes span the space and ``mean_k v_kᵀ A v_k = tr A`` exactly. Torch ops
    only (no LAPACK QR), so it can be captured in a CUDA graph."""
    if K > d:
        raise ValueError(f"logdet_jtj: orthonormal probes need K <= d, got K={K} probes for "
                         f"d={d}; use probe='normal' for more probes than dimensions")
    G = torch.randn(B, K, d, dtype=like.dtype, device=like.device, generator=generator)
    rows = []
    for k in range(K):
        g = G[:, k]
        for q in rows:
            g = g - (g * q).sum(-1, keepdim=True) * q
        rows.append(g / g.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny))
    return torch.stack(rows, dim=1) * math.sqrt(d)


def surrogate_probes(B: int, K: int, d: int, kind: str, like: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Probes ``(B, K, d)`` of the encoder surrogate: "orthonormal" (default),
    "normal" or "rademacher"."""
    if kind == "orthonormal":
        return orthonormal_probes(B, K, d, like, generator)
    if kind not in ("normal", "rademacher"):
        raise ValueError(f"logdet_jtj: probe must be 'orthonormal', 'normal' or 'rademacher' "
                         f"for method='surrogate', got {kind!r}")
    return _probes(B, K, d, kind, like, generator)


def model_encoder(decoder):
    """The encoder paired with a decoder: ``model.encode`` for ``model.decoder`` or
    ``model.decode`` of a RectangularFlow; None for anything else."""
    model = getattr(decoder, "model", None)          # RectangularFlow.decoder
    if model is None:
        model = getattr(decoder, "__self__", None)   # RectangularFlow.decode
    encode = getattr(model, "encode", None)
    return encode if callable(encode) else None


def encoder_vjp(encoder, x: torch.Tensor, u: torch.Tensor | None, probes: torch.Tensor
                ) -> torch.Tensor:
    """``W (B, K, D)``, ``W_k = probes_kᵀ f′(x)`` for an encoder ``f: (B, D) -> (B, d)`` and
    ``probes (B, K, d)``: K backward passes, no graph kept (the result is a constant).

    When ``u = f(x)`` was computed from an ``x`` that requires grad, its graph is reused (no
    second encoder pass); otherwise the encoder runs again on a detached copy of ``x``."""
    K = probes.shape[1]
    with torch.autocast(x.device.type, enabled=False):
        if u is not None and x.requires_grad and u.requires_grad:
            cols = []
            for k in range(K):
                w, = torch.autograd.grad(u, x, probes[:, k], retain_graph=True, allow_unused=True)
                if w is None:      # u does not depend on x: run the encoder below
                    break
                cols.append(w)
            if len(cols) == K:
                return torch.stack(cols, dim=1)
        x0 = x.detach().requires_grad_(True)
        with torch.enable_grad():
            u0 = encoder(x0)
        expected = (probes.shape[0], probes.shape[2])                # (B, d)
        if not isinstance(u0, torch.Tensor) or tuple(u0.shape) != expected:
            raise ValueError(f"logdet_jtj: the encoder must map x {tuple(x.shape)} to u of shape "
                             f"{expected}, got "
                             f"{tuple(u0.shape) if isinstance(u0, torch.Tensor) else type(u0).__name__}")
        cols = [torch.autograd.grad(u0, x0, probes[:, k], retain_graph=k < K - 1)[0]
                for k in range(K)]
    return torch.stack(cols, dim=1)


def _tracing_or_capturing(t: torch.Tensor) -> bool:
    """True under torch.compile tracing or while a CUDA graph captures on the current stream:
    then no host synchronisation is allowed."""
    if torch.compiler.is_compiling():
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _gram_matvec(decoder, u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v (B, d, K) -> Jᵀ(J v) (B, d, K)`` without forming J: one JVP with K tangents, then K
    VJPs through one graph of the primal decoder (no gradient to the parameters is kept). A
    decoder with ``linearize`` (a plain module's tangent rules) gives the JVP from what its
    primal pass saved, without recomputing the primal row."""
    u0 = u.detach().requires_grad_(True)
    B = u0.shape[0]
    linearize = getattr(decoder, "linearize", None)
    with torch.enable_grad():
        if callable(linearize):   # the primal once; each J v then carries no primal row
            x0, lin = linearize(u0)

            def push(V):
                JV = lin(V)
                return JV.reshape(B, JV.shape[1], -1)
        else:
            x0 = decoder(u0) if not _has_fast_path(decoder) else \
                decoder.jvp_packed(u0.unsqueeze(1))[:, 0]

            def push(V):
                return _push_tangents(decoder, u0.detach(), V)[1]
        x0 = x0.reshape(B, -1)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            JV = push(v.mT)                                          # (B, K, D)
        cols = []
        # the VJPs run in the graph's dtype: under torch.autocast (this runs inside the forward
        # pass) the backward ops would otherwise see low-precision operands
        with torch.autocast(u0.device.type, enabled=False):
            for k in range(JV.shape[1]):
                g, = torch.autograd.grad(x0, u0, JV[:, k], retain_graph=True)
                cols.append(g)
        return torch.stack(cols, dim=-1)                             # (B, d, K)

    return matvec


def logdet_jtj(decoder, u: torch.Tensor, method: str = "exact", *, probes: int = 1,
               probe: str | None = None, cg_rtol: float = 1e-5, cg_max_iter: int | None = None,
               cg_check_every="auto", generator: torch.Generator | None = None,
               encoder=None, x: torch.Tensor | None = None, **gram_kwargs) -> LogdetResult:
    """Volume term of the decoder at ``u (B, d)``; see the module docstring.

    Args:
        decoder: a flow with ``jvp_packed`` (``model.decoder``; ``model.decode`` of a
            RectangularFlow takes the same fast path), a ``torch.nn.Module`` ``(B, d) -> (B, D)``
            (its tangent rules, :func:`injflow_ext.nn.tangent`), or another callable of plain
            PyTorch ops (through ``torch.func``).
        u: ``(B, d)`` latent points (may carry gradient, e.g. from an encoder).
        method: "exact", "hutchinson" or "surrogate".
        probes: probes K per sample (hutchinson and surrogate).
        probe: hutchinson: "normal" (default) or "rademacher"; surrogate: "orthonormal"
            (default; K ≤ d), "normal" or "rademacher".
        cg_rtol, cg_max_iter: CG tolerance and cap (default d iterations).
        cg_check_every: stop CG once every system converged, testing every this many
            iterations (a host synchronisation each); None: never test, run the cap.
            "auto": every iteration when running eagerly (a test costs one synchronisation,
            far less than the matvec it can save: a JVP and a VJP through the decoder), never
            while a CUDA graph is being captured or ``torch.compile`` traces (no host syncs
            there; the cap with device-side masking of converged systems).
        generator: random generator for the probes.
        encoder: surrogate: the encoder f ``(B, D) -> (B, d)``, a left inverse of the decoder
            on its manifold; default ``model.encode`` when the decoder is a RectangularFlow's.
        x: surrogate: ``(B, D)``, where f′ is taken; default ``g(u)`` (detached), the point of
            the manifold where ``f′ g′ = I`` holds exactly. Training passes the data: when
            ``u = f(x)`` was computed from this ``x`` with ``x.requires_grad``, the encoder's
            backward reuses that graph.
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
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"logdet_jtj: probes must be a positive int, got {probes!r}")
        B, d = u.shape
        K = probes
        eps = _probes(B, K, d, probe or "normal", u, generator)      # (B, K, d)
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
    if method == "surrogate":
        return _surrogate(decoder, u, probes, probe or "orthonormal", generator,
                          encoder, x)
    raise ValueError(f"logdet_jtj: method must be 'exact', 'hutchinson' or 'surrogate', got "
                     f"{method!r}")


def _surrogate(decoder, u, K, probe, generator, encoder, x) -> LogdetResult:
    """The encoder-Jacobian surrogate; see the module docstring and :func:`logdet_jtj`."""
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"logdet_jtj: probes (K per sample) must be a positive int, got "
                         f"{K!r}")
    encoder = encoder if encoder is not None else model_encoder(decoder)
    if encoder is None or not callable(encoder):
        raise TypeError("logdet_jtj: method='surrogate' needs the encoder: pass encoder=f, a "
                        "callable (B, D) -> (B, d) that is a left inverse of the decoder on its "
                        "manifold, or use a RectangularFlow's decoder (model.decoder or "
                        "model.decode), whose encoder is model.encode")
    B, d = u.shape
    v = surrogate_probes(B, K, d, probe, u, generator)               # (B, K, d)
    decoded, Jv = _push_tangents(decoder, u, v)                      # (B, D), (B, K, D)
    if x is None:
        x, u_of_x = decoded.detach(), None
    else:
        if not isinstance(x, torch.Tensor) or x.shape != decoded.shape:
            raise ValueError(f"logdet_jtj: x must be a tensor of shape {tuple(decoded.shape)} "
                             f"(B, D), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        u_of_x = u
    w = encoder_vjp(encoder, x, u_of_x, v.detach())                  # (B, K, D), constant
    value = 2 * (w * Jv).sum(-1).mean(-1)
    return LogdetResult(value, decoded, "surrogate", {})


@dataclass
class EncoderSurrogateResult:
    """What :func:`encoder_volume_surrogate` returns: ``value (B,)`` the surrogate (its value
    estimates ``tr(f′ g′)``, d where ``f′ g′ = I``), ``latent`` ``z = f(x) (B, d)`` and
    ``decoded`` ``g(z) (B, D)``, both differentiable."""

    value: torch.Tensor
    latent: torch.Tensor
    decoded: torch.Tensor


def encoder_volume_surrogate(encoder, decoder, x: torch.Tensor, probes: int = 1,
                             probe: str = "orthonormal",
                             generator: torch.Generator | None = None) -> EncoderSurrogateResult:
    """FIF's volume-change surrogate ``s = mean_k v_kᵀ f′(x) sg(g′(z) v_k)``, ``z = f(x)``.

    vislearn/FFF computes ``v_kᵀ f′(x)`` by a backward pass with ``create_graph=True`` (a
    second-order pass through the encoder); here ``f′(x) w_k`` with ``w_k = sg(g′(z) v_k)``
    comes from one tangent pass of the encoder (the same number, ``v_kᵀ (f′ w_k)``, with the
    same gradient), so first-order ops suffice: the surrogate costs the encoder at x (1 row),
    the decoder at z (1 + K rows) and the encoder again (1 + K rows), no second derivative.

    Args:
        encoder: f ``(B, D) -> (B, d)``: an ``nn.Module`` (its tangent rules), something with
            ``jvp_packed``, or a plain callable (``torch.func``).
        decoder: g ``(B, d) -> (B, D)``, the same kinds.
        x: ``(B, D)`` data (FIF: with its training noise).
        probes: K; probe: "orthonormal" (FIF's: scaled orthonormal columns, K ≤ d),
            "normal" or "rademacher".
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"encoder_volume_surrogate: x must be a tensor (B, D), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(probes, int) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"encoder_volume_surrogate: probes must be a positive int, got "
                         f"{probes!r}")
    encoder, decoder = fast_decoder(encoder, "encoder"), fast_decoder(decoder)
    z = encoder(x)
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"encoder_volume_surrogate: the encoder must map x {tuple(x.shape)} to "
                         f"(B, d), got {tuple(z.shape) if isinstance(z, torch.Tensor) else z!r}")
    B, d = z.shape
    v = surrogate_probes(B, probes, d, probe, z, generator)           # (B, K, d)
    decoded, Jv = _push_tangents(decoder, z, v)                      # (B, D), (B, K, D)
    if decoded.shape != x.shape:
        raise ValueError(f"encoder_volume_surrogate: the decoder must map z {tuple(z.shape)} back "
                         f"to the data's shape {tuple(x.shape)}, got {tuple(decoded.shape)}")
    _, Fw = _push_tangents(encoder, x, Jv.detach())                  # (B, K, d): f′(x) sg(g′ v)
    value = (v * Fw).sum(-1).mean(-1)
    return EncoderSurrogateResult(value, z, decoded)
