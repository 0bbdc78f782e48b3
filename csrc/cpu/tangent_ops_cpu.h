// The CPU tangent_linear forward and backward (cpu/tangent_ops_cpu.cpp), for the ops that compose
// them (cpu/tangent_mlp_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace injflow {

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_cpu(
    const at::Tensor& XV, const at::Tensor& W, const c10::optional<at::Tensor>& b, int64_t act,
    double slope);

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_backward_cpu(
    const at::Tensor& gY, const at::Tensor& XV, const at::Tensor& W, const at::Tensor& Z,
    const at::Tensor& Y, const at::Tensor& dA, int64_t act, double slope, bool input_only);

}  // namespace injflow
