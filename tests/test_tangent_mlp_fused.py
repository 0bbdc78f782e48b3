"""The fused tangent_mlp kernels (path="fused"), each check written once and run on two
backends (the test parameter ``backend``):

- "emulated": the kernels' source (csrc/cuda/tangent_mlp_kernels.cuh), launch plan and kernel
  choice compiled for the CPU under the CUDA emulation of tests/cuda_emulation/ and run thread
  by thread (tests/emulated_cuda.py), on every machine with a C++ compiler;
- "cuda": the CUDA op on a GPU, through ``torch.ops.injflow.tangent_mlp`` with the
  ``fused`` options of the call (``FusedMlp``); skipped without one.

The checks: float64 against the CPU op, any samples per block, the cp.async pipeline equal to
the register one, float32 and TF32 error bounds, every layer and the input gradient a TF32
GEMM, the weight-gradient kernel. The emulation also sees what only it can: barriers every
thread reaches, no write outside shared memory or a global buffer, aligned vector accesses,
whole warps at every mma.sync, and results that do not depend on the order the threads run in;
its own checks are shown to fail on kernels that break them. What it cannot show: speed, the
real hardware's mma rounding (it sums a tile's exact TF32 products in float64), and
memory-ordering effects between threads that run at once on a GPU. CUDA-only checks (graph
capture, determinism, torch's TF32 switch) are in tests/test_tangent_mlp.py.
"""

import math
import os

import emulated_cuda as emu
import pytest
import torch
from conftest import _cuda_usable
from test_tangent_mlp import (
    assert_layers_are_tf32_gemms,
    assert_weight_grad_accuracy,
    make_mlp,
    reference,
    tf32,
    tf32_gemm_bound,
    weight_grad_bounds,
)

from injflow_ext.ops import FusedMlp
from injflow_ext.ops.tangent import MLP_PATHS
from injflow_ext.train.step import matmul_precision

# CI sets INJFLOW_REQUIRE_CUDA_EMULATION=1: there, a missing compiler fails instead of skipping
needs_emulation = pytest.mark.skipif(
    emu.compiler() is None and not os.environ.get("INJFLOW_REQUIRE_CUDA_EMULATION"),
    reason="needs a C++ compiler to build the CUDA emulation")
needs_cuda = pytest.mark.skipif(not _cuda_usable(),
                                reason="needs a GPU and an extension built with CUDA kernels")

# (B, R, widths), the CUDA tests' shapes with fewer samples (each runs in well under a second):
# the MINIBOONE conditioner (d = 21 tangents), the encode pass (primal only), a wide
# conditioner (float64: about 720 features fit the two shared-memory buffers at R = 21), odd
# widths, an input width of zero, the most rows a sample may have.
SHAPES = [
    (12, 22, [21, 128, 128, 128, 128, 44]),
    (40, 1, [21, 128, 128, 128, 128, 44]),
    (3, 21, [300, 320, 300, 400]),
    (37, 5, [11, 37, 70, 3]),
    (9, 3, [0, 16, 8]),
    (3, 128, [5, 8, 4]),
]
IMAGE = (2, 21, [392, 512, 512, 784])  # the flat-image conditioner (2 × 512)
SHAPES_F32 = SHAPES[:2] + [IMAGE]
# and at the sizes of a training step, too slow to emulate: the MINIBOONE conditioner and its
# encode pass at batch 400, the flat-image conditioner at 13 samples
FULL_SIZE = [(400, 22, [21, 128, 128, 128, 128, 44]), (400, 1, [21, 128, 128, 128, 128, 44]),
             (13, 21, [392, 512, 512, 784])]
ACT = {"tanh": 1, "silu": 6, None: 0}


def cpu_op(XV, Ws, bs, gY, activation, last):
    """The CPU op (per-layer path): Y, Z, A, dA and the gradients of (Y · gY).sum() with
    respect to XV, Ws and bs."""
    L = len(Ws)
    args = [t.detach().clone().requires_grad_() for t in (XV, *Ws, *bs)]
    Y, Z, A, dA = torch.ops.injflow.tangent_mlp.default(args[0], args[1:1 + L], args[1 + L:],
                                                        ACT[activation], 0.0, ACT[last], 1, [])
    grads = torch.autograd.grad((Y * gY).sum(), args)
    return [t.detach() for t in (Y, *Z, *A, *dA)], list(grads)


def emulated_fused(XV, Ws, bs, gY, activation="tanh", last=None, wgrad="cublas",
                   backward=True, **kw):
    """The emulated fused kernels: the same outputs and gradients as cpu_op (wgrad: the
    weight gradients by a GEMM or by the weight-gradient kernel, emu.backward; backward=False:
    the forward alone, gradients None); kw: math, pipe, per_block, wgrad_rows, and the
    emulation's order and seed of the threads."""
    rows = kw.pop("wgrad_rows", 0)
    Y, Z, A, dA, plan, stats = emu.forward(XV, Ws, bs, activation, last, **kw)
    if not backward:
        return [Y, *Z, *A, *dA], None, plan, (stats, None)
    gXV, gW, gb, GZ, _, bstats = emu.backward(gY, XV, Ws, Z, A, activation, last, wgrad=wgrad,
                                              wgrad_rows=rows, **kw)
    return [Y, *Z, *A, *dA], [gXV, *gW, *gb], plan, (stats, bstats)


def cuda_fused(XV, Ws, bs, gY, activation="tanh", last=None, wgrad="cublas", backward=True,
               math="fma", pipe="registers", per_block=0, wgrad_rows=0):
    """The CUDA op's fused path with the same options (FusedMlp), on the CPU tensors' copies:
    what emulated_fused returns (the plan and the emulation's statistics: None). The caching
    allocator's blocks are NaN-filled first, so an element the kernels never write shows."""
    L = len(Ws)
    fused = FusedMlp(math=math, pipeline=pipe, weight_grads=wgrad, samples_per_block=per_block,
                     weight_grad_rows=wgrad_rows)
    torch.full((64 << 20,), float("nan"), device="cuda")
    args = [t.detach().to("cuda").requires_grad_(backward) for t in (XV, *Ws, *bs)]
    Y, Z, A, dA = torch.ops.injflow.tangent_mlp.default(
        args[0], args[1:1 + L], args[1 + L:], ACT[activation], 0.0, ACT[last],
        MLP_PATHS["fused"], fused.codes())
    out = [t.detach().cpu() for t in (Y, *Z, *A, *dA)]
    if not backward:
        return out, None, None, None
    grads = torch.autograd.grad((Y * gY.to("cuda")).sum(), args)
    return out, [g.cpu() for g in grads], None, None


@pytest.fixture(params=[pytest.param("emulated", marks=needs_emulation),
                        pytest.param("cuda", marks=needs_cuda)])
def backend(request):
    """The backend a check runs the fused kernels on (see the module docstring)."""
    return request.param


@pytest.fixture
def fused(backend):
    """``fused(XV, Ws, bs, gY, activation, last, wgrad, math=, pipe=, per_block=,
    wgrad_rows=) -> ([Y, *Z, *A, *dA], [grad_XV, *grad_Ws, *grad_bs], plan, stats)`` on the
    backend."""
    return emulated_fused if backend == "emulated" else cuda_fused


def emulable(backend, B, R):
    """Skip a full-size case (FULL_SIZE's batch and rows) under the emulation, which runs
    every thread one after another."""
    if backend == "emulated" and (B, R) in {(b, r) for b, r, _ in FULL_SIZE}:
        pytest.skip("full size: too slow to emulate; the CUDA backend runs it")


def inputs(B, R, widths, dtype):
    XV = torch.randn(B, R, widths[0], dtype=torch.float64)
    Ws, bs = make_mlp(widths)
    gY = torch.randn(B, R, widths[-1], dtype=torch.float64)
    return [t.to(dtype) for t in (XV, *Ws, *bs, gY)], len(Ws)


def split(ts, L):
    return ts[0], ts[1:1 + L], ts[1 + L:1 + 2 * L], ts[-1]


# ----------------------------------------------------------------------- the emulation itself

@needs_emulation
@pytest.mark.parametrize("which,pattern", [
    ("shared_overflow", "shared memory written past its end"),
    ("divergent_barrier", "deadlock: 32 threads exited, 32 wait at __syncthreads"),
    ("misaligned", "load4: address not 16-byte aligned"),
    ("partial_warp_mma", r"deadlock: .* 32 at a warp collective \(mma.sync"),
    ("async_never_waited", "exited with cp.async copies in flight"),
])
def test_emulation_catches_broken_kernels(which, pattern):
    with pytest.raises(emu.EmulationError, match=pattern):
        emu.selftest(which)


@needs_emulation
def test_emulation_exposes_races_through_thread_order():
    """A kernel that reads a neighbour's shared-memory write without a barrier computes
    different results in different thread orders (so equal results across orders, as the
    fused kernels give below, mean something)."""
    runs = {order: emu.selftest("race", order) for order in ("forward", "reverse", "shuffled")}
    assert len(set(runs.values())) > 1, runs


@needs_emulation
def test_emulated_cp_async_lands_only_at_the_wait():
    """cp.async copies reach shared memory when their thread waits for them, so a kernel that
    reads them after a barrier but before the wait sees the old contents (NaN)."""
    assert emu.selftest("async_waited") == 64
    assert math.isnan(emu.selftest("async_not_waited"))


@needs_emulation
def test_emulated_mma_follows_the_ptx_fragment_layout():
    """One m16n8k8 through the kernels' fragment code (MmaLane) and the emulated mma.sync,
    whose layout is written from the PTX ISA independently: small integers (exact in TF32)
    give A·B exactly; other values give the product of the operands rounded to TF32 (to
    nearest), not truncated and not unrounded."""
    a = torch.randint(-8, 9, (16, 8)).float()
    b = torch.randint(-8, 9, (8, 8)).float()
    assert torch.equal(emu.one_mma(a, b), a @ b)
    a, b = torch.randn(16, 8), torch.randn(8, 8)
    c = emu.one_mma(a, b).double()
    exact = tf32(a) @ tf32(b)
    assert (c - exact).abs().max() < 1e-6
    assert (c - a.double() @ b.double()).abs().max() > 1e-4


# ------------------------------------------------------------------------------ launch plan

@needs_emulation
def test_emulated_plan_is_the_ops_plan():
    """The plan the emulation runs is the op's (plan_mlp): one sample per 64-thread block at
    MINIBOONE's batch on an H200, more per block once the batch gives each multiprocessor
    two blocks, the tensor-core row padding, and the op's refusals."""
    p = emu.plan(400, 22, [21, 128, 128, 44])
    assert (p.S, p.WM, p.ldm, p.blocks) == (1, 1, 36, 400)
    p = emu.plan(5000, 3, [3, 128, 128, 6], math="tf32")
    assert (p.S, p.WM, p.ldm, p.blocks) == (18, 2, 72, 278)
    # the cp.async pipeline: the same tiling with three chunk buffers, where they fit
    p = emu.plan(400, 22, [21, 128, 128, 44], math="tf32", pipe="async")
    assert (p.S, p.WM, p.pipe) == (1, 1, emu.PIPE["async"])
    # three chunks of 8 input features (the 64-thread block's depth) instead of one of 16
    assert p.smem == emu.plan(400, 22, [21, 128, 128, 44], math="tf32").smem + 8 * 136 * 4
    p = emu.plan(3, 21, [360, 370, 360, 100], dtype=torch.float64, pipe="async")
    assert p.pipe == emu.PIPE["registers"]  # 238 KB with three buffers: through registers
    # other devices: fewer multiprocessors, less shared memory; no cp.async below sm_80
    p = emu.plan(5000, 3, [3, 128, 128, 6], device=emu.A100)
    assert (p.S, p.WM, p.blocks) == (23, 4, 218)  # 5000 // (2 · 108) samples per block
    p = emu.plan(400, 22, [21, 128, 128, 44], pipe="async", device=emu.T4)
    assert p.pipe == emu.PIPE["registers"] and p.smem <= emu.T4["smem_optin"]
    with pytest.raises(emu.Unsupported, match="more than the device's 65536"):
        emu.plan(2, 21, [392, 512, 512, 784], device=emu.T4)  # the IMAGE conditioner
    with pytest.raises(emu.Unsupported, match="129 rows per sample exceeds 128"):
        emu.plan(2, 129, [3, 4])
    with pytest.raises(emu.Unsupported, match="bytes of shared memory per block, more than"):
        emu.plan(13, 21, [392, 1024, 1024, 784], dtype=torch.float64)


# ----------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("pipe", ["registers", "async"])
@pytest.mark.parametrize("B,R,widths", SHAPES + FULL_SIZE[:2])
@pytest.mark.parametrize("activation,last", [("tanh", None), ("silu", "tanh")])
def test_fused_matches_cpu_float64(fused, backend, B, R, widths, activation, last, pipe):
    """Every output of the forward (Y and the saved Z, A, dA) and every gradient equal the CPU
    op's to float64 rounding; outputs start as NaN (the emulation also fences every buffer),
    so an element never written, or written out of bounds, fails."""
    emulable(backend, B, R)
    ts, L = inputs(B, R, widths, torch.float64)
    XV, Ws, bs, gY = split(ts, L)
    ref_out, ref_grads = cpu_op(XV, Ws, bs, gY, activation, last)
    out, grads, _, _ = fused(XV, Ws, bs, gY, activation, last, pipe=pipe)
    for i, (o, r) in enumerate(zip(out + grads, ref_out + ref_grads)):
        assert not o.isnan().any(), f"output {i} has unwritten elements"
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10, msg=f"output {i}")


@pytest.mark.parametrize("pipe", ["registers", "async"])
@pytest.mark.parametrize("per_block", [1, 2, 3, 7, 64])
def test_fused_any_samples_per_block(fused, per_block, pipe):
    """The tiling (samples per block, hence 64-, 128- and 256-thread blocks) does not change
    the result; a last block with fewer samples is handled."""
    ts, L = inputs(50, 9, [10, 32, 32, 6], torch.float64)
    XV, Ws, bs, gY = split(ts, L)
    ref_out, ref_grads = cpu_op(XV, Ws, bs, gY, "tanh", None)
    out, grads, plan, _ = fused(XV, Ws, bs, gY, per_block=per_block, pipe=pipe)
    if plan is not None:
        assert plan.S == min(per_block, 128 // 9) and plan.pipe == emu.PIPE[pipe]
    for o, r in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


@needs_emulation
@pytest.mark.parametrize("pipe", ["registers", "async"])
@pytest.mark.parametrize("dtype,math", [(torch.float64, "fma"), (torch.float32, "fma"),
                                        (torch.float32, "tf32"), (torch.float32, "tf32x3")])
def test_emulated_results_do_not_depend_on_thread_order(dtype, math, pipe):
    """No races between barriers: the threads of every phase run forward, reversed and
    shuffled give bit-identical outputs and gradients (a missing __syncthreads between a
    shared-memory write and another thread's read would not)."""
    ts, L = inputs(20, 7, [13, 64, 40, 9], dtype)
    XV, Ws, bs, gY = split(ts, L)
    kw = dict(math=math, per_block=5, pipe=pipe)
    first = emulated_fused(XV, Ws, bs, gY, **kw)
    for order, seed in (("reverse", 0), ("shuffled", 1), ("shuffled", 2)):
        again = emulated_fused(XV, Ws, bs, gY, order=order, seed=seed, **kw)
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, b), order


@pytest.mark.parametrize("per_block", [1, 3])
@pytest.mark.parametrize("dtype,math", [(torch.float64, "fma"), (torch.float32, "fma"),
                                        (torch.float32, "tf32"), (torch.float32, "tf32x3")])
def test_fused_async_pipeline_equals_the_register_pipeline(fused, dtype, math, per_block):
    """The cp.async weight pipeline changes where the weight waits, not the arithmetic: every
    output and gradient is bit-identical to the register pipeline's (the same k order), on a
    wide network (several column passes, a width that is not a multiple of a chunk)."""
    ts, L = inputs(7, 21, [37, 200, 130, 19], dtype)
    XV, Ws, bs, gY = split(ts, L)
    regs = fused(XV, Ws, bs, gY, math=math, per_block=per_block)
    asyn = fused(XV, Ws, bs, gY, math=math, per_block=per_block, pipe="async")
    if asyn[2] is not None:
        assert asyn[2].pipe == emu.PIPE["async"] and regs[2].pipe == emu.PIPE["registers"]
    for a, b in zip(regs[0] + regs[1], asyn[0] + asyn[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B,R,widths", SHAPES_F32 + FULL_SIZE)
@pytest.mark.parametrize("math,wgrad", [("fma", "cublas"), ("tf32x3", "cublas"),
                                        ("tf32x3", "kernel")])
def test_fused_float32_error_within_pytorch_float32_error(fused, backend, B, R, widths, math,
                                                          wgrad):
    """Against float64, the fused float32 error is at most 4× the error of the same network in
    plain PyTorch float32 (TF32 off; + a floor for exact zeros), for the output and every
    gradient; with FMAs and with 3×TF32 (a TF32 head and tail per operand keep 22 of float32's
    24 mantissa bits; also the weight-gradient kernel's)."""
    emulable(backend, B, R)
    ts, L = inputs(B, R, widths, torch.float64)
    XV, Ws, bs, gY = split(ts, L)

    def plain(dtype):
        args = [t.to(dtype).requires_grad_() for t in (XV, *Ws, *bs)]
        Y = reference(args[0], args[1:1 + L], args[1 + L:], "tanh")
        return [Y.detach(), *torch.autograd.grad((Y * gY.to(dtype)).sum(), args)]

    with matmul_precision("float32"):
        exact, torch_f32 = plain(torch.float64), plain(torch.float32)
        f = lambda t: t.float()  # noqa: E731
        out, grads, plan, _ = fused(f(XV), [f(W) for W in Ws], [f(b) for b in bs], f(gY),
                                    math=math, wgrad=wgrad)
    ours = [out[0]] + grads
    if plan is not None:
        assert plan.math == emu.MATH[math]
    for i, (e, p, o) in enumerate(zip(exact, torch_f32, ours)):
        err_torch = (p.double() - e).norm() / e.norm()
        err_ours = (o.double() - e).norm() / e.norm()
        assert err_ours <= 4 * err_torch + 1e-6, (i, float(err_ours), float(err_torch))


@pytest.mark.parametrize("pipe", ["registers", "async"])
@pytest.mark.parametrize("B,R,widths", SHAPES + [IMAGE] + FULL_SIZE)
def test_fused_tf32_every_layer_is_a_tf32_gemm(fused, backend, B, R, widths, pipe):
    """With the tensor-core math, every layer's saved Z_l is the GEMM of the TF32-rounded layer
    input (the op's own A_{l-1}) and weight, within float32 accumulation error, element by
    element (a wrong fragment layout, a missed row, column or input feature, or operands not
    rounded to nearest would fail); the epilogue gives A and Y from Z as the FMA path does."""
    emulable(backend, B, R)
    XV = torch.randn(B, R, widths[0])
    Ws, bs = make_mlp(widths, dtype=torch.float32)
    gY = torch.randn(B, R, widths[-1])
    out, _, plan, stats = fused(XV, Ws, bs, gY, "tanh", math="tf32", pipe=pipe, backward=False)
    L = len(Ws)
    if plan is not None:
        assert plan.math == emu.MATH["tf32"] and stats[0].mma > 0
    assert_layers_are_tf32_gemms(XV, Ws, bs, out[0], out[1:1 + L], out[1 + L:2 * L],
                                 out[2 * L:])


@pytest.mark.parametrize("pipe", ["registers", "async"])
@pytest.mark.parametrize("B,R,n_in,n_out", [(12, 22, 21, 44), (2, 21, 512, 784),
                                            (37, 5, 11, 3), (3, 128, 5, 4), (50, 1, 128, 70),
                                            (400, 22, 21, 44), (13, 21, 512, 784)])
def test_fused_tf32_input_gradient_is_a_tf32_gemm(fused, backend, B, R, n_in, n_out, pipe):
    """The backward's GEMM (grad_XV = grad_Y · W of one linear layer) on the tensor cores:
    the TF32 GEMM within float32 accumulation error, element by element."""
    emulable(backend, B, R)
    XV = torch.randn(B, R, n_in)
    (W,), (b,) = make_mlp([n_in, n_out], dtype=torch.float32)
    gY = torch.randn(B, R, n_out)
    _, (gXV, *_), _, _ = fused(XV, [W], [b], gY, "tanh", None, math="tf32", pipe=pipe)
    exact, bound = tf32_gemm_bound(gY, W.T)
    err = (gXV.double() - exact).abs()
    assert (err <= bound).all(), f"error up to {float((err / bound).max()):.1f}× the bound"


@pytest.mark.parametrize("B,R,widths", SHAPES_F32 + FULL_SIZE)
@pytest.mark.parametrize("wgrad", ["cublas", "kernel"])
def test_fused_tf32_network_error_is_tf32_sized(fused, backend, B, R, widths, wgrad):
    """A whole network with TF32 (the weight gradients by a GEMM or by the weight-gradient
    kernel on the tensor cores): output and gradients off the float64 answer by no more than
    TF32's rounding allows (2⁻¹¹ relative per operand: a norm error below 1e-2), the output by
    more than float32's (so the tensor cores ran), and not bit-equal to the FMA kernels."""
    emulable(backend, B, R)
    ts, L = inputs(B, R, widths, torch.float64)
    XV, Ws, bs, gY = split(ts, L)
    exact_out, exact_grads = cpu_op(XV, Ws, bs, gY, "tanh", None)
    f = lambda t: t.float()  # noqa: E731
    args = (f(XV), [f(W) for W in Ws], [f(b) for b in bs], f(gY))
    out, grads, _, _ = fused(*args, math="tf32", wgrad=wgrad)
    errs = [float((o.double() - e).norm() / e.norm())
            for e, o in zip([exact_out[0]] + exact_grads, [out[0]] + grads)]
    assert max(errs) < 1e-2, errs
    # the output: TF32-sized (an emulation with every GEMM operand rounded to TF32 gives
    # 5e-4 - 9e-4 on these shapes); some gradients, e.g. the last bias's, involve no GEMM
    assert errs[0] > 1e-5, errs
    assert not torch.equal(out[0], fused(*args, math="fma", wgrad=wgrad)[0][0])


# ------------------------------------------------------------------- the parameter gradients

@pytest.mark.parametrize("B,R,widths", SHAPES + FULL_SIZE[:1])
@pytest.mark.parametrize("activation,last", [("tanh", None), ("silu", "tanh")])
@pytest.mark.parametrize("rows", [0, 16])
def test_fused_weight_grad_kernel_matches_cpu_float64(fused, backend, B, R, widths, activation,
                                                      last, rows):
    """FusedMlp(weight_grads="kernel"): the backward with every weight gradient from
    mlp_weight_grad_kernel (split over the rows: the plan's split, or 16 rows pinned by
    weight_grad_rows; the splits added by sum_partials_kernel, as are the bias partials)
    equals the CPU op's to float64 rounding, and the other outputs are those of the cuBLAS
    path bit for bit."""
    emulable(backend, B, R)
    ts, L = inputs(B, R, widths, torch.float64)
    XV, Ws, bs, gY = split(ts, L)
    _, ref_grads = cpu_op(XV, Ws, bs, gY, activation, last)
    out, grads, _, _ = fused(XV, Ws, bs, gY, activation, last, wgrad="kernel", wgrad_rows=rows)
    gemm_out, gemm_grads, _, _ = fused(XV, Ws, bs, gY, activation, last, wgrad="cublas")
    for i, (o, r) in enumerate(zip(grads, ref_grads)):
        assert not o.isnan().any(), f"gradient {i} has unwritten elements"
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10, msg=f"gradient {i}")
    for a, b in zip(out + [grads[0]] + grads[1 + L:], gemm_out + [gemm_grads[0]] +
                    gemm_grads[1 + L:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("math", ["fma", "tf32", "tf32x3"])
@pytest.mark.parametrize("B,R,n_in,n_out", [(12, 22, 21, 44), (2, 21, 512, 784),
                                            (37, 5, 11, 3), (3, 128, 5, 4),
                                            (400, 22, 21, 44), (13, 21, 512, 784)])
def test_fused_weight_grad_kernel_on_the_tensor_cores(fused, backend, math, B, R, n_in, n_out):
    """In float32 the weight-gradient kernel runs in the fused kernels' math, as cuBLAS would
    with TF32: for one linear layer (GZ = grad_Y, A = XV) every gW element within the bound of
    weight_grad_bounds, and the accuracy of the math (assert_weight_grad_accuracy: TF32's
    rounding shows, 3×TF32 is float32-accurate)."""
    emulable(backend, B, R)
    XV = torch.randn(B, R, n_in)
    (W,), (b,) = make_mlp([n_in, n_out], dtype=torch.float32)
    gY = torch.randn(B, R, n_out)
    _, (_, gW, _), _, _ = fused(XV, [W], [b], gY, "tanh", None, math=math, wgrad="kernel")
    (exact, bound), = weight_grad_bounds([gY], [XV], math)
    err = (gW.double() - exact).abs()
    assert (err <= bound).all(), f"error up to {float((err / bound).max()):.1f}× the bound"
    if math != "fma":
        assert_weight_grad_accuracy(math, [gY], [XV], [gW])


@needs_emulation
@pytest.mark.parametrize("rows", [0, 16, 48, 10_000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_weight_grad_kernel_any_split(rows, dtype):
    """Any rows per split (the plan's; one 16-row step; several steps; all rows in one split)
    over 185 rows (not a multiple of 16), widths that are not multiples of the 64-wide tile
    and a layer of no inputs: every gW element within the summation error bound of the exact
    sum, every gb the sum of the bias partials."""
    B, R, widths = 37, 5, [0, 16, 130, 70, 3]
    GZ = [torch.randn(B, R, n, dtype=dtype) for n in widths[1:]]
    ins = [torch.randn(B, R, n, dtype=dtype) for n in widths[:-1]]
    partial = torch.randn(11, sum(widths[1:]), dtype=dtype)
    gW, gb, info = emu.param_grads(GZ, ins, partial, rows_per_split=rows)
    assert info.rows_per_split % 16 == 0 and info.splits == math.ceil(B * R / info.rows_per_split)
    if rows:
        assert info.rows_per_split == math.ceil(rows / 16) * 16
    for (exact, bound), w in zip(weight_grad_bounds(GZ, ins), gW):
        assert w.shape == exact.shape and ((w.double() - exact).abs() <= bound).all()
    offset = 0
    for n, b in zip(widths[1:], gb):
        torch.testing.assert_close(b, partial[:, offset:offset + n].sum(0))
        offset += n


@needs_emulation
def test_emulated_weight_grad_kernel_on_the_image_conditioner():
    """The flat-image conditioner's weight gradients (392-512×2-784, 21 rows per sample) in
    float32: within the float32 summation bound."""
    B, R, widths = IMAGE
    GZ = [torch.randn(B, R, n) for n in widths[1:]]
    ins = [torch.randn(B, R, n) for n in widths[:-1]]
    gW, _, info = emu.param_grads(GZ, ins, torch.randn(1, sum(widths[1:])))
    assert info.tiles == 7 * 8 + 8 * 8 + 8 * 13
    for (exact, bound), w in zip(weight_grad_bounds(GZ, ins), gW):
        assert ((w.double() - exact).abs() <= bound).all()


@needs_emulation
@pytest.mark.parametrize("math", ["fma", "tf32", "tf32x3"])
@pytest.mark.parametrize("B,R,widths,rows", [
    (12, 22, [21, 128, 128, 44], 0),   # the MINIBOONE conditioner's shapes, the plan's split
    (37, 5, [0, 16, 130, 70, 3], 16),  # ragged widths and rows, a layer of no inputs
    (37, 5, [0, 16, 130, 70, 3], 10_000),
])
def test_emulated_weight_grad_kernel_of_every_layer_on_the_tensor_cores(math, B, R, widths,
                                                                        rows):
    """The kernel of every layer at once (emu.param_grads, the host's bookkeeping included):
    with "tf32" every gW element is the GEMM of the TF32-rounded GZ and A within float32
    accumulation error and off float32's answer by TF32's rounding; with "tf32x3" every
    element within the 3×TF32 bound, and the whole as accurate as float32; "fma" uses no mma."""
    GZ = [torch.randn(B, R, n) for n in widths[1:]]
    ins = [torch.randn(B, R, n) for n in widths[:-1]]
    gW, _, info = emu.param_grads(GZ, ins, torch.randn(1, sum(widths[1:])), rows_per_split=rows,
                                  math=math)
    assert (info.mma > 0) == (math != "fma")
    for (exact, bound), w in zip(weight_grad_bounds(GZ, ins, math), gW):
        err = (w.double() - exact).abs()
        assert (err <= bound).all(), f"error up to {float((err / bound).max()):.1f}× the bound"
    if math != "fma":
        assert_weight_grad_accuracy(math, GZ, ins, gW)


@needs_emulation
@pytest.mark.parametrize("math", ["fma", "tf32"])
def test_emulated_param_grads_do_not_depend_on_thread_order(math):
    """mlp_weight_grad_kernel and sum_partials_kernel give bit-identical gW and gb with their
    threads and blocks run forward, reversed and shuffled (a missing barrier between staging
    rows and reading them, or between reading them and staging the next, would not), with
    FMAs and on the tensor cores."""
    B, R, widths = 20, 7, [13, 64, 100, 9]
    GZ = [torch.randn(B, R, n) for n in widths[1:]]
    ins = [torch.randn(B, R, n) for n in widths[:-1]]
    partial = torch.randn(30, sum(widths[1:]))
    first = emu.param_grads(GZ, ins, partial, rows_per_split=32, math=math)
    for order, seed in (("reverse", 0), ("shuffled", 1), ("shuffled", 2)):
        again = emu.param_grads(GZ, ins, partial, rows_per_split=32, math=math, order=order,
                                seed=seed)
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, b), order
