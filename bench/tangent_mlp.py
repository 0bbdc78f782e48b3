"""Benchmark: a coupling conditioner (an MLP on a primal row and K tangent rows), forward +
backward, ours against plain PyTorch.

Methods (same weights, same dense upstream gradient):
- plain: the stronger plain-PyTorch reference, primal once and the K tangents beside it, per
  layer ``z = x Wᵀ + b; a = tanh(z); V = (1 − a²) ⊙ (V Wᵀ)``;
- plain_compiled: the same through ``torch.compile`` (inductor fuses the elementwise work);
- ours_per_layer: ``tangent_mlp(path="per_layer")``, one ``tangent_linear`` per layer;
- ours_fused: ``tangent_mlp(path="fused")`` (CUDA), the whole forward in one kernel and the
  backward's gradient chain in another, weight gradients by cuBLAS;
- ours_auto: what ``MLP`` uses by default;
- ``*_tf32`` (CUDA, float32): the same with TF32 tensor cores allowed for float32 matmuls
  (``torch.backends.cuda.matmul.allow_tf32``: cuBLAS and inductor's GEMMs, and the fused
  kernels' mma path); ``ours_fused_tf32x3``: the fused kernels with 3×TF32
  (``FusedMlp(math="tf32x3")``), float32-level accuracy on the tensor cores. Their ``err`` is
  against float64, so TF32's ~1e-3 shows there;
- ``ours_fused_async``, ``ours_fused_async_tf32`` (CUDA): the fused kernels with the weight
  staged by cp.async into three shared-memory buffers (``FusedMlp(pipeline="async")``) instead
  of through registers; the same arithmetic as ``ours_fused`` / ``ours_fused_tf32``;
- ``ours_fused_wgrad``, ``ours_fused_wgrad_tf32`` (CUDA): ``ours_fused`` / ``ours_fused_tf32``
  with the weight gradients of every layer from one split-K kernel
  (``FusedMlp(weight_grads="kernel")``, on the tensor cores under TF32) instead of one cuBLAS GEMM
  per layer.
On CUDA every method is captured in a CUDA graph (forward + backward) and the replays are
timed, since at these sizes a step is launch-bound; ``--eager`` times plain launches instead.
TFLOP/s counts the three GEMMs per layer (forward, input gradient, weight gradient).
With ``--sweep`` the fused methods (FMA and TF32, both pipelines) also run at other samples per
block (``FusedMlp(samples_per_block=...)``): 1..8, and the most samples that fit
the kernels' 32-, 64- and 128-row tiles (``samples_per_block_sweep``; for few rows per sample,
e.g. an encode pass, 1..8 samples never fill a tile).

    python bench/tangent_mlp.py [--device cpu|cuda] [--dtype float32|float64] [--quick]
                                [--eager] [--sweep] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, environment, median_time, print_table, write_results  # noqa: E402

from injflow_ext import tangent_mlp  # noqa: E402
from injflow_ext.benchmarks import capture_replay  # noqa: E402
from injflow_ext.benchmarks.plain_reference import plain_tangent_mlp  # noqa: E402
from injflow_ext.ops import FusedMlp  # noqa: E402
from injflow_ext.train.step import matmul_precision  # noqa: E402

# name: (batch, K, widths): the conditioners of bench/step.py's configurations (a coupling on
# D features conditions on D // 2 and outputs 2 (D − D // 2)), and MINIBOONE's encode pass.
CASES = {
    "POWER": (5000, 2, [3, 128, 128, 128, 128, 6]),
    "HEPMASS": (750, 10, [10, 128, 128, 128, 128, 22]),
    "MINIBOONE": (400, 21, [21, 128, 128, 128, 128, 44]),
    "MINIBOONE_encode": (400, 0, [21, 128, 128, 128, 128, 44]),
    "IMAGE": (50, 20, [392, 512, 512, 784]),
}
QUICK_CASES = {"TINY": (64, 3, [3, 16, 16, 6])}
METHODS = ["plain", "plain_compiled", "ours_per_layer", "ours_fused", "ours_auto"]
TF32_METHODS = ["plain_compiled_tf32", "ours_per_layer_tf32", "ours_fused_tf32",
                "ours_fused_tf32x3"]
ASYNC_METHODS = ["ours_fused_async"]  # CUDA, any dtype
ASYNC_TF32_METHODS = ["ours_fused_async_tf32"]  # CUDA, float32
WGRAD_METHODS = ["ours_fused_wgrad"]  # CUDA, any dtype
WGRAD_TF32_METHODS = ["ours_fused_wgrad_tf32"]  # CUDA, float32


plain_mlp = plain_tangent_mlp


@contextmanager
def arithmetic(method):
    """The float32 matmul arithmetic a method runs (and is captured) under: TF32 allowed for
    ``*_tf32``, full float32 otherwise (the fused kernels' own options: :func:`fused_of`)."""
    with matmul_precision("tf32" if method.endswith("_tf32") else "float32"):
        yield


def fused_of(method, samples_per_block: int = 0) -> FusedMlp:
    """The fused kernels' options of a method: 3×TF32 for ``*_tf32x3``, the cp.async weight
    pipeline for ``*_async*``, the weight-gradient kernel for ``*_wgrad*``."""
    return FusedMlp(math="tf32x3" if method.endswith("_tf32x3") else "auto",
                    pipeline="async" if "_async" in method else "registers",
                    weight_grads="kernel" if "_wgrad" in method else "cublas",
                    samples_per_block=samples_per_block)


def forward_fn(method, samples_per_block: int = 0):
    fused = fused_of(method, samples_per_block)
    method = (method.removesuffix("_tf32x3").removesuffix("_tf32").removesuffix("_async")
              .removesuffix("_wgrad"))
    if method == "plain":
        return plain_mlp
    if method == "plain_compiled":
        return torch.compile(plain_mlp, dynamic=False)
    path = {"ours_per_layer": "per_layer", "ours_fused": "fused", "ours_auto": "auto"}[method]
    return lambda XV, Ws, bs: tangent_mlp(XV, Ws, bs, "tanh", path=path, fused=fused)


def make_inputs(B, K, widths, device, dtype):
    g = torch.Generator().manual_seed(0)
    XV = torch.randn(B, 1 + K, widths[0], generator=g).to(device, dtype).requires_grad_()
    Ws = [(torch.randn(b, a, generator=g) / max(a, 1) ** 0.5).to(device, dtype).requires_grad_()
          for a, b in zip(widths[:-1], widths[1:])]
    bs = [(0.1 * torch.randn(b, generator=g)).to(device, dtype).requires_grad_()
          for b in widths[1:]]
    G = torch.randn(B, 1 + K, widths[-1], generator=g).to(device, dtype)
    return XV, Ws, bs, G


def make_step(fn, XV, Ws, bs, G, device, eager):
    """One forward + backward (gradients of XV and every parameter); on CUDA replayed from a
    graph unless ``eager``, captured as the installed ``injflow bench`` captures
    (``capture_replay``: on the warm-up's own stream and thread-local, since the first capture
    of a run once failed in the default mode, and a failed capture leaves torch's CUDA
    generator unusable for the rest of the process)."""
    params = [XV, *Ws, *bs]

    def step():
        return torch.autograd.grad((fn(XV, Ws, bs) * G).sum(), params)

    if device.type != "cuda" or eager:
        return step
    return capture_replay(step, device)


def rel_err(out, ref) -> float:
    return float(max((a - b).norm() / b.norm().clamp(min=1e-30) for a, b in zip(out, ref)))


def run_case(name, B, K, widths, methods, device, dtype, args):
    XV, Ws, bs, G = make_inputs(B, K, widths, device, dtype)
    params = [XV, *Ws, *bs]
    # float64 reference of the output and every gradient, for each method's error
    p64 = [p.detach().double().requires_grad_() for p in params]
    L = len(Ws)
    out64 = plain_mlp(p64[0], p64[1:1 + L], p64[1 + L:])
    ref = [out64.detach(), *torch.autograd.grad((out64 * G.double()).sum(), p64)]
    flops = 3 * 2 * B * (1 + K) * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    row = {"case": name, "batch": B, "K": K, "widths": widths, "gflop": flops / 1e9}
    budget = 0.3 if args.quick else args.budget
    for method in methods:
        if device.type != "cuda" and (method.startswith("ours_fused") or "_tf32" in method):
            continue
        try:
            with arithmetic(method):
                fn = forward_fn(method)
                out = fn(XV, Ws, bs)
                grads = torch.autograd.grad((out * G).sum(), params)
                row[f"{method}_err"] = rel_err([out.detach(), *grads], ref)
                step = make_step(fn, XV, Ws, bs, G, device, args.eager)
                t = median_time(step, device, budget_s=budget, min_repeats=5, max_repeats=200)
        except Exception as e:  # keep the other methods' numbers
            if args.quick:
                raise
            row[f"{method}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  {name} {method}: FAILED {row[f'{method}_error']}", flush=True)
            continue
        row[f"{method}_ms"] = t
        row[f"{method}_tflops"] = flops / t / 1e9
        print(f"  {name} {method}: {t:.3f} ms ({flops / t / 1e9:.2f} TFLOP/s, rel err "
              f"{row[f'{method}_err']:.1e})", flush=True)
    for method in methods:
        if row.get(f"{method}_ms"):
            bases = ["plain", "plain_compiled", "ours_per_layer"]
            if "_tf32" in method:  # against the same arithmetic too
                bases += ["plain_compiled_tf32", "ours_per_layer_tf32"]
            for base in bases:
                if row.get(f"{base}_ms") and method != base:
                    row[f"{method}_speedup_vs_{base}"] = row[f"{base}_ms"] / row[f"{method}_ms"]
    swept = [m for m in ("ours_fused", "ours_fused_tf32", "ours_fused_async",
                         "ours_fused_async_tf32") if m in methods]
    for method in swept if args.sweep and device.type == "cuda" else []:
        sweep = {}
        with arithmetic(method):
            for per_block in samples_per_block_sweep(1 + K):
                try:
                    step = make_step(forward_fn(method, per_block), XV, Ws, bs, G, device,
                                     args.eager)
                    sweep[per_block] = median_time(step, device, budget_s=budget / 2,
                                                   min_repeats=5, max_repeats=100)
                except Exception as e:
                    sweep[per_block] = f"{type(e).__name__}: {str(e)[:120]}"
        key = method.removeprefix("ours_")
        row[f"{key}_ms_by_samples_per_block"] = sweep
        print(f"  {name} {key} by samples per block: " + ", ".join(
            f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in sweep.items()),
            flush=True)
    return row


def samples_per_block_sweep(rows_per_sample: int, max_rows: int = 128) -> list[int]:
    """The samples per block that ``--sweep`` times for samples of ``rows_per_sample`` (1+K)
    rows: 1..8, and the most samples whose rows fit the fused kernels' tiles of one, two and
    four warps (32, 64 and 128 rows; the plan takes at most ``max_rows``, its kMaxRows)."""
    counts = set(range(1, 9)) | {tile // rows_per_sample for tile in (32, 64, max_rows)}
    return sorted(s for s in counts if s >= 1 and s * rows_per_sample <= max_rows)


def warm_up_capture(device) -> None:
    """One throwaway CUDA-graph capture of a matmul and its backward. On the H200 runs of
    2026-11-30 the first capture of the process failed (stream capture invalidated) whatever
    the method, and every capture of that case after it; the cause was not found (no device
    time left), so the first capture is spent here."""
    if device.type != "cuda":
        return
    a = torch.randn(64, 64, device=device, requires_grad=True)
    try:
        make_step(lambda XV, Ws, bs: XV @ Ws[0], a, [a], [], torch.ones(64, 64, device=device),
                  device, eager=False)()
    except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
        print(f"  (warm-up capture failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
    torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--cases", default=None, help="comma-separated names of " + ",".join(CASES))
    p.add_argument("--methods", default=None,
                   help="comma-separated, of " + ",".join(
                       METHODS + TF32_METHODS + ASYNC_METHODS + ASYNC_TF32_METHODS
                       + WGRAD_METHODS + WGRAD_TF32_METHODS) +
                   " (default: all; the async and wgrad ones on CUDA, the TF32 ones on CUDA in"
                   " float32)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per method")
    p.add_argument("--eager", action="store_true", help="CUDA: time eager launches, not graphs")
    p.add_argument("--sweep", action="store_true",
                   help="CUDA: also time the fused kernels at 1..8 samples per block")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        cases = {k: CASES[k] for k in args.cases.split(",")}
    if args.methods:
        methods = args.methods.split(",")
    else:
        cuda, f32 = device.type == "cuda", dtype == torch.float32
        methods = (METHODS + (TF32_METHODS if cuda and f32 else [])
                   + (ASYNC_METHODS if cuda else []) + (ASYNC_TF32_METHODS if cuda and f32 else [])
                   + (WGRAD_METHODS if cuda else []) + (WGRAD_TF32_METHODS if cuda and f32 else []))
    env = environment(device)
    warm_up_capture(device)
    rows = []
    for name, (B, K, widths) in cases.items():
        rows.append(run_case(name, B, K, widths, methods, device, dtype, args))
        write_results(args, "tangent_mlp", device, {"environment": env, "eager": args.eager,
                      "metric": "median ms of forward + backward", "rows": rows}, quiet=True)
    timing = "eager launches" if args.eager or device.type != "cuda" else "CUDA-graph replay"
    print(f"\nMLP forward+backward, {args.dtype}, {env['device_name']}, torch "
          f"{env['torch_version']} (median ms, {timing})")
    cols = [("case", "case", "s"), ("batch", "batch", "d"), ("K", "K", "d")]
    cols += [(f"{m}_ms", m, ".3f") for m in methods]
    print_table(rows, cols)
    print("\nspeed-ups and achieved TFLOP/s")
    cols = [("case", "case", "s")]
    cols += [(f"{m}_speedup_vs_plain_compiled", f"{m} vs compiled", ".2f") for m in methods
             if m.startswith("ours")]
    cols += [(f"{m}_speedup_vs_plain_compiled_tf32", f"{m} vs compiled tf32", ".2f")
             for m in methods if m.startswith("ours") and "_tf32" in m]
    cols += [(f"{m}_tflops", f"{m} TF/s", ".2f") for m in methods]
    print_table(rows, cols)
    write_results(args, "tangent_mlp", device, {"environment": env, "eager": args.eager,
                  "metric": "median ms of forward + backward", "rows": rows})


if __name__ == "__main__":
    main()
