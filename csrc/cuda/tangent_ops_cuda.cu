// CUDA kernels of the tangent ops: the fused elementwise parts (the GEMMs are shared cuBLAS
// calls, see tangent_ops.h). One thread per (batch row, feature) handles the primal and all K
// tangents of that feature, so the activation and its derivatives are evaluated once.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../tangent_ops.h"
#include "tangent_ops_cuda.h"

namespace injflow {
namespace {

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
