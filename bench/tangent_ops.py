"""Benchmark: tangent ops (forward+backward) against the plain-PyTorch way.

Plain PyTorch writes the same math with separate ops: for the linear layer
``z = x Wᵀ + b; y = σ(z); Ẏ = σ'(z) ⊙ (V Wᵀ)`` (two GEMMs, several elementwise kernels),
for the coupling ``e = exp(tanh(s)); y = x e + t; Ẏ = V e + x e (1 − tanh²s) Ṡ + Ṫ``.
Ours: ``tangent_linear_packed`` (one GEMM over the stacked rows + fused epilogue) and
``tangent_coupling_packed`` (one fused kernel), on the stacked (B, 1+K, n) layout. Both are
timed with the same dense random upstream gradient (``(out * G).sum()``), as inside a network;
a bare ``.sum()`` would hand both an expanded all-ones gradient, which ours copies to a dense
tensor and elementwise autograd does not.

    python bench/tangent_ops.py [--device cpu|cuda] [--dtype float32|float64] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_common_args, environment, median_times_interleaved,  # noqa: E402
                    print_table, write_results)

from injflow_ext import tangent_coupling_packed, tangent_linear_packed  # noqa: E402


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

    t_plain, t_ours = median_times_interleaved([plain, ours], device, budget_s=budget,
                                               min_repeats=5)
    return t_plain, t_ours, err


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

    t_plain, t_ours = median_times_interleaved([plain, ours], device, budget_s=budget,
                                               min_repeats=5)
    return t_plain, t_ours, err


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    budget = 0.3 if args.quick else 1.5
    batches = (400,) if args.quick else (400, 5000)
    rows = []
    for B in batches:
        for n in (128, 512):
            for K in (1, 21):
                if args.quick and n == 512:
                    continue
                t_plain, t_ours, err = bench_linear(B, K, n, device, dtype, budget)
                rows.append(dict(op="tangent_linear(tanh)", batch=B, width=n, K=K,
                                 plain_ms=t_plain, ours_ms=t_ours, speedup=t_plain / t_ours,
                                 max_abs_err=err))
                print(f"  linear B={B} n={n} K={K}: {t_plain:.3f} / {t_ours:.3f} ms", flush=True)
        for m in (3, 21, 392):
            for K in (1, 21):
                t_plain, t_ours, err = bench_coupling(B, K, m, device, dtype, budget)
                rows.append(dict(op="tangent_coupling(tanh)", batch=B, width=m, K=K,
                                 plain_ms=t_plain, ours_ms=t_ours, speedup=t_plain / t_ours,
                                 max_abs_err=err))
                print(f"  coupling B={B} m={m} K={K}: {t_plain:.3f} / {t_ours:.3f} ms", flush=True)
    env = environment(device)
    print(f"\ntangent ops forward+backward, {args.dtype}, {env['device_name']}, torch "
          f"{env['torch_version']} (median ms; speedup = plain / ours)")
    print_table(rows, [("op", "op", "s"), ("batch", "batch", "d"), ("width", "width", "d"),
                       ("K", "K", "d"), ("plain_ms", "plain ms", ".3f"),
                       ("ours_ms", "ours ms", ".3f"), ("speedup", "speedup", ".2f"),
                       ("max_abs_err", "max err", ".1e")])
    write_results(args, "tangent_ops", device, {"environment": env,
        "metric": "median ms of forward+backward", "cases": rows})


if __name__ == "__main__":
    main()
