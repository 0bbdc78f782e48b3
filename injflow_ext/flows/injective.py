"""What every injective flow of the library answers, whatever its parts: the maps between the
data ``x ∈ R^D`` (shaped ``data_shape``) and the latent ``u ∈ R^d``, the density on the
learned manifold, sampling, and persistence (docs/design.md, "The mathematics").

A subclass says how it encodes (``encode``) and decodes (``decoder``: the decoder as the
estimators see it, ``(B, d) -> (B, D)`` flat, with ``jvp_packed``) and which parameters make the
manifold (``parameter_groups``); the density ``log p(x) = log p_U(u) − ½ log det(JᵀJ)`` at
``u = encode(x)``, ``J = ∂g/∂u``, the prior flow on u and the base distribution live here once.
"""

from __future__ import annotations

import torch
from torch import nn

from .._extension import build_info
from .._io import atomic_torch_save
from ..estimators import logdet_jtj
from ..nn.base import check_width
from .distributions import as_base

__all__ = ["InjectiveFlow"]


class InjectiveFlow(nn.Module):
    """Base class of :class:`~injflow_ext.flows.RectangularFlow` and
    :class:`~injflow_ext.flows.FreeFormFlow`.

    Attributes set by the subclass's constructor (:meth:`_setup`): ``ambient_dim`` D,
    ``latent_dim`` d, ``data_shape``, ``prior`` (a Bijection of ``R^d`` or None: ``u = z``),
    ``base`` (the distribution of z), ``config`` (what :meth:`save` records; None for a model
    composed from your own parts)."""

    #: the ``format`` entry of a saved file
    model_format: str = "injflow_ext.InjectiveFlow/1"

    @staticmethod
    def _check_latent(owner: str, latent_dim, prior) -> None:
        """latent_dim a positive int; prior None or a Bijection of ``R^latent_dim``."""
        from ..nn import Bijection
        if prior is not None and not isinstance(prior, Bijection):
            raise TypeError(f"{owner}: prior must be None or an injflow_ext.nn.Bijection, got "
                            f"{type(prior).__name__}")
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"{owner}: latent_dim must be a positive int, got {latent_dim!r}")
        prior_n = getattr(prior, "n", None)
        if prior_n is not None and prior_n != latent_dim:
            raise ValueError(f"{owner}: prior must be a bijection of R^{latent_dim} "
                             f"(latent_dim), got one of R^{prior_n}")

    def _setup(self, ambient_dim: int, latent_dim: int, data_shape, prior, base) -> None:
        if latent_dim >= ambient_dim:
            raise ValueError(f"{type(self).__name__}: latent_dim must be smaller than the ambient "
                             f"dimension (an injective flow maps R^d into R^D with d < D), got "
                             f"latent_dim={latent_dim}, D={ambient_dim}")
        self.ambient_dim, self.latent_dim = ambient_dim, latent_dim
        self.data_shape = tuple(int(v) for v in data_shape) if data_shape is not None \
            else (ambient_dim,)
        self.prior = prior
        self.base = as_base(base, latent_dim)
        self.config: dict | None = None   # set by the builders: what save() records

    # ------------------------------------------------------------------ to implement
    @property
    def decoder(self):
        """g as the estimators see it: ``__call__(u (B, d)) -> (B, D)`` and
        ``jvp_packed(UV (B, 1+K, d)) -> (B, 1+K, D)``."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, D) or (B, *data_shape) -> u (B, d)``."""
        raise NotImplementedError

    def parameter_groups(self) -> dict:
        """``{"manifold": [...], "prior": [...]}``: the parameters that make the manifold and
        those of the prior flow f (what the two-step method trains in turn)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shapes
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

    # ------------------------------------------------------------------ maps and density
    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """``u (B, d) -> x (B, *data_shape)``: the decoder g."""
        check_width(f"{type(self).__name__}.decode", u, self.latent_dim, "u")
        return self._shaped(self.decoder(u))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, D) -> g(encode(x))``: the point of the learned manifold that x maps to."""
        return self.decode(self.encode(x))

    def prior_log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """``log p_U(u) (B,)``: ``log p_Z(f⁻¹(u)) + log|det ∂f⁻¹/∂u|``."""
        check_width(f"{type(self).__name__}.prior_log_prob", u, self.latent_dim, "u")
        if self.prior is None:
            return self.base.log_prob(u)
        z, lad = self.prior.inverse_with_logabsdet(u)
        return self.base.log_prob(z) + lad

    def log_prob_and_projection(self, x: torch.Tensor, **gram_kwargs):
        """``(log p (B,), proj(x))``: the exact on-manifold log-density of the projection of
        ``x (B, D)`` (the decoder's Jacobian at ``encode(x)``) and the projection itself
        (shaped like x), from one encode and one tangent pass."""
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

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation (ActNorm layers) from a batch ``x (B, D)``: one pass
        of the encoder and f⁻¹ in training mode. Layers already initialised (also by loading a
        state_dict) keep their values."""
        was_training = self.training
        self.train()
        self.prior_log_prob(self.encode(x))
        self.train(was_training)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Builder and weights in one file, written atomically (temporary file + rename)."""
        if self.config is None:
            raise ValueError(f"{type(self).__name__}.save: this model was composed from your own "
                             "parts, so a file cannot rebuild it; save model.state_dict() with "
                             "torch.save and load it into the model your code builds")
        atomic_torch_save({"format": self.model_format, "version": build_info()["version"],
                           "config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str, map_location="cpu") -> InjectiveFlow:
        """A model saved by :meth:`save` (on the CPU by default, also from a GPU run), also one
        written by an earlier version."""
        from .builders import from_config
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or "config" not in payload:
            raise ValueError(f"{cls.__name__}.load: {path} is not a file written by "
                             f"{cls.__name__}.save")
        model = from_config(payload["config"])
        if not isinstance(model, cls):
            raise ValueError(f"{cls.__name__}.load: {path} holds a {type(model).__name__}; load "
                             f"it with {type(model).__name__}.load or "
                             "injflow_ext.flows.InjectiveFlow.load")
        # in the saved dtype before loading: a float64 model loaded into float32 parameters
        # would come back rounded to float32
        model = model.to(next(iter(payload["state_dict"].values())).dtype)
        model.load_state_dict(payload["state_dict"])
        return model
