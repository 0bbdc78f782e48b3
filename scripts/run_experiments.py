"""Run the experiments of docs/experiments.md: RNF-ML exact, RNF-ML Hutchinson (K = 1), RNF-ML
with the encoder-Jacobian surrogate (K = 1 orthonormal probe) and the two-step baseline at
equal architecture (the `injflow train` defaults) on the von Mises circle, a two-bump circle
mixture, the sphere and digits over several seeds, the plain RNF recipe (scripts/plain_rnf.py)
beside them on the circles, then write the table and the figures.

    .venv/bin/python scripts/run_experiments.py [--seeds 0 1 2 3 4] [--jobs 2]
        [--out runs/experiments] [--table docs/experiments.md] [--figures docs/figures]

Each run is an ordinary `injflow train` run directory (OUT/DATA-METHOD-sSEED); finished runs
are reused, so the script can be interrupted and started again. With --jobs 2 two runs train
side by side, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from injflow_ext.train.objectives import REGISTRY  # noqa: E402

# the defaults of `injflow train` otherwise: the point is what a user gets
DATASETS = {
    "von-mises": ["--steps", "4000", "--batch-size", "500"],
    "circle-mixture": ["--steps", "4000", "--batch-size", "500"],
    "sphere": ["--steps", "4000", "--batch-size", "500"],
    "digits": ["--latent-dim", "10", "--epochs", "30"],
}
# every registered training method at its defaults (K = 1 probe for hutchinson and surrogate),
# and the surrogate with a denoising reconstruction beside the plain one
METHODS = {name: ["--method", name] for name in REGISTRY if name != "fif"}
METHODS = {**{k: v for k, v in METHODS.items() if k != "two-step"},
           "surrogate-noise": ["--method", "surrogate", "--noise", "0.05"],
           **{k: v for k, v in METHODS.items() if k == "two-step"}}
COLUMNS = [("kl_divergence", "KL(true‖model) ↓", 3), ("tear_mass", "tear mass ↓", 4),
           ("test_log_likelihood_median", "test log-lik median ↑", 3),
           ("test_log_likelihood", "test log-lik mean ↑", 3),
           ("reconstruction", "reconstruction ↓", 4), ("frechet_distance", "Fréchet ↓", 3),
           ("wall_time_s", "train s", 0)]


def run_one(data, method, seed, out_root, jobs, train=True, flags=None):
    """One `injflow train` run (reused when its metrics exist); ``flags``: its data and method
    flags (default DATASETS[data] + METHODS[method])."""
    flags = [*DATASETS[data], *METHODS[method]] if flags is None else flags
    run = os.path.join(out_root, f"{data}-{method}-s{seed}")
    mpath = os.path.join(run, "metrics.json")
    if not os.path.exists(mpath):
        if not train:
            return None
        env = dict(os.environ)
        if jobs > 1:
            env["OMP_NUM_THREADS"] = "1"
        t0 = time.time()
        cmd = [sys.executable, "-m", "injflow_ext", "train", "--data", data, "--seed", str(seed),
               "--out", run, "--overwrite", "--quiet", *flags]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        print(f"{data} {method} seed {seed}: exit {res.returncode} in {time.time() - t0:.0f} s",
              flush=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], flush=True)
            return None
    m = json.load(open(mpath))
    return {"data": data, "method": method, "seed": seed, "run": run,
            **m["test"], "wall_time_s": m["train"]["wall_time_s"]}


def run_plain(data, seed, out_root, jobs, train=True):
    """scripts/plain_rnf.py for one seed, in its own process (one thread with --jobs > 1)."""
    path = os.path.join(out_root, f"plain-{data}-s{seed}.json")
    if not os.path.exists(path):
        if not train:
            return None
        env = dict(os.environ)
        if jobs > 1:
            env["OMP_NUM_THREADS"] = "1"
        res = subprocess.run([sys.executable, os.path.join("scripts", "plain_rnf.py"), "--data",
                              data, "--seeds", str(seed), "--json", path], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        print(f"{data} plain RNF seed {seed}: exit {res.returncode}", flush=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], flush=True)
            return None
    r = json.load(open(path))[0]
    return {"data": data, "method": "plain RNF recipe", "seed": seed,
            "kl_divergence": r.get("kl"), "tear_mass": r.get("tear_mass"),
            "reconstruction": r.get("reconstruction"), "wall_time_s": r["wall_time_s"],
            "diverged": r.get("kl") is None}


def fmt(values, digits):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def write_table(rows, path, marker="table"):
    """The table of ``rows`` between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``path``."""
    lines = ["| data | method | " + " | ".join(h for _, h, _ in COLUMNS) + " | KL per seed |",
             "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    keys = []
    for r in rows:
        if (r["data"], r["method"]) not in keys:
            keys.append((r["data"], r["method"]))
    for data, method in keys:
        rs = [r for r in rows if r["data"] == data and r["method"] == method]
        cells = [fmt([r.get(k) for r in rs], n) for k, _, n in COLUMNS]
        per_seed = " / ".join("div." if r.get("kl_divergence") is None else
                              f"{r['kl_divergence']:.3f}" for r in rs) \
            if any("kl_divergence" in r for r in rs) else "–"
        lines.append(f"| {data} | {method} (n={len(rs)}) | " + " | ".join(cells)
                     + f" | {per_seed} |")
    table = "\n".join(lines)
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    doc = open(path).read() if os.path.exists(path) else f"{start}\n{end}\n"
    if start in doc:   # the table goes between the markers; the prose stays
        head, rest = doc.split(start, 1)
        tail = rest.split(end, 1)[1]
        with open(path, "w") as f:
            f.write(f"{head}{start}\n{table}\n{end}{tail}")
    print(table)


def density_figures(rows, out_dir):
    """For each circle dataset: the learned density along the circle (1° bins) of every seed,
    one panel per method, against the truth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from injflow_ext import load_run
    from injflow_ext.data import load_dataset
    from injflow_ext.evaluate.evaluation import model_chart_kl
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for data in ("von-mises", "circle-mixture"):
        ds = load_dataset(data)
        fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 3.6))
        for ax, method in zip(axes, METHODS):
            rs = [r for r in rows if r["data"] == data and r["method"] == method]
            truth = None
            for r in rs:
                kl = model_chart_kl(load_run(r["run"]), ds)
                ax.stairs(kl["model_density"], kl["edges"][0], lw=0.8, alpha=0.8,
                          label=f"seed {r['seed']}: KL {kl['kl']:.3f}")
                truth = kl
            if truth is not None:
                ax.stairs(truth["true_density"], truth["edges"][0], color="k", lw=1.6,
                          label="truth")
                # the same scale in every panel: spikes of a failed run are cut at 2.5 × the
                # truth's peak
                ax.set_ylim(0, 2.5 * truth["true_density"].max())
            ax.set_title(f"{data}, {method}")
            ax.set_xlabel("angle on the true circle")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("density (1° bins)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"density-{data}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data", nargs="+", default=list(DATASETS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-plain", action="store_true", help="skip the plain RNF recipe")
    p.add_argument("--plain-seeds", type=int, nargs="+", default=None,
                   help="seeds of the plain RNF recipe (default: --seeds)")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: the table and figures of the finished runs")
    p.add_argument("--out", default="runs/experiments")
    p.add_argument("--table", default="docs/experiments.md")
    p.add_argument("--figures", default="docs/figures")
    a = p.parse_args()
    tasks = [(d, m, s) for d in a.data for m in a.methods for s in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = [r for r in pool.map(lambda t: run_one(*t, a.out, a.jobs, not a.table_only),
                                    tasks) if r]
    if not a.no_plain:
        todo = [(d, s) for d in ("von-mises", "circle-mixture") if d in a.data
                for s in (a.plain_seeds or a.seeds)]
        with ThreadPoolExecutor(a.jobs) as pool:
            rows += [r for r in pool.map(lambda t: run_plain(*t, a.out, a.jobs, not a.table_only),
                                         todo) if r]
    rows.sort(key=lambda r: (list(DATASETS).index(r["data"]),
                             [*METHODS, "plain RNF recipe"].index(r["method"]), r["seed"]))
    json.dump(rows, open(os.path.join(a.out, "experiments.json"), "w"), indent=1)
    write_table(rows, a.table)
    for path in density_figures([r for r in rows if "run" in r], a.figures):
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
