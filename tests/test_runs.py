"""The run directory (injflow_ext.train.runs) and the failures a user hits with it: resume needs only
``--out RUN --resume`` from any working directory; damaged or foreign files give one clear
message naming the file; checkpoints are read safely; a SIGKILLed run resumes bit-identically;
out-of-range numbers are refused."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from injflow_ext import load_run
from injflow_ext.cli import main
from injflow_ext.train.runs import load_checkpoint, numpy_rng_state, read_config, set_numpy_rng_state

TINY = ["--ambient-layers", "2", "--ambient-hidden", "16,16", "--prior-layers", "1",
        "--prior-hidden", "8", "--batch-size", "100", "--quiet"]


@pytest.fixture
def npy_run(tmp_path, monkeypatch):
    """A finished run trained on a .npy file named by a relative path, latent-dim given once."""
    work = tmp_path / "work"
    work.mkdir()
    angles = np.random.default_rng(0).uniform(0, 2 * np.pi, 400)
    np.save(work / "circle.npy", np.stack([np.cos(angles), np.sin(angles)], 1))
    monkeypatch.chdir(work)
    assert main(["train", "--data", "circle.npy", "--latent-dim", "1", "--out", "run",
                 "--steps", "4", "--no-eval", *TINY]) == 0
    return work / "run"


def test_resume_needs_only_out_and_resume_from_any_directory(npy_run, tmp_path, monkeypatch):
    cfg = read_config(str(npy_run))
    assert os.path.isabs(cfg["data"]["name"])          # stored absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--out", str(npy_run), "--resume", "--quiet", "--no-eval"]) == 0
    assert load_checkpoint(str(npy_run / "checkpoint.pt"))["step"] == 4


@pytest.mark.parametrize("name,command", [
    ("model.pt", ["eval"]),
    ("config.json", ["eval"]),
    ("checkpoint.pt", ["train", "--resume", "--quiet", "--no-eval"]),
])
def test_damaged_files_give_one_clear_message(npy_run, capsys, name, command):
    path = npy_run / name
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])   # truncated
    run = ["--out", str(npy_run)] if command[0] == "train" else [str(npy_run)]
    assert main([command[0], *run, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert name in err and ("damaged" in err or "truncated" in err), err
    assert "Traceback" not in err


class Payload:
    """An object a safe checkpoint never holds (unpickling one could run code)."""


def test_checkpoint_with_an_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="loading it could run code, so it is refused"):
        load_checkpoint(str(path))


def test_numpy_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    np.random.seed(5)
    np.random.normal(size=3)
    state = numpy_rng_state()
    torch.save({"model": {}, "rng": state}, tmp_path / "c.pt")
    expected = np.random.normal(size=4)
    set_numpy_rng_state(load_checkpoint(str(tmp_path / "c.pt"))["rng"])
    assert np.array_equal(np.random.normal(size=4), expected)


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.pt"):
        load_run(str(tmp_path))


@pytest.mark.parametrize("argv,pattern", [
    (["sample", "RUN", "-n", "0", "--out", "s.npy"], "-n: must be at least 1, got 0"),
    (["train", "--data", "von-mises", "--steps", "-3"], "--steps: must be at least 1, got -3"),
    (["train", "--data", "von-mises", "--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["train", "--data", "von-mises", "--latent-dim", "0"],
     "--latent-dim: must be at least 1, got 0"),
])
def test_out_of_range_numbers_are_refused(argv, pattern, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert pattern in capsys.readouterr().err


def _final_weights(run):
    return load_checkpoint(str(run / "checkpoint.pt"))["model"]


def test_sigkill_after_a_checkpoint_resumes_bit_identically(tmp_path):
    """A training process killed with SIGKILL (no chance to write anything) after its first
    checkpoints resumes from the last one and ends with exactly the weights of an uninterrupted
    run."""
    args = ["--data", "von-mises", "--n-samples", "400", "--steps", "400", "--checkpoint-every",
            "20", "--patience", "1000", "--dtype", "float64", "--no-eval", *TINY]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["train", "--out", str(full), *args]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "injflow_ext", "train", "--out", str(killed),
                             *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ck = killed / "checkpoint.pt"
        if ck.exists() and 40 <= load_checkpoint(str(ck))["step"] < 300:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the training process finished before it could be killed; raise --steps")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(str(killed / "checkpoint.pt"))["step"]
    assert 0 < step < 400
    assert main(["train", "--out", str(killed), "--resume", "--quiet", "--no-eval"]) == 0
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = json.load(open(killed / "metrics.json"))
    assert log["train"]["steps"] == 400


def test_run_directories_of_the_version_1_layout_load_and_resume(tmp_path):
    """A run directory written before the models were composed from parts and the objective
    options moved into ``train.objective`` (4bd1d19 and earlier): its config.json (``model``:
    the constructor's keyword arguments; ``train``: hutchinson_samples, probe, surrogate_noise,
    cg_rtol, beta), checkpoint.pt and model.pt load, evaluate and resume to the same weights
    as a run of today's layout."""
    def train(out, *extra):
        return main(["train", "--data", "von-mises", "--n-samples", "300", "--method",
                     "hutchinson", "--steps", "6", "--checkpoint-every", "3", "--out", str(out),
                     "--no-eval", "--dtype", "float64", "--lr-schedule", "constant", *TINY,
                     *extra])

    new, old = tmp_path / "new", tmp_path / "old"
    assert train(new) == 0
    assert train(old, "--steps", "3") == 0
    # rewrite `old` as version 1 wrote it
    cfg = json.loads((old / "config.json").read_text())
    m = cfg["model"]
    v1_model = dict(ambient_dim=m["ambient_dim"], latent_dim=m["latent_dim"],
                    ambient_layers=m["ambient_layers"], ambient_hidden=m["ambient_hidden"],
                    prior_layers=m["prior_layers"], prior_hidden=m["prior_hidden"],
                    prior_spline_bins=0, activation="tanh", scale="tanh", actnorm=True, seed=0,
                    permutation="random", base="normal", base_dof=3, image_shape=None,
                    image_levels=2, image_hidden=[32, 32], image_activation="relu",
                    logit_alpha=None, data_shift=m["data_shift"], data_scale=m["data_scale"])
    train_cfg = dict(cfg["train"])
    train_cfg.pop("objective")
    train_cfg.update(hutchinson_samples=1, probe=None, surrogate_noise=0.0, beta=50.0,
                     cg_rtol=1e-5, steps=6)
    cfg.update(model=v1_model, train=train_cfg)
    (old / "config.json").write_text(json.dumps(cfg))
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    state["model_config"] = v1_model
    state["train_config"] = train_cfg
    torch.save(state, old / "checkpoint.pt")
    model = torch.load(old / "model.pt", weights_only=True)
    torch.save({"format": "injflow_ext.RectangularFlow/1", "version": "0.1.0",
                "config": v1_model, "state_dict": model["state_dict"]}, old / "model.pt")
    assert load_run(str(old)).config["builder"] == "tabular"
    assert main(["eval", str(old)]) == 0
    assert main(["train", "--out", str(old), "--resume", "--quiet", "--no-eval"]) == 0
    a = load_run(str(new)).state_dict()
    b = load_run(str(old)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_changed_data_is_refused_unless_allowed(npy_run, capsys):
    """config.json records what the data was (for a file: its path, size and the SHA-256 of
    the loaded arrays); a --resume on a replaced file is refused, showing both fingerprints;
    --allow-data-change goes on, says so and records the change. A file moved elsewhere with
    the same content is the same data."""
    cfg = read_config(str(npy_run))
    fp = cfg["data"]["fingerprint"]
    assert fp["path"] == cfg["data"]["name"] and fp["bytes"] > 0 and len(fp["sha256"]) == 64
    assert fp["split"] == {"train": 320, "val": 40, "test": 40}
    data = npy_run.parent / "circle.npy"
    x = np.load(data)
    np.save(data, x * 1.01)                       # same shape and size, other values
    with pytest.raises(SystemExit, match="changed since the run started.*--allow-data-change"
                       "(?s:.*)started on: .*" + fp["sha256"] + "(?s:.*)now: "):
        main(["train", "--out", str(npy_run), "--resume", "--quiet", "--no-eval"])
    assert main(["train", "--out", str(npy_run), "--resume", "--allow-data-change", "--quiet",
                 "--no-eval"]) == 0
    assert "going on with changed training data" in capsys.readouterr().err
    after = read_config(str(npy_run))
    assert after["data_changes"][0]["from"]["sha256"] == fp["sha256"]
    assert after["data"]["fingerprint"]["sha256"] == after["data_changes"][0]["to"]["sha256"]
    assert after["data"]["fingerprint"]["sha256"] != fp["sha256"]
    # the same content in another folder is the same data: the file moved, config.json names
    # the new place, the recorded fingerprint still the old path's
    moved = npy_run.parent / "moved"
    moved.mkdir()
    os.replace(data, moved / "circle.npy")
    cfg = json.loads((npy_run / "config.json").read_text())
    cfg["data"]["name"] = str(moved / "circle.npy")
    (npy_run / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--out", str(npy_run), "--resume", "--quiet", "--no-eval"]) == 0


def test_built_in_sets_are_fingerprinted_by_name_split_and_size(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", "von-mises", "--n-samples", "300", "--steps", "2",
                 "--out", str(out), "--no-eval", *TINY]) == 0
    fp = read_config(str(out))["data"]["fingerprint"]
    assert fp == {"name": "von-mises", "split": {"train": 240, "val": 30, "test": 30},
                  "size": 300}
    cfg = json.loads((out / "config.json").read_text())
    cfg["data"]["fingerprint"]["size"] = 301       # as if the set had changed under the run
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="changed since the run started"):
        main(["train", "--out", str(out), "--resume", "--quiet", "--no-eval"])


# ------------------------------------------------------------------------------ failed writes

def _fsize_limited(limit):
    """A child process with a file-size limit of ``limit`` bytes whose writes past it fail
    with EFBIG (SIGXFSZ ignored, as a batch system's limit would be met)."""
    def preexec():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_checkpoint_write_over_the_file_size_limit_is_one_message_and_keeps_the_old(tmp_path):
    """A resume whose checkpoint write hits the file-size limit ends with one message (the
    file, EFBIG, what to do), no traceback, and the previous checkpoint still loads."""
    run = tmp_path / "run"
    args = ["--data", "von-mises", "--n-samples", "300", "--checkpoint-every", "4", "--no-eval",
            *TINY]
    assert main(["train", "--out", str(run), "--steps", "4", *args]) == 0
    before = load_checkpoint(str(run / "checkpoint.pt"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["steps"] = 12
    (run / "config.json").write_text(json.dumps(cfg))
    limit = (run / "checkpoint.pt").stat().st_size // 2
    proc = subprocess.run([sys.executable, "-m", "injflow_ext", "train", "--out", str(run),
                           "--resume", "--quiet", "--no-eval"], capture_output=True, text=True,
                          preexec_fn=_fsize_limited(limit),
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"could not write {run / 'checkpoint.pt'}: File too large (EFBIG); the file would " \
           "exceed the file-size limit" in proc.stderr, proc.stderr
    after = load_checkpoint(str(run / "checkpoint.pt"))
    assert after["step"] == before["step"] == 4
    assert not list(run.glob(".tmp-*"))
    assert not (run / "train.lock").exists()


def test_a_write_to_a_read_only_folder_is_one_message(tmp_path, monkeypatch, capsys):
    """EACCES (a folder that is not writable; simulated: the tests run as root, whom a mode
    does not stop): one message naming the file and what to do, exit 2, the previous
    checkpoint loadable."""
    import errno

    from injflow_ext import _io
    run = tmp_path / "run"
    args = ["--data", "von-mises", "--n-samples", "300", "--checkpoint-every", "4", "--no-eval",
            *TINY]
    assert main(["train", "--out", str(run), "--steps", "4", *args]) == 0
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["steps"] = 12
    (run / "config.json").write_text(json.dumps(cfg))

    def read_only(dir, prefix):
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(_io.tempfile, "mkstemp", read_only)
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--no-eval"]) == 2
    err = capsys.readouterr().err
    # the first write of the resume (the log's truncation) meets it
    assert f"could not write {run / 'train_log.csv'}: Permission denied (EACCES); the folder " \
           "is not writable" in err, err
    assert "Traceback" not in err
    monkeypatch.undo()
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 4


def test_a_failed_plot_keeps_the_finished_training(tmp_path, monkeypatch, capsys):
    from injflow_ext.evaluate import plots

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "make_plots", broken)
    run = tmp_path / "run"
    assert main(["train", "--data", "von-mises", "--n-samples", "300", "--steps", "3",
                 "--out", str(run), *TINY]) == 0
    assert "the plots were not drawn (OSError" in capsys.readouterr().err
    assert (run / "model.pt").exists() and (run / "metrics.json").exists()
