#!/usr/bin/env bash
# Install a built wheel into a fresh virtual environment, without compiling anything, and check
# that it works: import, build_info, gram_logdet against torch, a tiny training run via the CLI,
# and the installed benchmark (injflow bench --quick).
#
#   bash scripts/smoke_wheel.sh dist/injflow_ext-0.1.0+pt213cpu-*.whl
#
# Environment: PYTHON   interpreter for the fresh environment (default python3)
set -euo pipefail
[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: smoke_wheel.sh WHEEL_FILE" >&2; exit 2; }
WHEEL=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"${PYTHON:-python3}" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
# --only-binary: nothing may be built from source; no compiler on PATH either.
mkdir -p "$WORK/nocompiler"
for c in cc gcc g++ c++ nvcc; do printf '#!/bin/sh\necho "smoke_wheel: $0 called" >&2; exit 1\n' \
  > "$WORK/nocompiler/$c"; chmod +x "$WORK/nocompiler/$c"; done
echo "smoke_wheel: installing $(basename "$WHEEL") into a fresh environment"
PATH="$WORK/nocompiler:$PATH" CC=false CXX=false "$PY" -m pip install -q \
  --disable-pip-version-check --only-binary=:all: "$WHEEL[cli]"
cd "$WORK"   # away from any checkout, so the installed package is the one imported
PATH="$WORK/nocompiler:$PATH" "$PY" - <<'PY'
import os, sys
import torch
import injflow_ext
assert injflow_ext.__file__.startswith(sys.prefix), injflow_ext.__file__
info = injflow_ext.build_info()
print("smoke_wheel: build_info", info)
assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
assert "+pt" in info["version"], info
J = torch.randn(16, 7, 3, dtype=torch.float64, requires_grad=True)
got = injflow_ext.gram_logdet(J)
ref = torch.logdet(J.mT @ J)
assert torch.allclose(got, ref, atol=1e-10), (got - ref).abs().max()
got.sum().backward()
assert torch.allclose(J.grad, 2 * J @ torch.linalg.inv(J.mT @ J), atol=1e-8)
print("smoke_wheel: gram_logdet matches torch.logdet(JᵀJ) and its gradient")
PY
"$WORK/venv/bin/injflow" train --data von-mises --latent-dim 1 --steps 3 --batch-size 64 \
  --n-samples 500 --ambient-layers 2 --ambient-hidden 16 --prior-layers 1 --prior-hidden 16 \
  --out "$WORK/run" --quiet --no-eval
test -f "$WORK/run/checkpoint.pt" && test -f "$WORK/run/model.pt"
# a cluster user with only the wheel can measure their machine
"$WORK/venv/bin/injflow" bench --device cpu --quick --budget 0.02 --json "$WORK/bench.json" \
  > "$WORK/bench.log"
test -s "$WORK/bench.json" || { cat "$WORK/bench.log"; echo "smoke_wheel: injflow bench failed"; exit 1; }
echo "smoke_wheel: OK ($(basename "$WHEEL"))"
