// CPU tangent_mlp: the per-layer path (one tangent_linear per layer). On the CPU the step is
// GEMM-bound (MKL near peak) and the per-layer kernels already fuse the elementwise work
// (bench/RESULTS.md, CPU), so a whole-network kernel has little to gain there.

#include <torch/library.h>

#include "../tangent_mlp.h"
#include "tangent_ops_cpu.h"

namespace injflow {
namespace {

MlpForwardResult tangent_mlp_cpu(const at::Tensor& XV, at::TensorList weights,
                                 at::TensorList biases, int64_t act, double slope,
                                 int64_t last_act, int64_t path, at::IntArrayRef fused) {
  check_tangent_mlp_args(XV, weights, biases, act, last_act, path, fused);
  TORCH_CHECK(path != kMlpFused, "tangent_mlp: the fused path (path=\"fused\", 2) runs on CUDA "
              "only; use path=\"auto\" (0) or \"per_layer\" (1) on the CPU");
  return tangent_mlp_per_layer(XV, weights, biases, act, slope, last_act, &tangent_linear_cpu);
}

MlpBackwardResult tangent_mlp_backward_cpu(const at::Tensor& gY, const at::Tensor& XV,
                                           at::TensorList weights, const at::Tensor& Y,
                                           at::TensorList Z, at::TensorList A,
                                           at::TensorList dA, int64_t act, double slope,
                                           int64_t last_act, int64_t path,
                                           at::IntArrayRef fused, bool input_only) {
  check_tangent_mlp_backward_args(gY, XV, weights, Y, Z, A, dA, act, last_act, path, fused);
  return tangent_mlp_backward_per_layer(gY, XV, weights, Y, Z, A, dA, act, slope, last_act,
                                        input_only, &tangent_linear_backward_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CPU, m) {
  m.impl("tangent_mlp", &tangent_mlp_cpu);
  m.impl("tangent_mlp_backward", &tangent_mlp_backward_cpu);
}

}  // namespace injflow
