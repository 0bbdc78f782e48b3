"""Fully connected conditioner networks that carry tangents (built on tangent_linear)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..ops.tangent import activation_code, tangent_linear_packed


class MLP(nn.Module):
    """``n_in -> hidden[0] -> ... -> n_out`` with an activation after every hidden layer.

    ``forward_packed(XV (B, 1+K, n_in)) -> (B, 1+K, n_out)`` carries a primal row and K tangent
    rows through every layer with one GEMM and one fused epilogue each. With ``zero_last`` the
    last layer starts at zero (a coupling built on it starts as the identity). ``n_in`` may be 0
    (the output is then a learned constant).
    """

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int] = (128, 128),
                 activation: str = "tanh", zero_last: bool = True):
        super().__init__()
        activation_code(activation)  # validates the name
        self.activation = activation
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

    def forward_packed(self, XV: torch.Tensor) -> torch.Tensor:
        n = len(self.weights)
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            XV = tangent_linear_packed(XV, W, b, self.activation if i < n - 1 else None)
        return XV

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, n_in) -> (B, n_out)``."""
        return self.forward_packed(x.unsqueeze(1))[:, 0]
