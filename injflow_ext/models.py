"""RectangularFlow: an injective flow ``x = h(pad(f(z)))`` (docs/design.md §1).

``z ~ N(0, I_d)`` (or independent Student-t coordinates, ``base="student-t"``), ``u = f(z)`` a
d-dimensional prior flow, ``pad`` appends ``D − d`` zeros, ``h`` a D-dimensional ambient flow.
The density of ``x`` on the manifold ``g(R^d)``, ``g = h ∘ pad``, is
``log p(x) = log p_U(u) − ½ log det(JᵀJ)`` at ``u = enc(x)`` (the first d coordinates of
``h⁻¹(x)``), ``J = ∂g/∂u`` (D × d).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._io import atomic_torch_save
from .estimators import logdet_jtj
from .nn import (
    ActNorm,
    AffineCoupling,
    Bijection,
    ElementwiseSpline,
    FixedAffine,
    Permutation,
    Reverse,
    Sequential,
)
from .nn.base import check_width
from .nn.image import LogitPixels, image_flow

__all__ = ["RectangularFlow", "default_ambient_size"]


def default_ambient_size(ambient_dim: int) -> tuple[int, tuple[int, ...]]:
    """``(layers, hidden)`` of the ambient flow h that ``injflow train`` uses by default: 8
    couplings with MLP 64-64 conditioners for D ≤ 8 (as many couplings, at a quarter of the
    cost per step, learn the low-dimensional sets as well: docs/experiments.md), else 10 with
    MLP 128×4."""
    return (8, (64, 64)) if ambient_dim <= 8 else (10, (128,) * 4)

_LOG_2PI = math.log(2 * math.pi)


class _Decoder:
    """``g = h ∘ pad`` as the estimators see it: ``__call__(u)`` and ``jvp_packed(UV)``."""

    def __init__(self, model: RectangularFlow):
        self.model = model

    def jvp_packed(self, UV: torch.Tensor) -> torch.Tensor:
        m = self.model
        pad = UV.new_zeros(*UV.shape[:-1], m.ambient_dim - m.latent_dim)
        return m.ambient.jvp_packed(torch.cat([UV, pad], dim=-1))

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.jvp_packed(u.unsqueeze(1))[:, 0]


class RectangularFlow(nn.Module):
    """Injective flow from ``R^latent_dim`` into ``R^ambient_dim`` with a density on its manifold.

    Args:
        ambient_dim: D, the data dimension.
        latent_dim: d < D, the manifold dimension.
        ambient_layers: blocks (ActNorm, AffineCoupling, Permutation) of the ambient flow h.
        ambient_hidden: hidden widths of h's coupling conditioners.
        prior_layers: blocks (ActNorm, AffineCoupling, Reverse) of the prior flow f.
        prior_hidden: hidden widths of f's conditioners.
        prior_spline_bins: when > 0, each block of f also gets an elementwise monotone spline
            with this many bins (:class:`~injflow_ext.nn.ElementwiseSpline`): for d = 1 the
            couplings have nothing to condition on and are affine, so without it the prior
            on u stays Gaussian.
        activation: conditioner activation; scale: coupling scale ("tanh" bounded, or "exp").
        actnorm: include ActNorm layers (initialised from the first training batch).
        seed: seed of the fixed permutations.
        permutation: the fixed permutation after each coupling of h: "random" (from ``seed``,
            the default) or "reverse". In D = 2 a random permutation is the identity half the
            time, so some couplings in a row transform the same coordinate; alternating them
            ("reverse") nevertheless learned worse densities (docs/experiments.md).
        base: the distribution of z: "normal" (the paper's N(0, I), the default) or
            "student-t" (independent Student-t coordinates with ``base_dof`` degrees of
            freedom: heavier tails, so that the flows need not compress exponentially to put
            density into the far ends of the latent space, e.g. the tear of a closed manifold).
        base_dof: the Student-t's degrees of freedom, a positive int (sampling sums that many
            squared normals).
        image_shape: ``(C, H, W)`` with ``C·H·W = ambient_dim``: an image model. h is then
            :func:`~injflow_ext.nn.image_flow` (``image_levels`` scales of ``ambient_layers``
            blocks of ChannelActNorm, 1 × 1 convolution and checkerboard couplings with CNN
            conditioners of widths ``image_hidden`` and ``image_activation``) instead of MLP
            couplings; encode, log_prob and loss take images ``(B, C, H, W)`` or flat
            ``(B, D)``, and decode, project, generate and sample return images.
            :meth:`for_images` builds one.
        logit_alpha: pixel data in (0, 1): h ends with :class:`~injflow_ext.nn.LogitPixels`
            (``x = (σ(y) − α)/(1 − 2α)``), after the standardisation, which then acts in logit
            space; densities stay in the pixels' units. None (default): no logit layer.
        data_shift, data_scale: optional per-feature standardisation ``x = x_std·scale + shift``
            kept as a fixed last layer of h, so that the model is trained on standardised data
            while encode/decode/log_prob/sample work in the data's own units.
    """

    def __init__(self, ambient_dim: int, latent_dim: int, *, ambient_layers: int = 10,
                 ambient_hidden: Sequence[int] = (128,) * 4, prior_layers: int = 5,
                 prior_hidden: Sequence[int] = (32,) * 2, prior_spline_bins: int = 0,
                 activation: str = "tanh",
                 scale: str = "tanh", actnorm: bool = True, seed: int = 0,
                 permutation: str = "random", base: str = "normal", base_dof: int = 3,
                 image_shape: Sequence[int] | None = None, image_levels: int = 2,
                 image_hidden: Sequence[int] = (32, 32), image_activation: str = "relu",
                 logit_alpha: float | None = None,
                 data_shift: Sequence[float] | None = None,
                 data_scale: Sequence[float] | None = None):
        super().__init__()
        for name, v in (("ambient_dim", ambient_dim), ("latent_dim", latent_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"RectangularFlow: {name} must be a positive int, got {v!r}")
        if latent_dim >= ambient_dim:
            raise ValueError(f"RectangularFlow: latent_dim must be smaller than ambient_dim "
                             f"(an injective flow maps R^d into R^D with d < D), got "
                             f"latent_dim={latent_dim}, ambient_dim={ambient_dim}")
        if permutation not in ("random", "reverse"):
            raise ValueError(f"RectangularFlow: permutation must be 'random' or 'reverse', got "
                             f"{permutation!r}")
        if base not in ("normal", "student-t"):
            raise ValueError(f"RectangularFlow: base must be 'normal' or 'student-t', got "
                             f"{base!r}")
        if isinstance(base_dof, bool) or not isinstance(base_dof, int) or base_dof < 1:
            raise ValueError(f"RectangularFlow: base_dof must be a positive int, got "
                             f"{base_dof!r}")
        if image_shape is not None:
            image_shape = tuple(int(v) for v in image_shape)
            if len(image_shape) != 3 or math.prod(image_shape) != ambient_dim:
                raise ValueError(f"RectangularFlow: image_shape must be (C, H, W) with C·H·W = "
                                 f"ambient_dim = {ambient_dim}, got {image_shape}")
        self.ambient_dim, self.latent_dim = ambient_dim, latent_dim
        self.base, self.base_dof = base, base_dof
        self.image_shape = image_shape
        self.config = dict(ambient_dim=ambient_dim, latent_dim=latent_dim,
                           ambient_layers=ambient_layers, ambient_hidden=list(ambient_hidden),
                           prior_layers=prior_layers, prior_hidden=list(prior_hidden),
                           prior_spline_bins=prior_spline_bins,
                           activation=activation, scale=scale, actnorm=actnorm, seed=seed,
                           permutation=permutation, base=base, base_dof=base_dof,
                           image_shape=None if image_shape is None else list(image_shape),
                           image_levels=image_levels, image_hidden=list(image_hidden),
                           image_activation=image_activation, logit_alpha=logit_alpha,
                           data_shift=None if data_shift is None else [float(v) for v in data_shift],
                           data_scale=None if data_scale is None else [float(v) for v in data_scale])
        D, d = ambient_dim, latent_dim
        ambient: list[Bijection] = []
        if image_shape is not None:
            ambient += list(image_flow(image_shape, levels=image_levels, couplings=ambient_layers,
                                       hidden=image_hidden, activation=image_activation,
                                       seed=seed, actnorm=actnorm).layers)
        for i in range(ambient_layers if image_shape is None else 0):
            if actnorm:
                ambient.append(ActNorm(D))
            ambient.append(AffineCoupling(D, ambient_hidden, activation, scale=scale))
            ambient.append(Reverse(D) if permutation == "reverse"
                           else Permutation(D, seed=seed + i))
        prior: list[Bijection] = []
        for _ in range(prior_layers):
            if actnorm:
                prior.append(ActNorm(d))
            prior.append(AffineCoupling(d, prior_hidden, activation, scale=scale))
            if prior_spline_bins:
                prior.append(ElementwiseSpline(d, bins=prior_spline_bins))
            prior.append(Reverse(d))
        if (data_shift is None) != (data_scale is None):
            raise ValueError("RectangularFlow: give both data_shift and data_scale, or neither")
        if data_shift is not None:
            ambient.append(FixedAffine(D, data_shift, data_scale))
        if logit_alpha is not None:
            ambient.append(LogitPixels(D, logit_alpha))
        self.ambient = Sequential(*ambient)
        self.prior = Sequential(*prior)

    @classmethod
    def for_images(cls, shape: Sequence[int], latent_dim: int, *, levels: int = 2,
                   couplings: int = 4, hidden: Sequence[int] = (32, 32),
                   activation: str = "relu", prior_layers: int = 5,
                   prior_hidden: Sequence[int] = (64, 64), **kwargs) -> RectangularFlow:
        """An image model: images ``shape = (C, H, W)`` on a ``latent_dim``-dimensional
        manifold, h a multiscale image flow (``levels`` scales of ``couplings`` blocks with CNN
        conditioners of widths ``hidden``), f an MLP flow on the latent. Other keyword
        arguments as the constructor (e.g. ``data_shift``, ``data_scale``, ``seed``)."""
        shape = tuple(int(v) for v in shape)
        return cls(math.prod(shape), latent_dim, ambient_layers=couplings, image_shape=shape,
                   image_levels=levels, image_hidden=hidden, image_activation=activation,
                   prior_layers=prior_layers, prior_hidden=prior_hidden, **kwargs)

    # ------------------------------------------------------------------ maps
    def _flat(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """``x (B, D)``, or an image model's ``(B, C, H, W)`` flattened to it."""
        if self.image_shape is not None and isinstance(x, torch.Tensor) and x.dim() == 4:
            if tuple(x.shape[1:]) != self.image_shape:
                raise ValueError(f"{op}: images must be (B, {', '.join(map(str, self.image_shape))})"
                                 f" or flat (B, {self.ambient_dim}), got {tuple(x.shape)}")
            x = x.reshape(x.shape[0], -1)
        check_width(op, x, self.ambient_dim)
        return x

    def _shaped(self, x: torch.Tensor) -> torch.Tensor:
        """An image model's ``(B, D)`` outputs as images ``(B, C, H, W)``."""
        return x if self.image_shape is None else x.reshape(x.shape[0], *self.image_shape)

    @property
    def decoder(self) -> _Decoder:
        """``g = h ∘ pad`` for :func:`injflow_ext.estimators.logdet_jtj`."""
        return _Decoder(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, D) -> u (B, d)``: the first d coordinates of ``h⁻¹(x)`` (image models also
        take ``(B, C, H, W)``)."""
        x = self._flat(x, "RectangularFlow.encode")
        return self.ambient.inverse(x)[:, :self.latent_dim]

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """``u (B, d) -> x (B, D)``: ``h(pad(u))`` (image models: ``(B, C, H, W)``)."""
        check_width("RectangularFlow.decode", u, self.latent_dim, "u")
        return self._shaped(self.decoder(u))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, D) -> g(enc(x)) (B, D)``: the point of the learned manifold that x maps to."""
        return self.decode(self.encode(x))

    def prior_log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """``log p_U(u) (B,)`` of the prior flow: ``log p_Z(f⁻¹(u)) + log|det ∂f⁻¹/∂u|``."""
        check_width("RectangularFlow.prior_log_prob", u, self.latent_dim, "u")
        z, lad = self.prior.inverse_with_logabsdet(u)
        return self.base_log_prob(z) + lad

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log p_Z(z) (B,)`` of the base distribution at ``z (B, d)``."""
        if self.base == "normal":
            return -0.5 * (z * z).sum(-1) - 0.5 * self.latent_dim * _LOG_2PI
        nu = float(self.base_dof)
        const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        return self.latent_dim * const - 0.5 * (nu + 1) * torch.log1p(z * z / nu).sum(-1)

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws ``(n, d)`` of the base distribution (Student-t as ``N / √(χ²_ν / ν)``,
        χ²_ν a sum of ν squared normals: only ``randn``, so a generator makes it repeatable)."""
        p = next(self.parameters())
        kw = dict(dtype=p.dtype, device=p.device, generator=generator)
        z = torch.randn(n, self.latent_dim, **kw)
        if self.base == "student-t":
            chi2 = torch.randn(self.base_dof, n, self.latent_dim, **kw).square().sum(0)
            z = z / torch.sqrt(chi2 / self.base_dof)
        return z

    def log_prob_and_projection(self, x: torch.Tensor, **gram_kwargs):
        """``(log p (B,), proj(x) (B, D))``: the exact on-manifold log-density of the projection
        of ``x (B, D)`` and the projection itself, from one encode and one tangent pass (image
        models: x and the projection may be ``(B, C, H, W)``, shaped like x)."""
        u = self.encode(x)
        res = logdet_jtj(self.decoder, u, "exact", **gram_kwargs)
        proj = res.decoded if x.dim() == 2 else self._shaped(res.decoded)
        return self.prior_log_prob(u) - 0.5 * res.value, proj

    def log_prob(self, x: torch.Tensor, **gram_kwargs) -> torch.Tensor:
        """Exact on-manifold log-density ``(B,)`` of the projection of ``x (B, D)``."""
        return self.log_prob_and_projection(x, **gram_kwargs)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``(n, D)`` from the model (on the learned manifold)."""
        return self.generate(self.sample_base(n, generator))

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, d) -> x (B, D) = g(f(z))``: the sampling map (prior flow, then decoder)."""
        u, _ = self.prior(z)
        return self.decode(u)

    # ------------------------------------------------------------------ training
    def parameter_groups(self) -> dict:
        """``{"ambient": [...], "prior": [...]}``: h's and f's parameters (two-step training)."""
        return {"ambient": list(self.ambient.parameters()), "prior": list(self.prior.parameters())}

    def loss(self, x: torch.Tensor, method: str = "exact", beta: float = 50.0,
             likelihood_weight: float = 1.0, *, phase: str | None = None,
             hutchinson_samples: int = 1, probe: str | None = None, cg_rtol: float = 1e-5,
             cg_max_iter: int | None = None, generator: torch.Generator | None = None) -> dict:
        """Training objective on a batch ``x (B, D)`` (a convenience over
        :mod:`injflow_ext.objectives`, which the training step uses); returns a dict of scalars:

        ``loss`` (to minimise), ``nll`` (mean ``−log p(x)`` on the manifold when the volume term
        is known, else None), ``prior_nll`` (mean ``−log p_U(u)``), ``reconstruction`` (mean
        ``‖x − g(u)‖²``) and ``logdet`` (mean ``log det JᵀJ``, None when not computed).

        method "exact" / "hutchinson" / "surrogate" (RNF-ML):
        ``w·(−log p_U(u) + ½ log det JᵀJ) + β·‖x − g(u)‖²`` with the volume term's gradient
        exact or estimated (Hutchinson + CG, or the encoder-Jacobian surrogate;
        ``hutchinson_samples`` probes per sample for both, ``probe`` their kind).
        method "two-step" (RNF-TS baseline):
        ``phase="reconstruction"`` gives ``β·‖x − g(u)‖²`` (train the ambient flow),
        ``phase="likelihood"`` gives ``−w·log p_U(sg(u))`` (train the prior flow).
        """
        from .objectives import OBJECTIVES, make_objective  # objectives build on this module

        x = self._flat(x, "RectangularFlow.loss")
        if method not in OBJECTIVES:
            raise ValueError(f"RectangularFlow.loss: method must be one of {list(OBJECTIVES)}, "
                             f"got {method!r}")
        if method == "two-step" and phase not in ("reconstruction", "likelihood"):
            raise ValueError(f"RectangularFlow.loss: method='two-step' needs "
                             f"phase='reconstruction' or 'likelihood', got {phase!r}")
        if method != "two-step" and phase is not None:
            raise ValueError(f"RectangularFlow.loss: phase is only for method='two-step', got "
                             f"phase={phase!r} with method={method!r}")
        kwargs = {"beta": beta}
        if method == "hutchinson":
            kwargs.update(samples=hutchinson_samples, probe=probe or "normal", cg_rtol=cg_rtol,
                          cg_max_iter=cg_max_iter)
        if method == "surrogate":
            kwargs.update(samples=hutchinson_samples, probe=probe or "orthonormal")
        return make_objective(method, **kwargs).loss(self, x, phase or "all", likelihood_weight,
                                                     generator)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Config and weights in one file, written atomically (temporary file + rename)."""
        from . import __version__
        atomic_torch_save({"format": "injflow_ext.RectangularFlow/1", "version": __version__,
                           "config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str, map_location="cpu") -> RectangularFlow:
        """A model saved by :meth:`save` (on the CPU by default, also from a GPU run)."""
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or "config" not in payload:
            raise ValueError(f"RectangularFlow.load: {path} is not a file written by "
                             "RectangularFlow.save")
        # in the saved dtype before loading: a float64 model loaded into float32 parameters
        # would come back rounded to float32
        model = cls(**payload["config"]).to(next(iter(payload["state_dict"].values())).dtype)
        model.load_state_dict(payload["state_dict"])
        return model
