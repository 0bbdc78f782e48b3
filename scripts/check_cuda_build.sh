#!/usr/bin/env bash
# Compile and link the CUDA kernels on a machine without a GPU, as a cluster wheel
# (scripts/build_wheel.sh with FORCE_CUDA=1), install that wheel and import it.
#
# Needs nvcc (CUDA 13.0) and a virtual environment with the CUDA build of torch
# (docs/design.md §4). The sources are copied to a scratch folder, so the CPU build in the
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
mkdir -p "$SCRATCH/src"
cp -r setup.py pyproject.toml README.md csrc injflow_ext scripts "$SCRATCH/src"/
rm -f "$SCRATCH"/src/injflow_ext/_C*.so "$SCRATCH"/src/injflow_ext/_build_config.py
cd "$SCRATCH"
# Architectures to check: the cluster default of the wheels unless the caller says otherwise.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
if ! FORCE_CUDA=1 PYTHON="$PY" bash src/scripts/build_wheel.sh --out "$SCRATCH/dist" \
     > build.log 2>&1; then
  grep -E "error|Error|FAILED" build.log | head -60
  tail -20 build.log
  echo "check_cuda_build: FAILED to compile/link the CUDA sources"
  exit 1
fi
grep -E "warning" build.log | grep -v -E "Deprecat|UserWarning" | head -20 || true
WHEEL=$(ls "$SCRATCH"/dist/injflow_ext-*.whl)
echo "check_cuda_build: wheel $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$WHEEL"
"$PY" - <<'PYEOF'
import injflow_ext, torch, zipfile, glob
info = injflow_ext.build_info()
print("check_cuda_build: built", info)
assert info["cuda_compiled"], "CUDA kernels were not compiled in"
assert "cu" in info["version"], info
assert torch.ops.injflow.gram_logdet.default is not None
wheel = glob.glob("dist/injflow_ext-*.whl")[0]
grafted = [n for n in zipfile.ZipFile(wheel).namelist() if ".libs/" in n]
print("check_cuda_build: libraries grafted into the wheel:", grafted)
assert not any(k in n for n in grafted for k in ("libtorch", "libc10", "libcudart", "libcublas")), \
    "torch/CUDA libraries must not be bundled"
PYEOF
"$PY" -m pip uninstall -q -y injflow_ext
echo "check_cuda_build: OK in $(( $(date +%s) - start )) s (arch list $TORCH_CUDA_ARCH_LIST)"
