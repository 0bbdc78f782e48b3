"""The training schedule: likelihood warm-up (steps or a percentage of the run), learning-rate
schedule, gradient clipping, and the rule that early stopping and model selection wait for the
warm-up to end."""

import math

import numpy as np
import pytest
import torch

from injflow_ext import RectangularFlow
from injflow_ext.train import loop as training
from injflow_ext.train.loop import TrainConfig, Trainer, learning_rate, likelihood_weight, warmup_steps
from injflow_ext.train.step import TrainStep


def test_warmup_spec_in_steps_percentages_or_epochs():
    assert warmup_steps(("0", "25%"), 4000, 19) == (0.0, 1000.0)
    assert warmup_steps(("100", "500"), 4000, 19) == (100.0, 500.0)
    assert warmup_steps((5.0, 20.0), 4000, 40) == (200.0, 800.0)       # numbers: epochs
    assert warmup_steps(None, 4000, 19) == (0.0, 0.0)
    for bad, pattern in (((("x", "10")), "number of steps"), (("0", "150%"), "percentage"),
                         (("600", "500"), "START must not come after END"),
                         (("-3", "5"), "number of steps"), ((1,), r"\(START, END\)")):
        with pytest.raises(ValueError, match=pattern):
            warmup_steps(bad, 4000, 19)


def test_likelihood_weight_ramps_over_the_window():
    assert likelihood_weight(0, (0.0, 0.0)) == 1.0
    assert [likelihood_weight(s, (100, 300)) for s in (0, 100, 200, 300, 999)] == \
        [0.0, 0.0, 0.5, 1.0, 1.0]


def test_learning_rate_schedules():
    cfg = TrainConfig(lr=1e-3, lr_schedule="cosine", lr_warmup=100, lr_final=0.1)
    assert learning_rate(0, 1100, cfg) == pytest.approx(1e-5)
    assert learning_rate(99, 1100, cfg) == pytest.approx(1e-3)
    assert learning_rate(600, 1100, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(
        math.pi * 500 / 999))))
    assert learning_rate(1099, 1100, cfg) == pytest.approx(1e-4)
    const = TrainConfig(lr=2e-3, lr_schedule="constant")
    assert {learning_rate(s, 100, const) for s in range(100)} == {2e-3}
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step").validate()
    with pytest.raises(ValueError, match="lr_final"):
        TrainConfig(lr_final=2.0).validate()


def test_grad_clip_bounds_the_update_norm():
    torch.manual_seed(0)
    model = RectangularFlow.tabular(3, 1, ambient_layers=2, ambient_hidden=(8,), prior_layers=0,
                            actnorm=False)
    x = torch.randn(64, 3) * 5
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    orig = opt.step

    def spy(*a, **k):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return orig(*a, **k)
    opt.step = spy
    TrainStep(model, "exact", opt, grad_clip=0.01)(x)
    assert seen[0] == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainStep(model, "exact", opt, grad_clip=0.0)


def _trainer(tmp_path, **cfg):
    rng = np.random.default_rng(0)
    t = rng.uniform(-np.pi, np.pi, 400)
    x = np.stack([np.cos(t), np.sin(t)], 1)
    torch.manual_seed(0)
    model = RectangularFlow.tabular(2, 1, ambient_layers=2, ambient_hidden=(8,), prior_layers=0)
    config = TrainConfig(batch_size=100, steps=60, log_every=1000, patience=1, **cfg)
    return Trainer(model, x[:300], x[300:], config, str(tmp_path), progress=False)


def test_early_stopping_waits_for_the_warmup(tmp_path, monkeypatch):
    # every validation is worse than the last: patience 1 stops one epoch after comparisons begin
    calls = iter(range(1000))
    monkeypatch.setattr(training, "validation_objective", lambda *a, **k: {
        "val_objective": float(next(calls)), "val_log_likelihood": 0.0,
        "val_reconstruction": 0.0})
    tr = _trainer(tmp_path, likelihood_warmup=("0", "50%"), select="best")   # 3 steps per epoch, end at 30
    summary = tr.run()
    assert tr.warmup == (0.0, 30.0)
    # epochs ending at steps 3..27 are not compared; step 30 is the first (best), 33 is worse
    assert summary["stopped_early"] and summary["steps"] == 33
    assert summary["best_epoch"] == 9


def test_select_final_writes_the_last_weights_and_never_stops(tmp_path, monkeypatch):
    calls = iter(range(1000))
    monkeypatch.setattr(training, "validation_objective", lambda *a, **k: {
        "val_objective": float(next(calls)), "val_log_likelihood": 0.0,
        "val_reconstruction": 0.0})
    tr = _trainer(tmp_path)   # the defaults: final weights, cosine decay to 0
    summary = tr.run()
    assert summary["steps"] == 60 and not summary["stopped_early"]
    saved = RectangularFlow.load(tr.model_path)
    for a, b in zip(saved.state_dict().values(), tr.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert tr.optimizers["all"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
