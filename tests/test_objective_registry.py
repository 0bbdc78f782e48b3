"""The objective registry: a new training method is one class (subclass Objective, set
``name``) in this file alone; TrainStep, the training config and the command line take it."""

import math

import pytest
import torch

from injflow_ext import RectangularFlow, TrainStep
from injflow_ext.train.objectives import REGISTRY, ExactObjective, Objective, Option


class ReconstructionOnly(Objective):
    """A method no file of the library knows: the reconstruction term alone, with an option of
    its own."""

    name = "reconstruction-only-test"
    summary = "reconstruction alone (a test of the registry)"
    options = (*Objective.options,
               Option("power", 2.0, "exponent of the reconstruction error", type=float,
                      check=lambda v: None if v > 0 else "must be > 0"))

    def loss(self, model, x, phase="all", likelihood_weight=1.0, generator=None):
        self._check_phase(phase)
        rec = (x - model.decode(model.encode(x))).abs().pow(self.power).sum(-1)
        return {"loss": self.beta * rec.mean(), "nll": None, "prior_nll": None,
                "reconstruction": rec.mean().detach(), "logdet": None, "diagnostics": {}}


def small_model():
    torch.manual_seed(0)
    m = RectangularFlow.tabular(4, 1, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                                prior_hidden=(4,)).double()
    m.initialize(torch.randn(32, 4, dtype=torch.float64))
    return m


def test_a_new_objective_registers_by_subclassing():
    assert REGISTRY["reconstruction-only-test"] is ReconstructionOnly
    assert ReconstructionOnly.defaults() == {"beta": 50.0, "power": 2.0}
    with pytest.raises(ValueError, match="power must be > 0"):
        ReconstructionOnly(power=0.0)


def test_train_step_trains_a_new_objective_by_name():
    m = small_model()
    x = torch.randn(64, 4, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.1, 0.1],
                                                                dtype=torch.float64)
    step = TrainStep(m, "reconstruction-only-test", lr=1e-2)
    assert isinstance(step.objective, ReconstructionOnly)
    losses = [float(step(x)["loss"]) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_the_command_line_offers_a_new_objective_and_its_options(tmp_path):
    from injflow_ext.cli import build_parser
    from injflow_ext.train_options import objective_options

    args = build_parser().parse_args(["train", "--data", "von-mises", "--method",
                                      "reconstruction-only-test", "--power", "1.5"])
    assert args.method == "reconstruction-only-test"
    assert objective_options(args) == {"power": 1.5}
    # an option of another method is refused, naming the methods that take it
    args = build_parser().parse_args(["train", "--data", "von-mises", "--power", "1.5"])
    with pytest.raises(SystemExit, match="--power is not an option of --method exact; it is for "
                       "--method reconstruction-only-test"):
        objective_options(args)


def test_a_new_objective_trains_from_the_command_line(tmp_path):
    """The whole run: config, loop, checkpoint, resume and evaluation with the new method."""
    from injflow_ext.cli import main
    from injflow_ext.train.runs import read_config

    out = tmp_path / "run"
    assert main(["train", "--data", "von-mises", "--n-samples", "300", "--method",
                 "reconstruction-only-test", "--power", "1.5", "--steps", "6",
                 "--batch-size", "50", "--out", str(out), "--quiet", "--no-eval",
                 "--checkpoint-every", "3"]) == 0
    cfg = read_config(str(out))
    assert cfg["train"]["method"] == "reconstruction-only-test"
    assert cfg["train"]["objective"] == {"power": 1.5}
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--no-eval"]) == 0


def test_exact_is_the_default_method_with_its_default_options():
    assert isinstance(TrainStep(small_model()).objective, ExactObjective)
    assert ExactObjective().option_values() == {"beta": 50.0}
