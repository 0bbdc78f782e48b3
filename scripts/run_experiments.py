"""Run the experiments of docs/experiments.md: RNF-ML exact, RNF-ML Hutchinson (K=1) and the
two-step baseline on von-mises, sphere and digits over several seeds, then write the table.

    .venv/bin/python scripts/run_experiments.py [--seeds 0 1 2] [--out runs/experiments]
                                                [--table docs/experiments.md]

Each run is an ordinary `injflow train` run directory; finished runs are reused, so the script
can be interrupted and started again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from injflow_ext.cli import main as injflow  # noqa: E402

COMMON = ["--beta", "50", "--batch-size", "200", "--lr", "1e-3", "--quiet"]
DATASETS = {
    "von-mises": ["--latent-dim", "1", "--epochs", "20", "--ambient-layers", "6",
                  "--ambient-hidden", "64,64", "--prior-layers", "3", "--likelihood-warmup", "3", "10"],
    "sphere": ["--latent-dim", "2", "--epochs", "20", "--ambient-layers", "6",
               "--ambient-hidden", "64,64", "--prior-layers", "3", "--likelihood-warmup", "3", "10"],
    "digits": ["--latent-dim", "10", "--epochs", "30", "--ambient-layers", "6",
               "--ambient-hidden", "128,128", "--prior-layers", "3", "--likelihood-warmup", "5", "15"],
}
METHODS = {"exact": ["--method", "exact"],
           "hutchinson": ["--method", "hutchinson", "--hutchinson-samples", "1"],
           "two-step": ["--method", "two-step"]}
COLUMNS = [("test_log_likelihood", "test log-lik ↑"), ("kl_divergence", "KL(true‖model) ↓"),
           ("reconstruction", "reconstruction ↓"), ("frechet_distance", "Fréchet ↓"),
           ("wall_time_s", "train time s")]


def run_all(seeds, out_root):
    results = {}
    for data, dargs in DATASETS.items():
        for method, margs in METHODS.items():
            for seed in seeds:
                run = os.path.join(out_root, f"{data}-{method}-s{seed}")
                mpath = os.path.join(run, "metrics.json")
                if not os.path.exists(mpath):
                    t0 = time.time()
                    rc = injflow(["train", "--data", data, "--seed", str(seed), "--out", run,
                                  "--overwrite", *COMMON, *dargs, *margs])
                    print(f"{data} {method} seed {seed}: exit {rc} in {time.time() - t0:.0f} s",
                          flush=True)
                if os.path.exists(mpath):
                    m = json.load(open(mpath))
                    results.setdefault((data, method), []).append(
                        {**m["test"], "wall_time_s": m["train"]["wall_time_s"]})
    return results


def fmt(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def write_table(results, seeds, path):
    lines = ["| data | method | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for (data, method), rows in results.items():
        cells = [fmt([r.get(k) for r in rows]) for k, _ in COLUMNS]
        lines.append(f"| {data} | {method} (n={len(rows)}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    # the table goes between the markers of docs/experiments.md (the prose around it stays)
    doc = open(path).read() if os.path.exists(path) else "<!-- table -->\n<!-- /table -->\n"
    if "<!-- table -->" in doc:
        head, rest = doc.split("<!-- table -->", 1)
        tail = rest.split("<!-- /table -->", 1)[1]
        with open(path, "w") as f:
            f.write(f"{head}<!-- table -->\n{table}\n<!-- /table -->{tail}")
    print(table)
    return table


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/experiments")
    p.add_argument("--table", default="docs/experiments.md")
    a = p.parse_args()
    write_table(run_all(a.seeds, a.out), a.seeds, a.table)
