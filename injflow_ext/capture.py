"""Whole-step CUDA-graph capture: a training step (loss, backward, optimiser step) recorded once
and replayed without per-kernel launch overhead.

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    step = CapturedStep(model, opt, example_x, method="exact", beta=50.0)
    for x in batches:                       # every batch the shape of example_x
        out = step(x)                       # dict of detached tensors: loss, nll, ...
        print(float(out["loss"]))           # reading a value synchronises; skip it to stay async

On a CUDA device the step is captured (``step.captured`` is True). On the CPU, or with
``capture=False``, the same step runs eagerly, with the same results, so code written for the
GPU runs unchanged on a laptop.

What capture needs (checked, with an error that says what to change):

- a fixed batch shape (``example_x``); drop or pad the last, smaller batch of an epoch;
- an optimiser that can run inside a graph: Adam/AdamW with ``capturable=True`` (their step
  count lives on the GPU), or ``optimizer=None`` to capture loss and backward only;
- no host synchronisation inside the step: the volume-term ops never synchronise unless asked
  (``gram_logdet(check=False)``; Hutchinson's CG runs a fixed number of iterations, at most
  ``d``, with device-side convergence masking), and ActNorm reads its initialisation flag only
  until it is set, which happens in the warm-up steps.

Warm-up: ``warmup`` eager steps on a side stream precede the capture (CUDA needs them to settle
its allocator and libraries). They update the weights and optimiser state on ``example_x``;
both are put back in place afterwards, so constructing a CapturedStep does not train the model.
Hutchinson probes come from the default CUDA generator, whose draws advance with every replay.

Compilation: ``compile=True`` (or a dict of ``torch.compile`` options) runs the loss through
``torch.compile`` before it is captured. Inductor then fuses the elementwise work between the
library's ops (ActNorm, permutations, splits and merges, the couplings' inverse pass, log-det
sums, the loss) into a few generated kernels, in the forward and the backward pass; the replayed
graph launches far fewer kernels. The compilation happens in the first compiled warm-up step
(seconds to minutes, once per shape). The first warm-up step runs uncompiled, so that one-time
state (ActNorm's initialisation flag) is settled before tracing and the step is traced once.
Inductor's own CUDA graphs (``mode="reduce-overhead"``) are not used: this class captures the
whole step, backward and optimiser included.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .models import RectangularFlow

__all__ = ["CapturedStep"]


class CapturedStep:
    """A training step of ``model`` on batches shaped like ``example_x`` (B, D), replayed from a
    CUDA graph on a GPU and run eagerly on the CPU.

    Args:
        model: the RectangularFlow (or any module ``loss_fn`` understands).
        optimizer: stepped after the backward pass; None to run loss and backward only (the
            gradients are then left in ``p.grad`` of each parameter).
        example_x: a batch (B, D) on the model's device; fixes the shape and dtype.
        method, beta, hutchinson_samples, cg_rtol: as in ``RectangularFlow.loss`` (the CG
            iteration cap is its default ``d``).
        loss_fn: instead of ``method``: ``loss_fn(model, x, likelihood_weight) -> dict`` with a
            scalar ``"loss"`` (or a scalar tensor).
        capture: False to run eagerly also on a GPU.
        warmup: eager warm-up steps before the capture.
        compile: True, or a dict of ``torch.compile`` keyword arguments (default
            ``{"dynamic": False}``), to compile the loss (and through AOTAutograd its backward)
            before capturing; also on the CPU, where it runs the compiled step eagerly.
    Call: ``step(x, likelihood_weight=1.0) -> dict`` of detached tensors (the loss and its
    parts). On a GPU they are the graph's static outputs, overwritten by the next call: clone
    what you keep.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 example_x: torch.Tensor, *, method: str = "exact", beta: float = 50.0,
                 hutchinson_samples: int = 1, cg_rtol: float = 1e-5,
                 loss_fn: Optional[Callable] = None, capture: bool = True, warmup: int = 3,
                 compile: bool | dict = False):
        if not isinstance(example_x, torch.Tensor) or example_x.dim() != 2:
            raise ValueError("CapturedStep: example_x must be a tensor of shape (B, D), got "
                             + (f"shape {tuple(example_x.shape)}"
                                if isinstance(example_x, torch.Tensor) else
                                type(example_x).__name__))
        self.model, self.optimizer = model, optimizer
        self.shape, self.dtype, self.device = tuple(example_x.shape), example_x.dtype, \
            example_x.device
        if loss_fn is None:
            if method not in ("exact", "hutchinson"):
                raise ValueError(f"CapturedStep: method must be 'exact' or 'hutchinson', got "
                                 f"{method!r} (two-step alternates two optimisers; capture each "
                                 "phase with its own loss_fn)")
            if not isinstance(model, RectangularFlow):
                raise TypeError("CapturedStep: give loss_fn for a model that is not a "
                                "RectangularFlow")
            kwargs = dict(beta=beta, hutchinson_samples=hutchinson_samples, cg_rtol=cg_rtol)

            def loss_fn(m, x, likelihood_weight):
                return m.loss(x, method, likelihood_weight=likelihood_weight, **kwargs)
        self.loss_fn = loss_fn
        self.captured = bool(capture) and self.device.type == "cuda"
        self.compiled_loss_fn = self._compile(loss_fn, compile)
        self._settled = self.compiled_loss_fn is None   # has one uncompiled step run?
        self.reason = ("captured in a CUDA graph" if self.captured else
                       "eager: capture=False" if self.device.type == "cuda" else
                       f"eager: CUDA graphs need a CUDA device, the batch is on {self.device}")
        self._weight = torch.ones((), dtype=example_x.dtype, device=self.device)
        if self.captured:
            self._check_optimizer_capturable()
            self._static_x = example_x.detach().clone()
            self._graph, self._static_out = self._capture(warmup)

    # ----------------------------------------------------------------------------- public
    def __call__(self, x: torch.Tensor, likelihood_weight: float = 1.0) -> Dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != self.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CapturedStep: x must have the shape of the captured batch "
                             f"{self.shape}, got {got}; drop or pad the last batch of an epoch, "
                             "or build another CapturedStep for this shape")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"CapturedStep: x must be {self.dtype} on {self.device}, got "
                             f"{x.dtype} on {x.device}")
        self._weight.fill_(likelihood_weight)
        if not self.captured:
            return self._eager_step(x)
        self._static_x.copy_(x)
        self._graph.replay()
        return self._static_out

    # ---------------------------------------------------------------------------- helpers
    def _compile(self, loss_fn, compile):
        if compile is False or compile is None:
            return None
        if compile is True:
            options = {}
        elif isinstance(compile, dict):
            options = dict(compile)
        else:
            raise TypeError(f"CapturedStep: compile must be a bool or a dict of torch.compile "
                            f"options, got {type(compile).__name__}")
        options.setdefault("dynamic", False)
        mode = options.get("mode")
        if self.captured and mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"CapturedStep: compile mode {mode!r} records CUDA graphs of its own, "
                             "which cannot run inside this class's capture; use mode=None, "
                             "'default' or 'max-autotune-no-cudagraphs', or pass capture=False")
        return torch.compile(loss_fn, **options)

    def _step_body(self, x) -> Dict[str, torch.Tensor]:
        fn = self.loss_fn
        if self.compiled_loss_fn is not None:
            if self._settled:
                fn = self.compiled_loss_fn
            self._settled = True
        out = fn(self.model, x, self._weight)
        if isinstance(out, torch.Tensor):
            out = {"loss": out}
        out["loss"].backward()
        if self.optimizer is not None:
            self.optimizer.step()
        flat = {}
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                flat[k] = v.detach()
            elif isinstance(v, dict):  # diagnostics: cg_iterations, cg_converged, ...
                flat.update({f"{k}.{k2}": v2.detach() for k2, v2 in v.items()
                             if isinstance(v2, torch.Tensor)})
        return flat

    def _eager_step(self, x):
        self._zero_grad()
        return self._step_body(x)

    def _zero_grad(self):
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for p in self.model.parameters():
                p.grad = None

    def _check_optimizer_capturable(self):
        opt = self.optimizer
        if opt is None:
            return
        if "capturable" in opt.defaults and not all(g.get("capturable", False)
                                                    for g in opt.param_groups):
            raise ValueError(
                f"CapturedStep: {type(opt).__name__} must be built with capturable=True to run "
                f"inside a CUDA graph, e.g. torch.optim.{type(opt).__name__}(params, lr=..., "
                "capturable=True); or pass capture=False")

    def _snapshot(self):
        params = [p.detach().clone() for p in self.model.parameters()]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        return params, buffers

    def _restore(self, snapshot, had_state):
        """Undo the warm-up in place (the graph holds these very tensors)."""
        params, buffers = snapshot
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), params):
                p.copy_(v)
            for b, v in zip(self.model.buffers(), buffers):
                b.copy_(v)
            if self.optimizer is not None:
                for p, state in self.optimizer.state.items():
                    for key, t in state.items():
                        if not isinstance(t, torch.Tensor):
                            continue
                        if id(p) in had_state:
                            t.copy_(had_state[id(p)][key])
                        else:  # fresh state: Adam's moments and step count start at zero
                            t.zero_()

    def _capture(self, warmup: int):
        snapshot = self._snapshot()
        had_state = {}
        if self.optimizer is not None:
            had_state = {id(p): {k: v.detach().clone() for k, v in st.items()
                                 if isinstance(v, torch.Tensor)}
                         for p, st in self.optimizer.state.items()}
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            # with compile: one uncompiled step, then at least one that compiles, before capture
            for _ in range(max(1 if self.compiled_loss_fn is None else 2, warmup)):
                self._eager_step(self._static_x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self._zero_grad()   # the graph allocates the gradients from its own pool
        with torch.cuda.graph(graph):
            static_out = self._step_body(self._static_x)
        torch.cuda.synchronize(self.device)
        self._restore(snapshot, had_state)
        return graph, static_out
