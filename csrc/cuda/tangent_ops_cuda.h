// The CUDA tangent_linear forward and backward (cuda/tangent_ops_cuda.cu), for the ops that
// compose them (tangent_mlp's per-layer path, cuda/tangent_mlp_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace injflow {

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_cuda(
    const at::Tensor& XV, const at::Tensor& W, const c10::optional<at::Tensor>& b, int64_t act,
    double slope);

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_backward_cuda(
    const at::Tensor& gY, const at::Tensor& XV, const at::Tensor& W, const at::Tensor& Z,
    const at::Tensor& Y, const at::Tensor& dA, int64_t act, double slope, bool input_only);

}  // namespace injflow
