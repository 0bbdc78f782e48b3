"""The plain-PyTorch references of a training step live in the package (so that an installed
``injflow bench`` has them): :mod:`injflow_ext.benchmarks.plain_reference`."""

from injflow_ext.benchmarks.plain_reference import *  # noqa: F401,F403
from injflow_ext.benchmarks.plain_reference import (  # noqa: F401
    encoder_surrogate,
    exact_batched,
    exact_jacfwd,
    exact_one_tangent,
    hutchinson_cg,
    mlp_tangents,
    reference_cg,
)
