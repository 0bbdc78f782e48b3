#!/usr/bin/env bash
# Create (once) the project's virtual environment .venv, install the dependencies, and build
# the extension against the installed torch. Sourced by scripts/main.sh and scripts/test.sh;
# safe to run again: it rebuilds only when csrc/, setup.py or pyproject.toml changed.
#
# Environment: TORCH_SPEC   torch requirement for a new .venv (default torch==2.13.0, the CPU
#                           build; use e.g. "torch==2.11.0" with a CUDA index for GPUs)
#              PYTHON       interpreter for a new .venv (default python3)
#              FORCE_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS   passed to the build (setup.py)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if [ ! -x "$PY" ]; then
  echo "bootstrap: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: installing ${TORCH_SPEC:-torch==2.13.0}"
  "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ ! -f "$VENV/.deps-installed" ] || [ "$ROOT/requirements-dev.txt" -nt "$VENV/.deps-installed" ]; then
  echo "bootstrap: installing build and test dependencies"
  "${PIP[@]}" -r "$ROOT/requirements-dev.txt"
  touch "$VENV/.deps-installed"
fi

stamp() {
  (cd "$ROOT" && cat setup.py pyproject.toml $(find csrc -type f | sort) \
    && "$PY" -c "import torch; print(torch.__version__)" \
    && { env | grep -E '^(FORCE_CUDA|FORCE_CPU|TORCH_CUDA_ARCH_LIST)=' | sort || true; }) | sha256sum | cut -c1-16
}
want=$(stamp)
have=$(cat "$VENV/.injflow-build" 2>/dev/null || true)
if [ "$want" != "$have" ] || ! (cd "$ROOT" && "$PY" -c "import injflow_ext" >/dev/null 2>&1); then
  echo "bootstrap: building injflow_ext (pip install --no-build-isolation -e .)"
  start=$(date +%s)
  (cd "$ROOT" && MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --disable-pip-version-check \
     --no-build-isolation --no-deps -e .)
  echo "bootstrap: built in $(( $(date +%s) - start )) s"
  echo "$want" > "$VENV/.injflow-build"
fi
