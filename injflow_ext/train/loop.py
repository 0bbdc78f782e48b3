"""The training loop: Adam, likelihood warm-up, validation with early stopping, two optimisers
for the two-step baseline, atomic checkpoints every N steps and at the end, exact resume.

A run directory holds ``config.json``, ``train_log.csv``, ``checkpoint.pt`` (for ``--resume``:
model, optimisers, step, RNG states, early-stopping state) and ``model.pt`` (the best model by
validation objective, loadable with ``InjectiveFlow.load`` or ``injflow_ext.load_run``).

Under ``torchrun`` (several processes) the step runs through DistributedDataParallel: every rank
takes its share of the same global batch (``distributed.shard``), metrics are reduced over the
ranks, and only rank 0 writes the run directory; see ``injflow_ext.train.distributed``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .._io import atomic_text, writing
from ..evaluate.evaluation import per_sample_scores
from ..flows import InjectiveFlow
from .distributed import DistContext, shard
from .objectives import BETA, Objective, make_objective, objective_class
from .preemption import Stopped, StopSignals
from .runs import RunDir, load_checkpoint, numpy_rng_state, save_checkpoint, set_numpy_rng_state
from .step import MODES, PRECISIONS, TrainStep, captures, default_optimizers, resolve_mode

__all__ = ["TrainConfig", "Trainer", "validation_objective", "likelihood_weight",
           "warmup_steps", "learning_rate"]

LOG_FIELDS = ["step", "epoch", "loss", "nll", "prior_nll", "reconstruction", "likelihood_weight",
              "lr", "steps_per_s", "val_objective", "val_log_likelihood", "val_reconstruction"]


@dataclass
class TrainConfig:
    """How a run trains: the method (a registered objective) with its options, and the loop's
    schedule. Every default of the loop is written here once; the objective's defaults are its
    options' (:mod:`injflow_ext.train.objectives`)."""

    method: str = "exact"                  # a registered objective (objectives.REGISTRY)
    objective: dict = field(default_factory=dict)   # its options; the rest take their defaults
    epochs: int | None = 50
    steps: int | None = None            # overrides epochs when set
    batch_size: int = 200
    lr: float = 1e-3
    # (START, END): the likelihood weight ramps 0 -> 1 from START to END; each a number of
    # steps as a string ("500"), a percentage of the run ("25%"), or a number (epochs)
    likelihood_warmup: tuple | None = None
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 500
    log_every: int = 10
    patience: int = 20                     # epochs without validation improvement
    select: str = "final"                  # model.pt: final | best (see Trainer._end_epoch)
    lr_schedule: str = "cosine"            # cosine (decay to lr_final · lr) | constant
    lr_warmup: int = 0                     # steps of linear learning-rate warm-up from 0
    lr_final: float = 0.0                  # cosine: the last step's fraction of lr
    grad_clip: float | None = None         # largest gradient norm (TrainStep.grad_clip)
    max_nonfinite_steps: int = 20
    step_mode: str = "auto"                # auto | eager | compiled | captured (train.step)
    precision: str | None = None           # None | float32 | tf32: the step's float32 GEMMs
    extra: dict = field(default_factory=dict)

    def validate(self):
        objective_of(self)   # the method is registered and takes these options
        if self.step_mode not in ("auto", *MODES):
            raise ValueError(f"step_mode must be auto, eager, compiled or captured, got "
                             f"{self.step_mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be float32 or tf32, got {self.precision!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"batch_size must be >= 1 and lr > 0, got {self.batch_size}, {self.lr}")
        if self.steps is None and (self.epochs is None or self.epochs < 1):
            raise ValueError("give epochs >= 1 or steps >= 1")
        if self.likelihood_warmup is not None:
            warmup_steps(self.likelihood_warmup, 1000, 10)   # checks the spec
        if self.select not in ("best", "final"):
            raise ValueError(f"select must be best or final, got {self.select!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.lr_warmup < 0 or not 0 <= self.lr_final <= 1:
            raise ValueError(f"lr_warmup must be >= 0 and lr_final in [0, 1], got "
                             f"{self.lr_warmup}, {self.lr_final}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """The config a run's ``config.json`` (``"train"``) holds, also one written by an
        earlier version: before ``select`` and ``lr_schedule`` existed (those runs trained with
        "best" and "constant"), or before the objective options moved into ``objective``
        (``hutchinson_samples``, ``probe``, ``surrogate_noise``, ``cg_rtol`` and ``beta`` at the
        top level)."""
        saved = dict(saved)
        # runs written before these options existed trained with these
        saved.setdefault("select", "best")
        saved.setdefault("lr_schedule", "constant")
        legacy = {k: saved.pop(k) for k in ("hutchinson_samples", "probe", "surrogate_noise",
                                            "cg_rtol", "beta") if k in saved}
        if legacy:
            renamed = {"hutchinson_samples": "probes", "surrogate_noise": "noise"}
            declared = objective_class(saved.get("method", cls.method)).defaults()
            options = {renamed.get(k, k): v for k, v in legacy.items()}
            saved["objective"] = {k: v for k, v in options.items()
                                  if k in declared and v is not None}
        if saved.get("likelihood_warmup"):
            saved["likelihood_warmup"] = tuple(saved["likelihood_warmup"])
        return cls(**saved)


def objective_of(cfg: TrainConfig) -> Objective:
    """The training objective a config names (its method and options)."""
    return make_objective(cfg.method, **cfg.objective)


def _warmup_point(value, total_steps: int, steps_per_epoch: int) -> float:
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                frac = float(text[:-1]) / 100
                if not 0 <= frac <= 1:
                    raise ValueError
                return frac * total_steps
            steps = int(text)
            if steps < 0:
                raise ValueError
            return float(steps)
        except ValueError:
            raise ValueError(f"likelihood_warmup: expected a number of steps (e.g. 500) or a "
                             f"percentage of the run from 0% to 100% (e.g. 25%), got {value!r}"
                             ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"likelihood_warmup: expected steps as a string, a percentage or a "
                         f"number of epochs >= 0, got {value!r}")
    return float(value) * steps_per_epoch     # a number: epochs


def warmup_steps(spec, total_steps: int, steps_per_epoch: int) -> tuple[float, float]:
    """``(start, end)`` in steps of a likelihood warm-up ``spec = (START, END)``: each a string
    of steps ("500"), a percentage of the run ("25%"), or a number of epochs (5.0)."""
    if spec is None:
        return 0.0, 0.0
    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise ValueError(f"likelihood_warmup must be (START, END), got {spec!r}")
    start, end = (_warmup_point(v, total_steps, steps_per_epoch) for v in spec)
    if start > end:
        raise ValueError(f"likelihood_warmup: START must not come after END, got {spec[0]} "
                         f"({start:g} steps) and {spec[1]} ({end:g} steps)")
    return start, end


def likelihood_weight(step: float, window: tuple[float, float]) -> float:
    """The paper's likelihood warm-up: 0 until step ``window[0]``, linear to 1 at
    ``window[1]`` (steps; :func:`warmup_steps`)."""
    start, end = window
    if step >= end:
        return 1.0
    if step <= start:
        return 0.0
    return (step - start) / (end - start)


def learning_rate(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of ``step`` (0-based): linear warm-up from 0 over ``cfg.lr_warmup``
    steps, then constant, or cosine decay to ``cfg.lr_final · cfg.lr`` at the last step."""
    if cfg.lr_warmup and step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(total_steps - 1 - cfg.lr_warmup, 1)
    t = min(max(step - cfg.lr_warmup, 0) / span, 1.0)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t)))


def validation_objective(model: InjectiveFlow, x: torch.Tensor, beta: float,
                         batch_size: int = 1000, dist: DistContext | None = None) -> dict:
    """Mean ``−log p(x) + β‖x − proj(x)‖²`` over ``x`` (N, D) with the exact log-density, the
    same for every training method, plus its parts. With a distributed ``dist`` each rank scores
    its share of ``x`` and the means are over all of it."""
    dist = dist or DistContext()
    start, stop = shard(len(x), dist.rank, dist.world_size)
    sums = {"objective": 0.0, "ll": 0.0, "rec": 0.0, "n": float(stop - start)}
    if stop > start:
        scores = per_sample_scores(model, x[start:stop], batch_size)
        ll, rec = scores["log_likelihood"], scores["reconstruction"]
        sums.update(objective=float(np.sum(-ll + beta * rec)), ll=float(np.sum(ll)),
                    rec=float(np.sum(rec)))
    sums = dist.sum(sums)
    n = max(sums["n"], 1.0)
    return {"val_objective": sums["objective"] / n, "val_log_likelihood": sums["ll"] / n,
            "val_reconstruction": sums["rec"] / n}


class Trainer:
    """Trains an injective flow (RectangularFlow, FreeFormFlow) on ``train`` (N, D), validating
    on ``val``.

    ``dist``: the process group of a multi-process run (``distributed.init_from_env``); by
    default a single process on ``config.device``. ``config.batch_size`` is the global batch."""

    def __init__(self, model: InjectiveFlow, train: np.ndarray, val: np.ndarray,
                 config: TrainConfig, out_dir: str, progress: bool = True,
                 dist: DistContext | None = None):
        config.validate()
        self.dist = dist or DistContext(device=torch.device(config.device))
        self.cfg, self.out_dir = config, out_dir
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device if self.dist.enabled else torch.device(config.device)
        self.model = model.to(self.device)
        dtype = next(model.parameters()).dtype
        self.train_x = torch.as_tensor(train, dtype=dtype, device=self.device)
        self.val_x = torch.as_tensor(val, dtype=dtype, device=self.device)
        self.objective = objective_of(config)
        self.step_mode = resolve_mode(config.step_mode, self.device, self.objective,
                                      distributed=self.dist.enabled)
        if self.step_mode == "captured" and self.dist.enabled:
            raise ValueError("step_mode 'captured' is for a single process; under torchrun use "
                             "'compiled' or 'eager' (or 'auto')")
        self.captured = captures(self.step_mode, self.device)
        if self.captured and len(self.train_x) > config.batch_size:
            # a captured step has one batch shape: the last partial batch of an epoch is dropped
            self.steps_per_epoch = len(self.train_x) // config.batch_size
            self.dropped_per_epoch = len(self.train_x) % config.batch_size
        else:
            self.steps_per_epoch = max(1, math.ceil(len(self.train_x) / config.batch_size))
            self.dropped_per_epoch = 0
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.warmup = warmup_steps(config.likelihood_warmup, self.total_steps,
                                   self.steps_per_epoch)
        self.step = 0
        self.best = {"val_objective": math.inf, "epoch": -1}
        self.bad_epochs = 0
        self.stopped_early = False
        self._streak = torch.zeros((), dtype=dtype, device=self.device)  # skipped steps in a row
        self.probe_gen = torch.Generator(device=self.device)
        self._initialized = False
        self.train_step = None   # the TrainStep, built in run() (after a resumed state is loaded)
        self._build_optimizers()
        run = RunDir(out_dir)
        self.checkpoint_path, self.model_path, self.log_path = run.checkpoint, run.model, run.log
        self.elapsed = 0.0

    # ------------------------------------------------------------------ state
    def _build_optimizers(self):
        """The step's optimisers (:func:`~injflow_ext.train.step.default_optimizers`), built
        before the step so that a resumed run loads their state first."""
        self.optimizers = default_optimizers(self.objective, self.model, self.cfg.lr,
                                             self.captured)

    def _set_learning_rate(self, value: float) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(value)
                else:
                    group["lr"] = value

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "model_config": self.model.config,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "step": self.step, "best": self.best, "bad_epochs": self.bad_epochs,
                "stopped_early": self.stopped_early, "elapsed": self.elapsed,
                "world_size": self.dist.world_size, "torch_rng": torch.get_rng_state(),
                "numpy_rng": numpy_rng_state(), "train_config": asdict(self.cfg),
                "initialized": self._initialized}

    def save_checkpoint(self):
        """Write ``checkpoint.pt`` atomically (rank 0 only; the ranks hold identical states)."""
        if self.dist.is_main:
            save_checkpoint(self.state(), self.checkpoint_path)

    def _save_model(self):
        if self.dist.is_main:
            self.model.save(self.model_path)

    def load_checkpoint(self, path: str | None = None):
        st = load_checkpoint(path or self.checkpoint_path, map_location=self.device)
        self.model.load_state_dict(st["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(st["optimizers"][k])
        self.step, self.best, self.bad_epochs = st["step"], st["best"], st["bad_epochs"]
        self.stopped_early, self.elapsed = st["stopped_early"], st["elapsed"]
        torch.set_rng_state(st["torch_rng"].cpu())
        set_numpy_rng_state(st["numpy_rng"])
        self._initialized = st.get("initialized", True)

    # ------------------------------------------------------------------ loop
    def _batch(self, step: int):
        """This rank's share of the global batch of ``step`` and its loss weight
        ``n_rank · world_size / n`` (1 for a single process; see ``injflow_ext.train.distributed``).

        The epoch's permutation comes from (seed, epoch), so a resumed run, with any number of
        ranks, sees exactly the batches an uninterrupted run would."""
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train_x), generator=g)
        idx = perm[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        start, stop = shard(len(idx), self.dist.rank, self.dist.world_size)
        if stop == start:  # an empty share still takes part in the gradient average, weighted 0
            return self.train_x[idx[:1].to(self.device)], 0.0
        weight = (stop - start) * self.dist.world_size / len(idx)
        return self.train_x[idx[start:stop].to(self.device)], weight

    def _build_train_step(self) -> TrainStep:
        wrap = None
        if self.dist.enabled:
            # two-step trains the ambient and the prior flow in separate backward passes, each
            # leaving the other flow's parameters without gradients
            def wrap(module):
                return DistributedDataParallel(
                    module,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=len(self.objective.phases) > 1)
        example = self.train_x[:min(self.cfg.batch_size, len(self.train_x))]
        return TrainStep(self.model, self.objective, self.optimizers, mode=self.step_mode,
                         example_x=example if self.captured else None, wrap=wrap,
                         precision=self.cfg.precision, grad_clip=self.cfg.grad_clip)

    def _seed_probes(self):
        """Hutchinson probes from (seed, step, rank): reproducible on resume with any world size,
        independent across ranks."""
        self.probe_gen.manual_seed(((self.cfg.seed + 7) * 1_000_003 + self.step) * 4096
                                   + self.dist.rank)

    def _train_step(self, x: torch.Tensor, weight: float, share: float = 1.0) -> dict:
        generator = None
        if self.step_mode == "eager":   # compiled code draws from the default generator
            self._seed_probes()
            generator = self.probe_gen
        out = self.train_step(x, likelihood_weight=weight, loss_scale=share, generator=generator)
        skipped = out["skipped"]
        self._streak = (self._streak + skipped) * skipped   # on the device: no synchronisation
        return out

    def _check_divergence(self):
        """Raise when more than ``max_nonfinite_steps`` steps in a row were skipped (read at
        log time, so the step loop never waits for the device)."""
        streak = int(self._streak)
        if streak > self.cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"training diverged: {streak} steps in a row with a non-finite "
                f"loss or gradient (up to step {self.step}); the last good checkpoint is "
                f"{self.checkpoint_path}. Lower --lr or --beta, or use float64.")

    def _log(self, row: dict):
        if not self.dist.is_main:
            return
        new = not os.path.exists(self.log_path)
        with writing(self.log_path), open(self.log_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})

    def _truncate_log(self):
        """On resume, drop log rows written after the checkpoint's step."""
        if not self.dist.is_main or not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["step"]) <= self.step]
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=LOG_FIELDS, lineterminator="\r\n")
        w.writeheader()
        w.writerows(keep)
        atomic_text(text.getvalue(), self.log_path)

    def run(self, resume: bool = False) -> dict:
        os.makedirs(self.out_dir, exist_ok=True)
        if resume:
            if not os.path.exists(self.checkpoint_path):
                raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}")
            self.load_checkpoint()
            self._truncate_log()
        elif os.path.exists(self.log_path) and self.dist.is_main:
            os.remove(self.log_path)
        if not self._initialized:  # data-dependent ActNorm initialisation on a large batch
            self.model.initialize(self.train_x[:min(len(self.train_x), 2000)])
            self._initialized = True
        self.train_step = self._build_train_step()
        if self.progress and self.dropped_per_epoch:
            print(f"injflow: captured step: the last {self.dropped_per_epoch} samples of each "
                  f"epoch's shuffle are dropped (one batch shape)", flush=True)
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                   dynamic_ncols=True, mininterval=0.5, desc=f"train {self.cfg.method}")
        self.model.train()
        t_start = time.perf_counter() - self.elapsed
        stop = StopSignals()
        try:
            with stop:
                self._loop(stop, bar, t_start)
        except KeyboardInterrupt:   # outside the main thread, Ctrl-C is still an exception
            self.elapsed = time.perf_counter() - t_start
            self.save_checkpoint()
            bar.close()
            raise
        bar.close()
        self.elapsed = time.perf_counter() - t_start
        self.save_checkpoint()
        if self.cfg.select == "final" or not os.path.exists(self.model_path):
            self._save_model()   # the final weights (or no validation improvement was recorded)
        self.dist.barrier()  # rank 0's files are complete before any rank returns
        return {"steps": self.step, "epochs": self.step / self.steps_per_epoch,
                "wall_time_s": self.elapsed, "best_epoch": self.best["epoch"],
                "best_val_objective": self.best["val_objective"],
                "stopped_early": self.stopped_early}

    def _stop_requested(self, stop: StopSignals, log_step: bool) -> int | None:
        """The signal to stop on after this step, or None. A single process stops at the step
        its signal arrived in; under torchrun the ranks agree at log steps (where they
        synchronise anyway), so that all stop at the same step."""
        if not self.dist.enabled:
            return stop.received
        if not log_step:
            return None
        agreed = self.dist.sum({"ranks": 1.0 if stop.received else 0.0,
                                "signum": float(stop.received or 0)})
        if agreed["ranks"] == 0:
            return None
        return stop.received or round(agreed["signum"] / agreed["ranks"])

    def _loop(self, stop: StopSignals, bar, t_start: float) -> None:
        """The training steps until the end of the run, early stopping or a stop signal
        (then :class:`Stopped` after the checkpoint)."""
        t_last, s_last = time.perf_counter(), self.step
        while self.step < self.total_steps and not self.stopped_early:
            epoch, i = divmod(self.step, self.steps_per_epoch)
            w = likelihood_weight(self.step, self.warmup)
            lr = learning_rate(self.step, self.total_steps, self.cfg)
            self._set_learning_rate(lr)
            x, share = self._batch(self.step)
            out = self._train_step(x, w, share)
            self.step += 1
            bar.update(1)
            end_of_epoch = (i == self.steps_per_epoch - 1) or self.step == self.total_steps
            if self.step % self.cfg.log_every == 0 or end_of_epoch:
                now = time.perf_counter()
                sps = (self.step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, self.step
                self._check_divergence()
                row = {"step": self.step, "epoch": epoch, "likelihood_weight": w, "lr": lr,
                       "steps_per_s": round(sps, 3), **self._batch_metrics(out, share)}
                if end_of_epoch:
                    row.update(self._end_epoch(epoch))
                self._log(row)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "nll", "reconstruction")
                                 if row.get(k) is not None} | {"steps/s": f"{sps:.1f}"})
            if self.step % self.cfg.checkpoint_every == 0:
                self.elapsed = time.perf_counter() - t_start
                self.save_checkpoint()
            log_step = self.step % self.cfg.log_every == 0 or end_of_epoch
            signum = self._stop_requested(stop, log_step)
            if signum is not None and self.step < self.total_steps:
                self.elapsed = time.perf_counter() - t_start
                self.save_checkpoint()
                self.dist.barrier()   # rank 0's checkpoint is complete before any rank exits
                bar.close()
                raise Stopped(signum, self.step, self.checkpoint_path)

    def _batch_metrics(self, out: dict, share: float) -> dict:
        """The step's loss and its parts, averaged over the global batch (all ranks)."""
        keys = [k for k in ("loss", "nll", "prior_nll", "reconstruction")
                if out.get(k) is not None]
        local = {k: float(out[k].detach()) * share if share else 0.0 for k in keys}
        reduced = self.dist.sum(local)
        return {k: reduced[k] / self.dist.world_size if k in reduced else None
                for k in ("loss", "nll", "prior_nll", "reconstruction")}

    def _end_epoch(self, epoch: int) -> dict:
        """Validation at the end of an epoch. Epochs that end before the likelihood warm-up
        does are not compared (their objective lacks the likelihood it will have) and never
        count towards early stopping; ``model.pt`` follows the training until then. After it,
        ``select="best"`` keeps the best validation objective in ``model.pt`` and stops after
        ``patience`` epochs without improvement; ``select="final"`` writes the final weights
        (:meth:`run`)."""
        beta = getattr(self.objective, "beta", BETA.default)
        val = validation_objective(self.model, self.val_x, beta, dist=self.dist)
        comparable = self.step >= self.warmup[1]
        if self.cfg.select == "final":
            return val
        if comparable and np.isfinite(val["val_objective"]):
            if val["val_objective"] < self.best["val_objective"]:
                self.best = {"val_objective": val["val_objective"], "epoch": epoch}
                self.bad_epochs = 0
                self._save_model()
            else:
                self.bad_epochs += 1
                if self.bad_epochs >= self.cfg.patience:
                    self.stopped_early = True
        elif not comparable:
            self._save_model()
        return val
