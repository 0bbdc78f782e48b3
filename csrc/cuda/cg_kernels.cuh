// The CUDA kernels of the batched conjugate-gradient solver (csrc/cuda/cg_cuda.cu launches
// them; the design is described there). In a header of their own so that they also compile
// for the CPU under the CUDA emulation of tests/cuda_emulation/ (emulation_hooks.cuh).
#pragma once

#include <cstdint>

#include "../cg.h"
#include "emulation_hooks.cuh"

namespace injflow {
namespace cg_kernels {

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

}  // namespace cg_kernels
}  // namespace injflow
