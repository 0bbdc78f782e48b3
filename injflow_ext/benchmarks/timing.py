"""Timing and reporting helpers shared by ``injflow bench`` and the scripts in bench/: device
facts, medians of CUDA-event (or host-clock) timings, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import torch

__all__ = ["device_name", "git_commit", "environment", "median_time", "print_table",
           "write_json"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))   # None outside a git checkout
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=here, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    import injflow_ext

    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "build_info": injflow_ext.build_info(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, *, min_repeats: int = 5, max_repeats: int = 50,
                budget_s: float = 2.0, warmup: int = 2) -> float:
    """Median time of fn() in milliseconds, repeating until the budget is spent.

    On CUDA each repetition is timed with device events recorded around it on the current
    stream (the launch gaps inside fn count; the host's synchronisation after it does not);
    on the CPU with the host clock.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    cuda = device.type == "cuda"
    while len(times) < max_repeats:
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    headers = [h for _, h, _ in columns]
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def write_json(path: str, payload: dict, quiet: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")
