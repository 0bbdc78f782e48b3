"""Models composed from parts: ``RectangularFlow(ambient, latent_dim, prior, base)``,
``FreeFormFlow(encoder, decoder, latent_dim, base, prior)`` (both :class:`InjectiveFlow` s), the
base distributions, and the builders of today's models."""

from .builders import (  # noqa: I001
    default_ambient_size,
    for_data,
    free_form,
    free_form_images,
    from_config,
    images,
    prior_flow,
    tabular,
)
from .distributions import BaseDistribution, StandardNormal, StudentT, TorchDistribution
from .free_form import FreeFormFlow
from .injective import InjectiveFlow
from .rectangular import RectangularFlow

__all__ = ["RectangularFlow", "FreeFormFlow", "InjectiveFlow", "BaseDistribution",
           "StandardNormal", "StudentT", "TorchDistribution", "tabular", "images", "free_form",
           "free_form_images", "for_data", "from_config", "prior_flow", "default_ambient_size"]
