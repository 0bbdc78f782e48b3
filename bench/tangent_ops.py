"""Benchmark: tangent ops (forward+backward) against the plain-PyTorch way.

Plain PyTorch writes the same math with separate ops: for the linear layer
``z = x Wᵀ + b; y = σ(z); Ẏ = σ'(z) ⊙ (V Wᵀ)`` (two GEMMs, several elementwise kernels),
for the coupling ``e = exp(tanh(s)); y = x e + t; Ẏ = V e + x e (1 − tanh²s) Ṡ + Ṫ``.
for the convolution ``z = conv(x) + b; y = σ(z); Ẏ = σ'(z) ⊙ conv(V)`` (the tangents' images
stacked into one convolution, elementwise math separate). Ours: ``tangent_linear_packed`` (one
GEMM over the stacked rows + fused epilogue), ``tangent_coupling_packed`` (one fused kernel) and
``tangent_conv2d_packed`` (one convolution of primal and tangent images + fused epilogue), on
the stacked (B, 1+K, ...) layout. Both are
timed with the same dense random upstream gradient (``(out * G).sum()``), as inside a network;
a bare ``.sum()`` would hand both an expanded all-ones gradient, which ours copies to a dense
tensor and elementwise autograd does not.

    python bench/tangent_ops.py [--device cpu|cuda] [--dtype float32|float64] [--quick] [--json PATH]
                                [--processes N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_common_args,
    environment,
    paired_ratio_interval,
    print_table,
    times_interleaved,
    write_results,
)

from injflow_ext import (  # noqa: E402
    tangent_conv2d_packed,
    tangent_coupling_packed,
    tangent_linear_packed,
)


def plain_linear(x, V, W, b):
    z = x @ W.T + b
    y = torch.tanh(z)
    Yd = (1 - y * y).unsqueeze(1) * (V @ W.T)
    return y, Yd


def plain_coupling(x, V, s, Sd, t, Td):
    st = torch.tanh(s)
    e = torch.exp(st)
    y = x * e + t
    Yd = V * e.unsqueeze(1) + (x * e * (1 - st * st)).unsqueeze(1) * Sd + Td
    return y, Yd, st.sum(-1)


def plain_conv(x, V, W, b):
    B, K = V.shape[:2]
    y = torch.tanh(F.conv2d(x, W, b, padding=1))
    Vc = F.conv2d(V.reshape(B * K, *V.shape[2:]), W, None, padding=1)
    Yd = (1 - y * y).unsqueeze(1) * Vc.view(B, K, *Vc.shape[1:])
    return y, Yd


def compare(plain, ours, device, budget) -> dict:
    """Interleaved timing of the two ways: median ms of each, the speed-up (ratio of the
    medians), and the median of the per-round ratios with its 95 % confidence interval; at
    least 9 rounds, so that the interval is narrower than the full range of the ratios."""
    times_plain, times_ours = times_interleaved([plain, ours], device, budget_s=budget,
                                                min_repeats=9)
    t_plain, t_ours = statistics.median(times_plain), statistics.median(times_ours)
    ratio, low, high = paired_ratio_interval(times_plain, times_ours)
    return dict(plain_ms=t_plain, ours_ms=t_ours, speedup=t_plain / t_ours,
                paired_speedup=ratio, paired_ci_low=low, paired_ci_high=high,
                rounds=len(times_plain))


def bench_linear(B, K, n, device, dtype, budget):
    g = torch.Generator(device="cpu").manual_seed(0)
    XV = torch.randn(B, 1 + K, n, generator=g).to(device, dtype)
    W = (torch.randn(n, n, generator=g) / n ** 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    x, V = XV[:, 0].contiguous().requires_grad_(), XV[:, 1:].contiguous().requires_grad_()
    XV.requires_grad_()
    # agree before timing
    y, Yd = plain_linear(x, V, W, b)
    YV = tangent_linear_packed(XV, W, b, "tanh")
    err = max((YV[:, 0] - y).abs().max().item(), (YV[:, 1:] - Yd).abs().max().item())

    G = torch.randn(B, 1 + K, n, generator=g).to(device, dtype)  # a dense upstream gradient
    G0, G1 = G[:, 0].contiguous(), G[:, 1:].contiguous()

    def ours():
        YV = tangent_linear_packed(XV, W, b, "tanh")
        (YV * G).sum().backward()

    def plain():
        y, Yd = plain_linear(x, V, W, b)
        ((y * G0).sum() + (Yd * G1).sum()).backward()

    return compare(plain, ours, device, budget), err


def bench_coupling(B, K, m, device, dtype, budget):
    g = torch.Generator(device="cpu").manual_seed(0)
    XV = torch.randn(B, 1 + K, m, generator=g).to(device, dtype).requires_grad_()
    ST = torch.randn(B, 1 + K, 2 * m, generator=g).to(device, dtype).requires_grad_()
    parts = [t.detach().contiguous().requires_grad_() for t in (
        XV[:, 0], XV[:, 1:], ST[:, 0, :m], ST[:, 1:, :m], ST[:, 0, m:], ST[:, 1:, m:])]
    y, Yd, lad = plain_coupling(*parts)
    YV, lad2 = tangent_coupling_packed(XV, ST)
    err = max((YV[:, 0] - y).abs().max().item(), (YV[:, 1:] - Yd).abs().max().item(),
              (lad - lad2).abs().max().item())

    G = torch.randn(B, 1 + K, m, generator=g).to(device, dtype)  # a dense upstream gradient
    G0, G1 = G[:, 0].contiguous(), G[:, 1:].contiguous()

    def ours():
        YV, lad = tangent_coupling_packed(XV, ST)
        ((YV * G).sum() + lad.sum()).backward()

    def plain():
        y, Yd, lad = plain_coupling(*parts)
        ((y * G0).sum() + (Yd * G1).sum() + lad.sum()).backward()

    return compare(plain, ours, device, budget), err


def bench_conv(B, K, C, device, dtype, budget, H=28):
    """C channels in and out, H × H images, 3 × 3 kernel, padding 1, tanh."""
    g = torch.Generator(device="cpu").manual_seed(0)
    XV = torch.randn(B, 1 + K, C, H, H, generator=g).to(device, dtype)
    W = (torch.randn(C, C, 3, 3, generator=g) / (9 * C) ** 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(C, generator=g).to(device, dtype).requires_grad_()
    x, V = XV[:, 0].contiguous().requires_grad_(), XV[:, 1:].contiguous().requires_grad_()
    XV.requires_grad_()
    y, Yd = plain_conv(x, V, W, b)
    YV = tangent_conv2d_packed(XV, W, b, "tanh", padding=1)
    err = max((YV[:, 0] - y).abs().max().item(), (YV[:, 1:] - Yd).abs().max().item())
    G = torch.randn(B, 1 + K, C, H, H, generator=g).to(device, dtype)
    G0, G1 = G[:, 0].contiguous(), G[:, 1:].contiguous()

    def ours():
        YV = tangent_conv2d_packed(XV, W, b, "tanh", padding=1)
        (YV * G).sum().backward()

    def plain():
        y, Yd = plain_conv(x, V, W, b)
        ((y * G0).sum() + (Yd * G1).sum()).backward()

    return compare(plain, ours, device, budget), err


def run_cases(args, device, dtype) -> list[dict]:
    """Every case once, in this process; rows in the canonical order."""
    budget = 0.3 if args.quick else 1.5
    batches = (400,) if args.quick else (400, 5000)
    cases = []
    if args.ops in ("all", "linear"):
        cases += [("tangent_linear(tanh)", B, n, K) for B in batches for n in (128, 512)
                  for K in (1, 21) if not (args.quick and n == 512)]
    if args.ops in ("all", "coupling"):
        cases += [("tangent_coupling(tanh)", B, m, K) for B in batches for m in (3, 21, 392)
                  for K in (1, 21)]
    if args.ops in ("all", "conv"):   # MNIST-sized: batch 64, 28 × 28, d = 20 tangents
        cases += [("tangent_conv2d(tanh, 3x3, 28x28)", 16 if args.quick else 64, C, K)
                  for C in (8, 32) for K in (1, 20) if not (args.quick and C == 32)]
    # smallest first: a case measured right after a multi-GB one ran measurably slower (the
    # allocator's state), so no case follows a much larger one
    results = {}
    for case in sorted(cases, key=lambda c: c[1] * (1 + c[3]) * c[2]):
        op, B, width, K = case
        bench = (bench_linear if op.startswith("tangent_linear") else
                 bench_conv if op.startswith("tangent_conv2d") else bench_coupling)
        timing, err = bench(B, K, width, device, dtype, budget)
        results[case] = dict(op=op, batch=B, width=width, K=K, **timing, max_abs_err=err)
        print(f"  {op} B={B} width={width} K={K}: {timing['plain_ms']:.3f} / "
              f"{timing['ours_ms']:.3f} ms", flush=True)
    return [results[case] for case in cases]


# glibc malloc settings under which freed memory stays with the process: no mmap for large
# tensors and no trimming of the heap's top, so a tensor allocated again is not paged in again.
# With the defaults, a tangent_linear call at 400/128/K = 21 took ~600 minor page faults
# against ~140 for the plain way in the same process (the allocation order decides which
# freed blocks glibc returns to the OS), worth ~1-2 ms of a ~21 ms call; with these settings
# both ways ran ~40 % faster. jemalloc or tcmalloc (LD_PRELOAD) have the same effect.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 28), "MALLOC_TRIM_THRESHOLD_": str(2 ** 30),
                     "MALLOC_TOP_PAD_": str(2 ** 26)}


def run_in_processes(args, n: int) -> list[dict]:
    """The whole benchmark n times, each in a fresh process, combined per case: the median of
    the runs' medians and of their paired speed-ups, and the range of the paired speed-ups
    over the runs. On a CPU the allocator's and the scheduler's state differ per process and
    move a case's ratio by more than one run's confidence interval shows."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            path = os.path.join(tmp, f"run{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device,
                   "--dtype", args.dtype, "--ops", args.ops, "--json", path] + (
                       ["--quick"] if args.quick else [])
            print(f"process {i + 1}/{n}", flush=True)
            env = dict(os.environ, **(KEEP_FREED_MEMORY if args.keep_freed_memory else {}))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            with open(path) as f:
                runs.append(json.load(f)["cases"])
    rows = []
    for per_run in zip(*runs):
        paired = [r["paired_speedup"] for r in per_run]
        row = dict(per_run[0])
        row.update(plain_ms=statistics.median(r["plain_ms"] for r in per_run),
                   ours_ms=statistics.median(r["ours_ms"] for r in per_run),
                   paired_speedup=statistics.median(paired), paired_runs=paired,
                   runs_low=min(paired), runs_high=max(paired), processes=n,
                   rounds=sum(r["rounds"] for r in per_run),
                   max_abs_err=max(r["max_abs_err"] for r in per_run))
        row["speedup"] = row["plain_ms"] / row["ours_ms"]
        for key in ("paired_ci_low", "paired_ci_high"):  # one run's; not meaningful combined
            row.pop(key)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--processes", type=int, default=1,
                   help="run the whole benchmark this many times, each in a fresh process, "
                        "and combine (see run_in_processes)")
    p.add_argument("--ops", choices=("all", "linear", "coupling", "conv"), default="all",
                   help="which op's cases to run")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="run the processes with glibc malloc set to keep freed memory "
                        "(KEEP_FREED_MEMORY; CPU), so that page faults on re-allocated "
                        "tensors do not decide the comparison; implies --processes >= 1 "
                        "fresh processes")
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        args.processes = max(args.processes, 1)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    columns = [("op", "op", "s"), ("batch", "batch", "d"), ("width", "width", "d"),
               ("K", "K", "d"), ("plain_ms", "plain ms", ".3f"), ("ours_ms", "ours ms", ".3f"),
               ("speedup", "speedup", ".2f"), ("paired_speedup", "paired", ".2f")]
    if args.processes > 1 or args.keep_freed_memory:
        rows = run_in_processes(args, args.processes)
        how = (f"medians over {args.processes} processes; paired = median of the processes' "
               f"paired speed-ups, lo/hi their range")
        columns += [("runs_low", "runs lo", ".2f"), ("runs_high", "hi", ".2f")]
    else:
        rows = run_cases(args, device, dtype)
        how = "paired = median of the per-round ratios, with its 95% confidence interval"
        columns += [("paired_ci_low", "95% CI lo", ".2f"), ("paired_ci_high", "hi", ".2f")]
    columns += [("rounds", "rounds", "d"), ("max_abs_err", "max err", ".1e")]
    print(f"\ntangent ops forward+backward, {args.dtype}, {env['device_name']}, torch "
          f"{env['torch_version']} (median ms; speedup = plain / ours; {how})")
    print_table(rows, columns)
    write_results(args, "tangent_ops", device, {"environment": env,
        "metric": "median ms of forward+backward", "processes": args.processes,
        "malloc_env": KEEP_FREED_MEMORY if args.keep_freed_memory else None, "cases": rows})


if __name__ == "__main__":
    main()
