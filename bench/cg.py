"""Benchmark: batched conjugate gradients, ours (one matvec + one fused kernel per iteration)
against a CG loop written with torch ops as in common reference code (elementwise ops and
reductions per iteration, a convergence test with a host synchronisation every iteration).

Systems: N = batch·K right-hand sides of size d ∈ {2, 10, 21, 64} with SPD matrices of
condition number 1e3, rtol 1e-6 (float64) or 1e-4 (float32), both capped at d iterations.

    python bench/cg.py [--device cpu|cuda] [--dtype float32|float64] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, environment, median_time, print_table, write_results  # noqa: E402
from plain_reference import reference_cg  # noqa: E402

from injflow_ext import cg_solve  # noqa: E402


def make_problem(N, d, K, cond, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, d, d, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    A = ((Q * lam) @ Q.mT).to(device, dtype)
    b = torch.randn(N, d, K, generator=g, dtype=torch.float64).to(device, dtype)
    return A, b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    budget = 0.3 if args.quick else 1.5
    shapes = [(400, 1), (5000, 1), (400, 21)] if not args.quick else [(400, 1)]
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    rows = []
    for N, K in shapes:
        for d in (2, 10, 21, 64):
            A, b = make_problem(N, d, K, 1e3, device, dtype)
            matvec = lambda p, A=A: torch.bmm(A, p)  # noqa: E731
            x_ref, it_ref = reference_cg(matvec, b, rtol, d)
            res = cg_solve(A, b, rtol=rtol, max_iter=d)
            exact = torch.linalg.solve(A.double(), b.double())
            err_ours = ((res.x.double() - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
            err_ref = ((x_ref.double() - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
            reps = dict(budget_s=budget, min_repeats=3)
            # the lambdas below are timed at once, inside this iteration (B023 does not apply)
            t_ref = median_time(lambda: reference_cg(matvec, b, rtol, d), device, **reps)  # noqa: B023
            t_ours = median_time(lambda: cg_solve(A, b, rtol=rtol, max_iter=d),  # noqa: B023
                                 device, **reps)
            t_ours_early = median_time(
                lambda: cg_solve(A, b, rtol=rtol, max_iter=d, check_every=4),  # noqa: B023
                device, **reps)
            rows.append(dict(systems=N * K, N=N, K=K, d=d, plain_ms=t_ref, ours_ms=t_ours,
                             ours_check4_ms=t_ours_early, speedup=t_ref / t_ours,
                             iterations_plain=it_ref,
                             iterations_ours_max=int(res.iterations.max()),
                             rel_err_plain=err_ref, rel_err_ours=err_ours))
            print(f"  N={N} K={K} d={d}: {t_ref:.3f} / {t_ours:.3f} ms", flush=True)
    env = environment(device)
    print(f"\nbatched CG (A: (N, d, d), b: (N, d, K), κ = 1e3, rtol {rtol:g}), {args.dtype}, "
          f"{env['device_name']}, torch {env['torch_version']} (median ms; speedup = plain / ours)")
    print_table(rows, [("systems", "systems", "d"), ("K", "K", "d"), ("d", "d", "d"),
                       ("plain_ms", "plain ms", ".3f"), ("ours_ms", "ours ms", ".3f"),
                       ("speedup", "speedup", ".2f"), ("ours_check4_ms", "ours check/4 ms", ".3f"),
                       ("iterations_plain", "it plain", "d"),
                       ("iterations_ours_max", "it ours", "d"),
                       ("rel_err_plain", "err plain", ".1e"), ("rel_err_ours", "err ours", ".1e")])
    write_results(args, "cg", device, {"environment": env,
        "metric": "median ms of a full solve", "cases": rows})


if __name__ == "__main__":
    main()
