// The CUDA kernels of gram_logdet and its backward (csrc/cuda/gram_logdet_cuda.cu launches
// them; the design is described there) and their launch shape. In a header of their own so
// that they also compile for the CPU under the CUDA emulation of tests/cuda_emulation/
// (emulation_hooks.cuh).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../gram_logdet.h"
#include "emulation_hooks.cuh"

namespace injflow {
namespace gram_kernels {

constexpr int kThreads = 256;
constexpr int kSharedMaxD = 64;    // d up to this keeps G in shared memory
constexpr int kTileElems = 1024;   // J elements staged per tile

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
gram_logdet_kernel(const scalar_t* __restrict__ J, int64_t D, int d, acc_t max_rel,
                   scalar_t* __restrict__ logdet, acc_t* __restrict__ jitter,
                   int32_t* __restrict__ status, acc_t* __restrict__ L,
                   acc_t* __restrict__ diag_ws, bool matrix_in_shared, int tile_elems) {
  acc_t* smem = dynamic_shared<acc_t>();
  __shared__ acc_t s_scale, s_lambda;
  __shared__ int s_ok;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int dd = d * d;
  const scalar_t* Jb = J + b * D * d;
  acc_t* Lb = L + b * dd;
  acc_t* tile = smem;
  acc_t* A = matrix_in_shared ? smem + tile_elems : Lb;
  acc_t* diag = matrix_in_shared ? smem + tile_elems + dd : diag_ws + b * d;

  // 1. Upper triangle of G, each thread owning fixed entries (no races), J staged in tiles.
  for (int e = tid; e < dd; e += blockDim.x) A[e] = acc_t(0);
  const int rows_per_tile = tile_elems / d;
  for (int64_t r0 = 0; r0 < D; r0 += rows_per_tile) {
    const int rows = static_cast<int>(D - r0 < rows_per_tile ? D - r0 : rows_per_tile);
    __syncthreads();
    for (int e = tid; e < rows * d; e += blockDim.x)
      tile[e] = static_cast<acc_t>(Jb[r0 * d + e]);
    __syncthreads();
    for (int e = tid; e < dd; e += blockDim.x) {
      const int i = e / d, j = e - i * d;
      if (j < i) continue;
      acc_t s = 0;
      for (int r = 0; r < rows; ++r) s += tile[r * d + i] * tile[r * d + j];
      A[e] += s;
    }
  }
  __syncthreads();
  for (int i = tid; i < d; i += blockDim.x) diag[i] = A[i * d + i];
  __syncthreads();
  if (tid == 0) {
    acc_t tr = 0;
    for (int i = 0; i < d; ++i) tr += diag[i];
    s_scale = tr / acc_t(d);
  }
  __syncthreads();
  const acc_t scale = s_scale;

  // 2. Cholesky of G + λI, left-looking by columns, retried with the jitter schedule.
  int st = kGramFailed;
  if (isfinite(scale) && scale > acc_t(0)) {
    for (int attempt = 0;; ++attempt) {
      const acc_t rel = jitter_relative<acc_t>(attempt, max_rel);
      if (rel < acc_t(0)) break;
      const acc_t lambda = rel * scale;
      for (int j = 0; j < d; ++j) {
        if (tid == 0) {
          acc_t s = diag[j] + lambda;
          for (int k = 0; k < j; ++k) s -= A[j * d + k] * A[j * d + k];
          const bool ok = (s > acc_t(0)) && isfinite(s);
          s_ok = ok;
          if (ok) A[j * d + j] = sqrt(s);
        }
        __syncthreads();
        if (!s_ok) break;  // uniform across the block
        const acc_t ljj = A[j * d + j];
        for (int i = j + 1 + tid; i < d; i += blockDim.x) {
          acc_t v = A[j * d + i];  // G[j][i], untouched upper triangle
          for (int k = 0; k < j; ++k) v -= A[i * d + k] * A[j * d + k];
          A[i * d + j] = v / ljj;
        }
        __syncthreads();
      }
      const bool ok = s_ok;
      __syncthreads();
      if (ok) {
        st = attempt == 0 ? kGramOk : kGramJittered;
        if (tid == 0) s_lambda = lambda;
        break;
      }
    }
  }
  __syncthreads();

  // 3. Outputs: logdet, jitter, status, and the factor (upper triangle cleared).
  if (tid == 0) {
    acc_t ld;
    if (st == kGramFailed) {
      ld = failed_logdet<acc_t>(scale);
    } else {
      ld = 0;
      for (int i = 0; i < d; ++i) ld += log(A[i * d + i]);
      ld *= acc_t(2);
    }
    logdet[b] = static_cast<scalar_t>(ld);
    jitter[b] = st == kGramFailed ? acc_t(0) : s_lambda;
    status[b] = st;
  }
  for (int e = tid; e < dd; e += blockDim.x) {
    const int i = e / d, j = e - i * d;
    Lb[e] = (st == kGramFailed || j > i) ? acc_t(0) : A[e];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
gram_logdet_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ J,
                            const acc_t* __restrict__ L, const int32_t* __restrict__ status,
                            int64_t D, int d, scalar_t* __restrict__ out,
                            acc_t* __restrict__ ginv_ws, bool matrix_in_shared) {
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int dd = d * d;
  const scalar_t* Jb = J + b * D * d;
  scalar_t* ob = out + b * D * d;
  if (status[b] == kGramFailed) {
    for (int64_t e = tid; e < D * d; e += blockDim.x) ob[e] = scalar_t(0);
    return;
  }
  const acc_t* Lb = L + b * dd;
  acc_t* G = matrix_in_shared ? dynamic_shared<acc_t>() : ginv_ws + b * dd;
  const acc_t g2 = acc_t(2) * static_cast<acc_t>(grad[b]);

  // Column c of G⁻¹ (stored G[i*d + c]) by L y = e_c, then Lᵀ x = y, in place.
  for (int c = tid; c < d; c += blockDim.x) {
    for (int i = 0; i < c; ++i) G[i * d + c] = acc_t(0);
    for (int i = c; i < d; ++i) {
      acc_t s = (i == c) ? acc_t(1) : acc_t(0);
      for (int k = c; k < i; ++k) s -= Lb[i * d + k] * G[k * d + c];
      G[i * d + c] = s / Lb[i * d + i];
    }
    for (int i = d - 1; i >= 0; --i) {
      acc_t s = G[i * d + c];
      for (int k = i + 1; k < d; ++k) s -= Lb[k * d + i] * G[k * d + c];
      G[i * d + c] = s / Lb[i * d + i];
    }
  }
  __syncthreads();
  for (int64_t e = tid; e < D * d; e += blockDim.x) {
    const int64_t r = e / d;
    const int c = static_cast<int>(e - r * d);
    acc_t s = 0;
    for (int i = 0; i < d; ++i) s += static_cast<acc_t>(Jb[r * d + i]) * G[i * d + c];
    ob[e] = static_cast<scalar_t>(g2 * s);
  }
}

// How the kernels run for d columns: G in shared memory (d <= kSharedMaxD) or in the output
// and workspace buffers; J staged in tiles of tile_elems; the dynamic shared memory of each
// kernel for acc_bytes-byte factorisation values.
struct GramLaunch {
  bool in_shared;
  int tile_elems;
  size_t forward_smem, backward_smem;
};

inline GramLaunch gram_launch(int d, size_t acc_bytes) {
  GramLaunch g;
  g.in_shared = d <= kSharedMaxD;
  g.tile_elems = std::max(kTileElems, d);
  g.forward_smem = acc_bytes * (g.tile_elems + (g.in_shared ? d * d + d : 0));
  g.backward_smem = g.in_shared ? acc_bytes * d * d : 0;
  return g;
}

}  // namespace gram_kernels
}  // namespace injflow
