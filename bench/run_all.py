"""Run every benchmark of bench/ and collect their JSON into one folder and one summary file.

    python bench/run_all.py [--device cpu|cuda] [--out bench/results/all] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["gram_logdet.py", "tangent_ops.py", "cg.py", "step.py"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "all"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for script in BENCHMARKS:
        name = script[:-3]
        path = os.path.join(args.out, f"{name}.json")
        cmd = [sys.executable, os.path.join(HERE, script), "--json", path]
        if args.device:
            cmd += ["--device", args.device]
        if args.quick:
            cmd.append("--quick")
        t0 = time.time()
        print(f"=== {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd)
        summary[name] = {"exit_code": rc, "seconds": round(time.time() - t0, 1),
                         "json": path if os.path.exists(path) else None}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0 if all(v["exit_code"] == 0 for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
