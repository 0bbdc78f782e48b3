"""The runnable examples of examples/ (the README points to them first) run at tiny sizes."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


def test_there_are_the_three_examples():
    assert EXAMPLES == ["free_form_own_data.py", "rnf_from_python.py",
                        "volume_term_own_decoder.py"]


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs_and_is_short(example, tmp_path):
    path = os.path.join(ROOT, "examples", example)
    assert sum(1 for _ in open(path)) < 100
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, path, "--steps", "5"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step     0" in proc.stdout
    assert not list(tmp_path.iterdir())       # nothing written where it was run
