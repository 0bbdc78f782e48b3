"""The benchmark scripts run (tiny sizes, no timing asserts): they check that every exact method
gives the same loss and gradients before timing, so a broken reference or op fails here."""

import json
import os
import subprocess
import sys

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
    row = res["rows"][0]
    assert row["exact_agreement"] < 1e-7
    for m in ("ours_exact", "ours_hutchinson", "ref_one_tangent", "ref_batched", "ref_jacfwd",
              "ref_hutchinson_cg"):
        assert row[f"{m}_ms"] > 0


def test_op_benchmarks_smoke(tmp_path):
    for script in ("cg.py", "tangent_ops.py"):
        res = run(script, tmp_path)
        assert res["cases"] and all(c["ours_ms"] > 0 for c in res["cases"])


def test_profile_step_smoke(tmp_path):
    res = run("profile_step.py", tmp_path, "--methods", "ours_exact,ref_batched")
    assert [r["method"] for r in res["rows"]] == ["ours_exact", "ref_batched"]
    for r in res["rows"]:
        assert r["wall_ms"] > 0 and r["launches_per_step"] > 0 and r["top"]
