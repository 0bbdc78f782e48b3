"""Image bijections with batched tangents (issue #17, first part): squeeze, per-channel ActNorm,
invertible 1×1 convolution, and affine couplings with checkerboard or channel masks whose
conditioners are small CNNs built on ``tangent_conv2d``.

They act on images ``(C, H, W)`` flattened to vectors of ``n = C·H·W`` features (channel-major,
as ``tensor.reshape(B, -1)``), so they are ordinary :class:`~injflow_ext.nn.Bijection` s: they
compose with ``Sequential``, carry packed tangents ``(B, 1+K, n)`` and plug into the volume-term
estimators unchanged. ``shape`` is the input image shape, ``out_shape`` the output's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ops.tangent import COUPLING_SCALES, tangent_conv2d_packed, tangent_coupling_packed
from .base import Bijection, check_width, take_features
from .layers import _SCALE_FUNCTIONS, ActNorm, InvertibleLinear, Permutation, Sequential

__all__ = ["LogitPixels", "Squeeze", "Unsqueeze", "ChannelActNorm", "InvertibleConv1x1", "ConvNet",
           "ConvAffineCoupling", "checkerboard_mask", "channel_mask", "image_flow"]


def _check_shape(layer: str, shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{layer}: shape must be (C, H, W) of positive ints, got {shape}")
    return shape


class Squeeze(Permutation):
    """Space-to-depth: ``(C, H, W) -> (4C, H/2, W/2)``, each 2 × 2 block of a channel becomes
    four channels (as ``torch.nn.functional.pixel_unshuffle``); a fixed permutation of the
    flattened features, log|det| = 0."""

    def __init__(self, shape: Sequence[int]):
        C, H, W = _check_shape("Squeeze", shape)
        if H % 2 or W % 2:
            raise ValueError(f"Squeeze: H and W must be even, got shape {(C, H, W)}")
        idx = torch.arange(C * H * W).view(C, H // 2, 2, W // 2, 2)
        perm = idx.permute(0, 2, 4, 1, 3).reshape(-1)
        super().__init__(C * H * W, perm=perm)
        self.shape, self.out_shape = (C, H, W), (4 * C, H // 2, W // 2)


class Unsqueeze(Permutation):
    """Depth-to-space, the inverse of :class:`Squeeze`: ``(4C, H/2, W/2) -> (C, H, W)`` (as
    ``torch.nn.functional.pixel_shuffle``); built from the image shape ``(C, H, W)`` it
    produces. A fixed permutation of the flattened features, log|det| = 0."""

    def __init__(self, shape: Sequence[int]):
        C, H, W = _check_shape("Unsqueeze", shape)
        squeeze = Squeeze((C, H, W))
        super().__init__(C * H * W, perm=squeeze.inv_perm)
        self.shape, self.out_shape = squeeze.out_shape, (C, H, W)


class ChannelActNorm(ActNorm):
    """``y = x ⊙ exp(log_scale[c]) + shift[c]`` per channel of a ``(C, H, W)`` image,
    initialised from the first batch it sees in training mode (zero mean, unit variance per
    channel over the batch and the pixels): :class:`~injflow_ext.nn.ActNorm` with one scale and
    shift per group of ``H·W`` features. log|det| = H·W·Σ log_scale."""

    def __init__(self, shape: Sequence[int], eps: float = 1e-6):
        C, H, W = _check_shape("ChannelActNorm", shape)
        super().__init__(C * H * W, eps, group_size=H * W)
        self.shape = self.out_shape = (C, H, W)


class InvertibleConv1x1(Bijection):
    """Glow's invertible 1 × 1 convolution: every pixel's channel vector times one ``C × C``
    matrix in the LU parametrisation of :class:`~injflow_ext.nn.InvertibleLinear` (initialised
    at a random rotation); log|det| = H·W·log|det W|."""

    def __init__(self, shape: Sequence[int], seed: int = 0):
        super().__init__()
        C, H, W = _check_shape("InvertibleConv1x1", shape)
        self.shape = self.out_shape = (C, H, W)
        self.n, self.pixels = C * H * W, H * W
        self.linear = InvertibleLinear(C, seed=seed)

    def forward_packed(self, XV):
        check_width("InvertibleConv1x1", XV, self.n)
        B, R = XV.shape[:2]
        Wm = self.linear.weight()
        YV = torch.matmul(Wm, XV.reshape(B, R, self.shape[0], self.pixels))
        return YV.reshape(B, R, self.n), (self.pixels * self.linear.log_s.sum()).expand(B)

    def inverse_with_logabsdet(self, y):
        check_width("InvertibleConv1x1", y, self.n, "y")
        B, C = y.shape[0], self.shape[0]
        L, U = self.linear._factors()
        # x = U⁻¹ L⁻¹ Pᵀ y per pixel, all pixels of all images as columns
        cols = y.reshape(B, C, self.pixels).transpose(0, 1).reshape(C, -1)
        z = torch.linalg.solve_triangular(L, self.linear.P.T @ cols, upper=False,
                                          unitriangular=True)
        x = torch.linalg.solve_triangular(U, z, upper=True)
        x = x.reshape(C, B, self.pixels).transpose(0, 1).reshape(B, self.n)
        return x, (-self.pixels * self.linear.log_s.sum()).expand(B)


class ConvNet(nn.Module):
    """``C_in -> hidden -> ... -> C_out`` channels by 3 × 3 convolutions (padding 1, so H × W is
    kept) with an activation after every hidden layer; ``forward_packed(XV (B, 1+K, C_in, H,
    W))`` carries the tangent images through every layer with ``tangent_conv2d_packed``. With
    ``zero_last`` the last layer starts at zero (a coupling on it starts as the identity)."""

    def __init__(self, c_in: int, c_out: int, hidden: Sequence[int] = (32, 32),
                 activation: str = "relu", zero_last: bool = True):
        super().__init__()
        self.activation = activation
        sizes = [c_in, *hidden, c_out]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            W, bias = torch.empty(b, a, 3, 3), torch.empty(b)
            if zero_last and i == len(sizes) - 2:
                nn.init.zeros_(W)
                nn.init.zeros_(bias)
            else:   # as torch.nn.Conv2d
                bound = 1 / math.sqrt(a * 9)
                nn.init.uniform_(W, -bound, bound)
                nn.init.uniform_(bias, -bound, bound)
            self.weights.append(nn.Parameter(W))
            self.biases.append(nn.Parameter(bias))

    def forward_packed(self, XV: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            XV = tangent_conv2d_packed(XV, W, b, self.activation if i < last else None,
                                       padding=1)
        return XV

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_packed(x.unsqueeze(1))[:, 0]


def checkerboard_mask(shape: Sequence[int], parity: int = 0) -> torch.Tensor:
    """Bool ``(C·H·W,)``: True on the pixels with ``(h + w) % 2 == parity``, every channel."""
    C, H, W = _check_shape("checkerboard_mask", shape)
    hw = (torch.arange(H)[:, None] + torch.arange(W)[None, :]) % 2 == parity
    return hw.expand(C, H, W).reshape(-1)


def channel_mask(shape: Sequence[int], first: bool = True) -> torch.Tensor:
    """Bool ``(C·H·W,)``: True on the first ``C // 2`` channels (or on the others)."""
    C, H, W = _check_shape("channel_mask", shape)
    c = torch.arange(C) < C // 2
    return (c if first else ~c)[:, None].expand(C, H * W).reshape(-1)


class ConvAffineCoupling(Bijection):
    """Affine coupling of an image: the features where ``mask`` is True (``x_a``) condition,
    the others are transformed, ``y_b = x_b ⊙ exp(s̃) + t``, with ``(s, t)`` from a
    :class:`ConvNet` on the image ``x ⊙ mask`` (``2C`` output channels, read at the
    transformed positions) and ``s̃ = tanh(s)`` or ``s``. With tangents: the CNN by
    ``tangent_conv2d``, the coupling by ``tangent_coupling_packed``.

    Args: shape (C, H, W); mask: "checkerboard", "checkerboard-odd", "channel",
    "channel-second" or a bool tensor ``(C·H·W,)``; hidden: CNN widths; activation; scale."""

    def __init__(self, shape: Sequence[int], mask="checkerboard", hidden: Sequence[int] = (32, 32),
                 activation: str = "relu", scale: str = "tanh"):
        super().__init__()
        C, H, W = _check_shape("ConvAffineCoupling", shape)
        if scale not in COUPLING_SCALES:
            raise ValueError(f"ConvAffineCoupling: scale must be one of {list(COUPLING_SCALES)}, "
                             f"got {scale!r}")
        named = {"checkerboard": lambda: checkerboard_mask(shape, 0),
                 "checkerboard-odd": lambda: checkerboard_mask(shape, 1),
                 "channel": lambda: channel_mask(shape, True),
                 "channel-second": lambda: channel_mask(shape, False)}
        if isinstance(mask, str):
            if mask not in named:
                raise ValueError(f"ConvAffineCoupling: mask must be one of {list(named)} or a "
                                 f"bool tensor, got {mask!r}")
            mask = named[mask]()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        n = C * H * W
        if mask.shape != (n,) or bool(mask.all()) or not bool(mask.any()):
            raise ValueError(f"ConvAffineCoupling: mask must be a bool tensor ({n},) with both "
                             f"values, got shape {tuple(mask.shape)}")
        self.shape = self.out_shape = (C, H, W)
        self.n, self.scale = n, scale
        idx_a, idx_b = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        self.register_buffer("mask", mask.float(), persistent=False)
        self.register_buffer("idx_a", idx_a, persistent=False)
        self.register_buffer("idx_b", idx_b, persistent=False)
        self.register_buffer("unperm", torch.argsort(torch.cat([idx_a, idx_b])),
                             persistent=False)
        self.conditioner = ConvNet(C, 2 * C, hidden, activation, zero_last=True)

    def _st(self, XV: torch.Tensor) -> torch.Tensor:
        """``[s_b, t_b]`` rows ``(B, 1+K, 2m)`` of the conditioner on the masked image rows."""
        B, R = XV.shape[:2]
        C, H, W = self.shape
        ST = self.conditioner.forward_packed((XV * self.mask.to(XV.dtype)).view(B, R, C, H, W))
        S, T = ST.reshape(B, R, 2, self.n).unbind(2)
        return torch.cat([take_features(S, self.idx_b), take_features(T, self.idx_b)], dim=-1)

    def forward_packed(self, XV):
        check_width("ConvAffineCoupling", XV, self.n)
        YVb, logabsdet = tangent_coupling_packed(take_features(XV, self.idx_b), self._st(XV),
                                                 self.scale)
        YV = torch.cat([take_features(XV, self.idx_a), YVb], dim=-1)
        return take_features(YV, self.unperm), logabsdet

    def inverse_with_logabsdet(self, y):
        check_width("ConvAffineCoupling", y, self.n, "y")
        s, t = self._st(y.unsqueeze(1))[:, 0].chunk(2, dim=-1)
        st = _SCALE_FUNCTIONS[self.scale](s)
        xb = (take_features(y, self.idx_b) - t) * torch.exp(-st)
        x = torch.cat([take_features(y, self.idx_a), xb], dim=-1)
        return take_features(x, self.unperm), -st.sum(-1)


def image_flow(shape: Sequence[int], levels: int = 2, couplings: int = 4,
               hidden: Sequence[int] = (32, 32), activation: str = "relu", seed: int = 0,
               actnorm: bool = True, latent_mixing: bool = True) -> Sequential:
    """A Glow/RealNVP-style flow whose forward ends at images ``shape = (C, H, W)`` (on the
    flattened layout), the ambient flow h of an image RectangularFlow: read from the data side,
    ``levels`` scales, each ``couplings`` Glow blocks (ChannelActNorm, InvertibleConv1x1,
    ConvAffineCoupling with alternating checkerboard masks), a Squeeze between scales
    (``(C, H, W) -> (4C, H/2, W/2)``), so the convolutions at the data end see the image's
    own pixel grid. Nothing is factored out: h must be a bijection of all ``C·H·W`` features.

    With ``latent_mixing`` (default) the latent end is a dense :class:`InvertibleLinear` over
    all features (a random rotation at initialisation): a RectangularFlow's latent is the
    first d features there, and without it those would be d neighbouring pixels of the
    coarsest scale, which local convolutions can fill only with a corner of the image.

    ``flow.shape`` is the latent end's image shape, ``flow.out_shape`` = ``shape``."""
    C, H, W = _check_shape("image_flow", shape)
    data_side: list[Bijection] = []          # from the image towards the latent
    cur = (C, H, W)
    for level in range(levels):
        for i in range(couplings):
            if actnorm:
                data_side.append(ChannelActNorm(cur))
            data_side.append(InvertibleConv1x1(cur, seed=seed + 100 * level + i))
            data_side.append(ConvAffineCoupling(cur, "checkerboard" if i % 2 == 0 else
                                                "checkerboard-odd", hidden, activation))
        if level + 1 < levels:
            data_side.append(Unsqueeze(cur))  # forward (towards the image) un-squeezes to cur
            cur = (4 * cur[0], cur[1] // 2, cur[2] // 2)
    layers: list[Bijection] = [InvertibleLinear(C * H * W, seed=seed + 7)] if latent_mixing else []
    layers += data_side[::-1]
    flow = Sequential(*layers)
    flow.shape, flow.out_shape = cur, (C, H, W)
    return flow


class LogitPixels(Bijection):
    """The logit preprocessing of pixel data as the data-side end of a flow: forward (towards
    the data) ``x = (σ(y) − α) / (1 − 2α)``, inverse ``y = logit(α + (1 − 2α) x)``, so that a
    model whose h ends with it has its density in the pixels' own units (values in (0, 1),
    e.g. dequantised). log|det ∂x/∂y| = Σ log σ'(y) − n log(1 − 2α); tangents ``σ'(y) / (1 −
    2α) ⊙ ẏ``. Pixels outside ``(−α/(1−2α), (1−α)/(1−2α))`` have no preimage (NaN)."""

    def __init__(self, n: int, alpha: float = 0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"LogitPixels: alpha must be in [0, 0.5), got {alpha!r}")
        self.n, self.alpha = n, float(alpha)

    def forward_packed(self, XV):
        check_width("LogitPixels", XV, self.n)
        a, c = self.alpha, 1 - 2 * self.alpha
        s = torch.sigmoid(XV[:, :1])
        ds = s * (1 - s)                                   # σ'(y), (B, 1, n)
        YV = torch.cat([(s - a) / c, XV[:, 1:] * (ds / c)], dim=1)
        logabsdet = torch.log(ds[:, 0]).sum(-1) - self.n * math.log(c)
        return YV, logabsdet

    def inverse_with_logabsdet(self, x):
        check_width("LogitPixels", x, self.n, "y")
        a, c = self.alpha, 1 - 2 * self.alpha
        p = a + c * x
        y = torch.log(p) - torch.log1p(-p)
        return y, -(torch.log(p * (1 - p)).sum(-1) - self.n * math.log(c))
