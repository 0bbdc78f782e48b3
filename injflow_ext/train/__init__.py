"""Training: the objectives and their registry (``objectives``), the one training step
(``step``), and for the command line the loop with its run directory (``loop``, ``runs``,
``distributed``; imported on use, not here)."""

from .fif import FifObjective  # registers "fif"
from .objectives import (
    REGISTRY,
    ExactObjective,
    HutchinsonObjective,
    Objective,
    Option,
    SurrogateObjective,
    TwoStepObjective,
    make_objective,
)
from .step import TrainStep

__all__ = ["Objective", "Option", "REGISTRY", "ExactObjective", "HutchinsonObjective",
           "SurrogateObjective", "TwoStepObjective", "FifObjective", "make_objective", "TrainStep"]
