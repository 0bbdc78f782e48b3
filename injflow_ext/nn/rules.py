"""Tangent rules for plain ``torch.nn`` modules: a user's network carries a primal and K
tangents in one pass, with its own parameters (no copy; gradients reach them).

    decoder = nn.Sequential(nn.Linear(21, 128), nn.Tanh(), nn.Linear(128, 43))
    YV = tangent(decoder).jvp_packed(UV)   # UV (B, 1+K, 21) -> YV (B, 1+K, 43)

Layout as the ops' (:mod:`injflow_ext.ops.tangent`): ``XV (B, 1+K, *shape)``, row 0 the primal
input, rows 1.. the tangents; ``YV[:, k] = (∂module/∂x) XV[:, k]`` for k ≥ 1. A module's
dimension ``i ≥ 1`` is the packed dimension ``i + 1``.

Fast rules (docs/design.md §2, "Your own networks"):

- ``nn.Sequential`` (nested ones too): its children's rules in order, where a run of
  ``nn.Linear`` layers with activations between them becomes one ``tangent_mlp`` call;
- ``nn.Linear``; ``nn.Conv2d`` (``tangent_conv2d``, zero padding) and ``nn.ConvTranspose2d``,
  each fused with an activation that follows it;
- the activations ``nn.Tanh``, ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ELU``, ``nn.Softplus``
  (``beta=1, threshold=20``), ``nn.SiLU``, ``nn.Sigmoid`` (the ops' fused epilogue) and
  ``nn.GELU`` (both forms, in torch ops);
- ``nn.Flatten``, ``nn.Unflatten``, ``nn.Identity``, ``nn.Dropout`` (eval mode: the identity;
  training mode: one mask for the primal and its tangents);
- :class:`~injflow_ext.nn.Residual` (``x + block(x)``) and
  :class:`~injflow_ext.nn.ElementwiseAffine`;
- the library's own modules: anything with ``jvp_packed`` (every
  :class:`~injflow_ext.nn.Bijection`) and :class:`~injflow_ext.nn.MLP`.

Any other module (a leaf, or a container whose ``forward`` the rules cannot know) runs
``torch.func.jvp`` of that module alone, vectorised over the K tangents: correct for a
deterministic module, slower; the first time per class a warning names it. A subclass of a
supported class that overrides ``forward`` is treated as unknown. Every module must map each
sample on its own (the volume term is per sample): BatchNorm in training mode does not, and
is refused with a message.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.tangent import (
    ACTIVATION_PARAM,
    tangent_conv2d_packed,
    tangent_epilogue_derivatives,
    tangent_epilogue_packed,
    tangent_mlp,
    tangent_mlp_derivatives,
)
from .mlp import MLP
from .plain import ElementwiseAffine, Residual

__all__ = ["tangent", "Tangent", "TangentRuleWarning"]


class TangentRuleWarning(UserWarning):
    """A module without a fast tangent rule runs through ``torch.func.jvp``."""


_WARNED: set[type] = set()

_PLAIN_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
                      nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Softplus: "softplus"}


def _is(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose ``forward`` is ``cls``'s (a subclass that overrides it is
    another function)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _activation(module: nn.Module) -> tuple[str, float | None] | None:
    """(name, parameter) of an activation module the ops' epilogue computes, else None."""
    for cls, name in _PLAIN_ACTIVATIONS.items():
        if _is(module, cls):
            if cls is nn.LeakyReLU:
                return name, float(module.negative_slope)
            if cls is nn.ELU:
                return name, float(module.alpha)
            if cls is nn.Softplus and (module.beta != 1 or module.threshold != 20):
                return None
            return name, None
    return None


def _param(act: tuple[str, float | None] | None) -> float | None:
    if act is None or act[0] not in ACTIVATION_PARAM:
        return None
    return act[1] if act[1] is not None else ACTIVATION_PARAM[act[0]]


def _rows_first(XV: torch.Tensor, fn, n_leading: int):
    """Apply ``fn`` to ``XV (B, R, *lead, n)`` as ``(B·prod(lead), R, n)`` (the ops take one
    feature dimension) and put the result back."""
    if n_leading == 0:
        return fn(XV)
    B, R = XV.shape[:2]
    lead = XV.shape[2:-1]
    flat = XV.movedim(1, -2).reshape(-1, R, XV.shape[-1])
    Y = fn(flat)
    return Y.reshape(B, *lead, R, Y.shape[-1]).movedim(-2, 1)


# ----------------------------------------------------------------------------------- steps
# A step maps packed rows to packed rows; a plan is a list of steps built from a module tree.
# ``linearize(X0 (B, 1, *in)) -> (Y0 (B, 1, *out), lin)``: the primal once, and the step's
# Jacobian there as a map ``lin(V (B, K, *in)) -> (B, K, *out)`` of tangents alone (no primal
# row); the default runs the step on [primal; tangents] each time.

class _Step:
    def linearize(self, X0):
        Y0 = self(X0)
        return Y0, lambda V: self(torch.cat([X0.detach(), V], dim=1))[:, 1:]


@dataclass
class _Mlp(_Step):
    """Linear layers with an activation after each (the last one's may differ): one
    ``tangent_mlp`` call."""

    names: list
    linears: list
    hidden: tuple | None
    last: tuple | None

    def _args(self, XV):
        n_in = self.linears[0].in_features
        if XV.shape[-1] != n_in:
            raise ValueError(f"tangent: {self.names[0]} ({self.linears[0]}) takes {n_in} features "
                             f"in its last dimension, got an input of shape "
                             f"{_module_shape(XV)}")
        param = _param(self.hidden) if self.hidden and self.hidden[0] in ACTIVATION_PARAM \
            else _param(self.last)
        return ([m.weight for m in self.linears], [m.bias for m in self.linears],
                self.hidden[0] if self.hidden else None, self.last[0] if self.last else None,
                param)

    def __call__(self, XV):
        args = self._args(XV)
        return _rows_first(XV, lambda X: tangent_mlp(X, *args), XV.dim() - 3)

    def linearize(self, X0):
        if X0.dim() != 3:
            return super().linearize(X0)
        weights, biases, hidden, last, param = self._args(X0)
        Y0, dA = tangent_mlp_derivatives(X0, weights, biases, hidden, last, param)

        def lin(V):
            for W, d in zip(weights, dA):
                V = (V @ W.T) * d.unsqueeze(1)
            return V
        return Y0, lin

    def describe(self):
        acts = [self.hidden[0] if self.hidden else "none"] * (len(self.linears) - 1) + \
            [self.last[0] if self.last else "none"]
        return (f"tangent_mlp: {' -> '.join(str(m.in_features) for m in self.linears)} -> "
                f"{self.linears[-1].out_features} ({', '.join(acts)}) [{', '.join(self.names)}]")


@dataclass
class _Conv(_Step):
    """``nn.Conv2d`` or ``nn.ConvTranspose2d`` and the activation after it."""

    name: str
    conv: nn.Module
    act: tuple | None

    def _check(self, XV):
        c = self.conv
        if XV.dim() != 5 or XV.shape[2] != c.in_channels:
            raise ValueError(f"tangent: {self.name} ({c}) takes images (B, {c.in_channels}, H, W), "
                             f"got an input of shape {_module_shape(XV)}")
        return (self.act[0], _param(self.act)) if self.act else (None, None)

    def _convolve(self, X):
        """The convolution without bias of images ``X (N, C, H, W)``."""
        c = self.conv
        if isinstance(c, nn.Conv2d):
            return F.conv2d(X, c.weight, None, c.stride, c.padding, c.dilation, c.groups)
        return F.conv_transpose2d(X, c.weight, None, c.stride, c.padding, c.output_padding,
                                  c.groups, c.dilation)

    def _bias(self, Z):
        c = self.conv
        Cout, Ho, Wo = Z.shape[-3:]
        return None if c.bias is None else c.bias[:, None].expand(Cout, Ho * Wo).reshape(-1)

    def __call__(self, XV):
        name, param = self._check(XV)
        c = self.conv
        if isinstance(c, nn.Conv2d):
            return tangent_conv2d_packed(XV, c.weight, c.bias, name, c.stride, c.padding,
                                         c.dilation, c.groups, param)
        B, R = XV.shape[:2]
        Z = self._convolve(XV.reshape(B * R, *XV.shape[2:]))
        Y = tangent_epilogue_packed(Z.reshape(B, R, -1), self._bias(Z), name, param)
        return Y.view(B, R, *Z.shape[1:])

    def linearize(self, X0):
        name, param = self._check(X0)
        B = X0.shape[0]
        Z = self._convolve(X0[:, 0])
        Y0, dA = tangent_epilogue_derivatives(Z.reshape(B, 1, -1), self._bias(Z), name, param)

        def lin(V):
            K = V.shape[1]
            ZV = self._convolve(V.reshape(B * K, *V.shape[2:]))
            return (ZV.reshape(B, K, -1) * dA.unsqueeze(1)).view(B, K, *ZV.shape[1:])
        return Y0.view(B, 1, *Z.shape[1:]), lin

    def describe(self):
        return f"{type(self.conv).__name__}" + (f" + {self.act[0]}" if self.act else "") + \
            f" [{self.name}]"


@dataclass
class _Activation(_Step):
    """An activation on its own: the ops' fused epilogue over all features."""

    name: str
    act: tuple

    def __call__(self, XV):
        B, R = XV.shape[:2]
        Y = tangent_epilogue_packed(XV.reshape(B, R, -1), None, self.act[0], _param(self.act))
        return Y.view(XV.shape)

    def linearize(self, X0):
        B = X0.shape[0]
        Y0, dA = tangent_epilogue_derivatives(X0.reshape(B, 1, -1), None, self.act[0],
                                              _param(self.act))
        return Y0.view(X0.shape), lambda V: (V.reshape(B, V.shape[1], -1) *
                                             dA.unsqueeze(1)).view(V.shape)

    def describe(self):
        return f"{self.act[0]} [{self.name}]"


@dataclass
class _Gelu(_Step):
    """``nn.GELU``: ``y = gelu(x)``, ``ẏ = gelu′(x) ⊙ v`` in torch ops."""

    name: str
    approximate: str

    def __call__(self, XV):
        y, dy = self._primal(XV[:, :1])
        return torch.cat([y, dy * XV[:, 1:]], dim=1)

    def linearize(self, X0):
        y, dy = self._primal(X0)
        dy = dy.detach()
        return y, lambda V: dy * V

    def _primal(self, x):
        y = F.gelu(x, approximate=self.approximate)
        if self.approximate == "tanh":
            c = math.sqrt(2 / math.pi)
            t = torch.tanh(c * (x + 0.044715 * x ** 3))
            dy = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        else:
            dy = 0.5 * (1 + torch.erf(x / math.sqrt(2))) + \
                x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return y, dy

    def describe(self):
        return f"gelu ({self.approximate}) [{self.name}]"


@dataclass
class _Reshape(_Step):
    """``nn.Flatten`` / ``nn.Unflatten`` on the module's dimensions ≥ 1."""

    name: str
    module: nn.Module

    def __call__(self, XV):
        m = self.module
        if isinstance(m, nn.Flatten):
            start = m.start_dim + 1 if m.start_dim >= 0 else m.start_dim
            end = m.end_dim + 1 if m.end_dim >= 0 else m.end_dim
            return XV.flatten(start, end)
        dim = m.dim + 1 if m.dim >= 0 else m.dim
        return XV.unflatten(dim, m.unflattened_size)

    def linearize(self, X0):
        return self(X0), self

    def describe(self):
        return f"{type(self.module).__name__} [{self.name}]"


@dataclass
class _Dropout(_Step):
    """``nn.Dropout`` in training mode: one mask for a sample's primal and tangents."""

    name: str
    p: float

    def __call__(self, XV):
        return XV * self._mask(XV)

    def _mask(self, XV):
        return F.dropout(XV.new_ones(XV.shape[0], 1, *XV.shape[2:]), self.p, training=True)

    def linearize(self, X0):
        mask = self._mask(X0)
        return X0 * mask, lambda V: V * mask

    def describe(self):
        return f"dropout p={self.p} [{self.name}]"


@dataclass
class _Affine(_Step):
    """:class:`ElementwiseAffine`: rows ≥ 1 scaled, the shift on row 0 only."""

    name: str
    module: ElementwiseAffine

    def __call__(self, XV):
        m = self.module
        return torch.cat([XV[:, :1] * m.scale + m.shift, XV[:, 1:] * m.scale], dim=1)

    def linearize(self, X0):
        m = self.module
        return X0 * m.scale + m.shift, lambda V: V * m.scale

    def describe(self):
        return f"ElementwiseAffine [{self.name}]"


@dataclass
class _Residual(_Step):
    """:class:`Residual`: ``XV + block(XV)`` with the block's own plan."""

    name: str
    steps: list

    def __call__(self, XV):
        return XV + self._check(XV, _run(self.steps, XV))

    def linearize(self, X0):
        Y0, lin = _linearize(self.steps, X0)
        return X0 + self._check(X0, Y0), lambda V: V + lin(V)

    def _check(self, XV, Y):
        if Y.shape != XV.shape:
            raise ValueError(f"tangent: {self.name} (Residual) needs a block that keeps the shape "
                             f"of its input, got {_module_shape(XV)} -> {_module_shape(Y)}")
        return Y

    def describe(self):
        return [f"Residual [{self.name}]", [s.describe() for s in self.steps]]


@dataclass
class _Packed(_Step):
    """A library module: ``jvp_packed`` (bijections) or ``forward_packed`` (:class:`MLP`)."""

    name: str
    module: nn.Module

    def __call__(self, XV):
        m = self.module
        if isinstance(m, MLP):
            return _rows_first(XV, m.forward_packed, XV.dim() - 3)
        return m.jvp_packed(XV)

    def describe(self):
        return f"{type(self.module).__name__}.{'forward' if isinstance(self.module, MLP) else 'jvp'}" \
               f"_packed [{self.name}]"


@dataclass
class _Fallback(_Step):
    """Any other module: ``torch.func.jvp`` of it alone, vectorised over the tangents."""

    name: str
    module: nn.Module

    def __call__(self, XV):
        cls = type(self.module)
        if cls not in _WARNED:
            _WARNED.add(cls)
            warnings.warn(
                f"injflow_ext.nn.tangent: {cls.__module__}.{cls.__qualname__} (first seen at "
                f"{self.name}) has no fast tangent rule; it runs through torch.func.jvp (correct, "
                "slower). Build it from nn.Sequential, nn.Linear, nn.Conv2d, activations and "
                "injflow_ext.nn.Residual, or give it a jvp_packed(XV) method "
                "(docs/design.md §2)", TangentRuleWarning, stacklevel=4)
        x = XV[:, 0]
        if XV.shape[1] == 1:
            return self.module(x).unsqueeze(1)
        y = self.module(x)

        def push(v):
            return torch.func.jvp(self.module, (x,), (v,))[1]
        try:
            Y = torch.func.vmap(push, in_dims=1, out_dims=1)(XV[:, 1:])
        except RuntimeError as exc:
            if "functorch" in str(exc):
                raise TypeError(
                    f"tangent: {self.name} ({cls.__qualname__}) calls injflow_ext ops, which "
                    "torch.func cannot differentiate; give the module a jvp_packed(XV) method, "
                    "or build it from modules with tangent rules") from exc
            if "mutate a captured Tensor" in str(exc):
                raise ValueError(
                    f"tangent: {self.name} ({cls.__qualname__}) changes its own state when "
                    "called (BatchNorm's running statistics in training mode, say) and mixes the "
                    "samples of a batch; the volume term needs a map of each sample alone: put "
                    "the module in eval mode, or use LayerNorm") from exc
            raise
        return torch.cat([y.unsqueeze(1), Y], dim=1)

    def describe(self):
        return f"torch.func.jvp: {type(self.module).__qualname__} [{self.name}]"


# ----------------------------------------------------------------------------------- planning

def _tokens(module: nn.Module, name: str) -> list:
    """The module tree as a flat list of (kind, name, module or data)."""
    if isinstance(module, MLP) or callable(getattr(module, "jvp_packed", None)):
        return [("packed", name, module)]
    if _is(module, nn.Sequential):
        out = []   # as Sequential.forward: every entry, also a module repeated
        for child_name, child in module._modules.items():
            out += _tokens(child, f"{name}.{child_name}")
        return out
    if _is(module, Residual):
        return [("residual", name, _plan_tokens(_tokens(module.block, f"{name}.block")))]
    if _is(module, nn.Linear):
        return [("linear", name, module)]
    if (_is(module, nn.Conv2d) and module.padding_mode == "zeros") or \
            _is(module, nn.ConvTranspose2d):
        return [("conv", name, module)]
    act = _activation(module)
    if act is not None:
        return [("act", name, act)]
    if _is(module, nn.GELU):
        return [("step", name, _Gelu(name, module.approximate))]
    if _is(module, nn.Identity) or (_is(module, nn.Dropout) and
                                    (not module.training or module.p == 0)):
        return []
    if _is(module, nn.Dropout):
        return [("step", name, _Dropout(name, module.p))]
    if (_is(module, nn.Flatten) or _is(module, nn.Unflatten)) and \
            (getattr(module, "start_dim", 1) != 0 and getattr(module, "dim", 1) != 0):
        return [("step", name, _Reshape(name, module))]
    if _is(module, ElementwiseAffine):
        return [("step", name, _Affine(name, module))]
    return [("step", name, _Fallback(name, module))]


def _plan_tokens(tokens: list) -> list:
    """Steps from tokens: runs of Linear (+ activation) merge into one MLP step, a convolution
    takes the activation after it."""
    steps, i = [], 0
    while i < len(tokens):
        kind, name, obj = tokens[i]
        if kind == "linear":
            pairs = []          # (name, linear, activation after it)
            while i < len(tokens) and tokens[i][0] == "linear":
                act = tokens[i + 1][2] if i + 1 < len(tokens) and tokens[i + 1][0] == "act" \
                    else None
                pairs.append((tokens[i][1], tokens[i][2], act))
                i += 2 if act is not None else 1
            steps += _mlp_runs(pairs)
        elif kind == "conv":
            act = tokens[i + 1][2] if i + 1 < len(tokens) and tokens[i + 1][0] == "act" else None
            steps.append(_Conv(name, obj, act))
            i += 2 if act is not None else 1
        elif kind == "act":
            steps.append(_Activation(name, obj))
            i += 1
        elif kind == "residual":
            steps.append(_Residual(name, obj))
            i += 1
        elif kind == "packed":
            steps.append(_Packed(name, obj))
            i += 1
        else:
            steps.append(obj)
            i += 1
    return steps


def _mlp_runs(pairs: list) -> list:
    """Split consecutive (name, Linear, activation) into ``tangent_mlp`` runs: one hidden
    activation between the layers of a run; its last activation may differ (one activation
    parameter for both)."""
    runs, s = [], 0
    while s < len(pairs):
        e = s
        while e + 1 < len(pairs) and pairs[e][2] == pairs[s][2] and \
                pairs[e][1].out_features == pairs[e + 1][1].in_features:
            e += 1
        hidden, last = pairs[s][2], pairs[e][2]
        if e > s and _param(hidden) is not None and _param(last) is not None and \
                _param(hidden) != _param(last):
            e -= 1
            last = pairs[e][2]
        run = pairs[s:e + 1]
        if len(run) > 1:
            for (na, a, _), (nb, b, _) in zip(run[:-1], run[1:]):
                if a.out_features != b.in_features:  # pragma: no cover - split above
                    raise ValueError(f"tangent: {na} gives {a.out_features} features and {nb} "
                                     f"takes {b.in_features}")
        runs.append(_Mlp([p[0] for p in run], [p[1] for p in run],
                         hidden if len(run) > 1 else None, last))
        s = e + 1
    return runs


def _run(steps: list, XV: torch.Tensor) -> torch.Tensor:
    for step in steps:
        XV = step(XV)
    return XV


def _linearize(steps: list, X0: torch.Tensor):
    """``(Y0, lin)`` of a chain of steps: the primal once, the tangent map composed."""
    lins = []
    for step in steps:
        X0, lin = step.linearize(X0)
        lins.append(lin)

    def chain(V):
        for lin in lins:
            V = lin(V)
        return V
    return X0, chain


def _module_shape(XV: torch.Tensor) -> tuple:
    """The module's view of packed rows: ``(B, *shape)``."""
    return (XV.shape[0], *XV.shape[2:])


class Tangent:
    """A module with its tangent rules: ``jvp_packed(XV (B, 1+K, *in)) -> (B, 1+K, *out)``,
    ``jvp(x, V)``, and ``__call__(x)`` (the module itself). Made by :func:`tangent`; the plan
    is rebuilt per call (cheap), so it follows changes of the module (``train()``/``eval()``,
    replaced layers)."""

    def __init__(self, module: nn.Module, name: str | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"tangent: module must be a torch.nn.Module, got "
                            f"{type(module).__name__}")
        self.module = module
        self.name = name or type(module).__name__

    def plan(self) -> list:
        """The steps a call runs, as text: which modules got which rule."""
        return [s.describe() for s in self._steps()]

    def _steps(self) -> list:
        return _plan_tokens(_tokens(self.module, self.name))

    def jvp_packed(self, XV: torch.Tensor) -> torch.Tensor:
        """``XV (B, 1+K, *in_shape) -> (B, 1+K, *out_shape)``: primal and tangents in one
        pass."""
        if not isinstance(XV, torch.Tensor) or XV.dim() < 3:
            raise ValueError(f"tangent({self.name}).jvp_packed: XV must be packed rows (B, 1+K, "
                             f"*shape), row 0 the primal, got "
                             f"{tuple(XV.shape) if isinstance(XV, torch.Tensor) else type(XV).__name__}")
        return _run(self._steps(), XV)

    def linearize(self, x: torch.Tensor):
        """``x (B, *in) -> (y (B, *out), lin)``: the module at x (differentiable) and its
        Jacobian there as a map ``lin(V (B, K, *in)) -> (B, K, *out)`` of tangents alone,
        reusing what the primal pass computed (activation derivatives, dropout masks): what a
        CG matvec needs without carrying the primal row every time. ``lin`` is meant for
        tangents that need no gradient (under ``torch.no_grad``)."""
        Y0, lin = _linearize(self._steps(), x.unsqueeze(1))
        return Y0[:, 0], lin

    def jvp(self, x: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, *in), V (B, K, *in) -> (y (B, *out), Ẏ (B, K, *out))``."""
        if V.shape[0] != x.shape[0] or V.shape[2:] != x.shape[1:]:
            raise ValueError(f"tangent({self.name}).jvp: V must be (B, K, *x.shape[1:]) = "
                             f"({x.shape[0]}, K, {', '.join(map(str, x.shape[1:]))}), got "
                             f"{tuple(V.shape)}")
        YV = self.jvp_packed(torch.cat([x.unsqueeze(1), V], dim=1))
        return YV[:, 0], YV[:, 1:]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def __repr__(self):
        return f"tangent({self.name})"


def tangent(module: nn.Module, name: str | None = None) -> Tangent:
    """The module with its tangent rules (see the module docstring): an object with
    ``jvp_packed``, ``jvp`` and ``__call__``. A :class:`Tangent` is returned as it is."""
    if isinstance(module, Tangent):
        return module
    return Tangent(module, name)
