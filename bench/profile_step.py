"""Profile: where one training step's time goes, per method, with ``torch.profiler``.

For each configuration and method of bench/step.py it runs a few warm-up steps, then profiles
``--steps`` steps and reports per step: wall time, the number of device kernels launched (CUDA)
or operators called (CPU), the summed kernel (or self CPU) time, and the busiest kernels or
operators. Prints a table per (config, method) and writes JSON.

    python bench/profile_step.py [--device cpu|cuda] [--configs MINIBOONE,IMAGE]
                                 [--methods ours_exact,ref_batched] [--steps 5] [--json PATH]
                                 [--mlp-path auto|per_layer|fused] [--tf32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step as step_bench  # noqa: E402
from common import add_common_args, environment, write_results  # noqa: E402

from injflow_ext.nn import set_mlp_path  # noqa: E402


def profile_method(method, model, x, device, steps):
    """Per-step wall ms, launch count, summed device (or self-CPU) ms and the top entries."""
    fn = step_bench.make_step(method, model, x, device)
    for _ in range(3):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    entries = []
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = len(kernels) / steps
        by_name = {}
        for e in kernels:
            t, n = by_name.get(e.name, (0.0, 0))
            by_name[e.name] = (t + e.device_time_total / 1e3, n + 1)
        busy = sum(t for t, _ in by_name.values()) / steps
    else:
        ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        launches = sum(e.count for e in ops) / steps
        by_name = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in ops}
        busy = sum(t for t, _ in by_name.values()) / steps
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        entries.append({"name": name[:160], "ms_per_step": t / steps, "calls_per_step": n / steps,
                        "share": t / steps / busy if busy else 0.0})
    return {"method": method, "wall_ms": wall, "launches_per_step": launches,
            "busy_ms": busy, "top": entries}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--configs", default="MINIBOONE,IMAGE")
    p.add_argument("--methods", default="ours_exact,ref_batched,ours_hutchinson,ref_hutchinson_cg")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=10, help="entries printed per method (JSON: all)")
    step_bench.add_arithmetic_args(p)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    configs = step_bench.QUICK_CONFIGS if args.quick else {
        k: step_bench.CONFIGS[k] for k in args.configs.split(",")}
    steps = 2 if args.quick else args.steps
    env = {**environment(device), "mlp_path": args.mlp_path, "mlp_math": args.mlp_math,
           "mlp_pipeline": args.mlp_pipeline, "mlp_wgrad": args.mlp_wgrad, "tf32": args.tf32}
    results = []
    for name, (D, d, B, hidden) in configs.items():
        model = step_bench.build_model(D, d, hidden, device, dtype)
        set_mlp_path(model, args.mlp_path, step_bench.fused_options(args))
        x = step_bench.make_batch(B, model.ambient_dim, device, dtype)
        for method in args.methods.split(","):
            if method.endswith("_graph") and device.type != "cuda":
                continue  # graphs are CUDA-only (make_step gives None)
            r = profile_method(method, model, x, device, steps)
            r["config"] = name
            results.append(r)
            unit = "kernels" if device.type == "cuda" else "op calls"
            what = "kernel" if device.type == "cuda" else "self-CPU"
            print(f"\n{name} {method}: wall {r['wall_ms']:.2f} ms/step, "
                  f"{r['launches_per_step']:.0f} {unit}/step, {what} time {r['busy_ms']:.2f} ms/step")
            for e in r["top"][:args.top]:
                print(f"  {e['ms_per_step']:8.3f} ms {100 * e['share']:5.1f}% "
                      f"{e['calls_per_step']:6.0f}x  {e['name']}")
            # what is profiled so far, in case a time limit stops the run
            write_results(args, "profile_step", device,
                          {**env, "complete": False, "rows": results}, quiet=True)
    write_results(args, "profile_step", device, {**env, "complete": True, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
