"""Report figures with matplotlib (written as PNG files into a run directory)."""

from __future__ import annotations

import csv
import os

import numpy as np
import torch

from .._io import writing
from ..data import Dataset
from ..flows import InjectiveFlow

__all__ = ["make_plots"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, run_dir: str, name: str, dpi: int = 110) -> str:
    out = os.path.join(run_dir, name)
    fig.tight_layout()
    try:
        with writing(out):
            fig.savefig(out, dpi=dpi)
    finally:
        _plt().close(fig)
    return out


def plot_losses(run_dir: str) -> str | None:
    path = os.path.join(run_dir, "train_log.csv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    step = [int(r["step"]) for r in rows]
    for ax, key, title in ((axes[0], "loss", "training loss"),
                           (axes[1], "reconstruction", "reconstruction ‖x − g(u)‖²"),
                           (axes[2], "nll", "NLL on the manifold")):
        ys = [(s, float(r[key])) for s, r in zip(step, rows) if r.get(key) not in (None, "")]
        if ys:
            ax.plot(*zip(*ys), lw=1, label="train")
        if key == "nll":
            vs = [(s, -float(r["val_log_likelihood"])) for s, r in zip(step, rows)
                  if r.get("val_log_likelihood") not in (None, "")]
            if vs:
                ax.plot(*zip(*vs), "o-", ms=3, lw=1, label="validation")
            ax.legend()
        if key == "reconstruction":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    return _save(fig, run_dir, "loss.png")


@torch.no_grad()
def plot_manifold_2d(model: InjectiveFlow, data: Dataset, run_dir: str) -> list:
    plt = _plt()
    p = next(model.parameters())
    x = torch.as_tensor(data.test, dtype=p.dtype, device=p.device)
    u = model.encode(x).double().cpu()
    lo, hi = float(u.min()), float(u.max())
    pad = 0.1 * (hi - lo + 1e-6)
    grid = torch.linspace(lo - pad, hi + pad, 800, dtype=p.dtype, device=p.device)[:, None]
    curve = model.decode(grid)
    dens = model.log_prob(curve).exp().double().cpu().numpy()
    curve = curve.double().cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    ax = axes[0]
    ax.scatter(data.test[:, 0], data.test[:, 1], s=3, c="0.7", label="test data")
    sc = ax.scatter(curve[:, 0], curve[:, 1], c=dens, s=6, cmap="viridis", label="learned manifold")
    fig.colorbar(sc, ax=ax, label="model density on the manifold")
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    ax.set_title("learned manifold and its density")
    ax = axes[1]
    if data.chart is not None and data.chart.dim == 1:
        from .evaluation import model_chart_kl
        kl = model_chart_kl(model, data)
        edges = kl["edges"][0]
        ax.stairs(kl["true_density"], edges, label="true density", lw=1.5)
        ax.stairs(kl["model_density"], edges, label="model (its samples' law, 1° bins)", lw=1)
        ax.set_xlabel(f"{data.chart.labels[0]} on the true circle")
        ax.legend()
        ax.set_title(f"density along the circle: KL {kl['kl']:.3f}, tear mass "
                     f"{kl['tear_mass']:.2%}")
    else:
        samples = model.sample(len(data.test)).double().cpu().numpy()
        ax.scatter(samples[:, 0], samples[:, 1], s=3)
        ax.set_aspect("equal")
        ax.set_title("model samples")
    return [_save(fig, run_dir, "manifold.png")]


@torch.no_grad()
def plot_manifold_3d(model: InjectiveFlow, data: Dataset, run_dir: str) -> list:
    plt = _plt()
    p = next(model.parameters())
    samples = model.sample(2000).double()
    dens = model.log_prob(samples.to(p.dtype)).double().cpu().numpy()
    samples = samples.cpu().numpy()
    fig = plt.figure(figsize=(11, 5))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    t = data.test[:2000]
    ax.scatter(t[:, 0], t[:, 1], t[:, 2], s=2, c="0.6")
    ax.set_title("test data")
    ax = fig.add_subplot(1, 2, 2, projection="3d")
    sc = ax.scatter(samples[:, 0], samples[:, 1], samples[:, 2], s=2, c=np.exp(dens), cmap="viridis")
    fig.colorbar(sc, ax=ax, shrink=0.6, label="model density")
    ax.set_title("model samples coloured by density")
    return [_save(fig, run_dir, "manifold.png")]


@torch.no_grad()
def plot_images(model: InjectiveFlow, data: Dataset, run_dir: str) -> list:
    plt = _plt()
    p = next(model.parameters())
    h, w = data.image_shape
    samples = model.sample(64).double().cpu().numpy().reshape(64, -1)
    x = torch.as_tensor(data.test[:32], dtype=p.dtype, device=p.device)
    rec = model.project(x).double().cpu().numpy().reshape(len(x), -1)
    outs = []
    for name, imgs in (("samples.png", samples),
                       ("reconstructions.png", np.stack([data.test[:32], rec], 1).reshape(64, -1))):
        fig, axes = plt.subplots(8, 8, figsize=(6, 6))
        for ax, img in zip(axes.flat, imgs):
            ax.imshow(np.clip(img.reshape(h, w), 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        fig.suptitle("model samples" if name == "samples.png"
                     else "test images (odd) and their projections (even)")
        outs.append(_save(fig, run_dir, name, dpi=100))
    outs.append(plot_interpolations(model, data, run_dir))
    return outs


@torch.no_grad()
def plot_interpolations(model: InjectiveFlow, data: Dataset, run_dir: str, pairs: int = 6,
                        steps: int = 8) -> str:
    """``interpolations.png``: for ``pairs`` pairs of test images (the first and last column),
    ``g((1 − t)·f(a) + t·f(b))`` at ``steps`` evenly spaced t: straight lines in the latent u,
    decoded onto the learned manifold (the end columns are the projections of a and b)."""
    plt = _plt()
    p = next(model.parameters())
    h, w = data.image_shape
    n = min(2 * pairs, len(data.test)) // 2 * 2
    x = torch.as_tensor(data.test[:n], dtype=p.dtype, device=p.device)
    u = model.encode(x)
    ua, ub = u[0::2], u[1::2]                                     # (P, d) each
    t = torch.linspace(0, 1, steps, dtype=p.dtype, device=p.device)[None, :, None]
    path = ((1 - t) * ua[:, None] + t * ub[:, None]).reshape(-1, u.shape[1])
    imgs = model.decode(path).double().cpu().numpy().reshape(n // 2, steps, h, w)
    ends = data.test[:n].reshape(n // 2, 2, h, w)
    fig, axes = plt.subplots(n // 2, steps + 2, figsize=(1.0 * (steps + 2), 1.0 * (n // 2)),
                             squeeze=False)
    for i in range(n // 2):
        row = [ends[i, 0], *imgs[i], ends[i, 1]]
        for j, img in enumerate(row):
            axes[i, j].imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
    fig.suptitle("test images a, b (outer columns) and g((1 − t) f(a) + t f(b)), t = 0 … 1")
    return _save(fig, run_dir, "interpolations.png", dpi=100)


def plot_ood_scores(s_in: dict, s_out: dict, in_name: str, out_name: str, run_dir: str,
                    name: str) -> str:
    """Histograms of the per-sample log-likelihood and reconstruction error of in- and
    out-of-distribution data (:func:`injflow_ext.evaluate.evaluation.per_sample_scores`), as in the
    paper's OOD figure; log-likelihoods clipped at their 1 % quantile so outliers stay in view."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "log_likelihood", "log-likelihood (nats)"),
                           (axes[1], "reconstruction", "reconstruction error ‖x − proj(x)‖²")):
        a, b = np.asarray(s_in[key], float), np.asarray(s_out[key], float)
        both = np.concatenate([a, b])
        both = both[np.isfinite(both)]
        lo, hi = (np.quantile(both, 0.01), both.max()) if key == "log_likelihood" else \
            (both.min(), np.quantile(both, 0.99))
        bins = np.linspace(lo, hi, 50)
        ax.hist(np.clip(a, lo, hi), bins, alpha=0.6, density=True, label=f"{in_name} (in)")
        ax.hist(np.clip(b, lo, hi), bins, alpha=0.6, density=True, label=f"{out_name} (out)")
        ax.set_xlabel(label)
        ax.legend()
    fig.suptitle("out-of-distribution scores of the test sets")
    return _save(fig, run_dir, name)


def make_plots(model: InjectiveFlow, data: Dataset, run_dir: str) -> list:
    """All figures that apply to the data: loss curves, and the manifold (2-D/3-D data) or
    sample and reconstruction grids (images). Returns the written paths."""
    model.eval()
    outs = [plot_losses(run_dir)]
    if data.image_shape is not None:
        outs += plot_images(model, data, run_dir)
    elif data.dim == 2 and model.latent_dim == 1:
        outs += plot_manifold_2d(model, data, run_dir)
    elif data.dim == 3:
        outs += plot_manifold_3d(model, data, run_dir)
    return [o for o in outs if o]
