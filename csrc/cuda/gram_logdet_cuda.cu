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

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../gram_logdet.h"

namespace injflow {

int cuda_runtime_version() { return CUDART_VERSION; }

namespace {

constexpr int kThreads = 256;
constexpr int kSharedMaxD = 64;    // d up to this keeps G in shared memory
constexpr int kTileElems = 1024;   // J elements staged per tile

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
gram_logdet_kernel(const scalar_t* __restrict__ J, int64_t D, int d, acc_t max_rel,
                   scalar_t* __restrict__ logdet, acc_t* __restrict__ jitter,
                   int32_t* __restrict__ status, acc_t* __restrict__ L,
                   acc_t* __restrict__ diag_ws, bool matrix_in_shared, int tile_elems) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
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
  extern __shared__ unsigned char smem_raw[];
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
  acc_t* G = matrix_in_shared ? reinterpret_cast<acc_t*>(smem_raw) : ginv_ws + b * dd;
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
  const bool in_shared = d <= kSharedMaxD;
  const int tile_elems = std::max(kTileElems, d);
  at::Tensor diag_ws = in_shared ? at::Tensor() : at::empty({B, d}, J.options().dtype(acc));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "gram_logdet_cuda", [&] {
    auto launch = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const size_t smem = sizeof(acc_t) * (tile_elems + (in_shared ? d * d + d : 0));
      gram_logdet_kernel<scalar_t, acc_t><<<B, kThreads, smem, stream>>>(
          J.const_data_ptr<scalar_t>(), D, d, static_cast<acc_t>(max_relative_jitter),
          logdet.mutable_data_ptr<scalar_t>(), jitter.mutable_data_ptr<acc_t>(),
          status.mutable_data_ptr<int32_t>(), L.mutable_data_ptr<acc_t>(),
          in_shared ? nullptr : diag_ws.mutable_data_ptr<acc_t>(), in_shared, tile_elems);
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
  const bool in_shared = d <= kSharedMaxD;
  at::Tensor ws = in_shared ? at::Tensor() : at::empty({B, d, d}, L.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "gram_logdet_backward_cuda", [&] {
    auto launch = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const size_t smem = in_shared ? sizeof(acc_t) * d * d : 0;
      gram_logdet_backward_kernel<scalar_t, acc_t><<<B, kThreads, smem, stream>>>(
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
