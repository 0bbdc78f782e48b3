"""Evaluation of a trained model the way the paper does: test log-likelihood on the manifold,
reconstruction error, Fréchet distance of samples to test data, KL from a known true density,
and out-of-distribution scores."""

from __future__ import annotations

import numpy as np
import torch

from . import metrics
from .data import Dataset
from .models import RectangularFlow

__all__ = ["evaluate", "per_sample_scores", "ood_report"]


@torch.no_grad()
def per_sample_scores(model: RectangularFlow, x, batch_size: int = 1000) -> dict:
    """Per-sample exact log-likelihood on the manifold and reconstruction error ``‖x − proj(x)‖²``
    of ``x`` (N, D) (numpy or tensor), as float64 numpy arrays of shape (N,). Runs in eval mode
    and restores the model's mode."""
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    ll, rec = [], []
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i:i + batch_size], dtype=p.dtype, device=p.device)
        log_p, proj = model.log_prob_and_projection(xb)
        ll.append(log_p.double().cpu())
        rec.append(((xb - proj) ** 2).sum(-1).double().cpu())
    model.train(was_training)
    return {"log_likelihood": torch.cat(ll).numpy(), "reconstruction": torch.cat(rec).numpy()}


@torch.no_grad()
def evaluate(model: RectangularFlow, data: Dataset, *, seed: int = 0,
             kl_samples: int = 5000) -> dict:
    """Metrics on ``data.test``: ``test_log_likelihood`` (mean, nats, data units),
    ``reconstruction`` (mean squared error), ``frechet_distance`` (model samples vs test data),
    and for known densities ``kl_divergence`` (true ‖ model, on fresh true samples)."""
    scores = per_sample_scores(model, data.test)
    ll = scores["log_likelihood"]
    finite = np.isfinite(ll)
    out = {"test_log_likelihood": float(ll[finite].mean()) if finite.any() else None,
           "test_log_likelihood_nonfinite": int((~finite).sum()),
           "reconstruction": float(scores["reconstruction"].mean()),
           "n_test": int(len(data.test))}
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    samples = model.sample(len(data.test), generator=g).double().cpu().numpy()
    out["frechet_distance"] = metrics.frechet_distance(samples, data.test)
    if data.log_density is not None and data.sampler is not None:
        x_true = data.sampler(kl_samples, np.random.default_rng(seed + 12345))
        log_q = per_sample_scores(model, x_true)["log_likelihood"]
        ok = np.isfinite(log_q)
        out["kl_divergence"] = metrics.kl_divergence(data.log_density(x_true[ok]), log_q[ok])
        out["kl_samples"] = int(ok.sum())
    return out


def ood_report(model: RectangularFlow, x_in: np.ndarray, x_out: np.ndarray) -> dict:
    """AUROC and decision-stump accuracy of the log-likelihood and of the (negated)
    reconstruction error as scores separating in- from out-of-distribution data."""
    s_in, s_out = per_sample_scores(model, x_in), per_sample_scores(model, x_out)
    rep = {"n_in": int(len(x_in)), "n_out": int(len(x_out))}
    for name, sign in (("log_likelihood", 1.0), ("reconstruction", -1.0)):
        a = np.nan_to_num(sign * s_in[name], nan=-1e300, neginf=-1e300, posinf=1e300)
        b = np.nan_to_num(sign * s_out[name], nan=-1e300, neginf=-1e300, posinf=1e300)
        rep[name] = {"auroc": metrics.auroc(a, b),
                     "stump_accuracy": metrics.decision_stump_accuracy(a, b),
                     "mean_in": float(np.mean(s_in[name])),
                     "mean_out": float(np.mean(s_out[name]))}
    return rep
