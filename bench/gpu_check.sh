#!/usr/bin/env bash
# One prepared GPU check (for a lent GPU machine, see the device tool): build the extension with
# its CUDA kernels against the machine's torch, run the CUDA tests, run every benchmark on the
# GPU, and write everything under $OUT (default bench/results/gpu).
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
start=$(date +%s)
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; echo "gpu_check: BUILD FAILED"; exit 1; }
echo "gpu_check: built in $(( $(date +%s) - start )) s"
python3 -c "import injflow_ext, json; print(json.dumps(injflow_ext.build_info()))" | tee "$OUT/build_info.json"
python3 -m pytest tests -q -x -k "cuda" -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" 2>&1 | tail -15
python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tail -5
python3 bench/run_all.py --device cuda --out "$OUT" 2>&1 | tail -80
echo "gpu_check: done in $(( $(date +%s) - start )) s"
