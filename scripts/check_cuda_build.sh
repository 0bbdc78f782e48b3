#!/usr/bin/env bash
# Compile and link the CUDA kernels on a machine without a GPU, and import the result.
#
# Needs nvcc (CUDA 13.0) and a virtual environment with the CUDA build of torch
# (DESIGN.md §4). The sources are copied to a scratch folder, so the CPU build in the
# working tree is left alone.
#
#   scripts/check_cuda_build.sh [VENV]      (default VENV: .venv-cuda, created if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${1:-.venv-cuda}
TORCH_CUDA_SPEC=${TORCH_CUDA_SPEC:-torch==2.14.1}

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  echo "check_cuda_build: no nvcc on PATH and no CUDA_HOME: skipping the CUDA compile check"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "check_cuda_build: creating $VENV with $TORCH_CUDA_SPEC (CUDA build)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_CUDA_SPEC" numpy ninja pybind11 \
    'setuptools>=70' wheel
fi
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
"$PY" -c "import torch,sys; sys.exit(0 if torch.version.cuda else 'torch in $VENV is not a CUDA build')"

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
cp -r setup.py pyproject.toml README.md csrc injflow_ext "$SCRATCH"/
rm -f "$SCRATCH"/injflow_ext/_C*.so "$SCRATCH"/injflow_ext/_build_config.py
cd "$SCRATCH"
# Architectures to check: the cluster default of the wheels unless the caller says otherwise.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
if ! FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > build.log 2>&1; then
  grep -E "error|Error|FAILED" build.log | head -60
  tail -20 build.log
  echo "check_cuda_build: FAILED to compile/link the CUDA sources"
  exit 1
fi
grep -E "warning" build.log | grep -v -E "Deprecat|UserWarning" | head -20 || true
"$PY" - <<'PYEOF'
import injflow_ext, torch
info = injflow_ext.build_info()
print("check_cuda_build: built", info)
assert info["cuda_compiled"], "CUDA kernels were not compiled in"
assert torch.ops.injflow.gram_logdet.default is not None
PYEOF
echo "check_cuda_build: OK in $(( $(date +%s) - start )) s (arch list $TORCH_CUDA_ARCH_LIST)"
