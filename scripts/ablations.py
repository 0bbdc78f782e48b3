"""The training-default ablations of docs/experiments.md: `injflow train` runs that change one
option at a time, over several seeds, judged by the KL on the true manifold's chart.

    .venv/bin/python scripts/ablations.py [--only NAME ...] [--data circle-mixture ...]
                                          [--seeds 0 1 2] [--jobs 2] [--out runs/ablations]

Every run gets `--steps 4000 --batch-size 500` and the variant's options. Runs go to
OUT/DATA/NAME-sSEED (finished ones are reused); `--jobs` runs train side by side, one thread
each. Prints the table (option → KL mean ± sd and per seed, tear mass, steps, time) and writes
it as JSON to OUT/ablations.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
COMMON = ["--steps", "4000", "--batch-size", "500", "--quiet"]

# the defaults before docs/experiments.md's ablations (h 10 × MLP 4×128, random permutations,
# best validation epoch with patience 20, constant learning rate, no warm-up)
OLD = ["--ambient-layers", "10", "--ambient-hidden", "128,128,128,128", "--prior-layers", "5",
       "--permutation", "random", "--select", "best", "--patience", "20",
       "--lr-schedule", "constant"]
# the ablation base: the old defaults with the plain recipe's smaller h (8 × MLP 64-64)
BASE = ["--ambient-layers", "8", "--ambient-hidden", "64,64", "--prior-layers", "5",
        "--permutation", "random", "--select", "best", "--patience", "20",
        "--lr-schedule", "constant"]


def _with(base, **changes):
    """``base`` with options replaced (``ambient_layers="6"`` -> --ambient-layers 6) or, with
    a value of None, removed; flags without a value are appended as ``flag=True``."""
    args = list(base)
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if flag in args:
            i = args.index(flag)
            n = 1
            while i + n < len(args) and not args[i + n].startswith("--"):
                n += 1
            del args[i:i + n]
        if value is True:
            args.append(flag)
        elif value is not None:
            args += [flag, *([value] if isinstance(value, str) else value)]
    return args


# the other options are ablated on full runs: BASE without early stopping, final weights
FULL = _with(BASE, select="final")

# and, once the cosine schedule proved the steadiest change, on top of it
COS = _with(FULL, lr_schedule="cosine")

VARIANTS = {
    "defaults": [],   # what `injflow train` does now (the choices below)
    "defaults + student-t base (ν = 3)": ["--base", "student-t", "--base-dof", "3"],
    "defaults + student-t base (ν = 8)": ["--base", "student-t", "--base-dof", "8"],
    "old defaults": OLD,
    "base (h 8 × 64-64)": BASE,
    "base + no early stop (patience 1000)": _with(BASE, patience="1000"),
    "full (base + final weights)": FULL,
    "full + reverse permutations": _with(FULL, permutation="reverse"),
    "full + cosine lr": COS,
    "full + likelihood warm-up 0→25%": _with(FULL, likelihood_warmup=["0", "25%"]),
    "full + no prior flow": _with(FULL, prior_layers="0"),
    "full + no ActNorm": _with(FULL, no_actnorm=True),
    "full + grad clip 10": _with(FULL, grad_clip="10"),
    "full + β = 10": _with(FULL, beta="10"),
    "full + β = 200": _with(FULL, beta="200"),
    "full + exp coupling scale": _with(FULL, coupling_scale="exp"),
    "full + lr 3e-3": _with(FULL, lr="3e-3"),
    "full + h 4 × 64-64": _with(FULL, ambient_layers="4"),
    "full + h 8 × 128-128": _with(FULL, ambient_hidden="128,128"),
    "full + lr 3e-4": _with(FULL, lr="3e-4"),
    "full + cosine + clip 10": _with(FULL, lr_schedule="cosine", grad_clip="10"),
    "full + cosine + clip 10 + warm-up 25%": _with(FULL, lr_schedule="cosine", grad_clip="10",
                                                   likelihood_warmup=["0", "25%"]),
    "cos + β = 200": _with(COS, beta="200"),
    "cos + β = 10": _with(COS, beta="10"),
    "cos + β = 20": _with(COS, beta="20"),
    "cos + lr 3e-3": _with(COS, lr="3e-3"),
    "cos + lr 3e-4": _with(COS, lr="3e-4"),
    "cos + likelihood warm-up 0→25%": _with(COS, likelihood_warmup=["0", "25%"]),
    "cos + reverse permutations": _with(COS, permutation="reverse"),
    "cos + no prior flow": _with(COS, prior_layers="0"),
    "cos + no ActNorm": _with(COS, no_actnorm=True),
    "cos + h 8 × 128-128": _with(COS, ambient_hidden="128,128"),
    "cos + h 4 × 64-64": _with(COS, ambient_layers="4"),
    "cos + exp coupling scale": _with(COS, coupling_scale="exp"),
    "cos + lr warm-up 200 steps": _with(COS, lr_warmup="200"),
    "cos + 12,000 steps (3× the budget)": _with(COS, steps="12000"),
    "full + cosine + spline prior": _with(FULL, lr_schedule="cosine", prior_spline_bins="8"),
    "full + cosine + spline prior + clip 10": _with(FULL, lr_schedule="cosine",
                                                    prior_spline_bins="8", grad_clip="10"),
    "full + cosine + clip 10 + warm-up 25% + reverse": _with(
        FULL, lr_schedule="cosine", grad_clip="10", likelihood_warmup=["0", "25%"],
        permutation="reverse"),
}


def run_one(data, name, args, seed, out_root, jobs, train=True):
    run = os.path.join(out_root, data, f"{name.replace(' ', '_').replace('/', '-')}-s{seed}")
    mpath = os.path.join(run, "metrics.json")
    if not os.path.exists(mpath):
        if not train:
            return None
        env = dict(os.environ, OMP_NUM_THREADS="1" if jobs > 1 else os.environ.get(
            "OMP_NUM_THREADS", ""))
        cmd = [sys.executable, "-m", "injflow_ext", "train", "--data", data, "--seed", str(seed),
               "--out", run, "--overwrite", *COMMON, *args]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"FAILED {data} {name} s{seed}: {res.stderr[-2000:]}", flush=True)
            return None
    m = json.load(open(mpath))
    row = {"data": data, "variant": name, "seed": seed, "kl": m["test"].get("kl_divergence"),
           "tear_mass": m["test"].get("tear_mass"), "kl_tear": m["test"].get("kl_tear"),
           "test_log_likelihood": m["test"]["test_log_likelihood"],
           "reconstruction": m["test"]["reconstruction"], "steps": m["train"]["steps"],
           "best_epoch": m["train"]["best_epoch"], "wall_time_s": m["train"]["wall_time_s"]}
    print(f"{data:22s} {name:34s} s{seed}: KL {row['kl']:.4f} tear {row['tear_mass']:.4f} "
          f"steps {row['steps']} {row['wall_time_s']:.0f} s", flush=True)
    return row


def _mean_or_dash(values):
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.3f}" if values else "–"


def table(rows):
    out = ["| data | option | KL mean ± sd | KL per seed | of it, tears (mean) | tear mass (max) "
           "| steps | train s |", "|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        if (r["data"], r["variant"]) not in keys:
            keys.append((r["data"], r["variant"]))
    for data, name in keys:
        rs = [r for r in rows if r["data"] == data and r["variant"] == name]
        kls = [r["kl"] for r in rs]
        sd = statistics.stdev(kls) if len(kls) > 1 else 0.0
        out.append(f"| {data} | {name} | {statistics.mean(kls):.3f} ± {sd:.3f} | "
                   f"{' / '.join(f'{k:.3f}' for k in kls)} | "
                   f"{_mean_or_dash([r.get('kl_tear') for r in rs])} | "
                   f"{max(r['tear_mass'] for r in rs):.2%} | "
                   f"{' / '.join(str(r['steps']) for r in rs)} | "
                   f"{statistics.mean(r['wall_time_s'] for r in rs):.0f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="+", default=None, help="variant names (default: all)")
    p.add_argument("--data", nargs="+", default=["circle-mixture"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: the table of the finished runs")
    a = p.parse_args()
    names = a.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    tasks = [(d, n, VARIANTS[n], s) for d in a.data for n in names for s in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda t: run_one(*t, a.out, a.jobs, not a.table_only), tasks))
    rows = [r for r in rows if r]
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "ablations.json")
    old = json.load(open(path)) if os.path.exists(path) else []
    keep = [r for r in old if (r["data"], r["variant"], r["seed"]) not in
            {(r2["data"], r2["variant"], r2["seed"]) for r2 in rows}]
    json.dump(keep + rows, open(path, "w"), indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
