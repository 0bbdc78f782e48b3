"""Base distributions of the latent ``z`` of a flow, as modules that follow the model's device
and dtype (``model.to(...)``, ``model.double()``), and the adapter that lets a
``torch.distributions.Distribution`` serve as a base.

A base answers ``log_prob(z (B, d)) -> (B,)``, ``sample(shape, generator=None) -> (*shape, d)``
and ``rsample``; ``event_shape == (d,)``. The library's bases take a ``torch.Generator``, so a
seeded draw repeats; a wrapped ``torch.distributions`` object draws from torch's global
generator (it has no generator argument) and stays on the device it was built on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BaseDistribution", "StandardNormal", "StudentT", "TorchDistribution", "as_base"]

_LOG_2PI = math.log(2 * math.pi)


def _sample_shape(shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(v) for v in shape)


class BaseDistribution(nn.Module):
    """A distribution over ``R^dim``; subclasses implement ``log_prob`` and ``rsample``.

    It holds no parameters and no state_dict entries: a model's saved weights do not depend on
    its base (a non-persistent anchor buffer only carries the device and dtype)."""

    def __init__(self, dim: int):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([self.dim])

    def _randn(self, shape, generator):
        return torch.randn(shape, dtype=self._anchor.dtype, device=self._anchor.device,
                           generator=generator)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``z (..., dim) -> (...)``."""
        raise NotImplementedError

    def rsample(self, shape=(), generator: torch.Generator | None = None) -> torch.Tensor:
        """``(*shape, dim)`` draws, differentiable in the distribution's parameters (none here)."""
        raise NotImplementedError

    def sample(self, shape=(), generator: torch.Generator | None = None) -> torch.Tensor:
        """``(*shape, dim)`` draws."""
        with torch.no_grad():
            return self.rsample(shape, generator)

    def from_standard_normal(self, w):
        """The variates ``z (N, dim)`` (numpy) with the quantiles of standard normal
        ``w (N, dim)``: how quadrature over the normal (the chart KL's) reaches this base."""
        raise NotImplementedError(f"{type(self).__name__} has no quantile map from the standard "
                                  "normal; the chart KL needs one (from_standard_normal)")

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class StandardNormal(BaseDistribution):
    """``N(0, I_dim)``, the paper's base."""

    def from_standard_normal(self, w):
        return w

    def log_prob(self, z):
        return -0.5 * (z * z).sum(-1) - 0.5 * self.dim * _LOG_2PI

    def rsample(self, shape=(), generator=None):
        return self._randn((*_sample_shape(shape), self.dim), generator)


class StudentT(BaseDistribution):
    """Independent Student-t coordinates with ``dof`` degrees of freedom: heavier tails than
    the normal, so that the flows need not compress exponentially to put density into the far
    ends of the latent space (e.g. the tear of a closed manifold; docs/experiments.md).

    Draws are ``N / √(χ²_ν / ν)`` with χ²_ν a sum of ν squared normals: only ``randn``, so a
    generator makes them repeatable; hence ``dof`` is a positive int."""

    def __init__(self, dim: int, dof: int = 3):
        super().__init__(dim)
        if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
            raise ValueError(f"StudentT: dof must be a positive int, got {dof!r}")
        self.dof = dof

    def log_prob(self, z):
        nu = float(self.dof)
        const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        return self.dim * const - 0.5 * (nu + 1) * torch.log1p(z * z / nu).sum(-1)

    def rsample(self, shape=(), generator=None):
        shape = (*_sample_shape(shape), self.dim)
        z = self._randn(shape, generator)
        chi2 = self._randn((self.dof, *shape), generator).square().sum(0)
        return z / torch.sqrt(chi2 / self.dof)

    def from_standard_normal(self, w):
        """``F_t⁻¹(Φ(w))``, through the upper tail for w > 0 so that far quantiles keep their
        precision."""
        import numpy as np
        from scipy.stats import norm, t
        return np.where(w < 0, t.ppf(norm.cdf(w), self.dof), t.isf(norm.sf(w), self.dof))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dof={self.dof}"


class TorchDistribution(BaseDistribution):
    """A ``torch.distributions.Distribution`` with ``event_shape == (dim,)`` as a base.

    It draws from torch's global generator: a ``generator`` argument is refused rather than
    ignored. The distribution's tensors stay where they were built; build it on the model's
    device and in its dtype."""

    def __init__(self, distribution: torch.distributions.Distribution):
        shape = tuple(distribution.event_shape)
        if len(shape) != 1 or tuple(distribution.batch_shape) != ():
            raise ValueError(f"base: a torch.distributions object must have event_shape (d,) "
                             f"and batch_shape () (wrap a per-coordinate one in "
                             f"torch.distributions.Independent(..., 1)), got event_shape "
                             f"{shape} and batch_shape {tuple(distribution.batch_shape)}")
        super().__init__(shape[0])
        self.distribution = distribution

    def log_prob(self, z):
        return self.distribution.log_prob(z)

    def rsample(self, shape=(), generator=None):
        if generator is not None:
            raise ValueError(f"{type(self.distribution).__name__} (a torch.distributions base) "
                             "draws from torch's global generator and takes no generator; seed "
                             "it with torch.manual_seed, or pass generator=None")
        shape = torch.Size(_sample_shape(shape))
        if self.distribution.has_rsample:
            return self.distribution.rsample(shape)
        return self.distribution.sample(shape)

    def extra_repr(self) -> str:
        return repr(self.distribution)


def as_base(base, dim: int) -> BaseDistribution:
    """``base`` as a :class:`BaseDistribution` over ``R^dim``: None (standard normal), a
    BaseDistribution, or a ``torch.distributions.Distribution`` with event shape ``(dim,)``."""
    if base is None:
        return StandardNormal(dim)
    if isinstance(base, torch.distributions.Distribution):
        base = TorchDistribution(base)
    if not isinstance(base, BaseDistribution):
        if isinstance(base, str):
            raise TypeError(f"base must be a distribution object, got the string {base!r}: use "
                            "injflow_ext.flows.StandardNormal(d) or StudentT(d, dof)")
        raise TypeError(f"base must be None, an injflow_ext.flows.BaseDistribution or a "
                        f"torch.distributions.Distribution with event_shape (d,), got "
                        f"{type(base).__name__}")
    if base.dim != dim:
        raise ValueError(f"base: a distribution over R^{dim} (the latent dimension) is needed, "
                         f"got one over R^{base.dim}")
    return base
