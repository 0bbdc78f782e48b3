"""Fully connected conditioner networks that carry tangents (built on tangent_mlp)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ops.tangent import MLP_PATHS, FusedMlp, activation_code, tangent_mlp


class MLP(nn.Module):
    """``n_in -> hidden[0] -> ... -> n_out`` with an activation after every hidden layer.

    ``forward_packed(XV (B, 1+K, n_in)) -> (B, 1+K, n_out)`` carries a primal row and K tangent
    rows through every layer with ``tangent_mlp`` (by default one GEMM and one fused epilogue
    per layer; on CUDA ``path="fused"`` runs the whole network in one kernel). ``path``
    ("auto", "per_layer", "fused") chooses explicitly and ``fused`` (a
    :class:`~injflow_ext.ops.FusedMlp`, or None for its defaults) how the fused path computes
    (see :func:`injflow_ext.ops.tangent.tangent_mlp`); :func:`set_mlp_path` sets both for
    every MLP of a model. With ``zero_last`` the
    last layer starts at zero (a coupling built on it starts as the identity). ``n_in`` may be 0
    (the output is then a learned constant).
    """

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int] = (128, 128),
                 activation: str = "tanh", zero_last: bool = True, path: str = "auto",
                 fused: FusedMlp | None = None):
        super().__init__()
        activation_code(activation)  # validates the name
        self.activation = activation
        self.path = path
        self.fused = fused
        sizes = [n_in, *hidden, n_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            W = torch.empty(b, a)
            bias = torch.empty(b)
            last = i == len(sizes) - 2
            if last and zero_last:
                nn.init.zeros_(W)
                nn.init.zeros_(bias)
            else:  # as torch.nn.Linear
                bound = 1 / math.sqrt(a) if a > 0 else 1.0
                nn.init.uniform_(W, -bound, bound)
                nn.init.uniform_(bias, -bound, bound)
            self.weights.append(nn.Parameter(W))
            self.biases.append(nn.Parameter(bias))

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in MLP_PATHS:
            raise ValueError(f"MLP: path must be one of {list(MLP_PATHS)}, got {value!r}")
        self._path = value

    @property
    def fused(self) -> FusedMlp | None:
        return self._fused

    @fused.setter
    def fused(self, value: FusedMlp | None) -> None:
        if value is not None and not isinstance(value, FusedMlp):
            raise TypeError(f"MLP: fused must be None or an injflow_ext.ops.FusedMlp, got "
                            f"{type(value).__name__}")
        self._fused = value

    def forward_packed(self, XV: torch.Tensor) -> torch.Tensor:
        return tangent_mlp(XV, list(self.weights), list(self.biases), self.activation, None,
                           path=self.path, fused=self.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, n_in) -> (B, n_out)``."""
        return self.forward_packed(x.unsqueeze(1))[:, 0]


def set_mlp_path(module: nn.Module, path: str, fused: FusedMlp | None = None) -> int:
    """Set ``path`` ("auto", "per_layer", "fused") and the fused path's options ``fused`` (a
    :class:`~injflow_ext.ops.FusedMlp`; None: its defaults) on every :class:`MLP` inside
    ``module``; returns how many were set."""
    mlps = [m for m in module.modules() if isinstance(m, MLP)]
    for m in mlps:
        m.path = path
        m.fused = fused
    return len(mlps)
