"""The injflow command line end to end on tiny settings: train, resume, eval, ood, sample,
load_run; bad input gives clear errors and loses no checkpoint."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from injflow_ext import load_run
from injflow_ext.cli import main
from injflow_ext.data import load_dataset

TINY = ["--ambient-layers", "2", "--ambient-hidden", "16,16", "--prior-layers", "1",
        "--prior-hidden", "8", "--batch-size", "100", "--quiet", "--n-samples", "600"]


def train(out, *extra):
    return main(["train", "--data", "von-mises", "--out", str(out), *TINY, *extra])


def test_train_eval_sample_ood_load_run(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--epochs", "2", "--likelihood-warmup", "0", "1") == 0
    for f in ("config.json", "metrics.json", "train_log.csv", "model.pt", "checkpoint.pt",
              "loss.png", "manifold.png"):
        assert (out / f).exists(), f
    m = json.load(open(out / "metrics.json"))
    t = m["test"]
    for k in ("test_log_likelihood", "reconstruction", "frechet_distance", "kl_divergence",
              "tear_mass", "kl_tear", "kl_discretisation", "test_log_likelihood_median"):
        assert np.isfinite(t[k]), k
    # the KL is a divergence on the circle's angle, and says so
    assert t["kl_divergence"] >= 0 and 0 <= t["tear_mass"] <= 1
    assert "chart" in t["kl_estimator"] and "angle" in t["kl_estimator"]
    quantiles = [t[f"test_log_likelihood_{q}"] for q in ("min", "q01", "q05", "q25", "median",
                                                          "q75", "max")]
    assert quantiles == sorted(quantiles)
    assert t["test_log_likelihood_below_floor"] == int(t["test_log_likelihood_min"] < -1000)
    model = load_run(str(out))
    # the standardisation is inside the model: log_prob and samples are in data units
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert torch.isfinite(model.log_prob(x)).all()
    assert model.config["data_shift"] is not None
    assert main(["eval", str(out)]) == 0
    assert main(["sample", str(out), "-n", "7", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (7, 2)
    np.save(tmp_path / "far.npy", np.random.default_rng(0).normal(5, 1, size=(200, 2)))
    assert main(["ood", str(out), "--in-data", "von-mises",
                 "--out-data", str(tmp_path / "far.npy")]) == 0
    rep = json.load(open(out / "ood_far.npy.json"))
    assert rep["reconstruction"]["auroc"] > 0.9   # far-away points reconstruct badly


@pytest.mark.parametrize("method", ["hutchinson", "surrogate", "two-step"])
def test_other_methods_train(tmp_path, method):
    assert train(tmp_path / method, "--steps", "6", "--method", method, "--no-eval") == 0
    rows = list(csv.DictReader(open(tmp_path / method / "train_log.csv")))
    assert rows and all(np.isfinite(float(r["loss"])) for r in rows)


def test_digits_images_trains_the_image_model(tmp_path):
    """--data digits-images builds RectangularFlow.images (1 × 8 × 8), trains, evaluates,
    plots a sample grid, and load_run gives back an image model."""
    out = tmp_path / "img"
    assert main(["train", "--data", "digits-images", "--latent-dim", "2", "--out", str(out),
                 "--steps", "3", "--batch-size", "50", "--n-samples", "300", "--quiet",
                 "--image-couplings", "1", "--image-hidden", "4", "--prior-layers", "1",
                 "--prior-hidden", "4", "--logit", "0.05"]) == 0
    m = load_run(str(out))
    assert m.image_shape == (1, 8, 8) and m.config["logit_alpha"] == 0.05
    assert m.sample(3).shape == (3, 1, 8, 8)
    for fig in ("samples.png", "reconstructions.png", "interpolations.png"):
        assert (out / fig).exists(), fig
    t = json.load(open(out / "metrics.json"))["test"]
    assert np.isfinite(t["test_log_likelihood"])
    # bits/dim: (−log p + d ln 17) / (64 ln 2) of the mean log-likelihood
    assert t["test_bits_per_dim"] == pytest.approx(
        (-t["test_log_likelihood"] + 2 * np.log(17)) / (64 * np.log(2)), rel=1e-12)
    assert "17 grey levels" in t["bits_per_dim_convention"]
    # no Inception weights here: FID is null with the reason, the raw-pixel Fréchet is there
    assert (t["fid"] is None) == (t["fid_unavailable"] is not None)
    assert np.isfinite(t["frechet_distance"]) and "raw pixels" in t["frechet_features"]
    # OOD of images: in-data defaults to the run's data; inverted digits are far off
    np.save(tmp_path / "inverted.npy", 1 - load_dataset("digits-images").test)
    assert main(["ood", str(out), "--out-data", str(tmp_path / "inverted.npy")]) == 0
    rep = json.load(open(out / "ood_inverted.npy.json"))
    # test splits: 180 digits, 18 of the 180 inverted ones (a file is split like any data)
    assert rep["in_data"] == "digits-images" and (rep["n_in"], rep["n_out"]) == (180, 18)
    assert rep["reconstruction"]["auroc"] > 0.9
    assert (out / "ood_inverted.npy.png").exists()


def test_resume_continues_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # a constant learning rate: the 8-step run below stands for the first 8 steps of a 12-step
    # one (a cosine schedule depends on the run's length; tests/test_runs.py kills a real run)
    const = ("--lr-schedule", "constant")
    assert train(full, "--steps", "12", "--checkpoint-every", "4", "--no-eval", *const) == 0
    assert train(part, "--steps", "12", "--checkpoint-every", "4", "--no-eval", *const) == 0
    # simulate a crash after step 8: roll the second run back to its step-8 state
    ck = torch.load(part / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 12
    assert train(tmp_path / "p8", "--steps", "8", "--checkpoint-every", "4", "--no-eval",
                 *const) == 0
    ck8 = torch.load(tmp_path / "p8" / "checkpoint.pt", weights_only=False)
    torch.save(ck8, part / "checkpoint.pt")
    assert main(["train", "--data", "von-mises", "--out", str(part), "--resume", "--quiet",
                 "--no-eval"]) == 0
    a = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    rows = list(csv.DictReader(open(part / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == sorted({int(r["step"]) for r in rows})


def test_bad_input_is_clear_and_keeps_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--steps", "4", "--no-eval") == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["train", "--data", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "x"),
                 "--latent-dim", "1", *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "wide.npy", np.random.default_rng(0).normal(size=(50, 5)))
    with pytest.raises(SystemExit, match="the data has 5 features, the model 2"):
        main(["eval", str(out), "--data", str(tmp_path / "wide.npy")])
    with pytest.raises(SystemExit, match="already holds a run"):
        train(out, "--steps", "4")
    x = np.random.default_rng(0).normal(size=(60, 3))
    x[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    assert main(["train", "--data", str(tmp_path / "nan.npy"), "--latent-dim", "1", "--out",
                 str(tmp_path / "y"), *TINY]) == 2
    assert "NaN or inf" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="latent-dim must be smaller"):
        main(["train", "--data", "von-mises", "--latent-dim", "2", "--out", str(tmp_path / "z"),
              *TINY])
    with pytest.raises(SystemExit, match="--noise / --surrogate-noise is not an option of "
                       "--method exact; it is for --method surrogate"):
        train(tmp_path / "n", "--surrogate-noise", "0.1")
    with pytest.raises(SystemExit, match="needs probes K <= d = 1, got 2"):
        train(tmp_path / "n", "--method", "surrogate", "--probes", "2")
    with pytest.raises(SystemExit, match=r"probe must be one of \['normal', 'rademacher'\], "
                       "got 'orthonormal'"):
        train(tmp_path / "n", "--method", "hutchinson", "--probe", "orthonormal")
    # an option of the other kind of model is refused, naming the one that applies
    with pytest.raises(SystemExit, match="--image-levels applies to rectangular image models, and "
                       "von-mises with --model rectangular trains a rectangular tabular model"):
        train(tmp_path / "n", "--image-levels", "3")
    with pytest.raises(SystemExit, match="--activation applies to rectangular tabular models, and "
                       "digits-images with --model rectangular trains a rectangular image "
                       "model; use --image-activation"):
        main(["train", "--data", "digits-images", "--latent-dim", "3", "--activation", "relu",
              "--out", str(tmp_path / "n"), "--quiet"])
    with pytest.raises(SystemExit, match="--ambient-hidden applies to rectangular tabular models, "
                       "and digits-images with --model rectangular trains a rectangular image "
                       "model; use --image-hidden"):
        main(["train", "--data", "digits-images", "--latent-dim", "3", "--ambient-hidden", "8",
              "--out", str(tmp_path / "n"), "--quiet"])
    with pytest.raises(SystemExit, match="--base-dof is for --base student-t"):
        train(tmp_path / "n", "--base-dof", "5")
    # free-form models: their own flags, and the rectangular ones refused
    with pytest.raises(SystemExit, match="--ambient-layers applies to rectangular tabular "
                       "models, and von-mises with --model free-form trains a free-form tabular "
                       "model"):
        main(["train", "--data", "von-mises", "--model", "free-form", "--ambient-layers", "3",
              "--out", str(tmp_path / "n"), "--quiet"])
    with pytest.raises(SystemExit, match="--free-form-blocks applies to free-form tabular models, "
                       "and von-mises with --model rectangular trains a rectangular tabular"):
        train(tmp_path / "n", "--free-form-blocks", "3")
    with pytest.raises(SystemExit, match="--free-form-channels applies to free-form image "
                       "models"):
        main(["train", "--data", "von-mises", "--model", "free-form", "--free-form-channels", "8",
              "--out", str(tmp_path / "n"), "--quiet"])
    with pytest.raises(SystemExit, match="needs an encoder network with tangents.*use a "
                       "FreeFormFlow"):
        train(tmp_path / "n", "--method", "fif")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", *TINY]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_console_entry_point_and_module():
    proc = subprocess.run([sys.executable, "-m", "injflow_ext", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "train" in proc.stdout


def test_ctrl_c_leaves_a_valid_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    from injflow_ext.train.loop import Trainer

    out = tmp_path / "run"
    original = Trainer._train_step

    def interrupt_at_step_5(self, *args):
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", interrupt_at_step_5)
    assert train(out, "--steps", "9", "--checkpoint-every", "100", "--no-eval") == 130
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 5
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--no-eval"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 9


def test_image_datasets_without_torchvision_say_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision":
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    from injflow_ext.data import load_dataset
    with pytest.raises(ImportError, match="needs torchvision"):
        load_dataset("mnist")


@pytest.mark.parametrize("data", ["von-mises", "digits-images"])
def test_free_form_model_trains_evaluates_samples_and_ood(tmp_path, data):
    """--model free-form on a flat and an image set: trains with FIF's loss (its default
    method), reports, and eval, sample and ood work on its run."""
    out = tmp_path / "ff"
    sizes = (["--free-form-hidden", "16", "--free-form-blocks", "1"] if data == "von-mises" else
             ["--latent-dim", "3", "--free-form-channels", "4,8", "--free-form-hidden", "16"])
    assert main(["train", "--data", data, "--model", "free-form", "--out", str(out),
                 "--steps", "8", "--batch-size", "50", "--n-samples", "400", "--quiet",
                 *sizes]) == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["train"]["method"] == "fif"
    assert cfg["model"]["builder"] == ("free-form" if data == "von-mises" else "free-form-images")
    t = json.load(open(out / "metrics.json"))["test"]
    assert np.isfinite(t["test_log_likelihood"]) and np.isfinite(t["reconstruction"])
    model = load_run(str(out))
    assert type(model).__name__ == "FreeFormFlow"
    assert main(["eval", str(out)]) == 0
    assert main(["sample", str(out), "-n", "5", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape[0] == 5
    D = model.ambient_dim
    np.save(tmp_path / "far.npy", np.random.default_rng(0).normal(5, 1, size=(100, D)))
    assert main(["ood", str(out), "--in-data", data, "--out-data", str(tmp_path / "far.npy")]) == 0
