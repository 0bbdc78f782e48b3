#!/usr/bin/env bash
# One prepared GPU check (for a lent GPU machine, see the device tool): get the extension with
# its CUDA kernels for the machine's torch, run the CUDA tests, run every benchmark and the step
# profile on the GPU, and leave everything under $OUT (default bench/results/gpu):
#   $OUT/gpu_check.log   everything printed
#   $OUT/results.tgz     the benchmarks' JSON, the tests' junit XML, the build log
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#
# The extension: if .devbuild/ holds a prebuilt injflow_ext/_C*.so and _build_config.py (built
# elsewhere against the same torch and the same sources), they are copied in and used
# when they import; otherwise it is built in place with FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST,
# default 9.0; MAX_JOBS, default 16). Prebuilding where a CUDA toolkit and the same torch exist:
#   FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace   (in a copy)
#   mkdir -p .devbuild && cp COPY/injflow_ext/_C*.so COPY/injflow_ext/_build_config.py .devbuild/
#   (find csrc setup.py -type f | sort | xargs cat | sha256sum | cut -c1-16) > .devbuild/csrc.sha
# Each stage has a time limit (seconds, environment): TEST_S, STEP_S, TF32_S, OPS_S, PROFILE_S,
# MLP_S, STEP_PL_S, FREE_FORM_S (stage free_form, not in the default list: bench/free_form.py). STAGES (default "tests mlp step step_per_layer tf32 ops profile") selects and
# orders the stages after the build; TEST_K (default "cuda and not emulated": the CUDA tests,
# not the CPU emulation's, which CI runs) the tests (pytest -k);
# MLP_CASES the MLP benchmark's cases (bench/tangent_mlp.py, with --sweep); STEP_MLP_PATH the
# step benchmark's --mlp-path; step_per_layer reruns the step benchmark with the conditioners'
# per-layer path (STEP_PL_CONFIGS, STEP_PL_METHODS), for the fused MLP's same-run comparison;
# OPS (default "gram_logdet tangent_ops cg") the op benchmarks; STEP_CONFIGS and STEP_METHODS
# (comma-separated, default all) the step benchmark's configurations and methods, TF32_CONFIGS,
# TF32_METHODS and TF32_MLP_PATH those of the TF32 rerun (TF32_MLP_PATH=fused: the fused MLP
# kernels on the tensor cores). MLP_METHODS the MLP benchmark's methods (default: all, the
# TF32 and 3×TF32 ones included). Stage tf32_per_layer (not in the default list) reruns the
# TF32 step with per-layer conditioners (TF32_PL_METHODS, TF32_PL_S), for a same-run comparison
# with a TF32_MLP_PATH=fused tf32 stage; stage tf32_async (not in the default list either) the
# fused TF32 step with the cp.async weight pipeline (--mlp-pipeline async,
# TF32_ASYNC_METHODS); stage wgrad (not in the default list) the float32 step (TF32 with
# WGRAD_TF32=1) with fused conditioners twice, the weight gradients by cuBLAS and by
# --mlp-wgrad kernel (WGRAD_S each, WGRAD_CONFIGS, WGRAD_METHODS). Stage profile takes
# PROFILE_CONFIGS, PROFILE_METHODS, PROFILE_MLP_PATH, PROFILE_MLP_MATH, PROFILE_MLP_PIPELINE,
# PROFILE_MLP_WGRAD and PROFILE_TF32=1 (what it profiles: the conditioners' path, the fused
# kernels' options, TF32 GEMMs). The step and profile JSON is rewritten after every method,
# so a stage stopped by its time limit keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
RES=$(mktemp -d)
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
pack() { tar czf "$OUT/results.tgz.tmp" -C "$RES" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
git rev-parse --short HEAD 2>/dev/null || true

stage "extension"
cuda_ok() { $PY -c "import injflow_ext, sys; sys.exit(0 if injflow_ext.build_info()['cuda_compiled'] else 1)"; }
csrc_hash() { find csrc setup.py -type f | sort | xargs cat | sha256sum | cut -c1-16; }
if ls .devbuild/_C*.so >/dev/null 2>&1; then
  if [ "$(cat .devbuild/csrc.sha 2>/dev/null)" = "$(csrc_hash)" ]; then
    cp .devbuild/_C*.so .devbuild/_build_config.py injflow_ext/
  else
    echo "the prebuilt extension in .devbuild/ is not of these sources; ignoring it"
  fi
fi
if cuda_ok; then
  echo "using the prebuilt extension"
else
  echo "building the extension here"
  rm -f injflow_ext/_C*.so
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py build_ext --inplace > "$RES/build.log" 2>&1
  cuda_ok || { tail -60 "$RES/build.log"; pack; echo "gpu_check: BUILD FAILED"; exit 1; }
fi
$PY -c "import injflow_ext, json; print(json.dumps(injflow_ext.build_info()))" | tee "$RES/build_info.json"

run_tests() {
  local xdist=""
  $PY -c "import xdist" 2>/dev/null && xdist="-n ${TEST_WORKERS:-8}"
  timeout "${TEST_S:-150}" $PY -m pytest tests -q -rfE -k "${TEST_K:-cuda and not emulated}" -p no:cacheprovider $xdist \
    --junitxml="$RES/cuda_tests.xml" 2>&1 | grep -v "^DEBUG" | tail -40
}
# drop the warnings torch.compile prints (deprecations, inductor's algorithm-selection notes)
quiet() { grep -v "UserWarning\|FutureWarning\|_warn_once\|warnings.warn\|^  check($\|tensor meta failed"; }
run_step() {
  timeout "${STEP_S:-200}" $PY bench/step.py --device cuda --budget "${STEP_BUDGET:-1.0}" \
    ${STEP_CONFIGS:+--configs "$STEP_CONFIGS"} ${STEP_METHODS:+--methods "$STEP_METHODS"} \
    ${STEP_MLP_PATH:+--mlp-path "$STEP_MLP_PATH"} \
    --json "$RES/step.json" 2>&1 | quiet
}
run_step_per_layer() {
  timeout "${STEP_PL_S:-120}" $PY bench/step.py --device cuda --budget "${STEP_BUDGET:-1.0}" \
    --mlp-path per_layer ${STEP_PL_CONFIGS:+--configs "$STEP_PL_CONFIGS"} \
    --methods "${STEP_PL_METHODS:-ours_exact_graph,ours_exact_compiled_graph}" \
    --json "$RES/step_per_layer.json" 2>&1 | quiet
}
run_mlp() {
  timeout "${MLP_S:-150}" $PY bench/tangent_mlp.py --device cuda --sweep \
    --budget "${MLP_BUDGET:-0.5}" ${MLP_CASES:+--cases "$MLP_CASES"} \
    ${MLP_METHODS:+--methods "$MLP_METHODS"} \
    --json "$RES/tangent_mlp.json" 2>&1 | quiet
}
run_tf32() {
  timeout "${TF32_S:-90}" $PY bench/step.py --device cuda --tf32 \
    --configs "${TF32_CONFIGS:-MINIBOONE,IMAGE}" ${TF32_METHODS:+--methods "$TF32_METHODS"} \
    ${TF32_MLP_PATH:+--mlp-path "$TF32_MLP_PATH"} \
    --budget "${STEP_BUDGET:-1.0}" --json "$RES/step_tf32.json" 2>&1 | quiet
}
run_tf32_async() {  # the TF32 step with the fused conditioners' cp.async weight pipeline
  timeout "${TF32_S:-90}" $PY bench/step.py --device cuda --tf32 \
    --mlp-path fused --mlp-pipeline async --configs "${TF32_CONFIGS:-MINIBOONE,IMAGE}" \
    --methods "${TF32_ASYNC_METHODS:-ours_exact_graph,ours_exact_compiled_graph}" \
    --budget "${STEP_BUDGET:-1.0}" --json "$RES/step_tf32_async.json" 2>&1 | quiet
}
run_tf32_per_layer() {  # the TF32 step with per-layer conditioners, beside a fused tf32 stage
  timeout "${TF32_PL_S:-90}" $PY bench/step.py --device cuda --tf32 --mlp-path per_layer \
    --configs "${TF32_CONFIGS:-MINIBOONE,IMAGE}" \
    --methods "${TF32_PL_METHODS:-ours_exact_graph,ours_exact_compiled_graph}" \
    --budget "${STEP_BUDGET:-1.0}" --json "$RES/step_tf32_per_layer.json" 2>&1 | quiet
}
run_wgrad() {  # the step with fused conditioners (float32, or TF32 with WGRAD_TF32=1), weight
  # gradients by cuBLAS, then by mlp_weight_grad_kernel (--mlp-wgrad kernel)
  local tf32=${WGRAD_TF32:+--tf32} tag=${WGRAD_TF32:+_tf32}
  for w in cublas kernel; do
    timeout "${WGRAD_S:-70}" $PY bench/step.py --device cuda $tf32 \
      --mlp-path fused --mlp-wgrad $w --configs "${WGRAD_CONFIGS:-MINIBOONE,IMAGE}" \
      --methods "${WGRAD_METHODS:-ours_exact_compiled_graph}" --budget "${STEP_BUDGET:-1.0}" \
      --json "$RES/step_fused_wgrad${tag}_$w.json" 2>&1 | quiet
  done
}
run_ops() {
  for b in ${OPS:-gram_logdet tangent_ops cg}; do
    timeout "${OPS_S:-100}" $PY bench/$b.py --device cuda --json "$RES/$b.json" 2>&1 \
      | grep -v "^  [A-Za-z]*[ =]"
  done
}
run_free_form() {  # your own networks: tangent rules vs torch.func, FIF vs the FFF reference
  timeout "${FREE_FORM_S:-90}" $PY bench/free_form.py --device cuda --budget "${FREE_FORM_BUDGET:-1.0}" \
    --json "$RES/free_form.json" 2>&1 | grep -v "^  [A-Za-z]*[ =]"
}
run_profile() {  # PROFILE_MLP_PATH, PROFILE_MLP_MATH, PROFILE_MLP_PIPELINE, PROFILE_MLP_WGRAD,
  # PROFILE_TF32=1: the conditioners' path, the fused kernels' options and TF32 GEMMs
  timeout "${PROFILE_S:-90}" $PY bench/profile_step.py --device cuda --configs "${PROFILE_CONFIGS:-MINIBOONE}" \
    ${PROFILE_MLP_PATH:+--mlp-path "$PROFILE_MLP_PATH"} ${PROFILE_TF32:+--tf32} \
    ${PROFILE_MLP_MATH:+--mlp-math "$PROFILE_MLP_MATH"} \
    ${PROFILE_MLP_PIPELINE:+--mlp-pipeline "$PROFILE_MLP_PIPELINE"} \
    ${PROFILE_MLP_WGRAD:+--mlp-wgrad "$PROFILE_MLP_WGRAD"} \
    --methods "${PROFILE_METHODS:-ours_exact_compiled_graph,ours_exact_graph,ref_batched_graph,ours_exact,ours_hutchinson,ref_hutchinson_cg}" \
    --steps 3 --top "${PROFILE_TOP:-12}" --json "$RES/profile_step.json" 2>&1 \
    | grep -v "^USDT\|profiler_st" | quiet
}
for s in ${STAGES:-tests mlp step step_per_layer tf32 ops profile}; do
  stage "$s"
  "run_$s"
  pack
done
stage "done"
