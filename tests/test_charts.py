"""The KL on the true manifold's chart (injflow_ext.data.charts.chart_kl): ≈ 0 for the truth, the
analytic value for a shifted density, ≥ 0 always, and tears and mass off the manifold seen."""

import numpy as np
import pytest
from scipy import special, stats

from injflow_ext.data import SYNTHETIC, load_dataset
from injflow_ext.data.charts import chart_kl, circle_chart, normal_quadrature, sphere_chart


def circle_push(weights, locs, kappas, shift=0.0, radius=1.0):
    """z (N, 1) -> points on a circle whose angle has the von Mises mixture's law (its CDF
    inverted numerically), rotated by ``shift``."""
    grid = np.linspace(-np.pi, np.pi, 200_001)
    w = np.asarray(weights) / np.sum(weights)
    cdf = sum(wk * (stats.vonmises.cdf(grid, k, loc=m) - stats.vonmises.cdf(-np.pi, k, loc=m))
              for wk, m, k in zip(w, locs, kappas))

    def push(z):
        theta = np.interp(special.ndtr(z[:, 0]), cdf, grid) + shift
        return radius * np.stack([np.cos(theta), np.sin(theta)], 1)
    return push


def test_normal_quadrature_weights_are_the_normal_masses():
    z, w = normal_quadrature(1, 1000)
    assert z[:, 0] == pytest.approx(np.linspace(-7, 7, 1001)[:-1] + 0.007)   # cell centres
    assert w.sum() == pytest.approx(1.0)
    assert (w * z[:, 0] ** 2).sum() == pytest.approx(1.0, abs=1e-4)   # midpoint rule, h = 0.014
    z2, w2 = normal_quadrature(2, 300)
    assert z2.shape == (90_000, 2) and w2.sum() == pytest.approx(1.0)
    assert (w2 * z2[:, 0] * z2[:, 1]).sum() == pytest.approx(0.0, abs=1e-12)
    zs, ws = normal_quadrature(2, 300, rng=np.random.default_rng(0))   # stratified
    np.testing.assert_array_equal(ws, w2)
    assert np.abs(zs - z2).max() <= 14 / 300 / 2


@pytest.mark.parametrize("name", ["von-mises", "circle-mixture", "circle-mixture-uneven"])
def test_the_true_model_has_kl_zero(name):
    chart = SYNTHETIC[name][3]
    spec = {"von-mises": ([1], [np.pi / 2], [1.0]),
            "circle-mixture": ([0.6, 0.4], [np.pi / 3, -2 * np.pi / 3], [3.0, 3.0]),
            "circle-mixture-uneven": ([0.75, 0.25], [0.0, 2.2], [8.0, 2.0])}[name]
    res = chart_kl(circle_push(*spec), chart, 1)
    assert 0 <= res["kl"] < 2e-4
    assert res["tear_mass"] == 0.0
    np.testing.assert_allclose(res["model_density"], res["true_density"], rtol=0.02, atol=1e-3)


@pytest.mark.parametrize("kappa,delta", [(1.0, 0.5), (4.0, 0.2), (2.0, np.pi)])
def test_a_shifted_von_mises_gives_the_analytic_kl(kappa, delta):
    chart = circle_chart([1], [0.3], [kappa])
    res = chart_kl(circle_push([1], [0.3], [kappa], shift=delta), chart, 1)
    # KL(vM(μ, κ) ‖ vM(μ + δ, κ)) = κ A(κ) (1 − cos δ), A = I₁/I₀
    exact = kappa * special.i1e(kappa) / special.i0e(kappa) * (1 - np.cos(delta))
    assert res["kl"] == pytest.approx(exact, rel=2e-3, abs=2e-5)
    assert res["kl_discretisation"] < 1e-3


def test_the_kl_sees_where_the_model_puts_its_mass():
    chart = circle_chart([1], [0.0], [2.0])
    # a radius-2 circle has the right angle law: the chart (the angle) does not care
    assert chart_kl(circle_push([1], [0.0], [2.0], radius=2.0), chart, 1)["kl"] < 2e-4

    # a model that puts no mass on the 60° arc (−2π/3, −π/3) (a tear): KL large, the arc's
    # true mass reported
    def torn(z):
        theta = -np.pi / 3 + (5 * np.pi / 3) * special.ndtr(z[:, 0])
        return np.stack([np.cos(theta), np.sin(theta)], 1)
    res = chart_kl(torn, chart, 1)
    arc_mass = stats.vonmises.cdf(-np.pi / 3, 2.0) - stats.vonmises.cdf(-2 * np.pi / 3, 2.0)
    assert res["tear_mass"] == pytest.approx(arc_mass, rel=0.02)
    assert res["kl"] > 0.1


def test_sphere_truth_and_a_rotated_sphere():
    kappa = 3.0
    chart = sphere_chart(kappa)

    def vmf(z, tilt=0.0):
        u1, u2 = special.ndtr(z[:, 0]), special.ndtr(z[:, 1])
        w = 1 + np.log(u1 + (1 - u1) * np.exp(-2 * kappa)) / kappa
        phi = 2 * np.pi * u2 - np.pi
        r = np.sqrt(np.clip(1 - w * w, 0, None))
        x = np.stack([r * np.cos(phi), r * np.sin(phi), w], 1)
        c, s = np.cos(tilt), np.sin(tilt)
        return x @ np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]]).T   # rotate about y
    res = chart_kl(vmf, chart, 2, cells=1000)
    assert 0 <= res["kl"] < 0.01
    tilt = 0.4   # the mean direction tilted by 0.4 rad: KL = κ A₃(κ) (1 − cos 0.4)
    a3 = 1 / np.tanh(kappa) - 1 / kappa
    tilted = chart_kl(lambda z: vmf(z, tilt), chart, 2, cells=1000)
    assert tilted["kl"] == pytest.approx(kappa * a3 * (1 - np.cos(tilt)), rel=0.05)


def test_sampling_estimator_for_higher_latent_dims_agrees():
    chart = circle_chart([1], [0.0], [2.0])
    push = circle_push([1], [0.0], [2.0], shift=0.5)

    def push3(z):   # d = 3 latents, only the first one used: sampling, not quadrature
        return push(z[:, :1])
    quad = chart_kl(push, chart, 1)["kl"]
    sampled = chart_kl(push3, chart, 3, n_samples=400_000, bins=(120,))
    assert sampled["kl"] == pytest.approx(quad, rel=0.05)
    assert "samples" in sampled["estimator"]


def test_datasets_carry_their_charts_and_samples_follow_them():
    for name in ("von-mises", "circle-mixture", "circle-mixture-uneven", "sphere", "torus"):
        ds = load_dataset(name, n_samples=4000)
        assert ds.chart is not None and ds.chart.dim == ds.latent_dim
        c = ds.chart.coords(ds.train)
        lo, hi = np.array(ds.chart.lows), np.array(ds.chart.highs)
        assert ((c >= lo) & (c < hi)).all()
        # the data's density on the manifold integrates to 1 over the chart (quadrature check)
    assert load_dataset("digits").chart is None


def test_chart_kl_checks_bins():
    chart = circle_chart([1], [0.0], [1.0])
    with pytest.raises(ValueError, match="bins must have 1 entries"):
        chart_kl(lambda z: z, chart, 1, bins=(10, 10))
    with pytest.raises(ValueError, match="even"):
        chart_kl(lambda z: z, chart, 1, bins=(9,))
