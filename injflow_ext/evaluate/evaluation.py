"""Evaluation of a trained model the way the paper does: test log-likelihood on the manifold,
reconstruction error, Fréchet distance of samples to test data, KL from a known true density,
and out-of-distribution scores."""

from __future__ import annotations

import numpy as np
import torch

from ..data import Dataset
from ..data.charts import chart_kl
from ..flows import InjectiveFlow
from . import metrics

__all__ = ["evaluate", "per_sample_scores", "ood_report", "model_chart_kl", "sampling_map",
           "log_likelihood_summary", "bits_per_dim", "image_metrics", "ood_summary"]

# a test point whose log-density is below this (nats) counts as an outlier in the summary
LOG_LIKELIHOOD_FLOOR = -1000.0


@torch.no_grad()
def per_sample_scores(model: InjectiveFlow, x, batch_size: int = 1000) -> dict:
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


def base_from_normal(model: InjectiveFlow, w: np.ndarray) -> np.ndarray:
    """The base variates ``z (N, d)`` with the same quantiles as standard normal ``w (N, d)``
    (``model.base.from_standard_normal``: identity for a normal base, ``F_t⁻¹(Φ(w))`` for a
    Student-t base): the normal quadrature of the chart KL then holds for any base that has
    the map."""
    return model.base.from_standard_normal(w)


def sampling_map(model: InjectiveFlow, batch_size: int = 65536):
    """``push(w (N, d) numpy) -> x (N, D) float64 numpy``: the model's sampling map
    ``g(f(z))`` (prior flow, then decoder) at the base variates ``z`` with the quantiles of
    standard normal ``w`` (:func:`base_from_normal`), in batches, in the model's dtype and
    device."""
    p = next(model.parameters())

    @torch.no_grad()
    def push(z):
        z = base_from_normal(model, np.asarray(z))
        out = []
        for i in range(0, len(z), batch_size):
            zb = torch.as_tensor(z[i:i + batch_size], dtype=p.dtype, device=p.device)
            out.append(model.generate(zb).reshape(len(zb), -1).double().cpu())
        return torch.cat(out).numpy()
    return push


def model_chart_kl(model: InjectiveFlow, data: Dataset, seed: int = 0, **kwargs) -> dict:
    """:func:`injflow_ext.data.charts.chart_kl` of ``model`` on ``data.chart`` (eval mode)."""
    if data.chart is None:
        raise ValueError(f"model_chart_kl: dataset {data.name!r} has no known true density "
                         "(no chart)")
    was_training = model.training
    model.eval()
    try:
        return chart_kl(sampling_map(model), data.chart, model.latent_dim, seed=seed, **kwargs)
    finally:
        model.train(was_training)


def log_likelihood_summary(ll: np.ndarray, floor: float = LOG_LIKELIHOOD_FLOOR) -> dict:
    """Mean, median and quantiles of per-point log-likelihoods ``ll (N,)`` over the finite
    ones, with the counts of non-finite points and of points below ``floor``: one outlier can
    move the mean by thousands of nats while the median does not move."""
    finite = np.isfinite(ll)
    f = ll[finite]
    out = {"test_log_likelihood": float(f.mean()) if f.size else None,
           "test_log_likelihood_nonfinite": int((~finite).sum()),
           "test_log_likelihood_floor": floor,
           "test_log_likelihood_below_floor": int((f < floor).sum())}
    for name, q in (("min", 0.0), ("q01", 0.01), ("q05", 0.05), ("q25", 0.25),
                    ("median", 0.5), ("q75", 0.75), ("max", 1.0)):
        out[f"test_log_likelihood_{name}"] = float(np.quantile(f, q)) if f.size else None
    return out


@torch.no_grad()
def evaluate(model: InjectiveFlow, data: Dataset, *, seed: int = 0) -> dict:
    """Metrics on ``data.test``: ``test_log_likelihood`` (mean, nats, data units) with its
    median, quantiles and outlier counts (:func:`log_likelihood_summary`), ``reconstruction``
    (mean squared error), ``frechet_distance`` (model samples vs test data), and for data with a
    known density ``kl_divergence`` = KL(true ‖ model) on the true manifold's chart
    (:func:`injflow_ext.data.charts.chart_kl`: the model's own distribution pushed to the chart) with
    ``kl_discretisation``, ``tear_mass`` and ``kl_estimator`` (its description); for image
    data also bits per dimension and FID or why there is none (:func:`image_metrics`)."""
    scores = per_sample_scores(model, data.test)
    out = {**log_likelihood_summary(scores["log_likelihood"]),
           "reconstruction": float(scores["reconstruction"].mean()),
           "n_test": int(len(data.test))}
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    samples = model.sample(len(data.test), generator=g).double().cpu().numpy()
    samples = samples.reshape(len(samples), -1)      # an image model's samples are images
    out["frechet_distance"] = metrics.frechet_distance(samples, data.test)
    if data.image_shape is not None:
        out.update(image_metrics(model, data, out, samples))
    if data.chart is not None:
        kl = model_chart_kl(model, data, seed=seed)
        out.update(kl_divergence=kl["kl"], kl_discretisation=kl["kl_discretisation"],
                   tear_mass=kl["tear_mass"], kl_tear=kl["kl_tear"],
                   kl_estimator=kl["estimator"])
    return out


def bits_per_dim(log_likelihood, latent_dim: int, ambient_dim: int, levels: int):
    """``(−log p(x) + d·ln L) / (D·ln 2)``: the on-manifold log-density ``log p`` (nats, data in
    (0, 1), w.r.t. d-dimensional volume) converted to grey-level units (x·L scales the volume
    on a d-dimensional manifold by L^d), in bits per ambient dimension. For d = D it is the usual
    bits/dim of dequantised images; for d < D it is not comparable with a full-dimensional
    flow's, which pays for all D dimensions."""
    return (-np.asarray(log_likelihood) + latent_dim * np.log(levels)) / (ambient_dim * np.log(2))


def image_metrics(model: InjectiveFlow, data: Dataset, scores: dict, samples: np.ndarray) -> dict:
    """Bits per dimension (:func:`bits_per_dim` of the mean and the median test log-likelihood
    in ``scores``) and sample quality: FID where the Inception weights are on this machine
    (:mod:`injflow_ext.evaluate.fid`), and always the raw-pixel Fréchet distance already in ``scores``."""
    from .fid import fid_unavailable, inception_fid
    out = {}
    if data.levels and scores.get("test_log_likelihood") is not None:
        bpd = bits_per_dim([scores["test_log_likelihood"], scores["test_log_likelihood_median"]],
                           model.latent_dim, data.dim, data.levels)
        out.update(test_bits_per_dim=float(bpd[0]), test_bits_per_dim_median=float(bpd[1]),
                   bits_per_dim_convention=f"(-log p + d ln L) / (D ln 2), L = {data.levels} grey "
                   f"levels, d = {model.latent_dim}, D = {data.dim}: the density on the manifold "
                   "in grey-level units per ambient dimension")
    reason = fid_unavailable()
    out["fid"] = None if reason else inception_fid(samples, data.test, data.image_shape)
    out["fid_unavailable"] = reason
    out["frechet_features"] = "raw pixels (frechet_distance); Inception-v3 pool features (fid)"
    return out


def ood_report(model: InjectiveFlow, x_in: np.ndarray, x_out: np.ndarray) -> dict:
    """AUROC and decision-stump accuracy of the log-likelihood and of the (negated)
    reconstruction error as scores separating in- from out-of-distribution data."""
    return ood_summary(per_sample_scores(model, x_in), per_sample_scores(model, x_out))


def ood_summary(s_in: dict, s_out: dict) -> dict:
    """:func:`ood_report` from per-sample scores (:func:`per_sample_scores` of the in- and the
    out-of-distribution data)."""
    rep = {"n_in": int(len(s_in["log_likelihood"])), "n_out": int(len(s_out["log_likelihood"]))}
    for name, sign in (("log_likelihood", 1.0), ("reconstruction", -1.0)):
        a = np.nan_to_num(sign * s_in[name], nan=-1e300, neginf=-1e300, posinf=1e300)
        b = np.nan_to_num(sign * s_out[name], nan=-1e300, neginf=-1e300, posinf=1e300)
        rep[name] = {"auroc": metrics.auroc(a, b),
                     "stump_accuracy": metrics.decision_stump_accuracy(a, b),
                     "mean_in": float(np.mean(s_in[name])),
                     "mean_out": float(np.mean(s_out[name]))}
    return rep
