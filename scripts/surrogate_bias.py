"""How far the encoder-Jacobian surrogate's gradient is from the exact one (docs/experiments.md).

For each model (trained runs, and untrained ones) on a batch of its test data, gradients with
respect to every parameter of

- the volume term ``½ mean log det JᵀJ`` (u = enc(x) carrying its gradient, as in training):
  exact, and the surrogate's expectation over probes (K = d orthonormal probes give it exactly:
  ``mean_k v_kᵀ A v_k = tr A``), with f′ taken at the data x and at g(u) on the manifold;
- the whole RNF-ML loss (β = 50, likelihood weight 1): exact against the surrogate objective
  (its expectation, and one orthonormal probe, K = 1, averaged over draws of the probe);

reported as the relative error ``‖g_s − g_e‖ / ‖g_e‖`` and the cosine similarity (medians over
seeds, with the range); and the
defect itself, ``‖f′(x) − J⁺‖_F / ‖J⁺‖_F`` at the data points (median over the batch): the
surrogate is exact where it is 0.

    .venv/bin/python scripts/surrogate_bias.py [--runs runs/experiments] [--batch 500]
        [--json runs/surrogate_bias.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from injflow_ext import RectangularFlow, load_run  # noqa: E402
from injflow_ext.data import load_dataset  # noqa: E402
from injflow_ext.estimators import decoder_jacobian  # noqa: E402
from injflow_ext.flows import default_ambient_size  # noqa: E402
from injflow_ext.train.objectives import ExactObjective, SurrogateObjective  # noqa: E402

BETA = ExactObjective.defaults()["beta"]


def flat_grad(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for g, p in zip(gs, params)])


def compare(a, b):
    """(relative error of a against b, cosine similarity)."""
    return (float((a - b).norm() / b.norm().clamp_min(1e-300)),
            float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300)))


def volume_gradients(model, x, objective):
    """Gradient of the objective's volume term alone (½ × its value), u = enc(x) with gradient."""
    u, res = objective._encode_and_volume(model, x, None)
    return flat_grad(0.5 * res.value.mean(), list(model.parameters()))


def pinv_defect(model, x):
    """Median over x of ``‖f′(x) − J⁺(u)‖_F / ‖J⁺(u)‖_F``, u = f(x)."""
    x0 = x.detach().requires_grad_(True)
    u = model.encode(x0)
    d = u.shape[1]
    rows = [torch.autograd.grad(u[:, i].sum(), x0, retain_graph=i < d - 1)[0] for i in range(d)]
    F = torch.stack(rows, 1)                                     # (B, d, D)
    with torch.no_grad():
        _, J = decoder_jacobian(model.decoder, u.detach())       # (B, D, d)
        pinv = torch.linalg.solve(J.mT @ J, J.mT)                # (B, d, D)
        err = (F - pinv).flatten(1).norm(dim=1) / pinv.flatten(1).norm(dim=1)
    return float(err.median())


def measure(model, x, single_draws=20, seed=0):
    model = model.double().eval()
    x = x.double()
    params = list(model.parameters())
    d = model.latent_dim
    row = {"pinv_defect": pinv_defect(model, x)}
    exact_vol = volume_gradients(model, x, ExactObjective(beta=BETA))
    for at in ("data", "manifold"):
        sur = volume_gradients(model, x, SurrogateObjective(beta=BETA, probes=d, encoder_at=at))
        row[f"volume_rel_err_{at}"], row[f"volume_cosine_{at}"] = compare(sur, exact_vol)
    exact_loss = flat_grad(ExactObjective(beta=BETA).loss(model, x)["loss"], params)
    expected = flat_grad(SurrogateObjective(beta=BETA, probes=d).loss(model, x)["loss"], params)
    row["loss_rel_err"], row["loss_cosine"] = compare(expected, exact_loss)
    gen = torch.Generator().manual_seed(seed)
    one = [compare(flat_grad(SurrogateObjective(beta=BETA, probes=1).loss(model, x, generator=gen)
                             ["loss"], params), exact_loss) for _ in range(single_draws)]
    row["loss_rel_err_one_probe"] = sum(r for r, _ in one) / len(one)
    row["loss_cosine_one_probe"] = sum(c for _, c in one) / len(one)
    return row


def untrained(data, seed, perturb):
    """The model `injflow train` builds (ActNorm initialised on a batch); with ``perturb`` > 0
    every parameter moved by ``perturb``·N(0, 1) (random conditioners: the couplings start as
    the identity, where the surrogate is exact)."""
    torch.manual_seed(seed)
    layers, hidden = default_ambient_size(data.dim)
    m = RectangularFlow.tabular(data.dim, data.latent_dim or 10, ambient_layers=layers,
                        ambient_hidden=hidden)
    m.train()
    m.initialize(torch.as_tensor(data.train[:500], dtype=torch.float32))
    if perturb:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(perturb * torch.randn_like(p))
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/experiments")
    p.add_argument("--data", nargs="+", default=["von-mises", "circle-mixture", "sphere", "digits"])
    p.add_argument("--methods", nargs="+", default=["exact", "surrogate"])
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--json", default="runs/surrogate_bias.json")
    p.add_argument("--table-only", action="store_true", help="print the table of --json")
    a = p.parse_args()
    if a.table_only:
        print(table(json.load(open(a.json))))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in a.data:
        data = load_dataset(name, seed=0)
        if name == "digits":
            data.latent_dim = 10
        x = torch.as_tensor(data.test[:a.batch])
        for label, perturb in (("initialisation", 0.0), ("random weights (0.05·N(0,1))", 0.05)):
            rows.append({"data": name, "model": label, "seed": 0,
                         **measure(untrained(data, 0, perturb), x)})
        for method in a.methods:
            for run in sorted(glob.glob(os.path.join(a.runs, f"{name}-{method}-s*"))):
                if not os.path.exists(os.path.join(run, "model.pt")):
                    continue
                rows.append({"data": name, "model": f"trained ({method})",
                             "seed": int(run.rsplit("-s", 1)[1]),
                             **measure(load_run(run), x)})
                print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    json.dump(rows, open(a.json, "w"), indent=1)
    print(table(rows))


def table(rows):
    keys = []
    for r in rows:
        if (r["data"], r["model"]) not in keys:
            keys.append((r["data"], r["model"]))
    cols = [("pinv_defect", "‖f′ − J⁺‖/‖J⁺‖"),
            ("volume_rel_err_data", "vol. rel. err (f′ at x)"),
            ("volume_cosine_data", "vol. cosine (f′ at x)"),
            ("volume_rel_err_manifold", "vol. rel. err (f′ at g(u))"),
            ("volume_cosine_manifold", "vol. cosine (f′ at g(u))"),
            ("loss_rel_err", "loss rel. err"), ("loss_cosine", "loss cosine"),
            ("loss_cosine_one_probe", "loss cosine, 1 probe")]
    lines = ["| data | model (n) | " + " | ".join(h for _, h in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for data, model in keys:
        rs = [r for r in rows if r["data"] == data and r["model"] == model]
        cells = []
        for k, _ in cols:   # median (min–max): a small exact gradient makes a ratio explode
            v = sorted(r[k] for r in rs)
            med = statistics.median(v)
            cells.append(f"{med:.2f}" if len(v) == 1 else f"{med:.2f} ({v[0]:.2f}–{v[-1]:.2f})")
        lines.append(f"| {data} | {model} (n={len(rs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
