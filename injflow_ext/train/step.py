"""One training step for every path: eager, compiled, or replayed from a CUDA graph.

    step = TrainStep(model, "exact", lr=1e-3, mode="captured", example_x=x0)
    for x in batches:                       # captured: every batch the shape of example_x
        out = step(x)                       # dict of detached tensors: loss, nll, ..., skipped
        print(float(out["loss"]))           # reading a value synchronises; skip it to stay async

A step runs every phase of the objective (:mod:`injflow_ext.train.objectives`) in order: zero the
phase's gradients, loss, backward, and the phase optimiser's step. A step whose loss or
gradients are not finite is skipped on the device, without a host synchronisation: the
optimiser receives a ``found_inf`` flag (as under ``torch.amp.GradScaler``) and leaves the
parameters and its state untouched; ``out["skipped"]`` is 1 for such a step.

Modes:

- ``"eager"``: plain PyTorch launches (every device).
- ``"compiled"``: the loss through ``torch.compile`` (inductor fuses the elementwise work
  between the library's ops, in the forward and the backward pass), launched eagerly.
- ``"captured"``: the whole step (loss, backward, optimiser) recorded once in a CUDA graph and
  replayed; compiled first unless ``compile=False``. Needs a fixed batch shape
  (``example_x``; drop or pad the last partial batch of an epoch), an objective that can be
  captured, and, for the non-finite skip, an optimiser that takes ``found_inf`` on the device
  (``torch.optim.Adam``/``AdamW`` with ``fused=True``, what TrainStep builds by default) built
  with ``capturable=True``. Off CUDA the step runs eagerly (``step.reason`` says so), so code
  written for a GPU runs unchanged on a laptop.

Capture warm-up: ``warmup`` eager steps on a side stream precede the capture; they change the
weights and optimiser state, which are put back afterwards, so constructing a TrainStep does
not train the model. Hutchinson probes: in eager mode from ``generator`` (per call); in the
compiled and captured modes from the default generator (a captured graph advances it with
every replay).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from .objectives import Objective, make_objective

__all__ = ["TrainStep", "MODES", "PRECISIONS", "resolve_mode", "matmul_precision",
           "default_optimizers", "captures"]

MODES = ("eager", "compiled", "captured")
PRECISIONS = (None, "float32", "tf32")


@contextmanager
def matmul_precision(precision: str | None):
    """The float32 GEMMs' precision inside the block (CUDA): "float32" (full float32 FMA),
    "tf32" (TensorFloat-32 tensor cores with float32 accumulation: operands rounded to a 10-bit
    mantissa, ~5e-4 relative; measured 19 % off a MINIBOONE step on an H100), or None (leave
    torch's setting). It covers cuBLAS and the fused ``tangent_mlp`` kernels, which follow the
    same switch. The volume term's Gram and Cholesky accumulate in float64 either way
    (``gram_logdet(accumulate_float64=True)``, the default)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be None, 'float32' or 'tf32', got {precision!r}")
    if precision is None:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def resolve_mode(mode: str, device: torch.device, objective: Objective,
                 distributed: bool = False) -> str:
    """``"auto"``: captured (and compiled) on a CUDA device for a capturable objective in a
    single process, compiled on CUDA under DDP, eager on the CPU. Other modes are returned as
    they are (after validation)."""
    if mode == "auto":
        if torch.device(device).type != "cuda":
            return "eager"
        if distributed:
            return "compiled"
        return "captured" if objective.capturable else "compiled"
    if mode not in MODES:
        raise ValueError(f"step mode must be 'auto' or one of {list(MODES)}, got {mode!r}")
    return mode


def captures(mode: str, device: torch.device) -> bool:
    """Whether a step of ``mode`` on ``device`` is recorded in a CUDA graph: "captured" on a
    CUDA device (elsewhere it runs eagerly)."""
    return mode == "captured" and torch.device(device).type == "cuda"


def default_optimizers(objective: Objective, model: torch.nn.Module, lr: float,
                       captured: bool) -> dict:
    """``{phase: Adam}`` over each phase's parameters: fused (it skips a non-finite step on the
    device, no synchronisation) and, for a captured step, capturable with the learning rate in
    a tensor (a schedule updates it in place, under the graph's feet)."""
    groups = objective.parameter_groups(model)
    device = next(model.parameters()).device
    rate = torch.tensor(lr, dtype=torch.float32, device=device) if captured else lr
    return {phase: torch.optim.Adam(groups[phase], lr=rate, fused=True, capturable=captured)
            for phase in objective.phases}


def check_batch(owner: str, x, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A batch for a step of one fixed shape, dtype and device (a captured graph's)."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner}: x must have the shape of the captured batch {shape}, got "
                         f"{got}; drop or pad the last batch of an epoch, or build another "
                         f"{owner} for this shape")
    if x.dtype != dtype or x.device != device:
        raise ValueError(f"{owner}: x must be {dtype} on {device}, got {x.dtype} on {x.device}")


class _ObjectiveLoss(torch.nn.Module):
    """``objective.loss(model, ...)`` as a module's forward, so that DistributedDataParallel
    (``wrap``) and torch.compile see the step's forward."""

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x, phase: str, likelihood_weight, generator=None):
        return self.objective.loss(self.model, x, phase, likelihood_weight, generator)


class TrainStep:
    """A training step of ``model`` under ``objective``.

    Args:
        model: a RectangularFlow (or any model the objective understands).
        objective: an :class:`~injflow_ext.train.Objective` or the name of a registered one
            (:data:`~injflow_ext.train.objectives.REGISTRY`; its default options).
        optimizers: None (default: :func:`default_optimizers`), an optimiser (single-phase
            objectives) or ``{phase: optimiser}``.
        mode: "eager", "compiled" or "captured" (see the module docstring).
        example_x: ``(B, D)``, required for "captured": fixes the batch shape and dtype.
        lr: learning rate of the default optimisers.
        update: False to run loss and backward only (gradients left in ``p.grad``; benchmarks).
        compile: compile the loss (default: True for "compiled" and "captured"), or a dict of
            ``torch.compile`` options.
        warmup: eager warm-up steps before a capture.
        skip_nonfinite: skip steps with a non-finite loss or gradient (on the device where the
            optimiser supports it, else with one host synchronisation per step in eager mode).
        wrap: ``wrap(module) -> module`` applied to the step's forward module (e.g.
            DistributedDataParallel); gradients are then checked, not the local loss.
        precision: None (torch's setting), "float32" or "tf32": the float32 GEMMs of the step
            (see :func:`matmul_precision`); off by default.
        grad_clip: None, or the largest global gradient norm of a phase's parameters: larger
            gradients are scaled down to it (on the device, no synchronisation).
    Call: ``step(x, likelihood_weight=1.0, loss_scale=1.0, generator=None) -> dict`` of
    detached tensors (the loss summed over phases and its parts, CG diagnostics as
    ``diagnostics.*``, ``skipped``). Captured: the graph's static outputs, overwritten by the
    next call (clone what you keep).
    """

    def __init__(self, model: torch.nn.Module, objective: str | Objective = "exact",
                 optimizers=None, *, mode: str = "eager",
                 example_x: torch.Tensor | None = None, lr: float = 1e-3, update: bool = True,
                 compile: bool | dict | None = None, warmup: int = 3,
                 skip_nonfinite: bool = True, wrap: Callable | None = None,
                 precision: str | None = None, grad_clip: float | None = None):
        if mode not in MODES:
            raise ValueError(f"TrainStep: mode must be one of {list(MODES)}, got {mode!r} "
                             "('auto' is resolved by injflow_ext.train.step.resolve_mode)")
        if precision not in PRECISIONS:
            raise ValueError(f"TrainStep: precision must be None, 'float32' or 'tf32', got "
                             f"{precision!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"TrainStep: grad_clip must be None or > 0, got {grad_clip!r}")
        self.precision, self.grad_clip = precision, grad_clip
        self.model = model
        self.objective = make_objective(objective)
        self.objective.check_model(model)
        self.phases = tuple(self.objective.phases)
        self.mode, self.update, self.skip_nonfinite = mode, bool(update), bool(skip_nonfinite)
        param = next(model.parameters())
        self.device = param.device
        self.captured = captures(mode, self.device)
        if mode == "captured" and not self.objective.capturable:
            raise ValueError(f"TrainStep: the {self.objective.name} objective cannot be captured "
                             "in a CUDA graph; use mode='compiled' or 'eager'")
        if self.captured:
            if not isinstance(example_x, torch.Tensor) or example_x.dim() != 2:
                got = (f"shape {tuple(example_x.shape)}" if isinstance(example_x, torch.Tensor)
                       else type(example_x).__name__)
                raise ValueError(f"TrainStep: mode='captured' needs example_x, a batch of shape "
                                 f"(B, D) on {self.device}, got {got}")
        self.reason = ("captured in a CUDA graph" if self.captured else
                       f"{mode}" if mode != "captured" else
                       f"eager: CUDA graphs need a CUDA device, the model is on {self.device}")
        self.groups = self.objective.parameter_groups(model)
        if not self.update and optimizers is not None:
            raise ValueError("TrainStep: update=False runs no optimiser; pass optimizers=None")
        self.optimizers = self._optimizers(optimizers, lr) if self.update else {}
        if self.captured:
            self._check_capturable()
        self.forward = _ObjectiveLoss(model, self.objective)
        self.distributed = wrap is not None
        if wrap is not None:
            self.forward = wrap(self.forward)
        if compile is None:
            compile = mode in ("compiled", "captured")
        self.compiled_forward = self._compile(compile)
        self._settled = self.compiled_forward is None   # has one uncompiled step run?
        self._weight = torch.ones((), dtype=param.dtype, device=self.device)
        self._scale = torch.ones((), dtype=param.dtype, device=self.device)
        if self.captured:
            self.shape, self.dtype = tuple(example_x.shape), example_x.dtype
            self._static_x = example_x.detach().to(self.device).clone()
            self._graph, self._static_out = self._capture(warmup)

    # ----------------------------------------------------------------------------- public
    def __call__(self, x: torch.Tensor, likelihood_weight: float = 1.0, loss_scale: float = 1.0,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        self._weight.fill_(likelihood_weight)
        self._scale.fill_(loss_scale)
        if not self.captured:
            self._zero_grad()
            with matmul_precision(self.precision):
                return self._body(x, generator)
        check_batch("TrainStep", x, self.shape, self.dtype, self.device)
        self._static_x.copy_(x)
        self._graph.replay()
        return self._static_out

    # ---------------------------------------------------------------------------- helpers
    def _optimizers(self, optimizers, lr) -> dict:
        if optimizers is None:
            return default_optimizers(self.objective, self.model, lr, self.captured)
        if isinstance(optimizers, torch.optim.Optimizer):
            if len(self.phases) != 1:
                raise ValueError(f"TrainStep: the {self.objective.name} objective has phases "
                                 f"{list(self.phases)}; pass optimizers as {{phase: optimizer}}")
            return {self.phases[0]: optimizers}
        if isinstance(optimizers, dict) and set(optimizers) == set(self.phases):
            return dict(optimizers)
        raise ValueError(f"TrainStep: optimizers must be None, an optimizer or a dict with the "
                         f"phases {list(self.phases)} as keys, got {optimizers!r}")

    def _check_capturable(self):
        for phase, opt in self.optimizers.items():
            if "capturable" in opt.defaults and not all(g.get("capturable", False)
                                                        for g in opt.param_groups):
                raise ValueError(
                    f"TrainStep: {type(opt).__name__} must be built with capturable=True to run "
                    f"inside a CUDA graph, e.g. torch.optim.{type(opt).__name__}(params, lr=..., "
                    "fused=True, capturable=True); or use mode='compiled'")
            if self.skip_nonfinite and not getattr(opt, "_step_supports_amp_scaling", False):
                raise ValueError(
                    f"TrainStep: skipping non-finite steps inside a CUDA graph needs an optimizer "
                    f"that takes found_inf on the device (e.g. torch.optim.Adam(..., fused=True, "
                    f"capturable=True)); {type(opt).__name__} of phase {phase!r} does not. Pass "
                    "such an optimizer, or skip_nonfinite=False")

    def _compile(self, compile):
        if compile is False or compile is None:
            return None
        options = {} if compile is True else dict(compile) if isinstance(compile, dict) else None
        if options is None:
            raise TypeError(f"TrainStep: compile must be a bool or a dict of torch.compile "
                            f"options, got {type(compile).__name__}")
        options.setdefault("dynamic", False)
        mode = options.get("mode")
        if self.captured and mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"TrainStep: compile mode {mode!r} records CUDA graphs of its own, "
                             "which cannot run inside this class's capture; use mode=None, "
                             "'default' or 'max-autotune-no-cudagraphs', or mode='compiled'")
        return torch.compile(self.forward, **options)

    def _zero_grad(self):
        if self.update:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
        else:
            for p in self.model.parameters():
                p.grad = None

    def _nonfinite(self, loss: torch.Tensor, params) -> torch.Tensor:
        """1.0 when the loss (single process) or a gradient is not finite, else 0.0 (device)."""
        grads = [p.grad for p in params if p.grad is not None]
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        if not self.distributed:
            bad = ~torch.isfinite(loss.detach())
        if grads:
            norms = torch._foreach_norm(grads)
            bad = bad | ~torch.isfinite(torch.stack(norms).sum())
        return bad.to(loss.dtype)

    def _clip(self, params) -> None:
        """Scale the gradients of ``params`` so that their global norm is at most
        ``grad_clip`` (a non-finite norm leaves them non-finite: the step is skipped)."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, (self.grad_clip / (total + 1e-6)).clamp(max=1.0))

    def _body(self, x, generator) -> dict[str, torch.Tensor]:
        forward = self.forward
        if self.compiled_forward is not None:
            if self._settled:   # the first step runs uncompiled (one-time state, e.g. ActNorm)
                forward = self.compiled_forward
                generator = None   # compiled code draws from the default generator
            self._settled = True
        flat: dict[str, torch.Tensor] = {}
        skipped = None
        for phase in self.phases:
            out = forward(x, phase, self._weight, generator)
            loss = out["loss"] * self._scale
            loss.backward()
            if self.update:
                opt = self.optimizers[phase]
                if self.grad_clip is not None:
                    self._clip(self.groups[phase])
                if self.skip_nonfinite:
                    bad = self._nonfinite(loss, self.groups[phase])
                    skipped = bad if skipped is None else torch.maximum(skipped, bad)
                    if getattr(opt, "_step_supports_amp_scaling", False):
                        # fused optimisers take found_inf as float32 whatever the params' dtype
                        opt.grad_scale, opt.found_inf = None, bad.float()
                        opt.step()
                    elif not bool(bad):   # one host synchronisation (eager only)
                        opt.step()
                else:
                    opt.step()
            self._merge(flat, out)
        flat["skipped"] = skipped if skipped is not None else torch.zeros_like(flat["loss"])
        return flat

    @staticmethod
    def _merge(flat, out):
        """The phases' outputs in one dict: losses summed, the other parts from the phase
        that computes them with gradients (later phases fill what earlier ones left)."""
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                v = v.detach()
                if k == "loss" and "loss" in flat:
                    flat["loss"] = flat["loss"] + v
                elif k not in flat or k == "prior_nll":
                    flat[k] = v
            elif isinstance(v, dict):   # diagnostics: cg_iterations, cg_converged, ...
                flat.update({f"{k}.{k2}": v2.detach() for k2, v2 in v.items()
                             if isinstance(v2, torch.Tensor)})

    # ---------------------------------------------------------------------------- capture
    def _snapshot(self):
        params = [p.detach().clone() for p in self.model.parameters()]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        states = {id(p): {k: v.detach().clone() for k, v in st.items()
                          if isinstance(v, torch.Tensor)}
                  for opt in self.optimizers.values() for p, st in opt.state.items()}
        return params, buffers, states

    def _restore(self, snapshot):
        """Undo the warm-up in place (the graph holds these very tensors)."""
        params, buffers, states = snapshot
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), params):
                p.copy_(v)
            for b, v in zip(self.model.buffers(), buffers):
                b.copy_(v)
            for opt in self.optimizers.values():
                for p, state in opt.state.items():
                    for key, t in state.items():
                        if not isinstance(t, torch.Tensor):
                            continue
                        if id(p) in states:
                            t.copy_(states[id(p)][key])
                        else:  # fresh state: Adam's moments and step count start at zero
                            t.zero_()

    def _capture(self, warmup: int):
        snapshot = self._snapshot()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), matmul_precision(self.precision):
            # with compile: one uncompiled step, then at least one that compiles, before capture
            for _ in range(max(1 if self.compiled_forward is None else 2, warmup)):
                self._zero_grad()
                self._body(self._static_x, None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self._zero_grad()   # the graph allocates the gradients from its own pool
        # captured on the warm-up's stream, one per graph: torch keys cuBLAS workspaces by
        # stream, and graphs sharing torch's default capture stream can free each other's
        # workspace when one of them is destroyed (pytorch/pytorch#193402)
        with torch.cuda.graph(graph, stream=side), matmul_precision(self.precision):
            static_out = self._body(self._static_x, None)
        torch.cuda.synchronize(self.device)
        self._restore(snapshot)
        return graph, static_out
