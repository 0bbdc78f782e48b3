"""Models composed from parts: ``RectangularFlow(ambient, latent_dim, prior, base)``, the base
distributions, and the builders of today's tabular and image models."""

from .builders import default_ambient_size, for_data, from_config, images, prior_flow, tabular  # noqa: I001
from .distributions import BaseDistribution, StandardNormal, StudentT, TorchDistribution
from .rectangular import RectangularFlow

__all__ = ["RectangularFlow", "BaseDistribution", "StandardNormal", "StudentT",
           "TorchDistribution", "tabular", "images", "for_data", "from_config", "prior_flow",
           "default_ambient_size"]
