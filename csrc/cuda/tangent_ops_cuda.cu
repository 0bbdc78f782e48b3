// CUDA kernels of the tangent ops: the fused elementwise parts (the GEMMs are shared cuBLAS
// calls, see tangent_ops.h). One thread per (batch row, feature) handles the primal and all K
// tangents of that feature, so the activation and its derivatives are evaluated once. The
// kernels are in tangent_ops_kernels.cuh (which also compiles for the CPU under the CUDA
// emulation of tests/cuda_emulation/).

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../tangent_ops.h"
#include "tangent_ops_cuda.h"
#include "tangent_ops_kernels.cuh"

namespace injflow {
namespace {

using namespace tangent_kernels;

at::Tensor linear_epilogue_cuda(at::Tensor& Z, const c10::optional<at::Tensor>& b, int64_t act,
                                double slope, at::Tensor& Y) {
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  at::Tensor dA = at::empty({B, n}, Z.options());
  const at::Tensor bias = b.has_value() ? b->contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tangent_linear_cuda", [&] {
    linear_epilogue_kernel<scalar_t><<<blocks_for(B * n), kThreads, 0, stream>>>(
        Z.mutable_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        B, R, n, act, static_cast<scalar_t>(slope), Y.mutable_data_ptr<scalar_t>(),
        dA.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dA;
}

// The GPU recomputes σ' and σ'' from Z in the kernel (cheaper than reading Y and dA).
void linear_grad_preact_cuda(const at::Tensor& gY, const at::Tensor& Z, const at::Tensor& /*Y*/,
                             const at::Tensor& /*dA*/, int64_t act, double slope,
                             at::Tensor& GZ, at::Tensor& gb) {
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (!at::globalContext().deterministicAlgorithms() && B > 0 && n > 0) {
    gb = at::empty({n}, Z.options());
    AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tangent_linear_backward_cuda", [&] {
      C10_CUDA_CHECK(cudaMemsetAsync(gb.mutable_data_ptr<scalar_t>(), 0, n * sizeof(scalar_t),
                                     stream));
      const dim3 block(32, kBiasRows);
      const int64_t row_blocks = std::min<int64_t>((B + kBiasRows - 1) / kBiasRows, 1024);
      const dim3 grid(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>(row_blocks));
      linear_grad_preact_bias_kernel<scalar_t><<<grid, block, 0, stream>>>(
          gY.const_data_ptr<scalar_t>(), Z.const_data_ptr<scalar_t>(), B, R, n, act,
          static_cast<scalar_t>(slope), GZ.mutable_data_ptr<scalar_t>(),
          gb.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tangent_linear_backward_cuda", [&] {
    linear_grad_preact_kernel<scalar_t><<<blocks_for(B * n), kThreads, 0, stream>>>(
        gY.const_data_ptr<scalar_t>(), Z.const_data_ptr<scalar_t>(), B, R, n, act,
        static_cast<scalar_t>(slope), GZ.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

// Declared in cuda/tangent_ops_cuda.h (tangent_mlp's per-layer path composes them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_cuda(
    const at::Tensor& XV, const at::Tensor& W, const c10::optional<at::Tensor>& b, int64_t act,
    double slope) {
  const c10::cuda::CUDAGuard guard(XV.device());
  return tangent_linear_composite(XV, W, b, act, slope, &linear_epilogue_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_backward_cuda(
    const at::Tensor& gY, const at::Tensor& XV, const at::Tensor& W, const at::Tensor& Z,
    const at::Tensor& Y, const at::Tensor& dA, int64_t act, double slope, bool input_only) {
  const c10::cuda::CUDAGuard guard(XV.device());
  return tangent_linear_backward_composite(gY, XV, W, Z, Y, dA, act, slope, input_only,
                                           &linear_grad_preact_cuda);
}

namespace {

std::tuple<at::Tensor, at::Tensor> tangent_coupling_cuda(const at::Tensor& XV_in,
                                                         const at::Tensor& ST_in, int64_t scale) {
  check_tangent_coupling_args(XV_in, ST_in, scale);
  const c10::cuda::CUDAGuard guard(XV_in.device());
  const at::Tensor XV = XV_in.contiguous(), ST = ST_in.contiguous();
  const int64_t B = XV.size(0), R = XV.size(1), m = XV.size(2);
  at::Tensor Y = at::empty_like(XV);
  at::Tensor lad = at::empty({B}, XV.options());
  if (B == 0) return {Y, lad};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_coupling_cuda", [&] {
    coupling_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        XV.const_data_ptr<scalar_t>(), ST.const_data_ptr<scalar_t>(), R, m, scale,
        Y.mutable_data_ptr<scalar_t>(), lad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {Y, lad};
}

std::tuple<at::Tensor, at::Tensor> tangent_coupling_backward_cuda(
    const at::Tensor& gY_in, const at::Tensor& gl_in, const at::Tensor& XV_in,
    const at::Tensor& ST_in, int64_t scale) {
  check_tangent_coupling_args(XV_in, ST_in, scale);
  TORCH_CHECK(gY_in.sizes() == XV_in.sizes() && gl_in.dim() == 1 && gl_in.size(0) == XV_in.size(0),
              "tangent_coupling_backward: grad shapes must be (B, 1+K, m) and (B,), got ",
              gY_in.sizes(), " and ", gl_in.sizes());
  const c10::cuda::CUDAGuard guard(XV_in.device());
  const at::Tensor XV = XV_in.contiguous(), ST = ST_in.contiguous();
  const at::Tensor gY = gY_in.contiguous(), gl = gl_in.contiguous();
  const int64_t B = XV.size(0), R = XV.size(1), m = XV.size(2);
  at::Tensor gXV = at::empty_like(XV);
  at::Tensor gST = at::empty_like(ST);
  if (B == 0) return {gXV, gST};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_coupling_backward_cuda", [&] {
    coupling_backward_kernel<scalar_t><<<blocks_for(B * m), kThreads, 0, stream>>>(
        XV.const_data_ptr<scalar_t>(), ST.const_data_ptr<scalar_t>(),
        gY.const_data_ptr<scalar_t>(), gl.const_data_ptr<scalar_t>(), B, R, m, scale,
        gXV.mutable_data_ptr<scalar_t>(), gST.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gXV, gST};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_epilogue_cuda(
    const at::Tensor& Z, const c10::optional<at::Tensor>& b, int64_t act, double slope) {
  const c10::cuda::CUDAGuard guard(Z.device());
  return tangent_epilogue_composite(Z, b, act, slope, &linear_epilogue_cuda);
}

std::tuple<at::Tensor, at::Tensor> tangent_epilogue_backward_cuda(
    const at::Tensor& gY, const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& dA,
    int64_t act, double slope) {
  const c10::cuda::CUDAGuard guard(Z.device());
  return tangent_epilogue_backward_composite(gY, Z, Y, dA, act, slope, &linear_grad_preact_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CUDA, m) {
  m.impl("tangent_epilogue", &tangent_epilogue_cuda);
  m.impl("tangent_epilogue_backward", &tangent_epilogue_backward_cuda);
  m.impl("tangent_linear", &tangent_linear_cuda);
  m.impl("tangent_linear_backward", &tangent_linear_backward_cuda);
  m.impl("tangent_coupling", &tangent_coupling_cuda);
  m.impl("tangent_coupling_backward", &tangent_coupling_backward_cuda);
}

}  // namespace injflow
