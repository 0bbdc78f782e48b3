"""The CUDA kernels of cg, gram_logdet and the tangent ops without a GPU: their source
(csrc/cuda/*_kernels.cuh) compiled for the CPU under the CUDA emulation of
tests/cuda_emulation/, behind the CUDA ops' host code (tests/emulated_cuda.py, ``kernels()``),
against the CPU ops: the same checks the CUDA tests make on a GPU, plus what only the emulation
sees (every barrier reached, whole warps at every shuffle, no write outside a buffer, no
element left unwritten, results that do not depend on the order threads run in).
"""

import os

import emulated_cuda as emu
import pytest
import torch

from injflow_ext.ops import ACTIVATIONS, COUPLING_SCALES

pytestmark = pytest.mark.skipif(
    emu.compiler() is None and not os.environ.get("INJFLOW_REQUIRE_CUDA_EMULATION"),
    reason="needs a C++ compiler to build the CUDA emulation")

ORDERS = [("forward", 0), ("reverse", 0), ("shuffled", 1)]


@pytest.fixture(scope="module")
def k():
    kernels = emu.kernels()
    yield kernels
    kernels.set_order(0, 0)


def close(a, b, dtype):
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def close_normwise(a, b, dtype):
    """Per batch element, ‖a − b‖ ≤ tol · ‖b‖: two factorisations that sum in different
    orders agree to a few units of rounding in norm (float32: measured ~1e-7), not in every
    small element."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    err = (a - b).flatten(1).norm(dim=1)
    assert (err <= tol * b.flatten(1).norm(dim=1)).all(), err


def every_order(k, fn):
    """fn() (a list of tensors) with the threads of every block, and the blocks of every
    launch, run forward, reversed and shuffled."""
    results = []
    for order, seed in ORDERS:
        k.set_order(emu.ORDER[order], seed)
        results.append(fn())
    k.set_order(0, 0)
    return results


def in_every_order(k, fn):
    """fn() in every order (every_order): the results must be bit-identical; returns them."""
    results = every_order(k, fn)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    return results[0]


# ---------------------------------------------------------------------------- gram_logdet

def gram_inputs(B, D, d, dtype):
    """J (B, D, d) with batch elements of different scales, the last one with a zero column
    (an exactly singular G, whose zero pivot takes the jitter path whatever the summation
    order; equal columns would leave a pivot of rounding size and either sign)."""
    J = torch.randn(B, D, d, dtype=torch.float64)
    J[0] *= 1e3
    if d > 1:
        J[-1, :, 1] = 0
    return J.to(dtype)


@pytest.mark.parametrize("dtype,acc64", [(torch.float64, False), (torch.float32, True),
                                         (torch.float32, False)])
@pytest.mark.parametrize("D,d", [(30, 1), (90, 5), (200, 64), (200, 65), (100, 70)])
def test_emulated_gram_logdet_matches_cpu(k, dtype, acc64, D, d):
    """logdet, jitter, status and the factor L of the CUDA kernel (G in shared memory for
    d <= 64, in global memory above; J staged in tiles of 1024 elements; the jitter retry
    for a singular G) equal the CPU op's, and so does the backward; in every thread order."""
    J = gram_inputs(3, D, d, dtype)
    out = in_every_order(k, lambda: k.gram_logdet(J, acc64, 1e-2))
    ref = torch.ops.injflow.gram_logdet(J, acc64, 1e-2)
    assert torch.equal(out[2], ref[2])  # status
    assert out[2].tolist() == [0, 0, 1 if d > 1 else 0]  # the singular one jittered
    factor_dtype = out[3].dtype
    close(out[0].to(factor_dtype), ref[0].to(factor_dtype), factor_dtype)  # logdet
    close(out[1], ref[1], factor_dtype)  # jitter
    close_normwise(out[3], ref[3], factor_dtype)  # L
    grad = torch.randn(3, dtype=torch.float64).to(dtype)
    g = in_every_order(k, lambda: [k.gram_logdet_backward(grad, J, out[3], out[2])])[0]
    close_normwise(g, torch.ops.injflow.gram_logdet_backward(grad, J, ref[3], ref[2]), dtype)


def test_emulated_gram_logdet_reports_failure(k):
    """A zero or non-finite J fails with status 2, a zero factor and a zero gradient, as on
    the CPU."""
    J = torch.randn(3, 20, 4, dtype=torch.float64)
    J[1] = 0
    J[2, 0, 0] = float("nan")
    out = k.gram_logdet(J, False, 1e-2)
    ref = torch.ops.injflow.gram_logdet(J, False, 1e-2)
    assert out[2].tolist() == ref[2].tolist() == [0, 2, 2]
    assert torch.equal(out[3][1:], torch.zeros_like(out[3][1:]))
    torch.testing.assert_close(out[0], ref[0], equal_nan=True)
    g = k.gram_logdet_backward(torch.ones(3, dtype=torch.float64), J, out[3], out[2])
    assert torch.equal(g[1:], torch.zeros_like(g[1:]))


# --------------------------------------------------------------------------------------- cg

def spd(N, d, dtype):
    A = torch.randn(N, d, d, dtype=torch.float64)
    return (A @ A.transpose(1, 2) / d + torch.eye(d)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("d", [7, 45])
def test_emulated_cg_matches_cpu(k, dtype, K, d):
    """cg_init and cg_step iterated to convergence, with a zero right-hand side (converged at
    once) and a system that is not SPD (breakdown), in every thread order. K > 1 (a thread per
    system, the CPU's per-system code) gives the CPU's state bit for bit. K = 1 (a warp per
    system, its dot products by shuffle reductions) sums in another order: the same statuses,
    solutions equal norm-wise, iteration counts within 2 (CG's residual is not monotone, so
    rounding can move the first crossing of the tolerance; tests/test_cg.py says the same of
    a GPU)."""
    N = 40  # several blocks of 4 warps (K = 1) or 128 threads
    A = spd(N, d, dtype)
    A[1] = -A[1]  # negative curvature: breakdown
    b = torch.randn(N, d, K, dtype=dtype)
    b[2] = 0
    x = torch.zeros_like(b)
    r = b.clone()
    p, rs, tol2, status, it = in_every_order(k, lambda: k.cg_init(r, b, 1e-6, 0.0))
    ref_state = list(torch.ops.injflow.cg_init(r, b, 1e-6, 0.0))
    for o, c in zip([p, rs, tol2, status, it], ref_state):
        assert torch.equal(o, c)
    cpu = [x.clone(), r.clone(), ref_state[0], torch.zeros_like(b), ref_state[1], ref_state[2],
           ref_state[3], ref_state[4]]
    state = [x, r, p, torch.zeros_like(b), rs, status, it]
    for _ in range(3 * d):
        def step(s=state):
            return k.cg_step(s[0], s[1], s[2], s[3], A, s[4], tol2, s[5], s[6])
        state = in_every_order(k, step)
        cx, cr, cp, cAp, crs, ctol, cst, cit = cpu
        torch.ops.injflow.cg_step(cx, cr, cp, cAp, A, crs, ctol, cst, cit)
    xs, _, _, _, _, sts, its = state
    assert torch.equal(sts, cpu[6])
    assert sts[1].eq(2).all() and sts[2].eq(1).all() and its[2].eq(0).all()
    assert sts[3:].eq(1).all()  # the rest converged
    if K > 1:
        for o, c in zip(state, [cpu[i] for i in (0, 1, 2, 3, 4, 6, 7)]):
            assert torch.equal(o, c)
        return
    assert (its - cpu[7]).abs().max() <= 2
    ok = sts.flatten() == 1
    rel = (xs - cpu[0]).norm(dim=1)[ok] / cpu[0].norm(dim=1)[ok].clamp(min=1e-30)
    assert rel.max() < (1e-9 if dtype == torch.float64 else 1e-4), rel.max()


# ------------------------------------------------------------------------------ tangent ops

@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu", "softplus", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_tangent_linear_matches_cpu(k, activation, dtype):
    """The epilogue kernel (forward) and both backward kernels (with the bias sum's 32 × 8
    blocks, shared partial sums and atomic adds, or the deterministic one) under the op's own
    composite, against the CPU op; the deterministic backward bit-identical in every order."""
    act = ACTIVATIONS[activation]
    B, R, n_in, n = 70, 4, 13, 40  # several feature blocks and row blocks
    XV = torch.randn(B, R, n_in, dtype=dtype)
    W = torch.randn(n, n_in, dtype=dtype) / n_in ** 0.5
    b = torch.randn(n, dtype=dtype)
    out = in_every_order(k, lambda: k.tangent_linear(XV, W, b, act, 0.1))
    ref = torch.ops.injflow.tangent_linear(XV, W, b, act, 0.1)
    for o, r in zip(out, ref):
        close(o, r, dtype)
    gY = torch.randn_like(out[0])
    ref_g = torch.ops.injflow.tangent_linear_backward(gY, XV, W, ref[1], ref[0], ref[2], act,
                                                      0.1)
    for deterministic in (False, True):
        def backward(deterministic=deterministic):
            return k.tangent_linear_backward(gY, XV, W, out[1], out[0], out[2], act, 0.1, False,
                                             deterministic)
        results = (in_every_order(k, backward),) if deterministic else every_order(k, backward)
        for g in results:
            for o, r in zip(g, ref_g):
                close(o, r, dtype)


def test_emulated_atomic_bias_sum_depends_on_block_order(k):
    """The emulation sees what the bias kernel's comment says: its atomic adds make the bias
    gradient depend on the order the blocks run in (by rounding), while the deterministic
    path's does not."""
    B, R, n = 300, 3, 40
    XV = torch.randn(B, R, 13)
    W, b = torch.randn(n, 13) / 13 ** 0.5, torch.randn(n)
    Y, Z, dA = k.tangent_linear(XV, W, b, 1, 0.0)
    gY = torch.randn_like(Y)

    def bias_grads(deterministic):
        return [r[2] for r in every_order(k, lambda: k.tangent_linear_backward(
            gY, XV, W, Z, Y, dA, 1, 0.0, False, deterministic))]

    atomic = bias_grads(False)
    assert any(not torch.equal(atomic[0], other) for other in atomic[1:])
    for other in atomic[1:]:
        close(other, atomic[0], torch.float32)
    deterministic = bias_grads(True)
    assert all(torch.equal(deterministic[0], other) for other in deterministic[1:])


@pytest.mark.parametrize("scale", list(COUPLING_SCALES))
@pytest.mark.parametrize("m", [9, 300])
def test_emulated_tangent_coupling_matches_cpu(k, scale, m):
    """The coupling kernel (a block per batch row, threads striding over features, the
    log-determinant by a shared-memory tree) and its backward, against the CPU op."""
    code = COUPLING_SCALES[scale]
    XV = torch.randn(5, 3, m, dtype=torch.float64)
    ST = torch.randn(5, 3, 2 * m, dtype=torch.float64)
    out = in_every_order(k, lambda: k.tangent_coupling(XV, ST, code))
    for o, r in zip(out, torch.ops.injflow.tangent_coupling(XV, ST, code)):
        close(o, r, torch.float64)
    gY, gl = torch.randn_like(XV), torch.randn(5, dtype=torch.float64)
    g = in_every_order(k, lambda: k.tangent_coupling_backward(gY, gl, XV, ST, code))
    for o, r in zip(g, torch.ops.injflow.tangent_coupling_backward(gY, gl, XV, ST, code)):
        close(o, r, torch.float64)


@pytest.mark.parametrize("activation", ["tanh", "elu", "sigmoid"])
def test_emulated_tangent_epilogue_matches_cpu(k, activation):
    """tangent_epilogue (the CUDA op under tangent_conv2d: the epilogue kernel on
    pre-activations computed elsewhere) and its backward, through the op's own composites."""
    act = ACTIVATIONS[activation]
    Z = torch.randn(33, 4, 50, dtype=torch.float64)
    b = torch.randn(50, dtype=torch.float64)
    out = in_every_order(k, lambda: k.tangent_epilogue(Z, b, act, 0.5))
    ref = torch.ops.injflow.tangent_epilogue(Z, b, act, 0.5)
    for o, r in zip(out, ref):
        close(o, r, torch.float64)
    gY = torch.randn_like(Z)
    ref_g = torch.ops.injflow.tangent_epilogue_backward(gY, ref[1], ref[0], ref[2], act, 0.5)
    for deterministic in (False, True):
        g = k.tangent_epilogue_backward(gY, out[1], out[0], out[2], act, 0.5, deterministic)
        for o, r in zip(g, ref_g):
            close(o, r, torch.float64)


@pytest.mark.parametrize("last", [None, "tanh"])
@pytest.mark.parametrize("input_only", [False, True])
def test_emulated_tangent_mlp_per_layer_matches_cpu(k, last, input_only):
    """The CUDA tangent_mlp's default path (one tangent_linear per layer, kernels emulated)
    forward and backward against the CPU op, with input_only (only grad_XV wanted: the weight
    GEMMs skipped, zero weight and bias gradients)."""
    widths = [11, 32, 32, 7]
    XV = torch.randn(20, 5, widths[0], dtype=torch.float64)
    Ws = [torch.randn(b, a, dtype=torch.float64) / a ** 0.5
          for a, b in zip(widths[:-1], widths[1:])]
    bs = [torch.randn(b, dtype=torch.float64) for b in widths[1:]]
    L, act, last_code = len(Ws), ACTIVATIONS["tanh"], ACTIVATIONS[last] if last else 0
    out = k.tangent_mlp(XV, Ws, bs, act, 0.0, last_code)
    Y, Z, A, dA = out[0], out[1:1 + L], out[1 + L:2 * L], out[2 * L:]
    ref = torch.ops.injflow.tangent_mlp.default(XV, Ws, bs, act, 0.0, last_code, 1, [])
    for o, r in zip([Y, *Z, *A, *dA], [ref[0], *ref[1], *ref[2], *ref[3]]):
        close(o, r, torch.float64)
    gY = torch.randn_like(Y)
    g = k.tangent_mlp_backward(gY, XV, Ws, Y, Z, A, dA, act, 0.0, last_code, input_only, False)
    ref_g = torch.ops.injflow.tangent_mlp_backward.default(gY, XV, Ws, *ref, act, 0.0, last_code,
                                                           1, [], False)
    close(g[0], ref_g[0], torch.float64)
    for o, r in zip(g[1:], [*ref_g[1], *ref_g[2]]):
        if input_only:
            assert torch.equal(o, torch.zeros_like(r))
        else:
            close(o, r, torch.float64)
