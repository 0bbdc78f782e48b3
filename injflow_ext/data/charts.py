"""Charts of the synthetic manifolds and the KL divergence of a model measured on them.

A :class:`Chart` maps points of R^D to coordinates of the true manifold (the angle
``atan2(x₂, x₁)`` of the circle; ``(cos polar, azimuth)`` of ``x/‖x‖`` for the sphere; the two
angles of the torus) and holds the true density with respect to the chart's Lebesgue measure.

:func:`chart_kl` judges a model by its own distribution (docs/experiments.md, "the KL"): the
model's samples ``g(f(z))``, ``z ~ N(0, I_d)``, are pushed to the chart — by quadrature over z
with exact normal cell weights when ``d ≤ 2``, by sampling otherwise — and binned; the true
distribution is binned by quadrature of its density; then ``KL(true ‖ model) = Σ_b p_b log(p_b /
q_b)`` over the bins. It is ≥ 0, it sees where the model puts its mass (tears, folds, mass off
the manifold), and it converges to the continuous KL as the bins shrink. Bins where the model's
density is below ``floor`` are floored (so the KL stays finite) and the true mass there is
reported as ``tear_mass``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Chart", "circle_chart", "sphere_chart", "torus_chart", "chart_kl",
           "normal_quadrature"]


@dataclass(frozen=True)
class Chart:
    """Coordinates of a known d-dimensional manifold and the true density on them.

    ``coords(x (N, D)) -> (N, d)``: chart coordinates of points (of the manifold or near it).
    ``log_density(c (N, d)) -> (N,)``: the true log-density w.r.t. ``dc`` (Lebesgue on the chart).
    ``lows``, ``highs``: the chart's box (every point maps into it).
    ``bins``: the default number of bins per coordinate. ``labels``: coordinate names."""

    name: str
    coords: Callable[[np.ndarray], np.ndarray]
    log_density: Callable[[np.ndarray], np.ndarray]
    lows: tuple
    highs: tuple
    bins: tuple
    labels: tuple

    @property
    def dim(self) -> int:
        return len(self.lows)


def _vm_logpdf(theta, kappa, loc):
    from scipy.special import i0e
    return kappa * (np.cos(theta - loc) - 1.0) - np.log(2 * np.pi * i0e(kappa))


def _angle(y, x):
    """atan2 in [−π, π) (π itself maps to −π, so that every angle lies in the chart's box)."""
    a = np.arctan2(y, x)
    return np.where(a >= np.pi, a - 2 * np.pi, a)


def circle_chart(weights: Sequence[float], locs: Sequence[float], kappas: Sequence[float],
                 name: str = "circle") -> Chart:
    """The unit circle in R² with a mixture of von Mises densities on the angle; the angle is
    the arc length, so the chart density is the density on the manifold. 360 bins (1°)."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    locs, kappas = np.asarray(locs, np.float64), np.asarray(kappas, np.float64)

    def coords(x):
        return _angle(x[:, 1], x[:, 0])[:, None]

    def log_density(c):
        t = c[:, 0:1]
        return np.logaddexp.reduce(np.log(w) + _vm_logpdf(t, kappas, locs), axis=1)

    return Chart(name, coords, log_density, (-np.pi,), (np.pi,), (360,), ("angle",))


def sphere_chart(kappa: float, name: str = "sphere") -> Chart:
    """S² ⊂ R³ with a von Mises–Fisher density of mean +z, on the equal-area chart
    ``(w, φ) = (cos polar angle, azimuth)`` of ``x/‖x‖``: ``dA = dw dφ``, so the chart density
    is the density on the sphere. 30 × 60 bins."""
    log_c = math.log(kappa) - math.log(4 * math.pi) - (kappa + math.log1p(-math.exp(-2 * kappa))
                                                       - math.log(2))

    def coords(x):
        r = np.linalg.norm(x, axis=1)
        w = np.clip(x[:, 2] / np.where(r > 0, r, 1.0), -1.0, 1.0)
        return np.stack([w, _angle(x[:, 1], x[:, 0])], 1)

    def log_density(c):
        return log_c + kappa * c[:, 0]

    return Chart(name, coords, log_density, (-1.0, -np.pi), (1.0, np.pi), (30, 60),
                 ("cos polar angle", "azimuth"))


def torus_chart(R: float, r: float, k_theta: float, mu_theta: float, k_phi: float,
                mu_phi: float, name: str = "torus") -> Chart:
    """The torus ``((R + r cos θ) cos φ, (R + r cos θ) sin φ, r sin θ)`` with independent von
    Mises angles, on the chart (θ, φ) (the chart density is the product of the two angle
    densities). 60 × 60 bins."""

    def coords(x):
        ring = np.hypot(x[:, 0], x[:, 1])
        return np.stack([_angle(x[:, 2], ring - R), _angle(x[:, 1], x[:, 0])], 1)

    def log_density(c):
        return _vm_logpdf(c[:, 0], k_theta, mu_theta) + _vm_logpdf(c[:, 1], k_phi, mu_phi)

    return Chart(name, coords, log_density, (-np.pi, -np.pi), (np.pi, np.pi), (60, 60),
                 ("θ (tube)", "φ (ring)"))


# ----------------------------------------------------------------------------- the KL

def normal_quadrature(d: int, cells: int, half_width: float = 7.0,
                      rng: np.random.Generator | None = None):
    """Nodes ``(cells^d, d)`` and weights ``(cells^d,)`` of N(0, I_d) on a grid of ``cells``
    equal cells per axis over ``[−half_width, half_width]``: each weight is the exact normal mass
    of its cell (products of Φ differences; the mass beyond the box, 2.6e-12 per axis at 7, is
    left out and the weights renormalised). Each node is its cell's centre, or with ``rng`` a
    uniform point of the cell (stratified sampling: once pushed through a map that stretches a
    cell over several bins, centres would alias onto some bins and miss others)."""
    from scipy.special import ndtr
    edges = np.linspace(-half_width, half_width, cells + 1)
    mass = np.diff(ndtr(edges))
    mass /= mass.sum()
    index = np.stack([g.reshape(-1) for g in np.meshgrid(*([np.arange(cells)] * d),
                                                          indexing="ij")], 1)
    offset = 0.5 if rng is None else rng.uniform(size=index.shape)
    nodes = edges[0] + (index + offset) * (edges[1] - edges[0])
    weights = np.prod(mass[index], axis=1)
    return nodes, weights


def _true_bin_mass(chart: Chart, bins: tuple, sub: int) -> np.ndarray:
    """The true probability of each bin, by the midpoint rule on ``sub`` points per bin and
    axis, normalised over the chart. Shape ``bins``."""
    axes = []
    for lo, hi, n in zip(chart.lows, chart.highs, bins):
        h = (hi - lo) / (n * sub)
        axes.append(lo + h * (np.arange(n * sub) + 0.5))
    grids = np.meshgrid(*axes, indexing="ij")
    pts = np.stack([g.reshape(-1) for g in grids], 1)
    dens = np.exp(chart.log_density(pts)).reshape([n * sub for n in bins])
    for k, n in enumerate(bins):   # sum the sub-points of each bin
        shape = dens.shape[:k] + (n, sub) + dens.shape[k + 1:]
        dens = dens.reshape(shape).sum(k + 1)
    return dens / dens.sum()


def _binned(chart: Chart, c: np.ndarray, w: np.ndarray, bins: tuple) -> np.ndarray:
    hist, _ = np.histogramdd(c, bins=bins, range=list(zip(chart.lows, chart.highs)), weights=w)
    return hist / max(hist.sum(), 1e-300)


def _kl_from_bins(p: np.ndarray, q: np.ndarray, bin_volume: float, floor: float):
    """``(KL, tear_mass, KL of the starved bins)`` of binned distributions: the model's density
    is floored at ``floor`` (per unit chart volume) and renormalised, so the KL is finite and
    ≥ 0."""
    starved = q < floor * bin_volume
    qf = np.maximum(q, floor * bin_volume)
    qf = qf / qf.sum()
    pos = p > 0
    terms = np.where(pos, p * np.log(np.where(pos, p, 1.0) / qf), 0.0)
    return float(terms.sum()), float(p[starved].sum()), float(terms[starved].sum())


def chart_kl(push: Callable[[np.ndarray], np.ndarray], chart: Chart, latent_dim: int, *,
             bins: tuple | None = None, floor: float = 1e-4, cells: int | None = None,
             n_samples: int = 2_000_000, seed: int = 0, sub: int | None = None) -> dict:
    """``KL(true ‖ model)`` on ``chart`` of the model ``x = push(z)``, ``z ~ N(0, I_latent_dim)``.

    Args:
        push: ``z (N, d) float64 -> x (N, D)``: the model's sampling map (its prior flow and
            decoder); called on batches of quadrature nodes or of normal samples.
        chart: the true manifold's chart (``Dataset.chart``).
        latent_dim: d of the model (quadrature when ``d ≤ 2``, sampling otherwise).
        bins: bins per chart coordinate (default ``chart.bins``: 1° on the circle).
        floor: the model density (per unit chart volume) below which a bin counts as starved.
        cells: quadrature cells per latent axis (default 200,000 for d = 1, 1,500 for d = 2).
        seed: of the stratified nodes (and of the samples when d > 2).
        n_samples: samples when d > 2.

    Returns a dict: ``kl`` (nats), ``kl_coarse`` (the same with bins twice as wide; the
    difference ``kl_discretisation`` estimates the binning error), ``tear_mass`` (true mass in
    starved bins), ``kl_tear`` (the part of ``kl`` from those bins: it grows with
    ``log(1/floor)``), ``estimator`` (its description), and for plotting ``edges`` (per axis),
    ``true_density`` and ``model_density`` (per bin, per unit chart volume).
    """
    bins = tuple(bins or chart.bins)
    if len(bins) != chart.dim:
        raise ValueError(f"chart_kl: bins must have {chart.dim} entries for chart "
                         f"{chart.name!r}, got {bins}")
    if any(b % 2 for b in bins):
        raise ValueError(f"chart_kl: bins must be even (the coarse estimate halves them), got "
                         f"{bins}")
    if latent_dim <= 2:
        cells = cells or (200_000 if latent_dim == 1 else 1_500)
        z, w = normal_quadrature(latent_dim, cells, rng=np.random.default_rng(seed))
        how = (f"stratified quadrature over z ({cells} cells per axis, exact normal cell "
               f"masses)")
    else:
        z = np.random.default_rng(seed).standard_normal((n_samples, latent_dim))
        w = np.full(len(z), 1.0 / len(z))
        how = f"{n_samples} model samples"
    x = push(z)
    if x.shape[0] != len(z):
        raise ValueError(f"chart_kl: push returned {x.shape[0]} points for {len(z)} latents")
    c = chart.coords(np.asarray(x, np.float64))
    ok = np.isfinite(c).all(1)
    c, w = c[ok], w[ok]
    sub = sub or (16 if chart.dim == 1 else 6)
    out = {}
    for key, bb in (("kl", bins), ("kl_coarse", tuple(b // 2 for b in bins))):
        vol = float(np.prod([(hi - lo) / n for lo, hi, n in zip(chart.lows, chart.highs, bb)]))
        p = _true_bin_mass(chart, bb, sub if key == "kl" else 2 * sub)
        q = _binned(chart, c, w, bb)
        kl, tear, kl_tear = _kl_from_bins(p, q, vol, floor)
        out[key] = kl
        if key == "kl":
            out.update(tear_mass=tear, kl_tear=kl_tear, true_density=p / vol, model_density=q / vol,
                       edges=[np.linspace(lo, hi, n + 1)
                              for lo, hi, n in zip(chart.lows, chart.highs, bb)])
    out["kl_discretisation"] = abs(out["kl"] - out["kl_coarse"])
    out["nonfinite_mass"] = float(1.0 - w.sum()) if latent_dim <= 2 else float((~ok).mean())
    out["estimator"] = (f"KL(true ‖ model) on the {chart.name} chart "
                        f"({' × '.join(chart.labels)}; {' × '.join(map(str, bins))} bins): the "
                        f"model pushed forward by {how}, the truth by quadrature of its density; "
                        f"model density floored at {floor:g}")
    return out
