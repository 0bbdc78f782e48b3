"""The comparison of docs/experiments.md §7: a free-form injective flow trained with FIF's loss
against RNF-ML exact and the two-step baseline, each at the `injflow train` defaults of its
model and the same budget (steps, batch, learning-rate schedule).

    .venv/bin/python scripts/free_form_comparison.py [--jobs 2] [--out runs/free-form]
        [--data circle-mixture sphere digits-images mnist-5k]

- circle-mixture, sphere: 5 seeds, 4,000 steps of 500 (as docs/experiments.md §3); FIF also
  with RNF's β = 50 (`--methods "free-form (FIF, β = 50)"`);
- digits-images: 3 seeds, 30 epochs (§6.1); mnist-5k: seed 0, 5 epochs of 64 with §6.2's small
  image h for RNF (its exact run costs 20 minutes on this CPU).
Runs are ordinary run directories (OUT/DATA-METHOD-sSEED), reused when finished; the table goes
between the `<!-- free-form table -->` markers of docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor

from run_experiments import run_one, write_table

DATA = {"circle-mixture": (["--steps", "4000", "--batch-size", "500"], range(5)),
        "sphere": (["--steps", "4000", "--batch-size", "500"], range(5)),
        "digits-images": (["--latent-dim", "10", "--epochs", "30"], range(3)),
        "mnist-5k": (["--latent-dim", "20", "--epochs", "5", "--batch-size", "64"], range(1))}
# table name -> (run directory's name, flags)
METHODS = {"free-form (FIF)": ("free-form", ["--model", "free-form", "--method", "fif"]),
           "free-form (FIF, β = 50)": ("free-form-beta50", ["--model", "free-form", "--method",
                                                            "fif", "--beta", "50"]),
           "exact": ("exact", ["--method", "exact"]),
           "two-step": ("two-step", ["--method", "two-step"])}
DEFAULT_METHODS = ["free-form (FIF)", "exact", "two-step"]
# RNF's image model at mnist-5k in minutes (docs/experiments.md §6.2)
SMALL_IMAGE_H = ["--image-hidden", "16,16", "--image-couplings", "2"]


def flags(data, method):
    slug, method_flags = METHODS[method]
    extra = SMALL_IMAGE_H if data == "mnist-5k" and not slug.startswith("free-form") else []
    return [*DATA[data][0], *method_flags, *extra]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--out", default="runs/free-form")
    p.add_argument("--table", default="docs/experiments.md")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args()
    tasks = [(d, m, s) for d in a.data for m in a.methods for s in DATA[d][1]]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = [r for r in pool.map(
            lambda t: run_one(t[0], METHODS[t[1]][0], t[2], a.out, a.jobs, not a.table_only,
                              flags(t[0], t[1])), tasks) if r]
    names = {slug: m for m, (slug, _) in METHODS.items()}
    for r in rows:
        r["method"] = names[r["method"]]
    os.makedirs(a.out, exist_ok=True)
    json.dump(rows, open(os.path.join(a.out, "comparison.json"), "w"), indent=1)
    write_table(rows, a.table, marker="free-form table")


if __name__ == "__main__":
    main()
