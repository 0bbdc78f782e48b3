"""Benchmark: gram_logdet forward+backward against the plain-PyTorch way.

Plain PyTorch: G = J.mT @ J, L = torch.linalg.cholesky(G), 2·Σ log diag L, autograd backward.
Ours: injflow_ext.gram_logdet (fused Gram + Cholesky + log-diagonal, fused backward), with the
default float64 accumulation for float32 input and, as a second column, float32 throughout.

    python bench/gram_logdet.py [--device cpu|cuda] [--dtype float32|float64] [--quick]
                                [--json bench/results/gram_logdet_DEVICE.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, environment, median_time, print_table, write_results  # noqa: E402

from injflow_ext import gram_logdet  # noqa: E402

BATCHES = (400, 5000)
DS = (2, 10, 21, 64)
AMBIENT = (8, 43, 784)


def plain_pytorch(J):
    G = J.mT @ J
    L = torch.linalg.cholesky_ex(G).L  # no host check of the status (no synchronisation)
    return 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def fwd_bwd(fn, J):
    def step():
        J.grad = None
        fn(J).sum().backward()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    budget = 0.3 if args.quick else 1.5
    batches = (400,) if args.quick else BATCHES
    rows = []
    for B in batches:
        for D in AMBIENT:
            for d in DS:
                if d > D:
                    continue
                torch.manual_seed(0)
                J = torch.randn(B, D, d, device=device, dtype=dtype, requires_grad=True)
                # agree before timing
                ref = plain_pytorch(J.detach().double())
                ours = gram_logdet(J.detach()).double()
                err = ((ours - ref).abs() / ref.abs().clamp(min=1)).max().item()
                reps = dict(budget_s=budget, min_repeats=3 if B * D * d > 1e7 else 5)
                t_ref = median_time(fwd_bwd(plain_pytorch, J), device, **reps)
                t_ours = median_time(fwd_bwd(gram_logdet, J), device, **reps)
                t_f32 = None
                if dtype == torch.float32:
                    t_f32 = median_time(fwd_bwd(
                        lambda x: gram_logdet(x, accumulate_float64=False), J), device, **reps)
                rows.append(dict(batch=B, D=D, d=d, plain_ms=t_ref, ours_ms=t_ours,
                                 ours_f32acc_ms=t_f32, speedup=t_ref / t_ours,
                                 speedup_f32acc=(t_ref / t_f32) if t_f32 else None,
                                 max_rel_err_vs_f64=err))
                print(f"  B={B} D={D} d={d}: plain {t_ref:.3f} ms, ours {t_ours:.3f} ms "
                      f"({t_ref / t_ours:.2f}x)", flush=True)
                del J
    env = environment(device)
    print(f"\ngram_logdet forward+backward, {args.dtype}, {env['device_name']}, torch "
          f"{env['torch_version']} (median ms; speedup = plain / ours)")
    print_table(rows, [("batch", "batch", "d"), ("D", "D", "d"), ("d", "d", "d"),
                       ("plain_ms", "plain ms", ".3f"), ("ours_ms", "ours ms", ".3f"),
                       ("speedup", "speedup", ".2f"), ("ours_f32acc_ms", "ours f32-acc ms", ".3f"),
                       ("speedup_f32acc", "speedup f32-acc", ".2f"),
                       ("max_rel_err_vs_f64", "rel err", ".1e")])
    write_results(args, "gram_logdet", device, {"environment": env,
        "metric": "median ms of forward+backward", "cases": rows})


if __name__ == "__main__":
    main()
