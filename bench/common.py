"""Shared helpers of the benchmark scripts: timing, environment facts, table and JSON output."""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from injflow_ext.benchmarks.timing import (  # noqa: F401  (the scripts import them from here)
    _sync,
    device_name,
    environment,
    git_commit,
    median_time,
    print_table,
    write_json,
)


def add_common_args(parser) -> None:
    """--device, --dtype, --quick, --json: the options every benchmark script takes."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--quick", action="store_true", help="small sizes, short timing budget")
    parser.add_argument("--json", default=None, help="output JSON path")







def median_times_interleaved(fns, device: torch.device, *, min_repeats: int = 5,
                             max_repeats: int = 50, budget_s: float = 2.0,
                             warmup: int = 2) -> list[float]:
    """Median times (ms) of several callables timed in alternation (A B A B ...), so that slow
    drifts of the machine (other jobs, frequency, page faults) fall on all of them alike; the
    ratios of these medians are steadier than those of back-to-back ``median_time`` calls."""
    times = times_interleaved(fns, device, min_repeats=min_repeats, max_repeats=max_repeats,
                              budget_s=budget_s, warmup=warmup)
    return [statistics.median(ts) for ts in times]


def paired_ratio_interval(times_a: list[float], times_b: list[float],
                          confidence: float = 0.95) -> tuple[float, float, float]:
    """Median of the per-round ratios ``a_i / b_i`` of two interleaved timings and a
    distribution-free confidence interval for it (order statistics of the ratios, binomial
    ranks; conservative: the interval's coverage is at least ``confidence`` where the number
    of rounds allows). Rounds share the machine's state, so their ratios vary less than the
    times do. Returns ``(median, low, high)``."""
    ratios = sorted(a / b for a, b in zip(times_a, times_b))
    n = len(ratios)
    # [r_j, r_{n-1-j}] misses the median on one side with probability P(X <= j), X the number
    # of ratios below it, X ~ Binomial(n, 1/2): take the largest j with P(X <= j) <= α/2
    alpha, j, cdf = 1 - confidence, 0, 0.0
    for i in range(n // 2):
        cdf += math.comb(n, i) / 2 ** n
        if cdf > alpha / 2:
            break
        j = i
    return statistics.median(ratios), ratios[j], ratios[n - 1 - j]


def times_interleaved(fns, device: torch.device, *, min_repeats: int = 5, max_repeats: int = 50,
                      budget_s: float = 2.0, warmup: int = 2) -> list[list[float]]:
    """Per-round times (ms) of several callables timed in alternation; see
    :func:`median_times_interleaved`."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_repeats:
        for fn, ts in zip(fns, times):
            ts.append(median_time(fn, device, min_repeats=1, max_repeats=1, budget_s=0.0,
                                  warmup=0))
        if len(times[0]) >= min_repeats and time.perf_counter() - start > budget_s * len(fns):
            break
    return times



def write_results(args, benchmark: str, device: torch.device, payload: dict,
                  quiet: bool = False) -> None:
    """Write a benchmark's JSON to --json or bench/results/BENCHMARK_DEVICE.json."""
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"{benchmark}_{device.type}.json")
    write_json(path, {"benchmark": benchmark, "dtype": args.dtype, **payload}, quiet)


