"""Forward-mode (tangent) ops: a primal and K tangents through a layer in one pass.

Layout: the primal ``x (B, n)`` and tangents ``V (B, K, n)`` are stacked as ``XV (B, 1+K, n)``
with row 0 the primal. The ``*_packed`` ops take and return that layout, so a chain of layers
runs without copies; ``tangent_linear`` and ``tangent_affine_coupling`` accept the separate
tensors for convenience (one copy to stack them).

Math (docs/design.md §1):
- linear: ``y = σ(xWᵀ + b)``, ``ẏ = σ'(xWᵀ + b) ⊙ (v Wᵀ)``
- affine coupling: ``y = x ⊙ exp(s̃) + t``, ``ẏ = v ⊙ exp(s̃) + x ⊙ exp(s̃) ⊙ s̃'(s) ⊙ ṡ + ṫ``,
  ``s̃ = tanh(s)`` (``scale="tanh"``, bounded) or ``s̃ = s`` (``scale="exp"``),
  ``log|det ∂y/∂x| = Σ s̃``.
- MLP (``tangent_mlp``): linear layers with an activation after every hidden layer, the
  rule above layer after layer; on CUDA optionally one kernel for the whole forward.
- convolution (``tangent_conv2d``): ``y = σ(conv(x, W) + b)``, ``ẏ = σ'(conv(x, W) + b) ⊙
  conv(v, W)``: one convolution of the stacked primal and tangent images (ATen/cuDNN), then
  the same fused epilogue as the linear layer (``tangent_epilogue``).
All are differentiable (first order) with respect to every input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._extension import _C
from ._checks import autocast_float32, check_tensor

__all__ = ["ACTIVATIONS", "COUPLING_SCALES", "MLP_PATHS", "FusedMlp", "tangent_linear",
           "tangent_epilogue_packed",
           "tangent_conv2d", "tangent_conv2d_packed",
           "tangent_linear_packed", "tangent_mlp", "tangent_mlp_derivatives",
           "tangent_epilogue_derivatives", "tangent_affine_coupling",
           "tangent_coupling_packed", "activation_code"]

# The kernels' codes (csrc/activations.h, csrc/tangent_mlp.h), exported by the extension.
ACTIVATIONS = {None: _C.ACTIVATION_CODES["none"], "identity": _C.ACTIVATION_CODES["none"],
               **_C.ACTIVATION_CODES}
# Default parameter (leaky_relu: negative slope, elu: alpha), as torch.nn.functional.
ACTIVATION_PARAM = {"leaky_relu": 0.01, "elu": 1.0}
COUPLING_SCALES = dict(_C.COUPLING_SCALE_CODES)
MLP_PATHS = dict(_C.MLP_PATH_CODES)
FUSED_MATH = dict(_C.MLP_FUSED_MATH_CODES)
FUSED_PIPELINES = dict(_C.MLP_FUSED_PIPELINE_CODES)
FUSED_WEIGHT_GRADS = dict(_C.MLP_FUSED_WEIGHT_GRAD_CODES)


@dataclass(frozen=True)
class FusedMlp:
    """How the fused path of :func:`tangent_mlp` (``path="fused"``, CUDA) computes: arguments
    of the op, so that fake kernels, ``torch.compile`` and CUDA-graph capture see them (the
    other paths check and ignore them).

    Args:
        math: "auto" (float32 follows ``torch.backends.cuda.matmul.allow_tf32``, as cuBLAS
            does: TF32 tensor cores with float32 accumulation when it is on, float32 FMAs
            otherwise), "fma", "tf32", or "tf32x3" (3×TF32: float32-level accuracy on the
            tensor cores; for benchmarks until measured). Float64 always uses FMAs.
        pipeline: "registers" (the next weight chunk's loads in registers) or "async"
            (cp.async into three shared-memory buffers, sm_80+; the same results bit for bit;
            unmeasured, so opt-in).
        weight_grads: "cublas" (the backward's weight gradients as one cuBLAS GEMM per layer)
            or "kernel" (one split-K kernel for all layers, in the fused kernels' arithmetic;
            deterministic; unmeasured, so opt-in).
        samples_per_block: samples per thread block (0: planned from the device; benchmarks).
        weight_grad_rows: rows per split of the weight-gradient kernel (0: planned).
    """

    math: str = "auto"
    pipeline: str = "registers"
    weight_grads: str = "cublas"
    samples_per_block: int = 0
    weight_grad_rows: int = 0

    def __post_init__(self):
        for name, value, choices in (("math", self.math, FUSED_MATH),
                                     ("pipeline", self.pipeline, FUSED_PIPELINES),
                                     ("weight_grads", self.weight_grads, FUSED_WEIGHT_GRADS)):
            if value not in choices:
                raise ValueError(f"FusedMlp: {name} must be one of {list(choices)}, got "
                                 f"{value!r}")
        for name in ("samples_per_block", "weight_grad_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"FusedMlp: {name} must be an int >= 0 (0: planned), got "
                                 f"{value!r}")

    def codes(self) -> list[int]:
        """The op's ``fused`` argument: [math, pipeline, weight_grads, samples_per_block,
        weight_grad_rows]."""
        return [FUSED_MATH[self.math], FUSED_PIPELINES[self.pipeline],
                FUSED_WEIGHT_GRADS[self.weight_grads], self.samples_per_block,
                self.weight_grad_rows]


def activation_code(activation, param=None) -> tuple[int, float]:
    """(code, parameter) of an activation name; raises a ValueError listing the valid names."""
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(k) for k in ACTIVATIONS if k is not None)
        raise ValueError(f"unknown activation {activation!r}; expected None or one of {names}")
    if param is None:
        param = ACTIVATION_PARAM.get(activation, 0.0)
    return ACTIVATIONS[activation], float(param)


def tangent_linear_packed(XV: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None,
                          activation: str | None = None, activation_param: float | None = None
                          ) -> torch.Tensor:
    """Linear layer + activation on stacked primal and tangent rows.

    Args:
        XV: ``(B, 1+K, n_in)``, row 0 the primal ``x``, rows 1.. the tangents ``V``.
        W: ``(n_out, n_in)``; b: ``(n_out,)`` or None.
        activation: None, "tanh", "relu", "leaky_relu", "elu", "softplus", "silu", "sigmoid".
        activation_param: negative slope of leaky_relu (0.01) or alpha of elu (1.0).
    Returns:
        ``YV (B, 1+K, n_out)``: row 0 ``σ(xWᵀ + b)``, rows k ``σ'(xWᵀ + b) ⊙ (V_k Wᵀ)``.
    """
    op = "tangent_linear"
    XV, W, b = autocast_float32(XV, W, b)
    check_tensor(op, "XV", XV, ndim=3)
    check_tensor(op, "W", W, shape=(None, XV.shape[-1]), like=XV)
    if b is not None:
        check_tensor(op, "b", b, shape=(W.shape[0],), like=XV)
    code, param = activation_code(activation, activation_param)
    Y, _, _ = torch.ops.injflow.tangent_linear.default(XV, W, b, code, param)
    return Y


def tangent_linear(x: torch.Tensor, V: torch.Tensor, W: torch.Tensor,
                   b: torch.Tensor | None = None, activation: str | None = None,
                   activation_param: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, Ẏ)`` for ``y = σ(xWᵀ + b)`` with tangents: x ``(B, n_in)``, V ``(B, K, n_in)``,
    W ``(n_out, n_in)``, b ``(n_out,)`` → y ``(B, n_out)``, Ẏ ``(B, K, n_out)``.
    See :func:`tangent_linear_packed` for the activations."""
    op = "tangent_linear"
    x, V = autocast_float32(x, V)
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, "V", V, shape=(x.shape[0], None, x.shape[1]), like=x)
    YV = tangent_linear_packed(torch.cat([x.unsqueeze(1), V], dim=1), W, b, activation,
                               activation_param)
    return YV[:, 0], YV[:, 1:]


def tangent_mlp(XV: torch.Tensor, weights, biases=None, activation: str | None = "tanh",
                last_activation: str | None = None, activation_param: float | None = None,
                path: str = "auto", fused: FusedMlp | None = None) -> torch.Tensor:
    """A fully connected network on stacked primal and tangent rows, every layer at once.

    Args:
        XV: ``(B, 1+K, n_in)``, row 0 the primal ``x``, rows 1.. the tangents.
        weights: sequence of ``(n_l, n_{l-1})`` weights, ``n_0 = n_in``.
        biases: sequence of ``(n_l,)`` biases (or None entries / None: no bias).
        activation: activation of every hidden layer (see :data:`ACTIVATIONS`).
        last_activation: activation of the last layer (None: linear).
        activation_param: leaky_relu's slope or elu's alpha, for both activations.
        path: "auto" (today the per-layer path on every device), "per_layer" (one
            ``tangent_linear`` per layer) or "fused" (CUDA: the whole forward in one kernel,
            the backward's gradient chain in another; an error where the shapes do not fit
            it). On an H200 the fused kernels are correct but slower than the per-layer path
            at every measured size (bench/RESULTS.md), hence not the default.
        fused: the fused path's choices (:class:`FusedMlp`: arithmetic, weight staging,
            weight gradients); None: the defaults (in float32 the fused kernels follow
            ``torch.backends.cuda.matmul.allow_tf32`` as cuBLAS does, what
            ``TrainStep(precision="tf32")`` sets).
    Returns:
        ``(B, 1+K, n_L)``: row 0 the network at ``x``, rows k its Jacobian times tangent k.
    """
    return _tangent_mlp(XV, weights, biases, activation, last_activation, activation_param,
                        path, fused)[0]


def tangent_mlp_derivatives(X: torch.Tensor, weights, biases=None, activation: str | None = "tanh",
                            last_activation: str | None = None,
                            activation_param: float | None = None
                            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The network of :func:`tangent_mlp` at the primal only, and each layer's activation
    derivative there: ``X (B, 1, n_in) -> (Y (B, 1, n_L), [dA_l (B, n_l)])``. ``Y`` is
    differentiable; ``dA_l = σ_l′(z_l)`` (ones for a linear layer) are constants. The
    Jacobian at x is then the linear map ``V ↦ (((V W_1ᵀ) ⊙ dA_1) … W_Lᵀ) ⊙ dA_L`` (a
    linearised tangent pass: K tangents without the primal row, e.g. in a CG matvec)."""
    if not isinstance(X, torch.Tensor) or X.dim() != 3 or X.shape[1] != 1:
        raise ValueError(f"tangent_mlp_derivatives: X must be the primal rows (B, 1, n_in), got "
                         f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
    Y, _, _, dA = _tangent_mlp(X, weights, biases, activation, last_activation,
                               activation_param, "per_layer", None)
    return Y, [d.detach() for d in dA]


def _tangent_mlp(XV, weights, biases, activation, last_activation, activation_param, path,
                 fused):
    """Checks, then the op: ``(Y, Z, A, dA)``."""
    op = "tangent_mlp"
    XV, = autocast_float32(XV)
    check_tensor(op, "XV", XV, ndim=3)
    weights = list(autocast_float32(*weights))
    if not weights:
        raise ValueError(f"{op}: weights must hold at least one layer, got none")
    biases = [None] * len(weights) if biases is None else list(autocast_float32(*biases))
    if len(biases) != len(weights):
        raise ValueError(f"{op}: biases must hold one entry per layer ({len(weights)}), got "
                         f"{len(biases)}")
    n = XV.shape[-1]
    for i, (W, b) in enumerate(zip(weights, biases)):
        check_tensor(op, f"weights[{i}]", W, shape=(None, n), like=XV)
        if b is None:
            biases[i] = XV.new_zeros(W.shape[0])
        else:
            check_tensor(op, f"biases[{i}]", b, shape=(W.shape[0],), like=XV)
        n = W.shape[0]
    if path not in MLP_PATHS:
        raise ValueError(f"{op}: path must be one of {list(MLP_PATHS)}, got {path!r}")
    if fused is not None and not isinstance(fused, FusedMlp):
        raise TypeError(f"{op}: fused must be None or an injflow_ext.ops.FusedMlp, got "
                        f"{type(fused).__name__}")
    code, param = activation_code(activation, activation_param)
    last_code, last_param = activation_code(last_activation, activation_param)
    # one parameter serves both activations: only leaky_relu and elu read it
    if activation in ACTIVATION_PARAM and last_activation in ACTIVATION_PARAM \
            and param != last_param:
        raise ValueError(f"{op}: {activation!r} and {last_activation!r} have different default "
                         "parameters and the op takes one; pass activation_param")
    param = param if activation in ACTIVATION_PARAM else last_param
    return torch.ops.injflow.tangent_mlp.default(
        XV, weights, biases, code, param, last_code, MLP_PATHS[path],
        [] if fused is None else fused.codes())


def tangent_epilogue_packed(Z: torch.Tensor, b: torch.Tensor | None = None,
                            activation: str | None = None,
                            activation_param: float | None = None) -> torch.Tensor:
    """The activation rule of the tangent ops on pre-activations computed elsewhere.

    Args:
        Z: ``(B, 1+K, n)``: row 0 the primal pre-activation, rows k its tangents.
        b: ``(n,)`` added to row 0, or None.
        activation, activation_param: as :func:`tangent_linear_packed`.
    Returns:
        ``(B, 1+K, n)``: row 0 ``σ(Z[:, 0] + b)``, rows k ``σ'(Z[:, 0] + b) ⊙ Z[:, k]``.
    """
    return _tangent_epilogue(Z, b, activation, activation_param)[0]


def tangent_epilogue_derivatives(Z: torch.Tensor, b: torch.Tensor | None = None,
                                 activation: str | None = None,
                                 activation_param: float | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Z (B, 1, n) -> (σ(Z + b) (B, 1, n), dA = σ′(Z + b) (B, n))``: the epilogue at the
    primal and its derivative there (a constant), for a linearised tangent pass."""
    Y, _, dA = _tangent_epilogue(Z, b, activation, activation_param)
    return Y, dA.detach()


def _tangent_epilogue(Z, b, activation, activation_param):
    op = "tangent_epilogue"
    Z, b = autocast_float32(Z, b)
    check_tensor(op, "Z", Z, ndim=3)
    if b is not None:
        check_tensor(op, "b", b, shape=(Z.shape[-1],), like=Z)
    code, param = activation_code(activation, activation_param)
    return torch.ops.injflow.tangent_epilogue.default(Z, b, code, param)


def tangent_conv2d_packed(XV: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          activation: str | None = None, stride=1, padding=0, dilation=1,
                          groups: int = 1, activation_param: float | None = None
                          ) -> torch.Tensor:
    """A 2-D convolution + activation on a primal image and K tangent images, stacked.

    Args:
        XV: ``(B, 1+K, C, H, W)``, row 0 the primal ``x``, rows 1.. the tangents ``V``.
        weight: ``(C', C / groups, kH, kW)``; bias: ``(C',)`` or None.
        activation, activation_param: as :func:`tangent_linear_packed`.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d``.
    Returns:
        ``(B, 1+K, C', H', W')``: row 0 ``σ(conv(x) + b)``, rows k ``σ'(conv(x) + b) ⊙
        conv(V_k)``. One convolution of all ``B·(1+K)`` images (ATen, cuDNN on a GPU; its own
        autograd), then the fused epilogue (``tangent_epilogue``).
    """
    op = "tangent_conv2d"
    XV, weight, bias = autocast_float32(XV, weight, bias)
    check_tensor(op, "XV", XV, ndim=5)
    check_tensor(op, "weight", weight, ndim=4, like=XV)
    B, R, C = XV.shape[:3]
    if weight.shape[1] * groups != C:
        raise ValueError(f"{op}: weight must be (C', C / groups, kH, kW) with C = {C} and "
                         f"groups = {groups}, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(weight.shape[0],), like=XV)
    Z = torch.nn.functional.conv2d(XV.reshape(B * R, *XV.shape[2:]), weight, None, stride,
                                   padding, dilation, groups)
    Cout, Ho, Wo = Z.shape[1:]
    b = None if bias is None else bias[:, None].expand(Cout, Ho * Wo).reshape(-1)
    Y = tangent_epilogue_packed(Z.reshape(B, R, Cout * Ho * Wo), b, activation, activation_param)
    return Y.view(B, R, Cout, Ho, Wo)


def tangent_conv2d(x: torch.Tensor, V: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None, activation: str | None = None, stride=1,
                   padding=0, dilation=1, groups: int = 1,
                   activation_param: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, Ẏ)`` of ``y = σ(conv2d(x, weight) + bias)`` with tangents: x ``(B, C, H, W)``,
    V ``(B, K, C, H, W)`` → y ``(B, C', H', W')``, Ẏ ``(B, K, C', H', W')``. See
    :func:`tangent_conv2d_packed`."""
    op = "tangent_conv2d"
    x, V = autocast_float32(x, V)
    check_tensor(op, "x", x, ndim=4)
    check_tensor(op, "V", V, shape=(x.shape[0], None, *x.shape[1:]), like=x)
    YV = tangent_conv2d_packed(torch.cat([x.unsqueeze(1), V], dim=1), weight, bias, activation,
                               stride, padding, dilation, groups, activation_param)
    return YV[:, 0], YV[:, 1:]


def tangent_coupling_packed(XV: torch.Tensor, ST: torch.Tensor, scale: str = "tanh"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling of the transformed half on stacked primal and tangent rows.

    Args:
        XV: ``(B, 1+K, m)``: ``[x_b; V_b]``.
        ST: ``(B, 1+K, 2m)``: row 0 ``[s, t]`` (the conditioner's output at the primal),
            rows k ``[ṡ_k, ṫ_k]`` (its tangents).
        scale: "tanh" (``s̃ = tanh(s)``, bounded) or "exp" (``s̃ = s``).
    Returns:
        ``YV (B, 1+K, m)`` and ``logabsdet (B,) = Σ s̃``.
    """
    op = "tangent_affine_coupling"
    XV, ST = autocast_float32(XV, ST)
    check_tensor(op, "XV", XV, ndim=3)
    check_tensor(op, "ST", ST, shape=(XV.shape[0], XV.shape[1], 2 * XV.shape[2]), like=XV)
    if scale not in COUPLING_SCALES:
        raise ValueError(f"{op}: scale must be one of {list(COUPLING_SCALES)}, got {scale!r}")
    return torch.ops.injflow.tangent_coupling.default(XV, ST, COUPLING_SCALES[scale])


def tangent_affine_coupling(x_b, V_b, s, S_dot, t, T_dot, scale: str = "tanh"):
    """``(y_b, Ẏ_b, logabsdet)`` of ``y_b = x_b ⊙ exp(s̃) + t`` with tangents.

    Shapes: x_b, s, t ``(B, m)``; V_b, S_dot, T_dot ``(B, K, m)`` → y_b ``(B, m)``,
    Ẏ_b ``(B, K, m)``, logabsdet ``(B,)``.
    """
    op = "tangent_affine_coupling"
    x_b, V_b, s, S_dot, t, T_dot = autocast_float32(x_b, V_b, s, S_dot, t, T_dot)
    check_tensor(op, "x_b", x_b, ndim=2)
    B, m = x_b.shape
    check_tensor(op, "V_b", V_b, shape=(B, None, m), like=x_b)
    K = V_b.shape[1]
    for name, a in (("s", s), ("t", t)):
        check_tensor(op, name, a, shape=(B, m), like=x_b)
    for name, a in (("S_dot", S_dot), ("T_dot", T_dot)):
        check_tensor(op, name, a, shape=(B, K, m), like=x_b)
    XV = torch.cat([x_b.unsqueeze(1), V_b], dim=1)
    ST = torch.cat([torch.cat([s.unsqueeze(1), S_dot], 1), torch.cat([t.unsqueeze(1), T_dot], 1)],
                   dim=2)
    YV, lad = tangent_coupling_packed(XV, ST, scale)
    return YV[:, 0], YV[:, 1:], lad


# ----------------------------------------------------------------------------- registrations
# Fake (meta) kernels, for torch.compile and opcheck.

# The fake kernels refuse what the kernels refuse (torch._check), so that tracing fails where
# running would, with the same message.

@torch.library.register_fake("injflow::tangent_linear")
def _tangent_linear_fake(XV, W, b, activation, slope):
    torch._check(XV.dim() == 3, lambda: f"tangent_linear: XV must be (B, 1+K, n_in), got "
                                        f"{tuple(XV.shape)}")
    torch._check(W.dim() == 2 and W.shape[1] == XV.shape[2],
                 lambda: f"tangent_linear: W must be (n_out, {XV.shape[2]}), got "
                         f"{tuple(W.shape)}")
    torch._check(b is None or tuple(b.shape) == (W.shape[0],),
                 lambda: f"tangent_linear: b must be ({W.shape[0]},)")
    torch._check(XV.dtype == W.dtype, lambda: f"tangent_linear: W must have dtype {XV.dtype}")
    B, R, _ = XV.shape
    shape = (B, R, W.shape[0])
    return XV.new_empty(shape), XV.new_empty(shape), XV.new_empty(B, W.shape[0])


@torch.library.register_fake("injflow::tangent_linear_backward")
def _tangent_linear_backward_fake(grad_Y, XV, W, Z, Y, dA, activation, slope, input_only=False):
    return XV.new_empty(XV.shape), W.new_empty(W.shape), W.new_empty(W.shape[0])


@torch.library.register_fake("injflow::tangent_epilogue")
def _tangent_epilogue_fake(Z, b, activation, slope):
    torch._check(Z.dim() == 3, lambda: f"tangent_epilogue: Z must be (B, 1+K, n), got "
                                       f"{tuple(Z.shape)}")
    torch._check(b is None or tuple(b.shape) == (Z.shape[2],),
                 lambda: f"tangent_epilogue: b must be ({Z.shape[2]},)")
    return Z.new_empty(Z.shape), Z.new_empty(Z.shape), Z.new_empty(Z.shape[0], Z.shape[2])


@torch.library.register_fake("injflow::tangent_epilogue_backward")
def _tangent_epilogue_backward_fake(grad_Y, Z, Y, dA, activation, slope):
    return Z.new_empty(Z.shape), Z.new_empty(Z.shape[2])


@torch.library.register_fake("injflow::tangent_coupling")
def _tangent_coupling_fake(XV, ST, scale):
    torch._check(XV.dim() == 3, lambda: f"tangent_coupling: XV must be (B, 1+K, m), got "
                                        f"{tuple(XV.shape)}")
    torch._check(ST.dim() == 3 and tuple(ST.shape) == (XV.shape[0], XV.shape[1], 2 * XV.shape[2]),
                 lambda: f"tangent_coupling: ST must be ({XV.shape[0]}, {XV.shape[1]}, "
                         f"{2 * XV.shape[2]}), got {tuple(ST.shape)}")
    return XV.new_empty(XV.shape), XV.new_empty(XV.shape[0])


@torch.library.register_fake("injflow::tangent_coupling_backward")
def _tangent_coupling_backward_fake(grad_Y, grad_logabsdet, XV, ST, scale):
    return XV.new_empty(XV.shape), ST.new_empty(ST.shape)


@torch.library.register_fake("injflow::tangent_mlp")
def _tangent_mlp_fake(XV, weights, biases, activation, slope, last_activation, path, fused):
    B, R, _ = XV.shape
    torch._check(len(weights) >= 1, lambda: "tangent_mlp: weights must hold at least one layer")
    torch._check(len(biases) == len(weights),
                 lambda: "tangent_mlp: biases must hold one tensor per layer")
    n = XV.shape[2]
    for W in weights:
        torch._check(W.dim() == 2 and W.shape[1] == n,
                     lambda n=n, W=W: f"tangent_mlp: a weight must be (n_out, {n}), got "
                                      f"{tuple(W.shape)}")
        n = W.shape[0]
    Z = [XV.new_empty(B, R, W.shape[0]) for W in weights]
    A = [XV.new_empty(B, R, W.shape[0]) for W in weights[:-1]]
    dA = [XV.new_empty(B, W.shape[0]) for W in weights]
    return XV.new_empty(B, R, weights[-1].shape[0]), Z, A, dA


@torch.library.register_fake("injflow::tangent_mlp_backward")
def _tangent_mlp_backward_fake(grad_Y, XV, weights, Y, Z, A, dA, activation, slope,
                               last_activation, path, fused, input_only=False):
    return (XV.new_empty(XV.shape), [W.new_empty(W.shape) for W in weights],
            [W.new_empty(W.shape[0]) for W in weights])


# Under torch.autocast every forward op runs in float32 (the wrappers above cast first; these
# rules do the same for direct torch.ops calls): low-precision GEMMs would lose the tangents'
# accuracy that the volume term's log-determinant needs.
for _name in ("tangent_linear", "tangent_coupling", "tangent_mlp", "tangent_epilogue"):
    for _device_type in ("cpu", "cuda"):
        torch.library.register_autocast(f"injflow::{_name}", _device_type, torch.float32)


# Autograd of all eight ops is registered in C++ (csrc/tangent_autograd.cpp, the Autograd key):
# a Python-registered autograd cost ~0.25 ms of interpreter time per call. The backward ops
# are first order only and say so if a second derivative is requested.
