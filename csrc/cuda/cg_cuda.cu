// CUDA kernels of the batched conjugate-gradient solver. With K > 1 right-hand sides: one thread
// per system (n, k), so that with the (N, d, K) layout consecutive threads read consecutive
// addresses; the per-system arithmetic is shared with the CPU kernels (cg.h). With K = 1: one
// warp per system, lanes over the d elements (for a dense A, lane i computes row i of A·p) and
// warp-shuffle reductions for pᵀAp and rᵀr, so that a system's d-long loops and its d×d matvec
// run 32 wide instead of in one thread. Same iteration, same stopping rule; only the order of
// the sums differs. No host synchronisation. The kernels are in cg_kernels.cuh (which also
// compiles for the CPU under the CUDA emulation of tests/cuda_emulation/).

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cg.h"
#include "cg_kernels.cuh"

namespace injflow {
namespace {

using namespace cg_kernels;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cg_init_cuda(
    const at::Tensor& r_in, const at::Tensor& b_in, double rtol, double atol) {
  const c10::cuda::CUDAGuard guard(r_in.device());
  const at::Tensor r = r_in.contiguous(), b = b_in.contiguous();
  check_cg_vectors("cg_init", {&r, &b});
  const int64_t N = r.size(0), d = r.size(1), K = r.size(2);
  at::Tensor p, rs, tol2, status, iterations;
  std::tie(p, rs, tol2, status, iterations) = cg_init_outputs(r);
  const int64_t systems = N * K;
  if (systems == 0) return {p, rs, tol2, status, iterations};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "cg_init_cuda", [&] {
    cg_init_kernel<scalar_t><<<(systems + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        systems, d, K, r.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        scalar_t(rtol * rtol), scalar_t(atol * atol), p.mutable_data_ptr<scalar_t>(),
        rs.mutable_data_ptr<scalar_t>(), tol2.mutable_data_ptr<scalar_t>(),
        status.mutable_data_ptr<int32_t>(), iterations.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {p, rs, tol2, status, iterations};
}

void cg_step_cuda(at::Tensor& x, at::Tensor& r, at::Tensor& p, at::Tensor& Ap,
                  const c10::optional<at::Tensor>& A_in, at::Tensor& rs, const at::Tensor& tol2, at::Tensor& status,
                  at::Tensor& iterations) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_cg_vectors("cg_step", {&x, &r, &p, &Ap});
  check_cg_matrix(x, A_in);
  const at::Tensor A = A_in.has_value() ? A_in->contiguous() : at::Tensor();
  check_cg_state(x, rs, tol2, status, iterations);
  const int64_t N = x.size(0), d = x.size(1), K = x.size(2);
  const int64_t systems = N * K;
  if (systems == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cuda", [&] {
    if (K == 1) {
      const int64_t warps_per_block = kThreads / 32;
      cg_step_warp_kernel<scalar_t><<<(systems + warps_per_block - 1) / warps_per_block,
                                      kThreads, 0, stream>>>(
          systems, d, x.mutable_data_ptr<scalar_t>(), r.mutable_data_ptr<scalar_t>(),
          p.mutable_data_ptr<scalar_t>(), Ap.mutable_data_ptr<scalar_t>(),
          A.defined() ? A.const_data_ptr<scalar_t>() : nullptr,
          rs.mutable_data_ptr<scalar_t>(), tol2.const_data_ptr<scalar_t>(),
          status.mutable_data_ptr<int32_t>(), iterations.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    cg_step_kernel<scalar_t><<<(systems + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        systems, d, K, x.mutable_data_ptr<scalar_t>(), r.mutable_data_ptr<scalar_t>(),
        p.mutable_data_ptr<scalar_t>(), Ap.mutable_data_ptr<scalar_t>(),
        A.defined() ? A.const_data_ptr<scalar_t>() : nullptr,
        rs.mutable_data_ptr<scalar_t>(), tol2.const_data_ptr<scalar_t>(),
        status.mutable_data_ptr<int32_t>(), iterations.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CUDA, m) {
  m.impl("cg_init", &cg_init_cuda);
  m.impl("cg_step", &cg_step_cuda);
}

}  // namespace injflow
