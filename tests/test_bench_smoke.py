"""The benchmark scripts run (tiny sizes, no timing asserts): they check that every exact method
gives the same loss and gradients before timing, so a broken reference or op fails here."""

import json
import os
import subprocess
import sys

import pytest
from conftest import _cuda_usable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, tmp_path, *args):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--quick",
                           "--json", str(out), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.load(open(out))


def test_step_benchmark_smoke(tmp_path):
    res = run("step.py", tmp_path, "--budget", "0.05")
    # a fully connected model and a convolutional image model (the plain CNN reference)
    assert [r["config"] for r in res["rows"]] == ["TINY", "TINY_CONV"]
    for row in res["rows"]:
        assert row["exact_agreement"] < 1e-7
        assert row["surrogate_agreement"] < 1e-7      # ours_surrogate = ref_surrogate, same probes
        for m in ("ours_exact", "ours_hutchinson", "ours_surrogate", "ref_one_tangent",
                  "ref_batched", "ref_jacfwd", "ref_hutchinson_cg", "ref_surrogate"):
            assert row[f"{m}_ms"] > 0


def test_op_benchmarks_smoke(tmp_path):
    for script in ("cg.py", "tangent_ops.py"):
        res = run(script, tmp_path)
        assert res["cases"] and all(c["ours_ms"] > 0 for c in res["cases"])
    for c in res["cases"]:  # tangent_ops: the paired speed-up inside its interval
        assert c["rounds"] >= 9 and c["paired_ci_low"] <= c["paired_speedup"] <= c["paired_ci_high"]


def test_paired_ratio_interval_order_statistics():
    """The median of the per-round ratios, and binomial ranks for the 95 % interval: with 9
    rounds the 2nd and 8th smallest ratios (coverage 1 − 2·10/512 ≈ 96 %), with 20 the 6th and
    15th, with 5 (too few for 95 %) the whole range."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from common import paired_ratio_interval
    ours = [1.0] * 20
    assert paired_ratio_interval(list(range(1, 10)), ours[:9]) == (5.0, 2.0, 8.0)
    assert paired_ratio_interval(list(range(1, 21)), ours) == (10.5, 6.0, 15.0)
    assert paired_ratio_interval([3, 1, 2, 5, 4], [1, 1, 1, 1, 1]) == (3, 1, 5)
    assert paired_ratio_interval([2.0, 4.0], [1.0, 2.0]) == (2.0, 2.0, 2.0)


def test_mlp_benchmark_sweeps_samples_per_block_up_to_full_tiles():
    """--sweep: 1..8 samples per block and the most that fill 32, 64 and 128 rows, never more
    than 128 rows (the plan's limit)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from tangent_mlp import samples_per_block_sweep
    assert samples_per_block_sweep(1) == [1, 2, 3, 4, 5, 6, 7, 8, 32, 64, 128]  # encode pass
    assert samples_per_block_sweep(3) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 21, 42]   # POWER
    assert samples_per_block_sweep(22) == [1, 2, 3, 4, 5]                       # MINIBOONE
    assert samples_per_block_sweep(128) == [1]
    assert all(s * r <= 128 for r in range(1, 129) for s in samples_per_block_sweep(r))


def test_profile_step_smoke(tmp_path):
    res = run("profile_step.py", tmp_path, "--methods", "ours_exact,ref_batched", "--mlp-path",
              "per_layer")
    assert res["mlp_path"] == "per_layer" and res["tf32"] is False
    assert [(r["config"], r["method"]) for r in res["rows"]] == [
        ("TINY", "ours_exact"), ("TINY", "ref_batched"),
        ("TINY_CONV", "ours_exact"), ("TINY_CONV", "ref_batched")]
    for r in res["rows"]:
        assert r["wall_ms"] > 0 and r["launches_per_step"] > 0 and r["top"]


def test_installed_injflow_bench_runs_and_writes_json(tmp_path, capsys):
    """``injflow bench`` needs no checkout: its code and the plain references are in the
    package. It checks agreement before timing and reports ours against plain PyTorch."""
    from injflow_ext.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--quick", "--budget", "0.02",
                 "--json", str(out)]) == 0
    res = json.load(open(out))
    assert {r["op"] for r in res["ops"]} == {"gram_logdet", "tangent_mlp"}
    for r in res["ops"] + res["step"]:
        assert r["ours_ms"] > 0 and r["plain_ms"] > 0
    assert res["step"][0]["grad_rel_err"] < 1e-3
    assert "training step" in capsys.readouterr().out


def test_injflow_bench_conditioner_path_and_precision(tmp_path, capsys):
    """``--mlp-path`` and ``--precision`` reach ours (and the JSON); the fused path on the CPU
    is refused with what to do instead."""
    from injflow_ext.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--quick", "--budget", "0.02", "--mlp-path",
                 "per_layer", "--precision", "float32", "--json", str(out)]) == 0
    res = json.load(open(out))
    assert res["mlp_path"] == "per_layer" and res["precision"] == "float32"
    assert res["tf32"] is False  # TF32 is a CUDA setting
    assert "conditioners per_layer" in capsys.readouterr().out
    assert res["fused"] is None
    assert main(["bench", "--device", "cpu", "--quick", "--mlp-path", "fused"]) == 2
    assert "mlp_path='fused' runs the CUDA kernels" in capsys.readouterr().err
    # the fused kernels' options (weight pipeline, weight gradients) are for the fused path,
    # and from Python only (the experiment knobs live in bench/)
    from injflow_ext.benchmarks import run_bench
    from injflow_ext.ops import FusedMlp
    with pytest.raises(ValueError, match="fused options are for the fused kernels; they need "
                       "mlp_path='fused', got 'auto'"):
        run_bench("cpu", quick=True, fused=FusedMlp(pipeline="async"), verbose=False)


@pytest.mark.skipif(not _cuda_usable(), reason="needs a GPU and an extension built with CUDA kernels")
@pytest.mark.parametrize("options", [{}, dict(mlp_path="fused", precision="tf32",
                                              fused=dict(pipeline="async", weight_grads="kernel"))])
def test_cuda_injflow_bench_captures_and_times(tmp_path, options):
    """``injflow bench --device cuda`` (what a cluster user runs): ours and plain PyTorch agree,
    and both are timed eagerly and (the MLP and the step) as CUDA-graph replays, with the
    default conditioners and with the fused kernels in every opt-in mode."""
    from injflow_ext.benchmarks import run_bench
    from injflow_ext.ops import FusedMlp
    out = tmp_path / "bench.json"
    fused = FusedMlp(**options.pop("fused")) if "fused" in options else None
    run_bench("cuda", quick=True, budget=0.02, json_path=str(out), fused=fused, **options)
    res = json.load(open(out))
    for r in res["ops"] + res["step"]:
        graphs = r.get("op") != "gram_logdet"  # gram_logdet is timed eagerly only
        for key in ("ours_ms", "plain_ms") + (("ours_graph_ms", "plain_graph_ms") if graphs
                                              else ()):
            assert r[key] > 0, (r.get("op", r.get("config")), key)


def test_free_form_benchmark_smoke(tmp_path):
    res = run("free_form.py", tmp_path, "--budget", "0.02")
    cases = [c["case"] for c in res["cases"]]
    assert sum(c.startswith("logdet_jtj") for c in cases) == 4
    assert sum(c.startswith("FIF step") for c in cases) == 2
    for c in res["cases"]:     # the script checked the agreement in float64 before timing
        assert c["ours_ms"] > 0 and c["baseline_ms"] > 0 and c["float64_agreement"] < 1e-6
