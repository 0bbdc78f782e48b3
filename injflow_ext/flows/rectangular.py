"""RectangularFlow: an injective flow ``x = h(pad(f(z)))`` composed from parts handed in
(docs/design.md, "The mathematics").

``z ~ base`` (a distribution over ``R^d``), ``u = f(z)`` a d-dimensional prior flow (or the
identity), ``pad`` appends ``D − d`` zeros, ``h`` a D-dimensional ambient flow. The density of
``x`` on the manifold ``g(R^d)``, ``g = h ∘ pad``, is
``log p(x) = log p_U(u) − ½ log det(JᵀJ)`` at ``u = enc(x)`` (the first d coordinates of
``h⁻¹(x)``), ``J = ∂g/∂u`` (D × d).

The model knows its maps and its density; it is trained by an objective
(:mod:`injflow_ext.train.objectives`), and built from today's defaults by the builders of
:mod:`injflow_ext.flows.builders` (``RectangularFlow.tabular``, ``RectangularFlow.images``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._extension import build_info
from .._io import atomic_torch_save
from ..estimators import logdet_jtj
from ..nn import Bijection
from ..nn.base import check_width
from .distributions import as_base

__all__ = ["RectangularFlow", "MODEL_FORMAT"]

MODEL_FORMAT = "injflow_ext.RectangularFlow/2"


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
    """Injective flow from ``R^latent_dim`` into ``R^D`` with a density on its manifold.

    Args:
        ambient: h, any :class:`~injflow_ext.nn.Bijection` of ``R^D`` (with batched tangents:
            ``jvp_packed``); its first ``latent_dim`` inputs are the manifold's coordinates.
        latent_dim: d < D.
        prior: f, a Bijection of ``R^d``, or None (then ``u = z``).
        base: the distribution of z: None (standard normal), an
            :class:`~injflow_ext.flows.BaseDistribution` (``StandardNormal``, ``StudentT``)
            or a ``torch.distributions.Distribution`` with event shape ``(d,)``.
        data_shape: the shape of one data point, e.g. ``(C, H, W)`` for images (encode,
            log_prob take ``(B, *data_shape)`` or flat ``(B, D)``; decode, project, generate
            and sample return ``(B, *data_shape)``). Default ``(D,)``.
        ambient_dim: D, needed only when ``ambient`` does not say it (an ``n`` attribute) and
            ``data_shape`` is not given.

    A model made by a builder (:meth:`tabular`, :meth:`images`) saves and loads with
    :meth:`save` / :meth:`load`; a model composed from your own parts is rebuilt by your code
    and loads a ``state_dict``.
    """

    def __init__(self, ambient: Bijection, latent_dim: int, prior: Bijection | None = None,
                 base=None, *, data_shape: Sequence[int] | None = None,
                 ambient_dim: int | None = None):
        super().__init__()
        if not isinstance(ambient, Bijection):
            raise TypeError(f"RectangularFlow: ambient must be an injflow_ext.nn.Bijection "
                            f"(forward, inverse, jvp_packed), got {type(ambient).__name__}")
        if prior is not None and not isinstance(prior, Bijection):
            raise TypeError(f"RectangularFlow: prior must be None or an injflow_ext.nn.Bijection, "
                            f"got {type(prior).__name__}")
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"RectangularFlow: latent_dim must be a positive int, got "
                             f"{latent_dim!r}")
        D = _ambient_dim(ambient, data_shape, ambient_dim)
        if latent_dim >= D:
            raise ValueError(f"RectangularFlow: latent_dim must be smaller than the ambient "
                             f"dimension (an injective flow maps R^d into R^D with d < D), got "
                             f"latent_dim={latent_dim}, D={D}")
        prior_n = getattr(prior, "n", None)
        if prior_n is not None and prior_n != latent_dim:
            raise ValueError(f"RectangularFlow: prior must be a bijection of R^{latent_dim} "
                             f"(latent_dim), got one of R^{prior_n}")
        self.ambient_dim, self.latent_dim = D, latent_dim
        self.data_shape = tuple(int(v) for v in data_shape) if data_shape is not None else (D,)
        self.ambient = ambient
        self.prior = prior
        self.base = as_base(base, latent_dim)
        self.config: dict | None = None   # set by the builders: what save() records

    # ------------------------------------------------------------------ builders
    @classmethod
    def tabular(cls, ambient_dim: int, latent_dim: int, **sizes) -> RectangularFlow:
        """Today's tabular model (:func:`injflow_ext.flows.builders.tabular`)."""
        from .builders import tabular
        return tabular(ambient_dim, latent_dim, **sizes)

    @classmethod
    def images(cls, shape: Sequence[int], latent_dim: int, **sizes) -> RectangularFlow:
        """Today's image model (:func:`injflow_ext.flows.builders.images`)."""
        from .builders import images
        return images(shape, latent_dim, **sizes)

    # ------------------------------------------------------------------ maps
    @property
    def image_shape(self) -> tuple | None:
        """``(C, H, W)`` of an image model, else None."""
        return self.data_shape if len(self.data_shape) == 3 else None

    def _flat(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """``x (B, D)``, or ``(B, *data_shape)`` flattened to it."""
        if len(self.data_shape) > 1 and isinstance(x, torch.Tensor) and x.dim() > 2:
            if tuple(x.shape[1:]) != self.data_shape:
                raise ValueError(f"{op}: x must be (B, {', '.join(map(str, self.data_shape))})"
                                 f" or flat (B, {self.ambient_dim}), got {tuple(x.shape)}")
            x = x.reshape(x.shape[0], -1)
        check_width(op, x, self.ambient_dim)
        return x

    def _shaped(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` outputs as ``(B, *data_shape)``."""
        return x if len(self.data_shape) == 1 else x.reshape(x.shape[0], *self.data_shape)

    @property
    def decoder(self) -> _Decoder:
        """``g = h ∘ pad`` for :func:`injflow_ext.estimators.logdet_jtj`."""
        return _Decoder(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, D) -> u (B, d)``: the first d coordinates of ``h⁻¹(x)`` (also
        ``(B, *data_shape)``)."""
        x = self._flat(x, "RectangularFlow.encode")
        return self.ambient.inverse(x)[:, :self.latent_dim]

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """``u (B, d) -> x (B, *data_shape)``: ``h(pad(u))``."""
        check_width("RectangularFlow.decode", u, self.latent_dim, "u")
        return self._shaped(self.decoder(u))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, D) -> g(enc(x))``: the point of the learned manifold that x maps to."""
        return self.decode(self.encode(x))

    def prior_log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """``log p_U(u) (B,)``: ``log p_Z(f⁻¹(u)) + log|det ∂f⁻¹/∂u|``."""
        check_width("RectangularFlow.prior_log_prob", u, self.latent_dim, "u")
        if self.prior is None:
            return self.base.log_prob(u)
        z, lad = self.prior.inverse_with_logabsdet(u)
        return self.base.log_prob(z) + lad

    def log_prob_and_projection(self, x: torch.Tensor, **gram_kwargs):
        """``(log p (B,), proj(x))``: the exact on-manifold log-density of the projection of
        ``x (B, D)`` and the projection itself (shaped like x), from one encode and one
        tangent pass."""
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

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, d) -> x (B, *data_shape) = g(f(z))``: the sampling map."""
        u = z if self.prior is None else self.prior(z)[0]
        return self.decode(u)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``(n, *data_shape)`` from the model (on the learned manifold)."""
        return self.generate(self.base.sample((n,), generator))

    # ------------------------------------------------------------------ training
    def parameter_groups(self) -> dict:
        """``{"ambient": [...], "prior": [...]}``: h's and f's parameters."""
        return {"ambient": list(self.ambient.parameters()),
                "prior": [] if self.prior is None else list(self.prior.parameters())}

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation (ActNorm layers) from a batch ``x (B, D)``: one pass
        through h⁻¹ and f⁻¹ in training mode. Layers already initialised (also by loading a
        state_dict) keep their values."""
        was_training = self.training
        self.train()
        self.prior_log_prob(self.encode(x))
        self.train(was_training)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Builder and weights in one file, written atomically (temporary file + rename)."""
        if self.config is None:
            raise ValueError("RectangularFlow.save: this model was composed from your own parts, "
                             "so a file cannot rebuild it; save model.state_dict() with "
                             "torch.save and load it into the model your code builds")
        atomic_torch_save({"format": MODEL_FORMAT, "version": build_info()["version"],
                           "config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str, map_location="cpu") -> RectangularFlow:
        """A model saved by :meth:`save` (on the CPU by default, also from a GPU run), also one
        written by an earlier version."""
        from .builders import from_config
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or "config" not in payload:
            raise ValueError(f"RectangularFlow.load: {path} is not a file written by "
                             "RectangularFlow.save")
        # in the saved dtype before loading: a float64 model loaded into float32 parameters
        # would come back rounded to float32
        model = from_config(payload["config"]).to(next(iter(payload["state_dict"].values())).dtype)
        model.load_state_dict(payload["state_dict"])
        return model


def _ambient_dim(ambient, data_shape, ambient_dim) -> int:
    """D from the ambient flow's width, the data shape or the argument, which must agree."""
    known = {}
    if getattr(ambient, "n", None) is not None:
        known["ambient.n"] = int(ambient.n)
    if data_shape is not None:
        known["prod(data_shape)"] = math.prod(int(v) for v in data_shape)
    if ambient_dim is not None:
        known["ambient_dim"] = ambient_dim
    if not known:
        raise ValueError("RectangularFlow: the ambient dimension D is unknown (the ambient flow "
                         "has no attribute n); pass ambient_dim=D or data_shape")
    if len(set(known.values())) > 1:
        raise ValueError(f"RectangularFlow: the ambient dimension must agree, got "
                         f"{', '.join(f'{k}={v}' for k, v in known.items())}")
    D = next(iter(known.values()))
    if isinstance(D, bool) or not isinstance(D, int) or D < 2:
        raise ValueError(f"RectangularFlow: the ambient dimension must be an int >= 2, got {D!r}")
    return D
