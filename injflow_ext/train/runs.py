"""The run directory of ``injflow train``, in one place: its files, reading them with errors that
name the file and say what to do, and loading its model.

    RUN/config.json      what was trained and how (data, model, training config, build)
    RUN/checkpoint.pt    the full training state for --resume (tensors and plain containers
                         only, read with torch.load(weights_only=True))
    RUN/model.pt         the best model by validation objective (InjectiveFlow.save)
    RUN/train_log.csv    one row per logged step
    RUN/metrics.json     evaluation of model.pt
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import numpy as np
import torch

from .._io import atomic_json, atomic_torch_save
from ..flows import InjectiveFlow

__all__ = ["RunDir", "load_run", "read_config", "write_config", "save_checkpoint",
           "load_checkpoint", "numpy_rng_state", "set_numpy_rng_state"]

# what a damaged or foreign file raises when read
_READ_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError, KeyError,
                TypeError, AttributeError, IndexError)


class RunDir:
    """The paths of a run directory."""

    def __init__(self, path: str):
        self.path = path
        self.config = os.path.join(path, "config.json")
        self.checkpoint = os.path.join(path, "checkpoint.pt")
        self.model = os.path.join(path, "model.pt")
        self.log = os.path.join(path, "train_log.csv")
        self.metrics = os.path.join(path, "metrics.json")

    def __repr__(self):
        return f"RunDir({self.path!r})"


def _not_a_run(run_dir: str, name: str) -> FileNotFoundError:
    return FileNotFoundError(f"{run_dir} has no {name}; is it a run directory written by "
                             "'injflow train'?")


def read_config(run_dir: str) -> dict:
    """``config.json`` of a run; a missing or damaged file is an error naming it."""
    path = RunDir(run_dir).config
    if not os.path.exists(path):
        raise _not_a_run(run_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the file is "
                         "damaged (truncated?). Start the run again with --overwrite") from None
    if not isinstance(cfg, dict) or not {"data", "model", "train"} <= set(cfg):
        raise ValueError(f"{path} is not a run configuration written by 'injflow train' (it "
                         "lacks data, model or train)")
    return cfg


def write_config(run_dir: str, config: dict) -> None:
    atomic_json(config, RunDir(run_dir).config)


def save_checkpoint(state: dict, path: str) -> None:
    """Write a training state atomically (temporary file + rename)."""
    atomic_torch_save(state, path)


def load_checkpoint(path: str, map_location=None) -> dict:
    """A training state written by :func:`save_checkpoint`, read with
    ``torch.load(weights_only=True)``: a checkpoint that holds any other object (which could run
    code when unpickled) is refused, and a damaged one is an error naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise ValueError(
                f"{path} holds objects other than tensors and plain containers; it was not "
                "written by this version of injflow_ext, and loading it could run code, so it "
                "is refused. Start the run again with --overwrite") from None
        raise ValueError(f"{path} cannot be read (UnpicklingError: {exc}); the file is damaged "
                         "(truncated?). Resume from a copy or start again with --overwrite") \
            from None
    except _READ_ERRORS as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the file is "
                         "damaged (truncated?). Resume from a copy or start again with "
                         "--overwrite") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a training checkpoint written by injflow_ext")
    return state


def load_run(run_dir: str, map_location="cpu") -> InjectiveFlow:
    """The trained model of a run directory (its best checkpoint, ``model.pt``), in eval mode.
    Its ``log_prob``, ``sample``, ``encode``, ``decode`` work in the data's own units (the
    standardisation used in training is a fixed layer of the model)."""
    path = RunDir(run_dir).model
    if not os.path.exists(path):
        raise _not_a_run(run_dir, "model.pt")
    try:
        return InjectiveFlow.load(path, map_location=map_location).eval()
    except _READ_ERRORS as exc:
        raise ValueError(f"{path} cannot be read as a model ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); the file is damaged (truncated?) or not written by "
                         "'injflow train'. If RUN/checkpoint.pt is intact, 'injflow train --out "
                         "RUN --resume' rewrites it at the end of the run") from None


def numpy_rng_state() -> dict:
    """numpy's global RNG state as tensors and plain values (a safe checkpoint holds no numpy
    arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: Any) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))
