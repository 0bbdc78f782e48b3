"""Tangent ops against torch.func.jvp of the plain-PyTorch function (float64), gradcheck with
respect to every input, opcheck, CPU-vs-CUDA, argument errors."""

import pytest
import torch
import torch.nn.functional as F
from reference import PLAIN_ACTIVATIONS

import injflow_ext
from injflow_ext import (
    tangent_affine_coupling,
    tangent_coupling_packed,
    tangent_linear,
    tangent_linear_packed,
)


def jvp_rows(f, x, V):
    """Reference: y = f(x) and Ẏ[:, k] = torch.func.jvp(f, x, V[:, k])."""
    y = f(x)
    tangents = [torch.func.jvp(f, (x,), (V[:, k],))[1] for k in range(V.shape[1])]
    return y, torch.stack(tangents, dim=1)


@pytest.mark.parametrize("activation", list(PLAIN_ACTIVATIONS))
@pytest.mark.parametrize("K", [1, 3, 21])
def test_tangent_linear_matches_jvp(device, activation, K):
    B, n_in, n_out = 6, 9, 7
    x = torch.randn(B, n_in, dtype=torch.float64, device=device) * 2
    V = torch.randn(B, K, n_in, dtype=torch.float64, device=device)
    W = torch.randn(n_out, n_in, dtype=torch.float64, device=device)
    b = torch.randn(n_out, dtype=torch.float64, device=device)
    act = PLAIN_ACTIVATIONS[activation]
    y, Yd = tangent_linear(x, V, W, b, activation)
    y_ref, Yd_ref = jvp_rows(lambda x_: act(x_ @ W.T + b), x, V)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Yd, Yd_ref, rtol=1e-12, atol=1e-12)


def test_tangent_linear_without_bias_and_float32(device):
    x = torch.randn(5, 4, device=device)
    V = torch.randn(5, 2, 4, device=device)
    W = torch.randn(3, 4, device=device)
    y, Yd = tangent_linear(x, V, W, None, "silu")
    y_ref, Yd_ref = jvp_rows(lambda x_: F.silu(x_ @ W.T), x, V)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(Yd, Yd_ref)


@pytest.mark.parametrize("activation", list(PLAIN_ACTIVATIONS))
def test_tangent_linear_gradcheck(device, activation):
    B, K, n_in, n_out = 3, 2, 4, 3
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    # keep pre-activations away from the kinks of relu/leaky_relu/elu for finite differences
    x = (torch.randn(B, n_in, dtype=torch.float64, device=device)).requires_grad_()
    V = torch.randn(B, K, n_in, **kw)
    W = torch.randn(n_out, n_in, **kw)
    b = torch.randn(n_out, **kw)
    with torch.no_grad():
        z = x @ W.T + b
        b += torch.where(z.abs() < 0.1, 0.3, 0.0).mean(0)

    def f(x, V, W, b):
        return tangent_linear(x, V, W, b, activation)

    assert torch.autograd.gradcheck(f, (x, V, W, b))


@pytest.mark.parametrize("activation", [None, "tanh", "silu"])
def test_tangent_linear_gradients_at_a_large_batch(device, activation):
    """A batch big enough that the CPU backward runs in several blocks (about 4 MiB of the
    pre-activation gradient at most, split evenly: here 701 elements in blocks of 176, the last
    of 173): every gradient equals autograd through the plain-PyTorch expression."""
    B, K, n = 701, 21, 128
    kw = dict(dtype=torch.float64, device=device)
    x = torch.randn(B, n, **kw).requires_grad_()
    V = torch.randn(B, K, n, **kw).requires_grad_()
    W = (torch.randn(n, n, **kw) / n ** 0.5).requires_grad_()
    b = torch.randn(n, **kw).requires_grad_()
    gy, gYd = torch.randn(B, n, **kw), torch.randn(B, K, n, **kw)
    act = PLAIN_ACTIVATIONS[activation]

    def ours(x, V, W, b):
        return tangent_linear(x, V, W, b, activation)

    def plain(x, V, W, b):
        return jvp_rows(lambda x_: act(x_ @ W.T + b), x, V)

    grads = []
    for f in (ours, plain):
        y, Yd = f(x, V, W, b)
        grads.append(torch.autograd.grad((y * gy).sum() + (Yd * gYd).sum(), (x, V, W, b)))
    for g, g_ref, name in zip(*grads, "xVWb"):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")

@pytest.mark.parametrize("scale", ["tanh", "exp"])
@pytest.mark.parametrize("K", [1, 3, 21])
def test_tangent_coupling_matches_jvp(device, scale, K):
    B, m = 5, 6
    kw = dict(dtype=torch.float64, device=device)
    x, s, t = (torch.randn(B, m, **kw) for _ in range(3))
    V, Sd, Td = (torch.randn(B, K, m, **kw) for _ in range(3))
    scale_fn = torch.tanh if scale == "tanh" else (lambda a: a)

    def f(x_, s_, t_):
        return x_ * torch.exp(scale_fn(s_)) + t_

    y, Yd, lad = tangent_affine_coupling(x, V, s, Sd, t, Td, scale)
    y_ref = f(x, s, t)
    Yd_ref = torch.stack([torch.func.jvp(f, (x, s, t), (V[:, k], Sd[:, k], Td[:, k]))[1]
                          for k in range(K)], dim=1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Yd, Yd_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lad, scale_fn(s).sum(-1), rtol=1e-12, atol=1e-12)
    # logabsdet is log|det ∂y/∂x| of the elementwise map
    J = torch.func.vmap(torch.func.jacfwd(lambda xx, ss: xx * torch.exp(scale_fn(ss))))(x, s)
    torch.testing.assert_close(lad, torch.logdet(J), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", ["tanh", "exp"])
def test_tangent_coupling_gradcheck(device, scale):
    B, K, m = 3, 2, 4
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    args = [torch.randn(B, m, **kw), torch.randn(B, K, m, **kw), torch.randn(B, m, **kw),
            torch.randn(B, K, m, **kw), torch.randn(B, m, **kw), torch.randn(B, K, m, **kw)]

    def f(*a):
        return tangent_affine_coupling(*a, scale=scale)

    assert torch.autograd.gradcheck(f, args)


def test_packed_chain_matches_unpacked(device):
    # linear -> linear -> coupling on the packed layout equals the unpacked calls
    B, K, n = 4, 3, 5
    kw = dict(dtype=torch.float64, device=device)
    XV = torch.randn(B, 1 + K, n, **kw)
    W1, W2 = torch.randn(8, n, **kw), torch.randn(2 * n, 8, **kw)
    H = tangent_linear_packed(XV, W1, None, "tanh")
    ST = tangent_linear_packed(H, W2)
    YV, lad = tangent_coupling_packed(XV, ST)
    h, Hd = tangent_linear(XV[:, 0], XV[:, 1:], W1, None, "tanh")
    st, STd = tangent_linear(h, Hd, W2)
    y, Yd, lad2 = tangent_affine_coupling(XV[:, 0], XV[:, 1:], st[:, :n], STd[..., :n],
                                          st[:, n:], STd[..., n:])
    torch.testing.assert_close(YV[:, 0], y)
    torch.testing.assert_close(YV[:, 1:], Yd)
    torch.testing.assert_close(lad, lad2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, dtype, requires_grad):
    kw = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    XV, W, b = torch.randn(3, 3, 4, **kw), torch.randn(5, 4, **kw), torch.randn(5, **kw)
    torch.library.opcheck(torch.ops.injflow.tangent_linear.default, (XV, W, b, 1, 0.0))
    torch.library.opcheck(torch.ops.injflow.tangent_linear.default, (XV, W, None, 3, 0.01))
    ST = torch.randn(3, 3, 8, **kw)
    torch.library.opcheck(torch.ops.injflow.tangent_coupling.default, (XV, ST, 0))
    torch.library.opcheck(torch.ops.injflow.tangent_coupling.default, (XV, ST, 1))
    with torch.no_grad():
        Y, Z, dA = torch.ops.injflow.tangent_linear.default(XV, W, b, 1, 0.0)
    gY = torch.randn(3, 3, 5, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.injflow.tangent_linear_backward.default,
                          (gY, XV.detach(), W.detach(), Z, Y, dA, 1, 0.0))
    torch.library.opcheck(torch.ops.injflow.tangent_linear_backward.default,
                          (gY, XV.detach(), W.detach(), Z, Y, dA, 1, 0.0, True))
    torch.library.opcheck(torch.ops.injflow.tangent_coupling_backward.default,
                          (torch.randn(3, 3, 4, dtype=dtype, device=device),
                           torch.randn(3, dtype=dtype, device=device), XV.detach(), ST.detach(), 0))


def test_input_only_backward_skips_the_parameters_and_keeps_the_input_gradient(device):
    """autograd.grad with respect to the input alone runs the backward with input_only (no
    weight GEMM): the input gradient is the full backward's, the parameter gradients of the op
    come back as zeros, and gradients asked of the parameters are unchanged."""
    kw = dict(dtype=torch.float64, device=device)
    XV = torch.randn(4, 3, 5, **kw, requires_grad=True)
    W, b = torch.randn(6, 5, **kw, requires_grad=True), torch.randn(6, **kw, requires_grad=True)
    Y = tangent_linear_packed(XV, W, b, "tanh")
    gY = torch.randn_like(Y)
    full = torch.autograd.grad(Y, (XV, W, b), gY, retain_graph=True)
    only_x, = torch.autograd.grad(Y, XV, gY)
    torch.testing.assert_close(only_x, full[0], rtol=0, atol=0)
    with torch.no_grad():
        _, Z, dA = torch.ops.injflow.tangent_linear.default(XV, W, b, 1, 0.0)
        Yp = Y.detach()
        gX, gW, gb = torch.ops.injflow.tangent_linear_backward.default(
            gY, XV.detach(), W.detach(), Z, Yp, dA, 1, 0.0, True)
    torch.testing.assert_close(gX, full[0], rtol=0, atol=0)
    assert not gW.any() and not gb.any()


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    kw = dict(dtype=torch.float64, device=device)
    W = torch.randn(6, 4, **kw, requires_grad=True)

    @torch.compile(fullgraph=True)
    def f(XV, W):
        ST = tangent_linear_packed(XV, W, None, "tanh")
        YV, lad = tangent_coupling_packed(XV[..., :3], ST)
        return YV.square().sum() + lad.sum()

    XV = torch.randn(5, 3, 4, **kw)
    out = f(XV, W)
    g, = torch.autograd.grad(out, W)
    ST = tangent_linear_packed(XV, W, None, "tanh")
    YV, lad = tangent_coupling_packed(XV[..., :3], ST)
    ref = YV.square().sum() + lad.sum()
    g_ref, = torch.autograd.grad(ref, W)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)


def test_double_backward_says_unsupported():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 1, 3, dtype=torch.float64)
    W = torch.randn(2, 3, dtype=torch.float64)
    y, _ = tangent_linear(x, V, W, None, "tanh")
    g, = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        g.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available() or not injflow_ext.build_info()["cuda_compiled"],
                    reason="needs a GPU and an extension built with CUDA kernels")
@pytest.mark.parametrize("activation", list(PLAIN_ACTIVATIONS))
def test_cuda_matches_cpu(activation):
    XV = torch.randn(64, 22, 128, dtype=torch.float64)
    W = torch.randn(96, 128, dtype=torch.float64) / 10
    b = torch.randn(96, dtype=torch.float64)
    ST = torch.randn(64, 22, 256, dtype=torch.float64)
    res = []
    for dev in ("cpu", "cuda"):
        args = [a.to(dev).requires_grad_() for a in (XV, W, b, ST)]
        Y = tangent_linear_packed(args[0], args[1], args[2], activation)
        YV, lad = tangent_coupling_packed(args[0], args[3])
        loss = (Y * Y.detach().cos()).sum() + (YV.sin()).sum() + lad.sum()
        grads = torch.autograd.grad(loss, args)
        res.append([t.cpu() for t in (Y, YV, lad, *grads)])
    for a, b_ in zip(*res):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available() or not injflow_ext.build_info()["cuda_compiled"],
                    reason="needs a GPU and an extension built with CUDA kernels")
def test_cuda_bias_gradient_fused_and_deterministic_mode():
    """The CUDA backward sums the bias gradient inside the pre-activation kernel (atomic adds
    across blocks); deterministic mode sums it separately. Both must agree with the CPU, and
    deterministic mode must repeat bit for bit. 3000 rows span many blocks; 50 features leave
    a partial block of features."""
    XV = torch.randn(3000, 3, 40, dtype=torch.float64)
    W = torch.randn(50, 40, dtype=torch.float64) / 5
    b = torch.randn(50, dtype=torch.float64)

    def grad_b(dev):
        bb = b.to(dev).requires_grad_()
        Y = tangent_linear_packed(XV.to(dev), W.to(dev), bb, "tanh")
        return torch.autograd.grad((Y * Y.detach().cos()).sum(), bb)[0].cpu()

    cpu, fused = grad_b("cpu"), grad_b("cuda")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        det1, det2 = grad_b("cuda"), grad_b("cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(det1, det2)
    torch.testing.assert_close(fused, cpu, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(det1, cpu, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: tangent_linear(torch.randn(2, 3), torch.randn(2, 1, 4), torch.randn(5, 3)),
     ValueError, r"V must have shape \(2, \*, 3\), got \(2, 1, 4\)"),
    (lambda: tangent_linear(torch.randn(2, 3), torch.randn(2, 1, 3), torch.randn(5, 4)),
     ValueError, r"W must have shape \(\*, 3\), got \(5, 4\)"),
    (lambda: tangent_linear(torch.randn(2, 3), torch.randn(2, 1, 3), torch.randn(5, 3),
                            torch.randn(4)), ValueError, r"b must have shape \(5\)"),
    (lambda: tangent_linear(torch.randn(2, 3), torch.randn(2, 1, 3), torch.randn(5, 3), None,
                            "gelu"), ValueError, r"unknown activation 'gelu'"),
    (lambda: tangent_linear(torch.randn(2, 3), torch.randn(2, 1, 3),
                            torch.randn(5, 3, dtype=torch.float64)), TypeError,
     r"W must have dtype torch.float32"),
    (lambda: tangent_linear(torch.ones(2, 3, dtype=torch.int32), torch.randn(2, 1, 3),
                            torch.randn(5, 3)), TypeError, r"x must be float32 or float64"),
    (lambda: tangent_affine_coupling(torch.randn(2, 3), torch.randn(2, 1, 3), torch.randn(2, 4),
                                     torch.randn(2, 1, 3), torch.randn(2, 3),
                                     torch.randn(2, 1, 3)), ValueError, r"s must have shape \(2, 3\)"),
    (lambda: tangent_affine_coupling(torch.randn(2, 3), torch.randn(2, 1, 3), torch.randn(2, 3),
                                     torch.randn(2, 2, 3), torch.randn(2, 3),
                                     torch.randn(2, 1, 3)), ValueError, r"S_dot must have shape \(2, 1, 3\)"),
    (lambda: tangent_coupling_packed(torch.randn(2, 1, 3), torch.randn(2, 1, 6), "softplus"),
     ValueError, r"scale must be one of"),
])
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
