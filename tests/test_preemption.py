"""Preemption: SIGTERM, SIGUSR1 and SIGINT during `injflow train` finish the step, write the
checkpoint atomically (also when the signal lands during a checkpoint write), print the
resume command and exit with the documented status (75, or 130 for SIGINT); the resumed run
ends bit-identically (float64) to an uninterrupted one, also under torchrun with 2 gloo
ranks, where every rank stops at the same step and rank 0 writes."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from injflow_ext.cli import main
from injflow_ext.train import loop
from injflow_ext.train.preemption import INTERRUPTED_EXIT, PREEMPTED_EXIT, StopSignals
from injflow_ext.train.runs import load_checkpoint

ARGS = ["--data", "von-mises", "--n-samples", "400", "--steps", "300", "--checkpoint-every",
        "20", "--dtype", "float64", "--no-eval", "--quiet",
        "--ambient-layers", "2", "--ambient-hidden", "16,16", "--prior-layers", "1",
        "--prior-hidden", "8", "--batch-size", "100"]


def final_weights(run):
    return load_checkpoint(str(run / "checkpoint.pt"))["model"]


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(["train", "--out", str(out), *ARGS]) == 0
    return final_weights(out)


def wait_for_checkpoint(proc, path, deadline_s=120):
    end = time.time() + deadline_s
    while time.time() < end and proc.poll() is None:
        if path.exists() and load_checkpoint(str(path))["step"] >= 40:
            return
        time.sleep(0.02)
    pytest.fail("the training process finished before the signal; raise --steps")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_the_resume_is_bit_identical(
        tmp_path, uninterrupted, sig):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "injflow_ext", "train", "--out", str(run),
                             *ARGS], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, run / "checkpoint.pt")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err
    step = load_checkpoint(str(run / "checkpoint.pt"))["step"]
    assert 40 <= step < 300
    assert f"stopped by {signal.Signals(sig).name} at step {step}" in err
    assert f"continue with: injflow train --out {run} --resume" in err
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--no-eval"]) == 0
    assert_bit_identical(final_weights(run), uninterrupted)


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, PREEMPTED_EXIT),
                                        (signal.SIGINT, INTERRUPTED_EXIT)])
def test_a_signal_during_a_checkpoint_write_lets_the_write_finish(
        tmp_path, monkeypatch, capsys, uninterrupted, sig, status):
    """The signal arrives while the periodic checkpoint of step 20 is being written: the write
    completes (the handler only records the signal), the run stops at that step with its
    checkpoint, and resumes bit-identically."""
    real = loop.save_checkpoint
    calls = []

    def signalled_write(state, path):
        calls.append(state["step"])
        if len(calls) == 1:
            os.kill(os.getpid(), sig)   # lands now, in the middle of this write
        real(state, path)

    monkeypatch.setattr(loop, "save_checkpoint", signalled_write)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *ARGS]) == status
    assert calls == [20, 20]   # the periodic write, then the stop's (nothing in between)
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 20
    assert "stopped by" in capsys.readouterr().err
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--no-eval"]) == 0
    assert_bit_identical(final_weights(run), uninterrupted)


def test_stop_signals_restores_the_handlers_it_replaced():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGUSR1   # the first one counts
    assert {s: signal.getsignal(s) for s in before} == before


def test_under_torchrun_every_rank_stops_at_the_same_step(tmp_path):
    """SIGUSR1 to one of 2 gloo ranks: both stop at the same log step, rank 0 writes the
    checkpoint, and the run resumed on 2 ranks ends bit-identically to an uninterrupted
    2-rank run."""
    args = [a for a in ARGS if a != "--quiet"] + ["--lr-schedule", "constant"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node=2", "-m", "injflow_ext", "train", "--out",
                                 str(out), "--quiet", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    full = torchrun(tmp_path / "full")
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-3000:]
    proc = torchrun(tmp_path / "run")
    wait_for_checkpoint(proc, tmp_path / "run" / "checkpoint.pt", deadline_s=300)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0                      # torchrun reports the workers' 75
    assert err.count("stopped by SIGUSR1 at step") == 1, err[-3000:]   # rank 0 says it once
    step = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"]
    logged = {int(r["step"]) for r in csv.DictReader(open(tmp_path / "run" / "train_log.csv"))}
    assert 40 <= step < 300 and step in logged and max(logged) == step   # a log step: where
    # the ranks agree (every 10 steps and at each epoch's end), and the log ends there
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node=2", "-m", "injflow_ext", "train", "--out",
                              str(tmp_path / "run"), "--resume", "--quiet", "--no-eval"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bit_identical(final_weights(tmp_path / "run"), final_weights(tmp_path / "full"))


# --------------------------------------------------------------------------- one owner per run

def test_a_run_being_trained_refuses_a_second_train_and_resume(tmp_path):
    """While a run trains, a second `train` on its directory (also with --overwrite) and a
    `--resume` of it are refused, naming the owner; the first run is unharmed and, once it
    ended, the directory is free again."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "injflow_ext", "train", "--out", str(run),
                             *ARGS], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, run / "checkpoint.pt")
    for extra in (["--overwrite", *ARGS], ["--resume", "--quiet", "--no-eval"]):
        with pytest.raises(SystemExit, match=rf"{run} is being trained by process {proc.pid} on "
                           rf"\S+ \(since .*\); wait for it to end or stop it"):
            main(["train", "--out", str(run), *extra])
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT
    assert not (run / "train.lock").exists()          # released on the way out
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--no-eval"]) == 0


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys):
    """A lock whose process no longer exists (killed with SIGKILL) is taken over, saying so;
    one of another host is not (its process cannot be checked), and the message says which
    file to delete."""
    import json
    import socket

    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.mkdir()
    (run / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                "slurm_job": None, "since": 0}))
    assert main(["train", "--out", str(run), "--overwrite", *ARGS[:-2], "--steps", "3"]) == 0
    assert f"taking over the stale lock {run / 'train.lock'}: process {dead.pid}" in \
        capsys.readouterr().err
    (run / "train.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1,
                                                "slurm_job": "123", "since": 0}))
    with pytest.raises(SystemExit, match=rf"process 1 on elsewhere, SLURM job 123 .* If that "
                       rf"process is gone .* delete {run / 'train.lock'}"):
        main(["train", "--out", str(run), "--resume", "--quiet", "--no-eval"])
