"""Evaluation metrics of the paper: Fréchet distance between sample sets ("tabular FID") and
out-of-distribution scores (AUROC, decision-stump accuracy). The KL from a known density on the
manifold is :func:`injflow_ext.data.charts.chart_kl`."""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "auroc", "decision_stump_accuracy"]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^{1/2})`` between the Gaussians fitted to the rows of
    ``a (N, D)`` and ``b (M, D)``."""
    from scipy import linalg
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: a and b must be (N, D) and (M, D), got {a.shape} and "
                         f"{b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
    return max(value, 0.0)


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Area under the ROC curve for telling in-distribution (label 1, higher score) from
    out-of-distribution samples (label 0)."""
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
    return float(roc_auc_score(y, np.r_[scores_in, scores_out]))


def decision_stump_accuracy(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Accuracy of the best single threshold on a score (a depth-1 decision tree), as in the
    paper's OOD table, on balanced classes."""
    from sklearn.tree import DecisionTreeClassifier
    s = np.r_[scores_in, scores_out].reshape(-1, 1)
    y = np.r_[np.ones(len(scores_in)), np.zeros(len(scores_out))]
    w = np.r_[np.full(len(scores_in), 0.5 / len(scores_in)),
              np.full(len(scores_out), 0.5 / len(scores_out))]
    tree = DecisionTreeClassifier(max_depth=1).fit(s, y, sample_weight=w)
    return float(min(1.0, (tree.predict(s) == y) @ w))
