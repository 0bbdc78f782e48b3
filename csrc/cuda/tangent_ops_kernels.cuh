// The CUDA kernels of the tangent ops (csrc/cuda/tangent_ops_cuda.cu launches them; the design
// is described there) and their launch shapes. In a header of their own so that they also
// compile for the CPU under the CUDA emulation of tests/cuda_emulation/ (emulation_hooks.cuh).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../activations.h"
#include "emulation_hooks.cuh"

namespace injflow {
namespace tangent_kernels {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

template <typename T>
__global__ void linear_epilogue_kernel(T* __restrict__ z, const T* __restrict__ bias, int64_t B,
                                       int64_t R, int64_t n, int64_t act, T slope,
                                       T* __restrict__ y, T* __restrict__ da) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < B * n;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = e / n, j = e - b * n;
    const int64_t o = b * R * n + j;
    const T z0 = z[o] + (bias ? bias[j] : T(0));
    z[o] = z0;
    const auto a = activation<T>(act, z0, slope, false);
    y[o] = a.f;
    da[e] = a.df;
    for (int64_t k = 1; k < R; ++k) y[o + k * n] = a.df * z[o + k * n];
  }
}

// GZ of one (batch row, feature) at offset o of its primal element: all R rows written;
// returns GZ[b,0,j].
template <typename T>
__device__ inline T grad_preact_element(const T* __restrict__ g, const T* __restrict__ z,
                                        int64_t o, int64_t R, int64_t n, int64_t act, T slope,
                                        T* __restrict__ gz) {
  const auto a = activation<T>(act, z[o], slope, true);
  T g0 = g[o] * a.df;
  for (int64_t k = 1; k < R; ++k) {
    const int64_t ok = o + k * n;
    g0 += g[ok] * z[ok] * a.d2f;
    gz[ok] = g[ok] * a.df;
  }
  gz[o] = g0;
  return g0;
}

template <typename T>
__global__ void linear_grad_preact_kernel(const T* __restrict__ g, const T* __restrict__ z,
                                          int64_t B, int64_t R, int64_t n, int64_t act, T slope,
                                          T* __restrict__ gz) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < B * n;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = e / n, j = e - b * n;
    grad_preact_element(g, z, b * R * n + j, R, n, act, slope, gz);
  }
}

// The same, with the bias gradient gb[j] = Σ_b GZ[b,0,j] in the same pass: blocks of 32
// features × 8 batch rows, each thread striding over batch rows and summing its GZ[b,0,j];
// the block sums its 8 partial sums per feature and adds them to gb (zeroed before) with one
// atomic add per feature and block. The order of the atomic adds varies from run to run (the
// result by rounding); deterministic mode uses the kernel above and a separate sum.
constexpr int kBiasRows = 8;

template <typename T>
__global__ void linear_grad_preact_bias_kernel(const T* __restrict__ g, const T* __restrict__ z,
                                               int64_t B, int64_t R, int64_t n, int64_t act,
                                               T slope, T* __restrict__ gz, T* __restrict__ gb) {
  __shared__ T partial[kBiasRows][33];
  const int64_t j = blockIdx.x * 32 + threadIdx.x;
  T acc = 0;
  if (j < n) {
    for (int64_t b = blockIdx.y * kBiasRows + threadIdx.y; b < B;
         b += (int64_t)gridDim.y * kBiasRows)
      acc += grad_preact_element(g, z, b * R * n + j, R, n, act, slope, gz);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    T s = 0;
    for (int y = 0; y < kBiasRows; ++y) s += partial[y][threadIdx.x];
    atomicAdd(gb + j, s);
  }
}

// One block per batch row: threads over features j, each covering all K tangents; the block
// reduces Σ_j s̃_j for the log-determinant (deterministic order).
template <typename T>
__global__ void coupling_kernel(const T* __restrict__ xv, const T* __restrict__ st, int64_t R,
                                int64_t m, int64_t scale, T* __restrict__ y, T* __restrict__ lad) {
  __shared__ T partial[kThreads];
  const int64_t b = blockIdx.x;
  const T* x = xv + b * R * m;
  const T* s = st + b * R * 2 * m;
  T* yb = y + b * R * m;
  T acc = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const auto sc = coupling_scale<T>(scale, s[j]);
    const T e = std::exp(sc.f);
    const T xec = x[j] * e * sc.df;
    yb[j] = x[j] * e + s[m + j];
    for (int64_t k = 1; k < R; ++k)
      yb[k * m + j] = x[k * m + j] * e + xec * s[k * 2 * m + j] + s[k * 2 * m + m + j];
    acc += sc.f;
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) partial[threadIdx.x] += partial[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) lad[b] = partial[0];
}

template <typename T>
__global__ void coupling_backward_kernel(const T* __restrict__ xv, const T* __restrict__ st,
                                         const T* __restrict__ g, const T* __restrict__ gl,
                                         int64_t B, int64_t R, int64_t m, int64_t scale,
                                         T* __restrict__ gx, T* __restrict__ gs) {
  for (int64_t e_ = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e_ < B * m;
       e_ += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = e_ / m, j = e_ - b * m;
    const T* x = xv + b * R * m;
    const T* s = st + b * R * 2 * m;
    const T* gb = g + b * R * m;
    T* gxb = gx + b * R * m;
    T* gsb = gs + b * R * 2 * m;
    const auto sc = coupling_scale<T>(scale, s[j]);
    const T e = std::exp(sc.f);
    const T ec = e * sc.df;
    const T curv = e * (sc.df * sc.df + sc.d2f);
    const T x0 = x[j], g0 = gb[j];
    T gx0 = g0 * e;
    T gs0 = g0 * x0 * ec + gl[b] * sc.df;
    for (int64_t k = 1; k < R; ++k) {
      const T gk = gb[k * m + j];
      const T sdot = s[k * 2 * m + j];
      gx0 += gk * ec * sdot;
      gs0 += gk * (ec * x[k * m + j] + x0 * curv * sdot);
      gxb[k * m + j] = gk * e;
      gsb[k * 2 * m + j] = gk * x0 * ec;
      gsb[k * 2 * m + m + j] = gk;
    }
    gxb[j] = gx0;
    gsb[j] = gs0;
    gsb[m + j] = g0;
  }
}

}  // namespace tangent_kernels
}  // namespace injflow
