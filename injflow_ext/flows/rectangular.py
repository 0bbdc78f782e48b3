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

from ..nn import Bijection
from .injective import InjectiveFlow

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


class RectangularFlow(InjectiveFlow):
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
    and loads a ``state_dict``. The density, sampling and persistence are
    :class:`~injflow_ext.flows.InjectiveFlow`'s.
    """

    model_format = MODEL_FORMAT

    def __init__(self, ambient: Bijection, latent_dim: int, prior: Bijection | None = None,
                 base=None, *, data_shape: Sequence[int] | None = None,
                 ambient_dim: int | None = None):
        super().__init__()
        if not isinstance(ambient, Bijection):
            raise TypeError(f"RectangularFlow: ambient must be an injflow_ext.nn.Bijection "
                            f"(forward, inverse, jvp_packed), got {type(ambient).__name__}")
        self._check_latent("RectangularFlow", latent_dim, prior)
        D = _ambient_dim(ambient, data_shape, ambient_dim)
        self.ambient = ambient
        self._setup(D, latent_dim, data_shape, prior, base)

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
    def decoder(self) -> _Decoder:
        """``g = h ∘ pad`` for :func:`injflow_ext.estimators.logdet_jtj`."""
        return _Decoder(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, D) -> u (B, d)``: the first d coordinates of ``h⁻¹(x)`` (also
        ``(B, *data_shape)``)."""
        x = self._flat(x, "RectangularFlow.encode")
        return self.ambient.inverse(x)[:, :self.latent_dim]

    def parameter_groups(self) -> dict:
        """``{"manifold": [...], "prior": [...]}``: h's and f's parameters."""
        return {"manifold": list(self.ambient.parameters()),
                "prior": [] if self.prior is None else list(self.prior.parameters())}


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
