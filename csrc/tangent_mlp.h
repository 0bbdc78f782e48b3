// tangent_mlp: a whole fully connected network (the couplings' conditioner) on a primal row and
// K tangent rows, stacked (B, R, n) with R = 1 + K and row 0 the primal:
//   A_0 = XV, Z_l = A_{l-1} W_lᵀ (+ b_l on row 0), A_l[:,0] = σ_l(Z_l[:,0]),
//   A_l[:,k] = σ_l'(Z_l[:,0]) ⊙ Z_l[:,k],   Y = A_L,
// σ_l = `activation` for the hidden layers l < L and `last_activation` for the last one.
// Saved for the backward: Z_l (B, R, n_l) for every layer, A_l for the hidden layers, and
// dA_l = σ_l'(Z_l[:,0]) (B, n_l) for every layer.
//
// This header holds the argument checks and the per-layer path (one tangent_linear per layer,
// each device's own kernels); csrc/cuda/tangent_mlp_cuda.cu adds the fused CUDA path.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "activations.h"

namespace injflow {

// `path` argument of tangent_mlp: auto (today the per-layer ops on every device), the
// per-layer ops, or the fused CUDA kernels (an error where they cannot take the shapes).
enum MlpPath : int64_t { kMlpAuto = 0, kMlpPerLayer = 1, kMlpFused = 2, kMlpPathCount = 3 };

// `fused` argument of tangent_mlp: the fused kernels' choices, arguments of the op (so that
// fake kernels, torch.compile and CUDA-graph capture see them), each 0 = automatic:
//   math: auto (float32 follows torch's TF32 switch for matmuls, as cuBLAS does), fma, tf32
//     (TF32 mma.sync, float32 accumulation), tf32x3 (3xTF32: float32-level accuracy); float64
//     and devices below sm_80 always use FMAs;
//   pipeline: registers (the next weight chunk's loads in registers) or async (cp.async into
//     three shared-memory buffers, sm_80+; the same results);
//   weight_grads: cublas (one GEMM per layer) or kernel (one split-K kernel for all layers,
//     in the fused kernels' arithmetic);
//   samples_per_block: pins the samples a block takes (0: planned from the device);
//   weight_grad_rows: pins the weight-gradient kernel's rows per split (0: planned).
enum FusedMath : int64_t {
  kFusedMathAuto = 0, kFusedMathFma = 1, kFusedMathTf32 = 2, kFusedMathTf32x3 = 3,
  kFusedMathCount = 4
};
enum FusedPipe : int64_t { kFusedPipeRegisters = 0, kFusedPipeAsync = 1, kFusedPipeCount = 2 };
enum FusedWgrad : int64_t { kFusedWgradCublas = 0, kFusedWgradKernel = 1, kFusedWgradCount = 2 };

struct FusedMlpOptions {
  int64_t math = kFusedMathAuto;
  int64_t pipeline = kFusedPipeRegisters;
  int64_t weight_grads = kFusedWgradCublas;
  int64_t samples_per_block = 0;
  int64_t weight_grad_rows = 0;
};

// `fused` ([] or the five codes above) as options, or an error naming the values each takes.
inline FusedMlpOptions fused_mlp_options(at::IntArrayRef fused, const char* op) {
  FusedMlpOptions o;
  if (fused.empty()) return o;
  TORCH_CHECK(fused.size() == 5, op, ": fused must be [] or [math, pipeline, weight_grads, "
              "samples_per_block, weight_grad_rows], got ", fused.size(), " values");
  o.math = fused[0];
  o.pipeline = fused[1];
  o.weight_grads = fused[2];
  o.samples_per_block = fused[3];
  o.weight_grad_rows = fused[4];
  TORCH_CHECK(o.math >= 0 && o.math < kFusedMathCount, op, ": fused math must be 0 (auto), "
              "1 (fma), 2 (tf32) or 3 (tf32x3), got ", o.math);
  TORCH_CHECK(o.pipeline >= 0 && o.pipeline < kFusedPipeCount, op, ": fused pipeline must be "
              "0 (registers) or 1 (async), got ", o.pipeline);
  TORCH_CHECK(o.weight_grads >= 0 && o.weight_grads < kFusedWgradCount, op, ": fused "
              "weight_grads must be 0 (cublas) or 1 (kernel), got ", o.weight_grads);
  TORCH_CHECK(o.samples_per_block >= 0 && o.weight_grad_rows >= 0, op, ": fused "
              "samples_per_block and weight_grad_rows must be >= 0 (0: planned), got ",
              o.samples_per_block, " and ", o.weight_grad_rows);
  return o;
}

using MlpForwardResult =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;
using MlpBackwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// One device's tangent_linear forward and backward (csrc/cpu, csrc/cuda).
using TangentLinearFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& XV, const at::Tensor& W, const c10::optional<at::Tensor>& b, int64_t act,
    double slope);
using TangentLinearBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& gY, const at::Tensor& XV, const at::Tensor& W, const at::Tensor& Z,
    const at::Tensor& Y, const at::Tensor& dA, int64_t act, double slope, bool input_only);

inline int64_t mlp_layer_activation(size_t l, size_t L, int64_t act, int64_t last_act) {
  return l + 1 < L ? act : last_act;
}

// Shapes, dtypes and devices of the layers; `biases` may be empty (the backward has none).
inline void check_mlp_layers(const char* op, const at::Tensor& XV, at::TensorList weights,
                             at::TensorList biases) {
  TORCH_CHECK(XV.dim() == 3 && XV.size(1) >= 1,
              op, ": XV must be (B, 1+K, n_in), got ", XV.sizes());
  TORCH_CHECK(XV.scalar_type() == at::kFloat || XV.scalar_type() == at::kDouble,
              op, ": XV must be float32 or float64, got ", XV.scalar_type());
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one layer");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), op, ": biases must hold one "
              "tensor per layer (", weights.size(), "), got ", biases.size());
  int64_t n = XV.size(2);
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& W = weights[l];
    TORCH_CHECK(W.dim() == 2 && W.size(1) == n, op, ": weights[", l, "] must be (n_out, ", n,
                "), got ", W.sizes());
    TORCH_CHECK(W.scalar_type() == XV.scalar_type() && W.device() == XV.device(), op,
                ": weights[", l, "] must be ", XV.scalar_type(), " on ", XV.device(), ", got ",
                W.scalar_type(), " on ", W.device());
    if (!biases.empty()) {
      const at::Tensor& b = biases[l];
      TORCH_CHECK(b.dim() == 1 && b.size(0) == W.size(0), op, ": biases[", l, "] must be (",
                  W.size(0), ",), got ", b.sizes());
      TORCH_CHECK(b.scalar_type() == XV.scalar_type() && b.device() == XV.device(), op,
                  ": biases[", l, "] must be ", XV.scalar_type(), " on ", XV.device(),
                  ", got ", b.scalar_type(), " on ", b.device());
    }
    n = W.size(0);
  }
}

inline void check_tangent_mlp_args(const at::Tensor& XV, at::TensorList weights,
                                   at::TensorList biases, int64_t act, int64_t last_act,
                                   int64_t path, at::IntArrayRef fused) {
  fused_mlp_options(fused, "tangent_mlp");
  TORCH_CHECK(biases.size() == weights.size(), "tangent_mlp: biases must hold one tensor per "
              "layer (", weights.size(), "), got ", biases.size());
  check_mlp_layers("tangent_mlp", XV, weights, biases);
  TORCH_CHECK(act >= 0 && act < kActCount, "tangent_mlp: unknown activation code ", act);
  TORCH_CHECK(last_act >= 0 && last_act < kActCount,
              "tangent_mlp: unknown last_activation code ", last_act);
  TORCH_CHECK(path >= 0 && path < kMlpPathCount, "tangent_mlp: path must be 0 (auto), "
              "1 (per layer) or 2 (fused), got ", path);
}

// The backward's saved tensors must be those of the forward: Z and dA one per layer, A one per
// hidden layer, shapes as the weights say.
inline void check_tangent_mlp_backward_args(const at::Tensor& gY, const at::Tensor& XV,
                                            at::TensorList weights, const at::Tensor& Y,
                                            at::TensorList Z, at::TensorList A,
                                            at::TensorList dA, int64_t act, int64_t last_act,
                                            int64_t path, at::IntArrayRef fused) {
  fused_mlp_options(fused, "tangent_mlp_backward");
  check_mlp_layers("tangent_mlp_backward", XV, weights, {});
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1 && Z.size() == L && dA.size() == L && A.size() == L - 1,
              "tangent_mlp_backward: expected ", L, " Z, ", L, " dA and ", L == 0 ? 0 : L - 1,
              " A tensors (one per layer, one per hidden layer), got ", Z.size(), ", ",
              dA.size(), " and ", A.size());
  const int64_t B = XV.size(0), R = XV.size(1);
  for (size_t l = 0; l < L; ++l) {
    const int64_t n = weights[l].size(0);
    TORCH_CHECK(Z[l].sizes() == at::IntArrayRef({B, R, n}) && dA[l].sizes() ==
                    at::IntArrayRef({B, n}) && (l + 1 == L || A[l].sizes() == Z[l].sizes()),
                "tangent_mlp_backward: the saved tensors of layer ", l, " must be Z and A (", B,
                ", ", R, ", ", n, ") and dA (", B, ", ", n, "), got ", Z[l].sizes(), ", ",
                l + 1 == L ? Y.sizes() : A[l].sizes(), " and ", dA[l].sizes());
  }
  const int64_t n_out = weights[L - 1].size(0);
  TORCH_CHECK(gY.sizes() == at::IntArrayRef({B, R, n_out}) && Y.sizes() == gY.sizes(),
              "tangent_mlp_backward: grad_Y and Y must be (", B, ", ", R, ", ", n_out,
              "), got ", gY.sizes(), " and ", Y.sizes());
  TORCH_CHECK(act >= 0 && act < kActCount && last_act >= 0 && last_act < kActCount,
              "tangent_mlp_backward: unknown activation codes ", act, ", ", last_act);
  TORCH_CHECK(path >= 0 && path < kMlpPathCount, "tangent_mlp_backward: path must be 0, 1 "
              "or 2, got ", path);
}

// The per-layer path: tangent_linear for each layer with the device's kernels.
inline MlpForwardResult tangent_mlp_per_layer(const at::Tensor& XV, at::TensorList weights,
                                              at::TensorList biases, int64_t act, double slope,
                                              int64_t last_act, TangentLinearFn linear) {
  const size_t L = weights.size();
  std::vector<at::Tensor> Z, A, dA;
  at::Tensor H = XV;
  for (size_t l = 0; l < L; ++l) {
    auto out = linear(H, weights[l], biases[l], mlp_layer_activation(l, L, act, last_act), slope);
    H = std::get<0>(out);
    Z.push_back(std::get<1>(out));
    dA.push_back(std::get<2>(out));
    if (l + 1 < L) A.push_back(H);
  }
  return {H, Z, A, dA};
}

inline MlpBackwardResult tangent_mlp_backward_per_layer(
    const at::Tensor& gY, const at::Tensor& XV, at::TensorList weights, const at::Tensor& Y,
    at::TensorList Z, at::TensorList A, at::TensorList dA, int64_t act, double slope,
    int64_t last_act, bool input_only, TangentLinearBackwardFn linear_backward) {
  const size_t L = weights.size();
  std::vector<at::Tensor> gW(L), gb(L);
  at::Tensor g = gY;
  for (size_t i = L; i-- > 0;) {
    const at::Tensor& in = i == 0 ? XV : A[i - 1];
    const at::Tensor& out = i + 1 == L ? Y : A[i];
    auto r = linear_backward(g, in, weights[i], Z[i], out, dA[i],
                             mlp_layer_activation(i, L, act, last_act), slope, input_only);
    g = std::get<0>(r);
    gW[i] = std::get<1>(r);
    gb[i] = std::get<2>(r);
  }
  return {g, gW, gb};
}

}  // namespace injflow
