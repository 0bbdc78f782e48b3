"""tangent_mlp (a whole MLP on a primal row and K tangent rows) against torch.func.jvp of the
plain network in float64, gradcheck, opcheck, torch.compile; on CUDA the fused kernels against
the CPU op (float64 to rounding, float32 within a multiple of PyTorch's own float32 error),
CUDA-graph capture, determinism, and argument errors."""

import pytest
import torch
from conftest import DEVICES, _cuda_usable
from reference import PLAIN_ACTIVATIONS

from injflow_ext import tangent_linear_packed, tangent_mlp
from injflow_ext.ops import FusedMlp
from injflow_ext.ops.tangent import MLP_PATHS
from injflow_ext.train.step import matmul_precision

PLAIN = PLAIN_ACTIVATIONS
needs_cuda = pytest.mark.skipif(not _cuda_usable(),
                                reason="needs a GPU and an extension built with CUDA kernels")


def make_mlp(widths, dtype=torch.float64, device="cpu", requires_grad=False, scale=1.0):
    """Weights (n_l, n_{l-1}) scaled like torch.nn.Linear's init, and biases."""
    Ws, bs = [], []
    for a, b in zip(widths[:-1], widths[1:]):
        Ws.append((torch.randn(b, a, dtype=dtype, device=device) * scale / max(a, 1) ** 0.5)
                  .requires_grad_(requires_grad))
        bs.append((torch.randn(b, dtype=dtype, device=device) * 0.3).requires_grad_(requires_grad))
    return Ws, bs


def plain_mlp(x, Ws, bs, activation, last_activation=None):
    """The network in plain PyTorch: x (B, n_0) -> (B, n_L)."""
    for i, (W, b) in enumerate(zip(Ws, bs)):
        act = PLAIN[activation if i < len(Ws) - 1 else last_activation]
        x = act(x @ W.T + b)
    return x


def reference(XV, Ws, bs, activation, last_activation=None):
    """Row 0: the network at the primal; rows k: torch.func.jvp along tangent k."""
    f = lambda x: plain_mlp(x, Ws, bs, activation, last_activation)  # noqa: E731
    x = XV[:, 0]
    rows = [f(x)] + [torch.func.jvp(f, (x,), (XV[:, k],))[1] for k in range(1, XV.shape[1])]
    return torch.stack(rows, dim=1)


def replayed(step):
    """What ``step()`` returns when captured in a CUDA graph (after a warm-up run on a side
    stream, outside the capture) and replayed once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # its own stream, as TrainStep captures
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    return out


def tf32(x):
    """float32 values rounded to TF32 (10 mantissa bits, to nearest with ties away from zero,
    as cvt.rna.tf32.f32 does), returned in float64."""
    bits = x.detach().float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32).double()


def tf32_gemm_bound(x, w, b=None, rel=2e-5):
    """x @ wᵀ (+ b) of TF32-rounded operands, in float64, and a bound on the float32
    accumulation error of each element: rel · (|x| @ |w|ᵀ + |b|). The products of two TF32
    values are exact in float32, so a tensor-core GEMM may differ from it only by its float32
    additions (n·2⁻²⁴ relative in the worst case, far less in practice)."""
    x, w = tf32(x), tf32(w)
    exact, scale = x @ w.T, x.abs() @ w.abs().T
    if b is not None:
        exact[:, 0] += b.double()
        scale[:, 0] += b.double().abs()
    return exact, rel * scale


def weight_grad_bounds(GZ, ins, math="fma"):
    """For each layer, gW_l = GZ_lᵀ A_l summed over all rows in float64 (of the TF32-rounded
    operands for math "tf32"), and a bound on each element's error as a split-K kernel in
    `math` may make it: c · (|GZ_l|ᵀ |A_l|) with, for `rows` rows and the unit roundoff u of
    GZ's dtype, fma: (rows + 1) · u (a split adds its rows one by one, then the splits are
    added); tf32: (2·rows + 2) · 2⁻²⁴ (products of TF32 values are exact in float32; 2u per
    addition allows tensor cores that truncate); tf32x3: 2⁻²⁰ (the dropped tail·tail product
    and the tails' own rounding, 3·2⁻²² of each product) + (6·rows + 2) · 2⁻²⁴ (three mma per
    product)."""
    u = 2.0**-24 if GZ[0].dtype == torch.float32 else 2.0**-53
    out = []
    for g, a in zip(GZ, ins):
        rows = g.numel() // g.shape[-1]
        g2, a2 = g.reshape(rows, g.shape[-1]), a.reshape(rows, a.shape[-1])
        g2, a2 = (tf32(g2), tf32(a2)) if math == "tf32" else (g2.double(), a2.double())
        c = {"fma": (rows + 1) * u, "tf32": (2 * rows + 2) * 2.0**-24,
             "tf32x3": 2.0**-20 + (6 * rows + 2) * 2.0**-24}[math]
        out.append((g2.T @ a2, c * (g2.abs().T @ a2.abs())))
    return out


def assert_weight_grad_accuracy(math, GZ, ins, gW):
    """The weight gradients gW_l = GZ_lᵀ A_l of a kernel in `math` ("tf32" or "tf32x3"), each
    layer's relative error (norm, against float64) next to a float32 GEMM's of the same
    operands: TF32's more than 10× it (the operands were rounded: about 1 000× on the tests'
    shapes), 3×TF32's at most 4× it (float32-accurate)."""
    for (exact, _), g, a, w in zip(weight_grad_bounds(GZ, ins), GZ, ins, gW):
        if w.numel() == 0:
            continue
        g2, a2 = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])
        with matmul_precision("float32"):
            f32 = g2.T @ a2
        err_f32 = float((f32.double() - exact).norm() / exact.norm())
        err = float((w.double() - exact).norm() / exact.norm())
        if math == "tf32":
            assert err > 10 * err_f32, f"error {err:.1e}, float32's {err_f32:.1e}: no TF32"
        else:
            assert err <= 4 * err_f32 + 1e-12, f"error {err:.1e}, float32's {err_f32:.1e}"


def paths_for(device):
    return ["auto", "per_layer"] + (["fused"] if torch.device(device).type == "cuda" else [])


# --------------------------------------------------------------------------- every device

@pytest.mark.parametrize("activation", list(PLAIN))
@pytest.mark.parametrize("K", [0, 1, 5])
def test_matches_jvp_of_the_plain_network(device, activation, K):
    XV = torch.randn(7, 1 + K, 6, dtype=torch.float64, device=device)
    Ws, bs = make_mlp([6, 9, 8, 5], device=device)
    ref = reference(XV, Ws, bs, activation)
    for path in paths_for(device):
        Y = tangent_mlp(XV, Ws, bs, activation, path=path)
        torch.testing.assert_close(Y, ref, rtol=1e-12, atol=1e-12, msg=path)


@pytest.mark.parametrize("last_activation", ["tanh", "softplus", "sigmoid"])
def test_last_activation_and_missing_biases(device, last_activation):
    XV = torch.randn(4, 3, 5, dtype=torch.float64, device=device)
    Ws, bs = make_mlp([5, 7, 3], device=device)
    zero = [torch.zeros_like(b) for b in bs]
    ref = reference(XV, Ws, zero, "silu", last_activation)
    for path in paths_for(device):
        Y = tangent_mlp(XV, Ws, None, "silu", last_activation, path=path)
        torch.testing.assert_close(Y, ref, rtol=1e-12, atol=1e-12, msg=path)


def test_single_layer_equals_tangent_linear(device):
    XV = torch.randn(5, 4, 3, dtype=torch.float64, device=device)
    Ws, bs = make_mlp([3, 6], device=device)
    for path in paths_for(device):
        Y = tangent_mlp(XV, Ws, bs, "tanh", "elu", path=path)
        torch.testing.assert_close(Y, tangent_linear_packed(XV, Ws[0], bs[0], "elu"), msg=path)


@pytest.mark.parametrize("activation", ["tanh", "relu", "silu"])
def test_gradcheck(device, activation):
    XV = torch.randn(3, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    Ws, bs = make_mlp([4, 5, 6, 3], device=device, requires_grad=True)
    if activation == "relu":  # keep pre-activations away from the kink for finite differences
        with torch.no_grad():
            for b in bs:
                b.add_(torch.sign(b) * 0.5)
    for path in paths_for(device):
        def f(XV, *params, path=path):
            return tangent_mlp(XV, params[:3], params[3:], activation, "tanh", path=path)
        assert torch.autograd.gradcheck(f, (XV, *Ws, *bs)), path


def test_gradients_match_autograd_of_the_plain_network(device):
    XV = torch.randn(9, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    Ws, bs = make_mlp([6, 16, 16, 5], device=device, requires_grad=True)
    gY = torch.randn(9, 4, 5, dtype=torch.float64, device=device)
    params = (XV, *Ws, *bs)
    ref = torch.autograd.grad((reference(XV, Ws, bs, "softplus") * gY).sum(), params)
    for path in paths_for(device):
        grads = torch.autograd.grad((tangent_mlp(XV, Ws, bs, "softplus", path=path) * gY).sum(),
                                    params)
        for g, r, name in zip(grads, ref, ["XV", "W0", "W1", "W2", "b0", "b1", "b2"]):
            torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11, msg=f"{path}: {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, dtype, requires_grad):
    kw = dict(dtype=dtype, device=device)
    XV = torch.randn(5, 3, 4, **kw, requires_grad=requires_grad)
    Ws, bs = make_mlp([4, 8, 6], dtype=dtype, device=device, requires_grad=requires_grad)
    codes = [0, 1] + ([2] if torch.device(device).type == "cuda" else [])
    fused = FusedMlp(pipeline="async").codes()   # the fused path's options, through the schema
    for path in codes:
        torch.library.opcheck(torch.ops.injflow.tangent_mlp.default,
                              (XV, Ws, bs, 1, 0.0, 0, path, []))
        torch.library.opcheck(torch.ops.injflow.tangent_mlp.default,
                              (XV, Ws, bs, 3, 0.01, 1, path, fused))
        with torch.no_grad():
            Y, Z, A, dA = torch.ops.injflow.tangent_mlp.default(XV, Ws, bs, 1, 0.0, 1, path, [])
        gY = torch.randn_like(Y)
        torch.library.opcheck(torch.ops.injflow.tangent_mlp_backward.default,
                              (gY, XV.detach(), [W.detach() for W in Ws], Y, Z, A, dA, 1, 0.0,
                               1, path, fused))
        torch.library.opcheck(torch.ops.injflow.tangent_mlp_backward.default,
                              (gY, XV.detach(), [W.detach() for W in Ws], Y, Z, A, dA, 1, 0.0,
                               1, path, [], True))


def test_input_gradient_alone_equals_the_full_backward(device):
    """autograd.grad(Y, XV) runs the backward with input_only (no weight GEMMs): the same input
    gradient as the full backward, on every path of the device."""
    XV = torch.randn(6, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    Ws, bs = make_mlp([4, 8, 8, 3], device=device, requires_grad=True)
    paths = ["per_layer"] + (["fused"] if torch.device(device).type == "cuda" else [])
    for path in paths:
        Y = tangent_mlp(XV, Ws, bs, "tanh", path=path)
        gY = torch.randn_like(Y)
        full = torch.autograd.grad(Y, [XV, *Ws, *bs], gY, retain_graph=True)
        only_x, = torch.autograd.grad(Y, XV, gY)
        torch.testing.assert_close(only_x, full[0], rtol=0, atol=0)
        with torch.no_grad():
            Yp, Z, A, dA = torch.ops.injflow.tangent_mlp.default(
                XV, Ws, bs, 1, 0.0, 0, MLP_PATHS[path], [])
            g = torch.ops.injflow.tangent_mlp_backward.default(
                gY, XV.detach(), [W.detach() for W in Ws], Yp, Z, A, dA, 1, 0.0, 0,
                MLP_PATHS[path], [], True)
        torch.testing.assert_close(g[0], full[0], rtol=0, atol=0)
        assert not any(t.any() for t in [*g[1], *g[2]])


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    XV = torch.randn(6, 3, 4, dtype=torch.float64, device=device)
    Ws, bs = make_mlp([4, 8, 8, 3], device=device, requires_grad=True)

    def loss(XV, Ws, bs):
        return tangent_mlp(XV, Ws, bs, "tanh").sin().sum()

    out = torch.compile(loss, fullgraph=True)(XV, Ws, bs)
    grads = torch.autograd.grad(out, [*Ws, *bs])
    ref = loss(XV, Ws, bs)
    ref_grads = torch.autograd.grad(ref, [*Ws, *bs])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_double_backward_says_unsupported():
    XV = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    Ws, bs = make_mlp([3, 4, 2])
    g, = torch.autograd.grad(tangent_mlp(XV, Ws, bs).sum(), XV, create_graph=True)
    with pytest.raises(NotImplementedError, match="first derivatives only"):
        g.sum().backward()


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: tangent_mlp(torch.randn(2, 3), [torch.randn(4, 3)]), ValueError,
     r"XV must have 3 dimensions"),
    (lambda: tangent_mlp(torch.randn(2, 1, 3), [torch.randn(4, 3), torch.randn(2, 5)]),
     ValueError, r"weights\[1\] must have shape \(\*, 4\), got \(2, 5\)"),
    (lambda: tangent_mlp(torch.randn(2, 1, 3), []), ValueError, r"at least one layer"),
    (lambda: tangent_mlp(torch.randn(2, 1, 3), [torch.randn(4, 3)], [torch.randn(5)]),
     ValueError, r"biases\[0\] must have shape \(4\)"),
    (lambda: tangent_mlp(torch.randn(2, 1, 3), [torch.randn(4, 3)], [None, None]), ValueError,
     r"one entry per layer \(1\), got 2"),
    (lambda: tangent_mlp(torch.randn(2, 1, 3), [torch.randn(4, 3, dtype=torch.float64)]),
     TypeError, r"weights\[0\] must have dtype torch.float32"),
    (lambda: tangent_mlp(torch.randn(2, 1, 3), [torch.randn(4, 3)], path="fast"), ValueError,
     r"path must be one of"),
    (lambda: tangent_mlp(torch.randn(2, 1, 3), [torch.randn(4, 3)], activation="gelu"),
     ValueError, r"unknown activation 'gelu'"),
    (lambda: tangent_mlp(torch.randn(2, 1, 3), [torch.randn(4, 3)], path="fused"),
     RuntimeError, r'fused path \(path="fused", 2\) runs on CUDA only; use path="auto"'),
])
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# ------------------------------------------------------------------ CUDA: the fused kernels
# Their correctness checks run on the CUDA emulation and on a GPU alike, written once in
# tests/test_tangent_mlp_fused.py; what only a GPU has (graph capture, torch's TF32 switch,
# the device's refusals) is here.

@needs_cuda
@pytest.mark.parametrize("fused", [FusedMlp("fma"), FusedMlp("tf32"), FusedMlp("tf32x3"),
                                   FusedMlp("tf32", pipeline="async"),
                                   FusedMlp("fma", weight_grads="kernel"),
                                   FusedMlp("tf32", weight_grads="kernel", weight_grad_rows=16)],
                         ids=["fma", "tf32", "tf32x3", "tf32-async", "fma-wgrad-kernel",
                              "tf32-wgrad-kernel-16"])
def test_cuda_fused_backward_is_deterministic_and_graph_capturable(fused):
    """Every option of the fused path: two eager steps give the same outputs and gradients bit
    for bit, and so does the step captured in a CUDA graph and replayed (the options are the
    op's arguments, recorded with it)."""
    XV = torch.randn(300, 22, 21, device="cuda", requires_grad=True)
    Ws, bs = make_mlp([21, 128, 128, 44], dtype=torch.float32, device="cuda", requires_grad=True)

    def step():
        Y = tangent_mlp(XV, Ws, bs, "tanh", path="fused", fused=fused)
        return [Y.detach(), *torch.autograd.grad(Y.sin().sum(), [XV, *Ws, *bs])]

    first, second = step(), step()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    captured = replayed(step)
    for a, b in zip(captured, first):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- CUDA: TF32

def test_tf32_reference_helpers():
    """The TF32 tests' reference (runs on the CPU): rounding to nearest with ties away from
    zero at 10 mantissa bits, and a bound that a float32 GEMM of TF32 operands meets while a
    float32 GEMM of unrounded or truncated operands does not (so the CUDA tests can fail)."""
    ulp = 2.0 ** -10
    x = torch.tensor([1 + ulp / 2, 1 + ulp / 2 - 2.0 ** -23, -(1 + ulp / 2), 1 + 1.5 * ulp])
    assert tf32(x).tolist() == [1 + ulp, 1.0, -(1 + ulp), 1 + 2 * ulp]
    XV = torch.randn(400, 22, 128)
    (W,), (b,) = make_mlp([128, 128], dtype=torch.float32)
    exact, bound = tf32_gemm_bound(XV, W, b)

    def worst(x, w):
        z = x @ w.T
        z[:, 0] += b
        return float(((z.double() - exact).abs() / bound).max())

    def truncate(t):
        return (t.contiguous().view(torch.int32) & -0x2000).view(torch.float32)

    assert worst(tf32(XV).float(), tf32(W).float()) < 0.2
    assert worst(XV, W) > 3
    assert worst(truncate(XV), truncate(W)) > 3


def assert_layers_are_tf32_gemms(XV, Ws, bs, Y, Z, A, dA):
    """The outputs of tangent_mlp(XV, Ws, bs, "tanh") with a linear last layer (Y, Z, A, dA)
    as TF32 kernels must give them: every layer's Z_l the GEMM of the TF32-rounded layer input
    (the op's own A_{l-1}) and weight within float32 accumulation error, element by element
    (tf32_gemm_bound); A, dA and Y from Z by the epilogue's rule."""
    inputs = [XV, *A]
    for i, (W, b) in enumerate(zip(Ws, bs)):
        assert not Z[i].isnan().any(), f"layer {i}: unwritten elements"
        exact, bound = tf32_gemm_bound(inputs[i], W, b)
        err = (Z[i].double() - exact).abs()
        assert (err <= bound).all(), \
            f"layer {i}: error up to {float((err / bound.clamp(min=1e-30)).max()):.1f}× the bound"
    # the epilogue (unchanged from the FMA path): A and Y from Z
    for i in range(len(Ws) - 1):
        z0 = Z[i][:, 0]
        torch.testing.assert_close(A[i][:, 0], torch.tanh(z0))
        torch.testing.assert_close(A[i][:, 1:], (1 - torch.tanh(z0).square())[:, None] *
                                   Z[i][:, 1:])
        torch.testing.assert_close(dA[i], 1 - torch.tanh(z0).square())
    assert torch.equal(Y, Z[-1])


@needs_cuda
def test_cuda_fused_tf32_switch_is_honoured():
    """math="auto" follows torch's TF32 switch for matmuls, as cuBLAS does: off (torch's
    default), the fused float32 kernels are the FMA kernels bit for bit, on, the TF32 ones;
    float64 ignores the switch and the option (FMAs, float64 rounding)."""
    XV = torch.randn(40, 9, 21, device="cuda")
    Ws, bs = make_mlp([21, 64, 64, 10], dtype=torch.float32, device="cuda")
    with matmul_precision("float32"):
        default = tangent_mlp(XV, Ws, bs, path="fused")
        assert torch.equal(default, tangent_mlp(XV, Ws, bs, path="fused", fused=FusedMlp("fma")))
    with matmul_precision("tf32"):
        default = tangent_mlp(XV, Ws, bs, path="fused")
    with matmul_precision("float32"):
        assert torch.equal(default, tangent_mlp(XV, Ws, bs, path="fused",
                                                fused=FusedMlp("tf32")))
    W64, b64 = [W.double() for W in Ws], [b.double() for b in bs]
    with matmul_precision("tf32"):
        y64 = tangent_mlp(XV.double(), W64, b64, path="fused", fused=FusedMlp("tf32"))
    ref = tangent_mlp(XV.double().cpu(), [W.cpu() for W in W64], [b.cpu() for b in b64])
    torch.testing.assert_close(y64.cpu(), ref, rtol=1e-11, atol=1e-11)


@needs_cuda
def test_cuda_fused_refuses_shapes_it_cannot_take():
    XV = torch.randn(2, 129, 3, device="cuda")
    Ws, bs = make_mlp([3, 4], dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match=r'129 rows per sample exceeds 128.*path="auto" \(0\)'):
        tangent_mlp(XV, Ws, bs, path="fused")
    # auto falls back to the per-layer path and gives the same answer as the CPU
    torch.testing.assert_close(tangent_mlp(XV, Ws, bs).cpu(),
                               tangent_mlp(XV.cpu(), [W.cpu() for W in Ws],
                                           [b.cpu() for b in bs]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
def test_mlp_module_runs_through_tangent_mlp(dev):
    """The coupling conditioner (injflow_ext.nn.MLP) uses tangent_mlp; its path can be set."""
    from injflow_ext.nn.mlp import MLP
    mlp = MLP(4, 6, (8, 8), "tanh", zero_last=False).double().to(dev)
    XV = torch.randn(5, 3, 4, dtype=torch.float64, device=dev)
    ref = reference(XV, list(mlp.weights), list(mlp.biases), "tanh")
    torch.testing.assert_close(mlp.forward_packed(XV), ref, rtol=1e-12, atol=1e-12)
    mlp.path = "per_layer"
    torch.testing.assert_close(mlp.forward_packed(XV), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_options_are_checked_where_they_are_given(device):
    """The fused path's options are arguments of the op (schema ``int[] fused``), checked on
    every device and path: FusedMlp refuses a bad name naming the values it takes, the op a
    bad code; the per-layer path runs with any valid options, unchanged."""
    XV = torch.randn(5, 3, 4, dtype=torch.float64, device=device)
    Ws, bs = make_mlp([4, 8, 2], device=device)
    for field, bad, pattern in (("math", "tf64", r"math must be one of \['auto', 'fma', "
                                 r"'tf32', 'tf32x3'\]"),
                                ("pipeline", "cp.async", r"pipeline must be one of "
                                 r"\['registers', 'async'\]"),
                                ("weight_grads", "triton", r"weight_grads must be one of "
                                 r"\['cublas', 'kernel'\]"),
                                ("samples_per_block", -1, "samples_per_block must be an int")):
        with pytest.raises(ValueError, match=pattern):
            FusedMlp(**{field: bad})
    plain = tangent_mlp(XV, Ws, bs, path="per_layer")
    pinned = tangent_mlp(XV, Ws, bs, path="per_layer",
                                 fused=FusedMlp("tf32x3", "async", "kernel", 3, 16))
    assert torch.equal(plain, pinned)
    op = torch.ops.injflow.tangent_mlp.default
    for codes, pattern in (([0, 5, 0, 0, 0], r"fused pipeline must be 0 \(registers\) or 1"),
                           ([9, 0, 0, 0, 0], r"fused math must be 0 \(auto\)"),
                           ([0, 0, 2, 0, 0], r"fused weight_grads must be 0 \(cublas\)"),
                           ([0, 0, 0, -1, 0], "must be >= 0"),
                           ([1, 2], r"fused must be \[\] or \[math, pipeline")):
        with pytest.raises(RuntimeError, match=pattern):
            op(XV, Ws, bs, 1, 0.0, 0, MLP_PATHS["per_layer"], codes)
    with pytest.raises(TypeError, match="fused must be None or an injflow_ext.ops.FusedMlp"):
        tangent_mlp(XV, Ws, bs, fused={"math": "fma"})
