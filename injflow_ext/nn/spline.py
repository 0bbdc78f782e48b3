"""An elementwise monotone rational-quadratic spline (Durkan et al., "Neural Spline Flows",
2019), unconditional: learned per feature.

In a prior flow of latent dimension d = 1 an affine coupling has nothing to condition on and
is an affine map, so a stack of them can only shift and scale the Gaussian; a spline can give
the latent any smooth density (docs/experiments.md, "the prior flow for small d").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Bijection, check_width

__all__ = ["ElementwiseSpline"]


class ElementwiseSpline(Bijection):
    """``y_i = s_i(x_i)``: a monotone rational-quadratic spline with ``bins`` bins on
    ``[−bound, bound]`` per feature, the identity outside (slopes 1 at the ends, so the map and
    its derivative are continuous). Starts as the identity.

    Args:
        n: features. bins: knots − 1. bound: half-width of the spline's interval.
        min_width, min_height, min_slope: lower limits that keep the map well conditioned.
    Shapes: ``x (B, n)``; packed tangents ``XV (B, 1+K, n)`` scale by ``s_i'(x_i)``.
    """

    def __init__(self, n: int, bins: int = 8, bound: float = 4.0, min_width: float = 1e-3,
                 min_height: float = 1e-3, min_slope: float = 1e-3):
        super().__init__()
        if bins < 2 or bound <= 0:
            raise ValueError(f"ElementwiseSpline: bins must be >= 2 and bound > 0, got {bins}, "
                             f"{bound}")
        self.n, self.bins, self.bound = n, bins, float(bound)
        self.min_width, self.min_height, self.min_slope = min_width, min_height, min_slope
        self.widths = nn.Parameter(torch.zeros(n, bins))
        self.heights = nn.Parameter(torch.zeros(n, bins))
        # softplus(v) + min_slope = 1 at the inner knots: the identity
        self.slopes = nn.Parameter(torch.full((n, bins - 1), math.log(math.expm1(1 - min_slope))))

    def _knots(self):
        """Knot positions ``xk, yk (n, bins+1)`` and slopes ``dk (n, bins+1)``."""
        B, K = self.bound, self.bins
        w = self.min_width + (1 - self.min_width * K) * F.softmax(self.widths, -1)
        h = self.min_height + (1 - self.min_height * K) * F.softmax(self.heights, -1)
        zero = w.new_zeros(self.n, 1)
        xk = -B + 2 * B * torch.cat([zero, torch.cumsum(w, -1)], -1)
        yk = -B + 2 * B * torch.cat([zero, torch.cumsum(h, -1)], -1)
        xk = torch.cat([xk[:, :1], xk[:, 1:-1], xk.new_full((self.n, 1), B)], -1)
        yk = torch.cat([yk[:, :1], yk[:, 1:-1], yk.new_full((self.n, 1), B)], -1)
        one = w.new_ones(self.n, 1)
        dk = torch.cat([one, self.min_slope + F.softplus(self.slopes), one], -1)
        return xk, yk, dk

    @staticmethod
    def _gather(t, idx):
        """``t (n, m)`` at per-element bin indices ``idx (B, n)`` -> ``(B, n)``."""
        return torch.gather(t.unsqueeze(0).expand(idx.shape[0], -1, -1), 2,
                            idx.unsqueeze(-1)).squeeze(-1)

    def _bin(self, knots, v):
        """The bin of each element of ``v (B, n)`` among ``knots (n, bins+1)``."""
        idx = torch.searchsorted(knots.detach().contiguous(),
                                 v.detach().T.contiguous()).T - 1
        return idx.clamp(0, self.bins - 1)

    def _params(self, knots_x, knots_y, dk, idx):
        g = self._gather
        x0, x1 = g(knots_x[:, :-1], idx), g(knots_x[:, 1:], idx)
        y0, y1 = g(knots_y[:, :-1], idx), g(knots_y[:, 1:], idx)
        d0, d1 = g(dk[:, :-1], idx), g(dk[:, 1:], idx)
        return x0, x1 - x0, y0, y1 - y0, d0, d1

    def _forward_values(self, x):
        """``(y, dy/dx)`` of ``x (B, n)``."""
        xk, yk, dk = self._knots()
        inside = (x > -self.bound) & (x < self.bound)
        xc = x.clamp(-self.bound, self.bound)
        x0, w, y0, h, d0, d1 = self._params(xk, yk, dk, self._bin(xk, xc))
        s = h / w
        xi = ((xc - x0) / w).clamp(0, 1)
        t = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * t
        y = y0 + h * (s * xi * xi + d0 * t) / den
        dy = s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2) / (den * den)
        return torch.where(inside, y, x), torch.where(inside, dy, torch.ones_like(dy))

    def forward_packed(self, XV):
        check_width("ElementwiseSpline", XV, self.n)
        y, dy = self._forward_values(XV[:, 0])
        YV = torch.cat([y.unsqueeze(1), XV[:, 1:] * dy.unsqueeze(1)], dim=1)
        return YV, torch.log(dy).sum(-1)

    def inverse_with_logabsdet(self, y):
        check_width("ElementwiseSpline", y, self.n, "y")
        xk, yk, dk = self._knots()
        inside = (y > -self.bound) & (y < self.bound)
        yc = y.clamp(-self.bound, self.bound)
        x0, w, y0, h, d0, d1 = self._params(xk, yk, dk, self._bin(yk, yc))
        s = h / w
        dy_ = yc - y0
        c2 = d1 + d0 - 2 * s
        a = h * (s - d0) + dy_ * c2
        b = h * d0 - dy_ * c2
        c = -s * dy_
        disc = (b * b - 4 * a * c).clamp(min=0)
        xi = ((2 * c) / (-b - torch.sqrt(disc))).clamp(0, 1)
        x = x0 + xi * w
        t = xi * (1 - xi)
        den = s + c2 * t
        dydx = s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2) / (den * den)
        x = torch.where(inside, x, y)
        lad = torch.where(inside, -torch.log(dydx), torch.zeros_like(dydx))
        return x, lad.sum(-1)
