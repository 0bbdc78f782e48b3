"""Bijections with batched tangents: AffineCoupling, ActNorm, Permutation, Reverse,
InvertibleLinear, Sequential. Shapes: ``x (B, n)``, packed tangents ``XV (B, 1+K, n)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ops.tangent import COUPLING_SCALES, tangent_coupling_packed
from .base import Bijection, check_width, take_features
from .mlp import MLP

# s̃ = scale(s) of the coupling, for the inverse pass (the forward pass runs in the fused op).
_SCALE_FUNCTIONS = {"tanh": torch.tanh, "exp": lambda s: s}


class AffineCoupling(Bijection):
    """``y_a = x_a``, ``y_b = x_b ⊙ exp(s̃) + t`` with ``(s, t) = MLP(x_a)``, ``s̃ = tanh(s)``.

    Args:
        n: number of features.
        hidden: hidden widths of the conditioner MLP.
        activation: its activation (see ``injflow_ext.ops.ACTIVATIONS``).
        mask: bool ``(n,)``, True for the conditioning features ``x_a``; default: the first
            ``n // 2`` features (half split). With ``n = 1`` nothing conditions and ``(s, t)``
            are learned constants.
        scale: "tanh" (bounded, the default) or "exp" (``s̃ = s``).
    The conditioner's last layer starts at zero, so the layer starts as the identity.
    """

    def __init__(self, n: int, hidden: Sequence[int] = (128, 128), activation: str = "tanh",
                 mask: torch.Tensor | None = None, scale: str = "tanh"):
        super().__init__()
        if scale not in COUPLING_SCALES:
            raise ValueError(f"AffineCoupling: scale must be one of {list(COUPLING_SCALES)}, "
                             f"got {scale!r}")
        if mask is None:
            mask = torch.arange(n) < n // 2
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (n,):
            raise ValueError(f"AffineCoupling: mask must be a bool tensor of shape ({n},), got "
                             f"{tuple(mask.shape)}")
        if bool(mask.all()):
            raise ValueError("AffineCoupling: mask conditions on every feature; at least one "
                             "feature must be transformed")
        self.n, self.scale = n, scale
        idx_a, idx_b = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        perm = torch.cat([idx_a, idx_b])
        self.register_buffer("idx_a", idx_a, persistent=False)
        self.register_buffer("idx_b", idx_b, persistent=False)
        self.register_buffer("unperm", torch.argsort(perm), persistent=False)
        # the half split (x_a the first features) needs no gathers: slices and a concatenation
        self.m = len(idx_a)
        self.leading_split = bool(torch.equal(idx_a, torch.arange(self.m)))
        self.conditioner = MLP(len(idx_a), 2 * len(idx_b), hidden, activation, zero_last=True)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (..., n) -> (x_a (..., m), x_b (..., n − m))``."""
        if self.leading_split:
            return x[..., :self.m], x[..., self.m:]
        return take_features(x, self.idx_a), take_features(x, self.idx_b)

    def merge(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        x = torch.cat([xa, xb], dim=-1)
        return x if self.leading_split else take_features(x, self.unperm)

    def forward_packed(self, XV):
        check_width("AffineCoupling", XV, self.n)
        XVa, XVb = self.split(XV)
        ST = self.conditioner.forward_packed(XVa)
        YVb, logabsdet = tangent_coupling_packed(XVb, ST, self.scale)
        return self.merge(XVa, YVb), logabsdet

    def inverse_with_logabsdet(self, y):
        check_width("AffineCoupling", y, self.n, "y")
        ya, yb = self.split(y)
        s, t = self.conditioner(ya).chunk(2, dim=-1)
        st = _SCALE_FUNCTIONS[self.scale](s)
        xb = (yb - t) * torch.exp(-st)
        return self.merge(ya, xb), -st.sum(-1)


class ActNorm(Bijection):
    """``y = x ⊙ exp(log_scale) + shift`` per feature, initialised from the first batch it sees
    in training mode so that the output (forward) or input (inverse) has zero mean and unit
    variance per feature.

    With ``group_size > 1`` one scale and shift serve each run of ``group_size`` consecutive
    features (``n / group_size`` parameters each; the statistics pool the batch and the group):
    per channel of a flattened image (:class:`~injflow_ext.nn.ChannelActNorm`)."""

    def __init__(self, n: int, eps: float = 1e-6, group_size: int = 1):
        super().__init__()
        if group_size < 1 or n % group_size:
            raise ValueError(f"ActNorm: group_size must divide n = {n}, got {group_size}")
        self.n, self.eps, self.group_size = n, eps, group_size
        self.log_scale = nn.Parameter(torch.zeros(n // group_size))
        self.shift = nn.Parameter(torch.zeros(n // group_size))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False

    def _full(self, v: torch.Tensor) -> torch.Tensor:
        """A per-group parameter ``(n / group_size,)`` as per-feature ``(n,)``."""
        return v if self.group_size == 1 else v.repeat_interleave(self.group_size)

    @torch.no_grad()
    def _initialize(self, data: torch.Tensor, direction: str) -> None:
        if data.shape[0] < 2:
            return
        grouped = data.reshape(data.shape[0], -1, self.group_size)
        mean, std = grouped.mean((0, 2)), grouped.std((0, 2)) + self.eps
        if direction == "forward":     # y = (x − mean) / std
            self.log_scale.copy_(-torch.log(std))
            self.shift.copy_(-mean / std)
        else:                          # x = (y − shift) e^{-s} standardised: shift = mean, e^s = std
            self.log_scale.copy_(torch.log(std))
            self.shift.copy_(mean)
        self.initialized.fill_(True)
        self._seen_initialized = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_initialized = False   # read the loaded buffer again

    def _maybe_initialize(self, data, direction):
        # the buffer is read (a host sync on a GPU) only until it is seen set, so that training
        # steps can be captured in a CUDA graph (TrainStep(mode="captured"))
        if self.training and not self._seen_initialized:
            if bool(self.initialized):
                self._seen_initialized = True
            else:
                self._initialize(data, direction)

    def forward_packed(self, XV):
        check_width(type(self).__name__, XV, self.n)
        self._maybe_initialize(XV[:, 0], "forward")
        YV = XV * self._full(torch.exp(self.log_scale))
        y0 = YV[:, :1] + self._full(self.shift)
        YV = torch.cat([y0, YV[:, 1:]], dim=1)
        return YV, (self.group_size * self.log_scale.sum()).expand(XV.shape[0])

    def inverse_with_logabsdet(self, y):
        check_width(type(self).__name__, y, self.n, "y")
        self._maybe_initialize(y, "inverse")
        x = (y - self._full(self.shift)) * self._full(torch.exp(-self.log_scale))
        return x, (-self.group_size * self.log_scale.sum()).expand(y.shape[0])


class Permutation(Bijection):
    """A fixed permutation of the features (random from ``seed`` unless ``perm`` is given)."""

    def __init__(self, n: int, perm: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        if perm is None:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        perm = torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(n)):
            raise ValueError(f"Permutation: perm must be a permutation of range({n}), got "
                             f"{perm.tolist()}")
        self.n = n
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward_packed(self, XV):
        check_width(type(self).__name__, XV, self.n)
        return take_features(XV, self.perm), XV.new_zeros(XV.shape[0])

    def inverse_with_logabsdet(self, y):
        check_width(type(self).__name__, y, self.n, "y")
        return take_features(y, self.inv_perm), y.new_zeros(y.shape[0])


class Reverse(Permutation):
    """Reverses the order of the features."""

    def __init__(self, n: int):
        super().__init__(n, perm=torch.arange(n - 1, -1, -1))


class InvertibleLinear(Bijection):
    """``y = x Wᵀ`` with ``W = P L (U + diag(sign · exp(log_s)))`` (LU parametrisation: P a
    fixed permutation, L unit lower-triangular, U strictly upper-triangular), so that
    ``log|det W| = Σ log_s``. Initialised at a random rotation."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        P, L, U = torch.linalg.lu(Q)
        s = torch.diagonal(U)
        self.n = n
        self.register_buffer("P", P.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(n, n), -1))
        self.lower = nn.Parameter((L * self.lower_mask.double()).float())
        self.upper = nn.Parameter(torch.triu(U, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def _factors(self):
        eye = torch.eye(self.n, dtype=self.lower.dtype, device=self.lower.device)
        L = self.lower * self.lower_mask + eye
        U = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return L, U

    def weight(self) -> torch.Tensor:
        L, U = self._factors()
        return self.P @ L @ U

    def forward_packed(self, XV):
        check_width("InvertibleLinear", XV, self.n)
        return XV @ self.weight().T, self.log_s.sum().expand(XV.shape[0])

    def inverse_with_logabsdet(self, y):
        check_width("InvertibleLinear", y, self.n, "y")
        L, U = self._factors()
        # x = W⁻¹ y per sample: W = P L U  =>  x = U⁻¹ L⁻¹ Pᵀ y
        z = torch.linalg.solve_triangular(L, (y @ self.P).T, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(U, z, upper=True).T
        return x, (-self.log_s.sum()).expand(y.shape[0])


class FixedAffine(Bijection):
    """``y = x ⊙ scale + shift`` with fixed (non-trainable) per-feature ``shift`` and ``scale``:
    a data standardisation kept inside a model so that its densities are in the data's units."""

    def __init__(self, n: int, shift, scale):
        super().__init__()
        shift = torch.as_tensor(shift, dtype=torch.float32).reshape(-1)
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if shift.shape != (n,) or scale.shape != (n,):
            raise ValueError(f"FixedAffine: shift and scale must have {n} entries, got "
                             f"{tuple(shift.shape)} and {tuple(scale.shape)}")
        if not bool((scale > 0).all()):
            raise ValueError("FixedAffine: every scale must be positive")
        self.n = n
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward_packed(self, XV):
        check_width("FixedAffine", XV, self.n)
        YV = XV * self.scale
        YV = torch.cat([YV[:, :1] + self.shift, YV[:, 1:]], dim=1)
        return YV, torch.log(self.scale).sum().expand(XV.shape[0])

    def inverse_with_logabsdet(self, y):
        check_width("FixedAffine", y, self.n, "y")
        return (y - self.shift) / self.scale, (-torch.log(self.scale).sum()).expand(y.shape[0])


class Sequential(Bijection):
    """Composition: ``forward`` applies the layers in order, ``inverse`` in reverse order."""

    def __init__(self, *layers: Bijection):
        super().__init__()
        for layer in layers:
            if not isinstance(layer, Bijection):
                raise TypeError(f"Sequential: every layer must be a Bijection, got "
                                f"{type(layer).__name__}")
        self.layers = nn.ModuleList(layers)
        self.n = getattr(layers[0], "n", None) if layers else None

    def forward_packed(self, XV):
        total = XV.new_zeros(XV.shape[0])
        for layer in self.layers:
            XV, lad = layer.forward_packed(XV)
            total = total + lad
        return XV, total

    def inverse_with_logabsdet(self, y):
        total = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, lad = layer.inverse_with_logabsdet(y)
            total = total + lad
        return y, total

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]
