"""The training loop: Adam, likelihood warm-up, validation with early stopping, two optimisers
for the two-step baseline, atomic checkpoints every N steps and at the end, exact resume.

A run directory holds ``config.json``, ``train_log.csv``, ``checkpoint.pt`` (for ``--resume``:
model, optimisers, step, RNG states, early-stopping state) and ``model.pt`` (the best model by
validation objective, loadable with ``RectangularFlow.load`` or ``injflow_ext.load_run``).
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

from ._io import atomic_torch_save
from .evaluation import per_sample_scores
from .models import RectangularFlow

__all__ = ["TrainConfig", "Trainer", "validation_objective", "likelihood_weight"]

LOG_FIELDS = ["step", "epoch", "loss", "nll", "prior_nll", "reconstruction", "likelihood_weight",
              "steps_per_s", "val_objective", "val_log_likelihood", "val_reconstruction"]


@dataclass
class TrainConfig:
    method: str = "exact"                  # exact | hutchinson | two-step
    hutchinson_samples: int = 1
    beta: float = 50.0
    epochs: Optional[int] = 50
    steps: Optional[int] = None            # overrides epochs when set
    batch_size: int = 200
    lr: float = 1e-3
    likelihood_warmup: Optional[tuple] = None   # (start_epoch, end_epoch): weight 0 -> 1
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 500
    log_every: int = 10
    patience: int = 20                     # epochs without validation improvement
    cg_rtol: float = 1e-5
    max_nonfinite_steps: int = 20
    extra: dict = field(default_factory=dict)

    def validate(self):
        if self.method not in ("exact", "hutchinson", "two-step"):
            raise ValueError(f"method must be exact, hutchinson or two-step, got {self.method!r}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"batch_size must be >= 1 and lr > 0, got {self.batch_size}, {self.lr}")
        if self.steps is None and (self.epochs is None or self.epochs < 1):
            raise ValueError("give epochs >= 1 or steps >= 1")
        if self.likelihood_warmup is not None:
            a, b = self.likelihood_warmup
            if not 0 <= a <= b:
                raise ValueError(f"likelihood_warmup must be START END with 0 <= START <= END, "
                                 f"got {a} {b}")


def likelihood_weight(progress_epochs: float, warmup) -> float:
    """The paper's likelihood warm-up: 0 before START, linear to 1 at END (epochs)."""
    if warmup is None:
        return 1.0
    start, end = warmup
    if progress_epochs <= start:
        return 0.0
    if progress_epochs >= end:
        return 1.0
    return (progress_epochs - start) / (end - start)


def validation_objective(model: RectangularFlow, x: torch.Tensor, beta: float,
                         batch_size: int = 1000) -> dict:
    """Mean ``−log p(x) + β‖x − proj(x)‖²`` with the exact log-density, the same for every
    training method, plus its parts."""
    scores = per_sample_scores(model, x, batch_size)
    ll, rec = scores["log_likelihood"], scores["reconstruction"]
    return {"val_objective": float(np.mean(-ll + beta * rec)),
            "val_log_likelihood": float(np.mean(ll)), "val_reconstruction": float(np.mean(rec))}


class Trainer:
    """Trains a RectangularFlow on ``train`` (N, D) with validation on ``val``."""

    def __init__(self, model: RectangularFlow, train: np.ndarray, val: np.ndarray,
                 config: TrainConfig, out_dir: str, progress: bool = True):
        config.validate()
        self.cfg, self.out_dir, self.progress = config, out_dir, progress
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        dtype = next(model.parameters()).dtype
        self.train_x = torch.as_tensor(train, dtype=dtype, device=self.device)
        self.val_x = torch.as_tensor(val, dtype=dtype, device=self.device)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_x) / config.batch_size))
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.step = 0
        self.best = {"val_objective": math.inf, "epoch": -1}
        self.bad_epochs = 0
        self.stopped_early = False
        self.nonfinite_streak = 0
        self.probe_gen = torch.Generator(device=self.device).manual_seed(config.seed + 7)
        self._initialized = False
        self._build_optimizers()
        self.checkpoint_path = os.path.join(out_dir, "checkpoint.pt")
        self.model_path = os.path.join(out_dir, "model.pt")
        self.log_path = os.path.join(out_dir, "train_log.csv")
        self.elapsed = 0.0

    # ------------------------------------------------------------------ state
    def _build_optimizers(self):
        lr = self.cfg.lr
        if self.cfg.method == "two-step":
            groups = self.model.parameter_groups()
            self.optimizers = {"ambient": torch.optim.Adam(groups["ambient"], lr=lr),
                               "prior": torch.optim.Adam(groups["prior"], lr=lr)}
        else:
            self.optimizers = {"all": torch.optim.Adam(self.model.parameters(), lr=lr)}

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "model_config": self.model.config,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "step": self.step, "best": self.best, "bad_epochs": self.bad_epochs,
                "stopped_early": self.stopped_early, "elapsed": self.elapsed,
                "probe_rng": self.probe_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "train_config": asdict(self.cfg),
                "initialized": self._initialized}

    def save_checkpoint(self):
        atomic_torch_save(self.state(), self.checkpoint_path)

    def load_checkpoint(self, path: Optional[str] = None):
        st = torch.load(path or self.checkpoint_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(st["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(st["optimizers"][k])
        self.step, self.best, self.bad_epochs = st["step"], st["best"], st["bad_epochs"]
        self.stopped_early, self.elapsed = st["stopped_early"], st["elapsed"]
        self.probe_gen.set_state(st["probe_rng"].cpu() if self.device.type == "cpu"
                                 else st["probe_rng"])
        torch.set_rng_state(st["torch_rng"].cpu())
        np.random.set_state(st["numpy_rng"])
        self._initialized = st.get("initialized", True)

    # ------------------------------------------------------------------ loop
    def _batch(self, step: int) -> torch.Tensor:
        """The batch of a global step: the epoch's permutation comes from (seed, epoch), so a
        resumed run sees exactly the batches an uninterrupted run would."""
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train_x), generator=g)
        idx = perm[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size].to(self.device)
        return self.train_x[idx]

    def _train_step(self, x: torch.Tensor, weight: float) -> dict:
        cfg, m = self.cfg, self.model
        if cfg.method == "two-step":
            out = m.loss(x, "two-step", beta=cfg.beta, phase="reconstruction")
            self._apply(out["loss"], [self.optimizers["ambient"]])
            out2 = m.loss(x, "two-step", likelihood_weight=max(weight, 1e-12),
                          phase="likelihood")
            self._apply(out2["loss"], [self.optimizers["prior"]])
            out = {**out, "loss": out["loss"].detach() + out2["loss"].detach(),
                   "prior_nll": out2["prior_nll"]}
        else:
            out = m.loss(x, cfg.method, beta=cfg.beta, likelihood_weight=weight,
                         hutchinson_samples=cfg.hutchinson_samples, cg_rtol=cfg.cg_rtol,
                         generator=self.probe_gen)
            self._apply(out["loss"], [self.optimizers["all"]])
        return out

    def _apply(self, loss: torch.Tensor, optimizers):
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.nonfinite_streak += 1
            if self.nonfinite_streak > self.cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"training diverged: {self.nonfinite_streak} steps in a row with a non-finite "
                    f"loss (last at step {self.step}); the last good checkpoint is "
                    f"{self.checkpoint_path}. Lower --lr or --beta, or use float64.")
            return
        self.nonfinite_streak = 0
        loss.backward()
        for o in optimizers:
            o.step()

    def _log(self, row: dict):
        new = not os.path.exists(self.log_path)
        with open(self.log_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})

    def _truncate_log(self):
        """On resume, drop log rows written after the checkpoint's step."""
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["step"]) <= self.step]
        with open(self.log_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(keep)

    def run(self, resume: bool = False) -> dict:
        os.makedirs(self.out_dir, exist_ok=True)
        if resume:
            if not os.path.exists(self.checkpoint_path):
                raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}")
            self.load_checkpoint()
            self._truncate_log()
        elif os.path.exists(self.log_path):
            os.remove(self.log_path)
        if not self._initialized:  # data-dependent ActNorm initialisation on a large batch
            self.model.train()
            with torch.no_grad():
                n = min(len(self.train_x), 2000)
                self.model.prior_log_prob(self.model.encode(self.train_x[:n]))
            self._initialized = True
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                   dynamic_ncols=True, mininterval=0.5, desc=f"train {self.cfg.method}")
        self.model.train()
        t_last, s_last = time.perf_counter(), self.step
        t_start = time.perf_counter() - self.elapsed
        try:
            while self.step < self.total_steps and not self.stopped_early:
                epoch, i = divmod(self.step, self.steps_per_epoch)
                w = likelihood_weight(epoch + i / self.steps_per_epoch, self.cfg.likelihood_warmup)
                out = self._train_step(self._batch(self.step), w)
                self.step += 1
                bar.update(1)
                end_of_epoch = (i == self.steps_per_epoch - 1) or self.step == self.total_steps
                if self.step % self.cfg.log_every == 0 or end_of_epoch:
                    now = time.perf_counter()
                    sps = (self.step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, self.step
                    row = {"step": self.step, "epoch": epoch, "likelihood_weight": w,
                           "steps_per_s": round(sps, 3),
                           **{k: (None if out[k] is None else float(out[k].detach()))
                              for k in ("loss", "nll", "prior_nll", "reconstruction")}}
                    if end_of_epoch:
                        row.update(self._end_epoch(epoch))
                    self._log(row)
                    bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "nll", "reconstruction")
                                     if row.get(k) is not None} | {"steps/s": f"{sps:.1f}"})
                if self.step % self.cfg.checkpoint_every == 0:
                    self.elapsed = time.perf_counter() - t_start
                    self.save_checkpoint()
        except KeyboardInterrupt:
            self.elapsed = time.perf_counter() - t_start
            self.save_checkpoint()
            bar.close()
            raise
        bar.close()
        self.elapsed = time.perf_counter() - t_start
        self.save_checkpoint()
        if not os.path.exists(self.model_path):  # no validation improvement was ever recorded
            self.model.save(self.model_path)
        return {"steps": self.step, "epochs": self.step / self.steps_per_epoch,
                "wall_time_s": self.elapsed, "best_epoch": self.best["epoch"],
                "best_val_objective": self.best["val_objective"],
                "stopped_early": self.stopped_early}

    def _end_epoch(self, epoch: int) -> dict:
        val = validation_objective(self.model, self.val_x, self.cfg.beta)
        warm = self.cfg.likelihood_warmup
        comparable = warm is None or epoch + 1 >= warm[1]  # only after the warm-up ends
        if comparable and np.isfinite(val["val_objective"]):
            if val["val_objective"] < self.best["val_objective"]:
                self.best = {"val_objective": val["val_objective"], "epoch": epoch}
                self.bad_epochs = 0
                self.model.save(self.model_path)
            else:
                self.bad_epochs += 1
                if self.bad_epochs >= self.cfg.patience:
                    self.stopped_early = True
        elif not comparable:
            self.model.save(self.model_path)
        return val
