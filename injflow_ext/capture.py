"""``CapturedStep``: the earlier interface of the whole-step CUDA-graph capture, kept for code
written against it; it is a :class:`injflow_ext.step.TrainStep` (one step implementation).

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    step = CapturedStep(model, opt, example_x, method="exact", beta=50.0)
    for x in batches:                       # every batch the shape of example_x
        out = step(x)                       # dict of detached tensors: loss, nll, ...

Differences from ``TrainStep``: the optimiser is given (None: loss and backward only), the
objective is a ``method`` name or a ``loss_fn(model, x, likelihood_weight)``, the loss is not
compiled unless ``compile`` says so, non-finite steps are not skipped (as before), and every
call checks the batch's shape and dtype against ``example_x``, also when it runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .models import RectangularFlow
from .objectives import Objective, make_objective
from .step import TrainStep, check_batch

__all__ = ["CapturedStep"]


class _FunctionObjective(Objective):
    """``loss_fn(model, x, likelihood_weight) -> dict with "loss" (or a scalar tensor)``."""

    name = "loss_fn"

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn

    def loss(self, model, x, phase="all", likelihood_weight=1.0, generator=None):
        out = self.loss_fn(model, x, likelihood_weight)
        return {"loss": out} if isinstance(out, torch.Tensor) else out


class CapturedStep(TrainStep):
    """A training step of ``model`` on batches shaped like ``example_x`` (B, D), replayed from a
    CUDA graph on a GPU and run eagerly on the CPU (see :class:`TrainStep`).

    Args: model; optimizer (None: loss and backward only, gradients left in ``p.grad``);
    example_x; method ("exact", "hutchinson" or "surrogate"), beta, hutchinson_samples, cg_rtol as in
    ``RectangularFlow.loss``; or loss_fn; capture (False: eager also on a GPU); warmup;
    compile (True or a dict of ``torch.compile`` options).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 example_x: torch.Tensor, *, method: str = "exact", beta: float = 50.0,
                 hutchinson_samples: int = 1, cg_rtol: float = 1e-5,
                 loss_fn: Callable | None = None, capture: bool = True, warmup: int = 3,
                 compile: bool | dict = False):
        if not isinstance(example_x, torch.Tensor) or example_x.dim() != 2:
            raise ValueError("CapturedStep: example_x must be a tensor of shape (B, D), got "
                             + (f"shape {tuple(example_x.shape)}"
                                if isinstance(example_x, torch.Tensor) else
                                type(example_x).__name__))
        if loss_fn is not None:
            objective = _FunctionObjective(loss_fn)
        else:
            if method not in ("exact", "hutchinson", "surrogate"):
                raise ValueError(f"CapturedStep: method must be 'exact', 'hutchinson' or "
                                 f"'surrogate', got "
                                 f"{method!r} (two-step alternates two optimisers: use "
                                 "TrainStep(model, 'two-step', ...))")
            if not isinstance(model, RectangularFlow):
                raise TypeError("CapturedStep: give loss_fn for a model that is not a "
                                "RectangularFlow")
            kwargs = {"beta": beta}
            if method == "hutchinson":
                kwargs.update(samples=hutchinson_samples, cg_rtol=cg_rtol)
            if method == "surrogate":
                kwargs.update(samples=hutchinson_samples)
            objective = make_objective(method, **kwargs)
        if not (compile is None or isinstance(compile, (bool, dict))):
            raise TypeError(f"CapturedStep: compile must be a bool or a dict of torch.compile "
                            f"options, got {type(compile).__name__}")
        mode = "captured" if capture else ("compiled" if compile else "eager")
        self.example_shape, self.example_dtype = tuple(example_x.shape), example_x.dtype
        self.example_device = example_x.device
        super().__init__(model, objective, optimizer, mode=mode, example_x=example_x,
                         update=optimizer is not None, compile=compile, warmup=warmup,
                         skip_nonfinite=False)

    def __call__(self, x: torch.Tensor, likelihood_weight: float = 1.0) -> dict[str, torch.Tensor]:
        check_batch("CapturedStep", x, self.example_shape, self.example_dtype,
                    self.example_device)
        return super().__call__(x, likelihood_weight)
