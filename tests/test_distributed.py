"""Training under torch.distributed: 2 CPU processes (gloo) launched by torchrun must train
exactly what one process does on the same global batches, for every method, and a checkpoint
written by 2 ranks must resume on 1."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from injflow_ext.cli import main
from injflow_ext.train.distributed import init_from_env, shard

# float64 so that the only differences are summation order; batch 63 does not split evenly over
# 2 ranks (32 + 31) and the last batch of an epoch (320 - 5·63 = 5) neither (3 + 2). A constant
# learning rate, so that a run lengthened on resume follows the same schedule as a long one.
TINY = ["--data", "von-mises", "--latent-dim", "1", "--n-samples", "400", "--batch-size", "63",
        "--lr-schedule", "constant",
        "--ambient-layers", "2", "--ambient-hidden", "16,16", "--prior-layers", "1",
        "--prior-hidden", "8", "--dtype", "float64", "--quiet", "--no-eval"]


def torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "injflow_ext", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=False)["model"]


def assert_same_weights(a, b):
    """Equal up to summation order: the gradient all-reduce adds in another order than one
    process does, and Adam turns a gradient at roundoff level (e.g. of an ActNorm scale right
    after its data-dependent initialisation) into an update of up to ~1e-12 either way. A real
    difference in the gradient (a wrong share weight, a missed batch) moves weights by ~1e-4."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-8, atol=1e-10, msg=k)


def log_rows(run):
    return list(csv.DictReader(open(run / "train_log.csv")))


@pytest.mark.parametrize("n", [0, 1, 5, 63, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_covers_each_item_once(n, world):
    parts = [shard(n, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [stop - start for start, stop in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("method", ["exact", "two-step"])
def test_two_ranks_train_what_one_rank_trains(tmp_path, method):
    args = [*TINY, "--method", method, "--steps", "7"]     # crosses an epoch: reshuffle + validation
    torchrun(2, *args, "--out", str(tmp_path / "two"))
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    one, two = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one]   # rank 0 alone wrote the log
    for r1, r2 in zip(one, two):
        for k in ("loss", "reconstruction", "val_objective"):
            if r1[k]:
                assert float(r2[k]) == pytest.approx(float(r1[k]), rel=1e-10), k
    assert json.load(open(tmp_path / "two" / "config.json"))["world_size"] == 2
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["world_size"] == 2


def test_checkpoint_of_two_ranks_resumes_on_one(tmp_path):
    part, full = tmp_path / "part", tmp_path / "full"
    torchrun(2, *TINY, "--steps", "4", "--out", str(part))
    # the 2-rank run stopped at step 4 of what is now an 8-step run
    cfg = json.load(open(part / "config.json"))
    cfg["train"]["steps"] = 8
    json.dump(cfg, open(part / "config.json", "w"))
    assert main(["train", "--out", str(part), "--resume", "--quiet", "--no-eval"]) == 0
    assert main(["train", *TINY, "--steps", "8", "--out", str(full)]) == 0
    assert_same_weights(weights(full), weights(part))
    assert all(v.dtype == torch.float64 for v in weights(part).values() if v.is_floating_point())
    steps = [int(r["step"]) for r in log_rows(part)]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_hutchinson_trains_on_two_ranks(tmp_path):
    run = tmp_path / "hutch"
    torchrun(2, *TINY, "--method", "hutchinson", "--steps", "6", "--out", str(run))
    rows = log_rows(run)
    assert [int(r["step"]) for r in rows] == [6]   # end of the first epoch (ceil(320 / 63))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert all(torch.isfinite(v).all() for v in weights(run).values())


def test_launch_without_rendezvous_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set; launch with torchrun"):
        init_from_env("cpu")


# Run by torchrun in the test below: the threads of the process after DistContext.close. The
# model is wrapped in DistributedDataParallel *after* the group exists, as the trainer does, and
# left in a reference cycle.
TEARDOWN_SCRIPT = """
import os, sys, torch
from injflow_ext.train.distributed import init_from_env
def threads():
    return len(os.listdir("/proc/self/task"))
ctx = init_from_env("cpu")
with_group = threads()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2).double())
model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
ctx.sum({"loss": 1.0})
ctx.barrier()
cycle = [model]
cycle.append(cycle)  # what a reference cycle keeps of the model, close() must still free
del model, cycle
ctx.close()
print(f"rank {ctx.rank}: threads {with_group} with the group, {threads()} after close")
sys.exit(0 if threads() < with_group else 3)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_close_stops_the_backend_threads(tmp_path):
    """close() must free the gloo backend, so that its worker threads are joined before the
    interpreter shuts down: a worker still releasing its last collective's tensors then
    aborts the process after a run that succeeded (seen as a rare "terminate called without
    an active exception" at the exit of rank 1). The backend stays alive, and its threads with
    it, if anything still refers to the group: torch.distributed.nn imported after
    init_process_group binds it as a default argument, which distributed.py avoids."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("after close") == 2, proc.stdout


FREE_FORM = [a for a in TINY if a not in ("--ambient-layers", "2", "--ambient-hidden", "16,16")]
FREE_FORM += ["--model", "free-form", "--free-form-hidden", "16", "--free-form-blocks", "1"]


def test_free_form_model_on_two_ranks(tmp_path):
    """The exact volume term of a free-form decoder: two ranks train what one does; FIF's
    loss (random probes per sample) trains on two ranks and resumes on one."""
    args = [*FREE_FORM, "--method", "exact", "--steps", "7"]
    torchrun(2, *args, "--out", str(tmp_path / "two"))
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    run = tmp_path / "fif"
    torchrun(2, *FREE_FORM, "--steps", "4", "--out", str(run))
    cfg = json.load(open(run / "config.json"))
    assert cfg["train"]["method"] == "fif" and cfg["model"]["builder"] == "free-form"
    cfg["train"]["steps"] = 6            # what is now a 6-step run
    json.dump(cfg, open(run / "config.json", "w"))
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--no-eval"]) == 0
    assert [int(r["step"]) for r in log_rows(run)][-1] == 6
