// CUDA kernels of the batched conjugate-gradient solver. With K > 1 right-hand sides: one thread
// per system (n, k), so that with the (N, d, K) layout consecutive threads read consecutive
// addresses; the per-system arithmetic is shared with the CPU kernels (cg.h). With K = 1: one
// warp per system, lanes over the d elements (for a dense A, lane i computes row i of A·p) and
// warp-shuffle reductions for pᵀAp and rᵀr, so that a system's d-long loops and its d×d matvec
// run 32 wide instead of in one thread. Same iteration, same stopping rule; only the order of
// the sums differs. No host synchronisation.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cg.h"

namespace injflow {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void cg_init_kernel(int64_t systems, int64_t d, int64_t K, const T* r, const T* b,
                               T rtol2, T atol2, T* p, T* rs, T* tol2, int32_t* status,
                               int32_t* iterations) {
  const int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (s < systems) cg_init_system<T>(s, d, K, r, b, rtol2, atol2, p, rs, tol2, status, iterations);
}

template <typename T>
__global__ void cg_step_kernel(int64_t systems, int64_t d, int64_t K, T* x, T* r, T* p, T* Ap,
                               const T* A, T* rs, const T* tol2, int32_t* status,
                               int32_t* iterations) {
  const int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (s >= systems) return;
  if (A && status[s] == kCGRunning) cg_matvec_system<T>(s, d, K, A, p, Ap);
  cg_step_system<T>(s, d, K, x, r, p, Ap, rs, tol2, status, iterations);
}

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the same sum (butterfly of commutative adds)
}

// One CG iteration of system `warp` (K = 1: its elements are contiguous at warp·d). Every
// branch below depends only on values all lanes share, so the warp never diverges around the
// shuffles.
template <typename T>
__global__ void cg_step_warp_kernel(int64_t systems, int64_t d, T* __restrict__ x,
                                    T* __restrict__ r, T* __restrict__ p, T* __restrict__ Ap,
                                    const T* __restrict__ A, T* __restrict__ rs,
                                    const T* __restrict__ tol2, int32_t* __restrict__ status,
                                    int32_t* __restrict__ iterations) {
  const int64_t sys = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (sys >= systems || status[sys] != kCGRunning) return;
  const int64_t base = sys * d;
  if (A) {  // Ap = A[sys]·p, lane i computing rows i, i + 32, ...; p is read by all lanes
    const T* As = A + sys * d * d;
    for (int64_t i = lane; i < d; i += 32) {
      const T* Ai = As + i * d;
      T s = 0;
      for (int64_t j = 0; j < d; ++j) s += Ai[j] * p[base + j];
      Ap[base + i] = s;
    }
  }
  T pAp = 0;
  for (int64_t i = lane; i < d; i += 32) pAp += p[base + i] * Ap[base + i];
  pAp = warp_sum(pAp);
  if (!(pAp > T(0)) || !isfinite(pAp)) {  // zero or negative curvature: A is not SPD here
    if (lane == 0) status[sys] = kCGBreakdown;
    return;
  }
  const T rs_old = rs[sys];
  const T alpha = rs_old / pAp;
  T rr = 0;
  for (int64_t i = lane; i < d; i += 32) {
    const int64_t o = base + i;
    x[o] += alpha * p[o];
    const T ri = r[o] - alpha * Ap[o];
    r[o] = ri;
    rr += ri * ri;
  }
  rr = warp_sum(rr);  // also orders every lane's read of rs[sys] before lane 0 writes it
  const bool done = rr <= tol2[sys];
  if (lane == 0) {
    iterations[sys] += 1;
    rs[sys] = rr;
    if (done) status[sys] = kCGConverged;
  }
  if (done) return;
  const T beta = rr / rs_old;
  for (int64_t i = lane; i < d; i += 32) {
    const int64_t o = base + i;
    p[o] = r[o] + beta * p[o];
  }
}

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
