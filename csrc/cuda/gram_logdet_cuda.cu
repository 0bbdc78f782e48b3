// CUDA kernels of gram_logdet and its backward: one thread block per batch element.
//
// Forward (one launch): the block streams its J (D×d) through shared memory in row tiles and
// accumulates the upper triangle of G = JᵀJ in the factorisation dtype acc_t; then a Cholesky
// of G + λI (bounded jitter schedule of gram_logdet.h, retried in place: G's upper triangle and
// diagonal survive the factorisation), then logdet = 2 Σ log L_ii. For d <= 64 the matrix stays
// in shared memory; for larger d it lives in the output buffer L (same kernel, slower, correct).
//
// Backward (one launch): G⁻¹ column by column from L (forward then backward substitution, one
// thread per column), then grad_J = 2 · grad[b] · J G⁻¹.
//
// No host synchronisation: every launch is on the current stream, status is returned as a tensor.
// The kernels are in gram_logdet_kernels.cuh (which also compiles for the CPU under the CUDA
// emulation of tests/cuda_emulation/).

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../gram_logdet.h"
#include "gram_logdet_kernels.cuh"

namespace injflow {

int cuda_runtime_version() { return CUDART_VERSION; }

namespace {

using namespace gram_kernels;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_logdet_cuda(
    const at::Tensor& J_in, bool accumulate_float64, double max_relative_jitter) {
  check_gram_logdet_input(J_in);
  TORCH_CHECK(J_in.is_cuda(), "gram_logdet (CUDA kernel): J must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(J_in.device());
  const at::Tensor J = J_in.contiguous();
  const int64_t B = J.size(0), D = J.size(1);
  const int d = static_cast<int>(J.size(2));
  const auto acc = gram_factor_dtype(J, accumulate_float64);
  at::Tensor logdet = at::empty({B}, J.options());
  at::Tensor jitter = at::empty({B}, J.options().dtype(acc));
  at::Tensor status = at::empty({B}, J.options().dtype(at::kInt));
  at::Tensor L = at::empty({B, d, d}, J.options().dtype(acc));
  if (B == 0) return {logdet, jitter, status, L};
  const bool in_shared = gram_launch(d, 8).in_shared;
  at::Tensor diag_ws = in_shared ? at::Tensor() : at::empty({B, d}, J.options().dtype(acc));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "gram_logdet_cuda", [&] {
    auto launch = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const GramLaunch g = gram_launch(d, sizeof(acc_t));
      gram_logdet_kernel<scalar_t, acc_t><<<B, kThreads, g.forward_smem, stream>>>(
          J.const_data_ptr<scalar_t>(), D, d, static_cast<acc_t>(max_relative_jitter),
          logdet.mutable_data_ptr<scalar_t>(), jitter.mutable_data_ptr<acc_t>(),
          status.mutable_data_ptr<int32_t>(), L.mutable_data_ptr<acc_t>(),
          in_shared ? nullptr : diag_ws.mutable_data_ptr<acc_t>(), in_shared, g.tile_elems);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (acc == at::kDouble) launch(double(0)); else launch(float(0));
  });
  return {logdet, jitter, status, L};
}

at::Tensor gram_logdet_backward_cuda(const at::Tensor& grad_in, const at::Tensor& J_in,
                                     const at::Tensor& L_in, const at::Tensor& status_in) {
  check_gram_logdet_backward_input(grad_in, J_in, L_in, status_in);
  TORCH_CHECK(J_in.is_cuda(), "gram_logdet_backward (CUDA kernel): J must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(J_in.device());
  const at::Tensor J = J_in.contiguous();
  const at::Tensor grad = grad_in.to(J.scalar_type()).contiguous();
  const at::Tensor L = L_in.contiguous();
  const at::Tensor status = status_in.contiguous();
  const int64_t B = J.size(0), D = J.size(1);
  const int d = static_cast<int>(J.size(2));
  at::Tensor out = at::empty_like(J);
  if (B == 0) return out;
  const bool in_shared = gram_launch(d, 8).in_shared;
  at::Tensor ws = in_shared ? at::Tensor() : at::empty({B, d, d}, L.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "gram_logdet_backward_cuda", [&] {
    auto launch = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      gram_logdet_backward_kernel<scalar_t, acc_t><<<B, kThreads,
                                                     gram_launch(d, sizeof(acc_t)).backward_smem,
                                                     stream>>>(
          grad.const_data_ptr<scalar_t>(), J.const_data_ptr<scalar_t>(),
          L.const_data_ptr<acc_t>(), status.const_data_ptr<int32_t>(), D, d,
          out.mutable_data_ptr<scalar_t>(),
          in_shared ? nullptr : ws.mutable_data_ptr<acc_t>(), in_shared);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (L.scalar_type() == at::kDouble) launch(double(0)); else launch(float(0));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CUDA, m) {
  m.impl("gram_logdet", &gram_logdet_cuda);
  m.impl("gram_logdet_backward", &gram_logdet_backward_cuda);
}

}  // namespace injflow
