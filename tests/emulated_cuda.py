"""The fused tangent_mlp CUDA kernels run on the CPU (tests/cuda_emulation/): builds the
emulation with the system's C++ compiler once per source version, and calls it with CPU
tensors the way the CUDA op calls the kernels (csrc/cuda/tangent_mlp_cuda.cu), including the
host's part after the backward kernel (the weight gradients as GEMMs or by their own kernel,
the bias sums).

Shapes: XV (B, R, n_0) with R = 1 + K rows per sample; Ws[l] (n_{l+1}, n_l); bs[l] (n_{l+1},).
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests" / "cuda_emulation" / "tangent_mlp_emulated.cpp",
           ROOT / "tests" / "cuda_emulation" / "cuda_on_cpu.h",
           ROOT / "csrc" / "cuda" / "tangent_mlp_kernels.cuh",
           ROOT / "csrc" / "cuda" / "mlp_param_grad_kernels.cuh",
           ROOT / "csrc" / "cuda" / "emulation_hooks.cuh",
           ROOT / "csrc" / "activations.h"]
MATH = {"fma": 0, "tf32": 1, "tf32x3": 2}
PIPE = {"registers": 0, "async": 1}
ORDER = {"forward": 0, "reverse": 1, "shuffled": 2}
ACT_CODES = {None: 0, "tanh": 1, "relu": 2, "leaky_relu": 3, "elu": 4, "softplus": 5,
             "silu": 6, "sigmoid": 7}
# what the plan reads from the device: multiprocessors, compute capability, shared memory
H200 = {"sms": 132, "major": 9, "smem_optin": 232448}
A100 = {"sms": 108, "major": 8, "smem_optin": 166912}
T4 = {"sms": 40, "major": 7, "smem_optin": 65536}

_lib = None
_kernels = None
KERNEL_SOURCES = [ROOT / "tests" / "cuda_emulation" / "kernels_emulated.cpp",
                  ROOT / "tests" / "cuda_emulation" / "cuda_on_cpu.h",
                  *sorted((ROOT / "csrc").glob("*.h")),
                  *sorted((ROOT / "csrc" / "cuda").glob("*_kernels.cuh")),
                  ROOT / "csrc" / "cuda" / "emulation_hooks.cuh"]


def compiler():
    """The C++ compiler to build the emulation with, or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library():
    """The built emulation (cached under the temp directory by a hash of its sources)."""
    global _lib
    if _lib is not None:
        return _lib
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX) to build the CUDA emulation")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"injflow_cuda_emulation_{digest}.so"
    if not out.exists():
        torch_include = torch.utils.cpp_extension.include_paths()[0]
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-U_FORTIFY_SOURCE",
               "-D_FORTIFY_SOURCE=0", "-Wall", "-Wno-unknown-pragmas",
               f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests' / 'cuda_emulation'}",
               f"-I{torch_include}", str(SOURCES[0]), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError("building the CUDA emulation failed:\n" + proc.stderr[-4000:])
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    for name in ("emu_mlp_plan", "emu_mlp_forward", "emu_mlp_backward", "emu_mlp_param_grads",
                 "emu_selftest", "emu_one_mma"):
        getattr(lib, name).restype = ctypes.c_int
    _lib = lib
    return lib


def kernels():
    """The kernels of cg, gram_logdet and the tangent ops under the emulation, behind the CUDA
    ops' host code (tests/cuda_emulation/kernels_emulated.cpp), as a torch extension of CPU
    tensors: cg_init, cg_step (returns the new state), gram_logdet, gram_logdet_backward,
    tangent_linear, tangent_linear_backward (+ deterministic), tangent_epilogue,
    tangent_epilogue_backward (+ deterministic), tangent_mlp and tangent_mlp_backward (the
    per-layer path; flat lists of tensors), tangent_coupling, tangent_coupling_backward, and
    set_order(order, seed) for the thread and block order of later launches. Built once per
    source version (about a minute)."""
    global _kernels
    if _kernels is None:
        if compiler() is None:
            raise RuntimeError("no C++ compiler (set CXX) to build the CUDA emulation")
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in KERNEL_SOURCES)).hexdigest()
        # torch runs `ninja` from PATH: the one pip installed beside this Python will do
        bin_dir = os.path.dirname(sys.executable)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        _kernels = torch.utils.cpp_extension.load(
            name=f"injflow_cuda_emulation_{digest[:12]}", sources=[str(KERNEL_SOURCES[0])],
            extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "cuda_emulation")],
            extra_cflags=["-O2", "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",
                          "-Wno-unknown-pragmas"], verbose=False)
    return _kernels


@dataclass
class Plan:
    """The launch plan (csrc/cuda/tangent_mlp_kernels.cuh, plan_mlp)."""
    S: int
    WM: int
    ldm: int
    blocks: int
    smem: int
    math: int
    pipe: int


@dataclass
class Stats:
    blocks: int
    barriers: int
    mma: int


class EmulationError(RuntimeError):
    """A check of the emulation failed (deadlock, out-of-bounds write, misalignment, ...)."""


class Unsupported(RuntimeError):
    """The plan refuses the shapes (the op's "the fused path cannot take these shapes")."""


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _ptrs(ts):
    return (ctypes.c_void_p * len(ts))(*[(t.data_ptr() if t is not None else 0) for t in ts])


def _ints(xs):
    return (ctypes.c_int * len(xs))(*xs)


def _check(rc, err):
    if rc == 1:
        raise Unsupported(err.value.decode())
    if rc != 0:
        raise EmulationError(err.value.decode())


def _layer_codes(L, activation, last_activation):
    return [ACT_CODES[activation if i < L - 1 else last_activation] for i in range(L)]


def _dtype_code(dtype):
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the emulated kernels take float32 or float64, got {dtype}")
    return 0 if dtype == torch.float32 else 1


def _shapes(XV, Ws):
    """XV and Ws contiguous, B, R and the layers' input and output widths."""
    XV = XV.detach().contiguous()
    Ws = [W.detach().contiguous() for W in Ws]
    return XV, Ws, XV.shape[0], XV.shape[1], [W.shape[1] for W in Ws], [W.shape[0] for W in Ws]


def _launch(fn, XV, n_in, n_out, activation, last_activation, slope, math, pipe, buffers,
            per_block, order, seed, device):
    """Call emu_mlp_forward or emu_mlp_backward: the shapes, the buffers, the device's facts."""
    B, R, _ = XV.shape
    L = len(n_out)
    plan_out, stats = (ctypes.c_int64 * 7)(), (ctypes.c_int64 * 3)()
    err = ctypes.create_string_buffer(4096)
    rc = fn(_dtype_code(XV.dtype), MATH[math], PIPE[pipe], ctypes.c_int64(B), R, L, _ints(n_in),
            _ints(n_out), _ints(_layer_codes(L, activation, last_activation)),
            ctypes.c_double(slope), *buffers, device["sms"], device["major"],
            ctypes.c_int64(device["smem_optin"]), ctypes.c_int64(per_block), ORDER[order],
            ctypes.c_uint64(seed), plan_out, stats, err, len(err))
    _check(rc, err)
    return Plan(*plan_out), Stats(*stats)


def plan(B, R, widths, dtype=torch.float32, math="fma", backward=False, per_block=0,
         device=H200, pipe="registers"):
    """The fused kernels' launch plan for B samples of R rows through layers `widths`."""
    lib = library()
    n_in, n_out = widths[:-1], widths[1:]
    out = (ctypes.c_int64 * 7)()
    err = ctypes.create_string_buffer(1024)
    rc = lib.emu_mlp_plan(_dtype_code(dtype), MATH[math], PIPE[pipe], ctypes.c_int64(B), R,
                          len(n_out), _ints(n_in), _ints(n_out), int(backward), device["sms"],
                          device["major"], ctypes.c_int64(device["smem_optin"]),
                          ctypes.c_int64(per_block), out, err, len(err))
    _check(rc, err)
    return Plan(*out)


def forward(XV, Ws, bs, activation="tanh", last_activation=None, slope=0.0, math="fma",
            pipe="registers", per_block=0, order="forward", seed=0, device=H200):
    """The fused forward kernel: (Y, Z, A, dA, plan, stats) like torch.ops.injflow.tangent_mlp
    (Y, Z, A, dA: the output (B, R, n_L), every layer's pre-activations (B, R, n_l), hidden
    outputs (B, R, n_l) and σ' at the primal (B, n_l))."""
    XV, Ws, B, R, n_in, n_out = _shapes(XV, Ws)
    bs = [b.detach().contiguous() for b in bs]
    Z = [XV.new_empty(B, R, n) for n in n_out]
    A = [XV.new_empty(B, R, n) for n in n_out]
    dA = [XV.new_empty(B, n) for n in n_out]
    p, stats = _launch(library().emu_mlp_forward, XV, n_in, n_out, activation, last_activation, slope,
                       math, pipe,
                       [_ptr(XV), _ptrs(Ws), _ptrs(bs), _ptrs(Z), _ptrs(A), _ptrs(dA)],
                       per_block, order, seed, device)
    return A[-1], Z, A[:-1], dA, p, stats


def backward(gY, XV, Ws, Z, A, activation="tanh", last_activation=None, slope=0.0, math="fma",
             pipe="registers", per_block=0, order="forward", seed=0, device=H200,
             wgrad="cublas", wgrad_rows=0):
    """The fused backward kernel and the host's part after it, as the CUDA op does:
    (grad_XV, grad_Ws, grad_bs, GZ, plan, stats). Z, A: the forward's saved pre-activations
    and hidden outputs; GZ: every layer's pre-activation gradient (B, R, n_l). wgrad: the
    weight gradients as GEMMs ("cublas", here torch's CPU GEMM in float32) or by
    mlp_weight_grad_kernel ("kernel", FusedMlp(weight_grads="kernel"), in the same math as the fused
    kernels; wgrad_rows pins its rows per split); the bias sums are sum_partials_kernel's
    either way."""
    XV, Ws, B, R, n_in, n_out = _shapes(XV, Ws)
    gY = gY.detach().contiguous()
    Z = [z.detach().contiguous() for z in Z]
    L = len(Ws)
    linear_last = last_activation is None
    GZ = [XV.new_empty(B, R, n) for n in n_out]
    if linear_last:
        GZ[-1] = None
    p = plan(B, R, [n_in[0]] + n_out, XV.dtype, math, backward=True, per_block=per_block,
             device=device, pipe=pipe)
    partial = XV.new_empty(p.blocks, sum(n_out))
    gXV = torch.empty_like(XV)
    p, stats = _launch(library().emu_mlp_backward, XV, n_in, n_out, activation, last_activation,
                       slope, math, pipe, [_ptr(gY), _ptrs(Ws), _ptrs(Z), _ptrs(GZ), _ptr(gXV),
                                           _ptr(partial)], per_block, order, seed, device)
    if linear_last:
        GZ[-1] = gY
    inputs = [XV] + [a.detach().contiguous() for a in A]
    gW, gb, _ = param_grads(GZ, inputs, partial, own_gemm=wgrad == "kernel",
                            rows_per_split=wgrad_rows, math=math, order=order, seed=seed,
                            device=device)
    if wgrad != "kernel":
        gW = [GZ[i].reshape(B * R, n_out[i]).T @ inputs[i].reshape(B * R, n_in[i])
              for i in range(L)]
    return gXV, gW, gb, GZ, p, stats


@dataclass
class GradInfo:
    """How param_grads ran: mlp_weight_grad_kernel's rows per split, splits (grid.y), tiles
    (grid.x) and mma.sync calls (counted per warp), and sum_partials_kernel's blocks."""
    rows_per_split: int
    splits: int
    tiles: int
    sum_blocks: int
    mma: int


def param_grads(GZ, inputs, partial, own_gemm=True, rows_per_split=0, math="fma",
                order="forward", seed=0, device=H200):
    """The fused backward's parameter gradients from every layer's pre-activation gradient
    GZ[l] (..., n_out_l), the layers' inputs inputs[l] (..., n_in_l) and the backward kernel's
    bias partials (blocks, Σ n_out): (gW, gb, GradInfo), gW None unless own_gemm (then
    mlp_weight_grad_kernel's, over all rows, with FMAs or, float32, math "tf32" or
    "tf32x3")."""
    GZ = [g.detach().contiguous() for g in GZ]
    inputs = [a.detach().contiguous() for a in inputs]
    partial = partial.detach().contiguous()
    n_out, n_in = [g.shape[-1] for g in GZ], [a.shape[-1] for a in inputs]
    M = 1
    for size in GZ[0].shape[:-1]:
        M *= size
    gW = [partial.new_empty(o, i) for o, i in zip(n_out, n_in)] if own_gemm else None
    gb = [partial.new_empty(o) for o in n_out]
    info = (ctypes.c_int64 * 5)()
    err = ctypes.create_string_buffer(4096)
    rc = library().emu_mlp_param_grads(
        _dtype_code(partial.dtype), MATH[math], ctypes.c_int64(M), len(n_out), _ints(n_in), _ints(n_out),
        _ptrs(GZ), _ptrs(inputs), _ptr(partial), ctypes.c_int64(partial.shape[0]),
        _ptrs(gW) if own_gemm else ctypes.c_void_p(0), _ptrs(gb), device["sms"],
        ctypes.c_int64(rows_per_split), ORDER[order], ctypes.c_uint64(seed), info, err,
        len(err))
    _check(rc, err)
    return gW, gb, GradInfo(*info)


def selftest(which, order="forward"):
    """Run one of the emulation's test kernels: "shared_overflow", "divergent_barrier",
    "misaligned", "partial_warp_mma", "async_never_waited" raise EmulationError; "race"
    returns the order-dependent value it computes; "async_waited" and "async_not_waited" the
    sum of 64 ones copied by cp.async and read after (64) or before (NaN) the wait."""
    kinds = ["shared_overflow", "divergent_barrier", "misaligned", "partial_warp_mma", "race",
             "async_waited", "async_not_waited", "async_never_waited"]
    value = ctypes.c_double(0)
    err = ctypes.create_string_buffer(1024)
    rc = library().emu_selftest(kinds.index(which), ORDER[order], ctypes.byref(value), err,
                                len(err))
    _check(rc, err)
    return value.value


def one_mma(a, b):
    """C = a (16 × 8) · b (8 × 8) through one warp's fragments as the kernels lay them out
    (MmaLane) and the emulated mma.sync, float32."""
    a, b = a.float().contiguous(), b.float().contiguous()
    c = torch.full((16, 8), float("nan"))
    err = ctypes.create_string_buffer(1024)
    _check(library().emu_one_mma(_ptr(a), _ptr(b), _ptr(c), err, len(err)), err)
    return c
