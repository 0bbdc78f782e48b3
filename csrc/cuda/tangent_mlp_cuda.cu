// CUDA tangent_mlp: the whole network in one kernel for the forward and one for the backward's
// activation-gradient chain (csrc/tangent_mlp.h has the math and the per-layer path).
//
// Forward (mlp_forward_kernel): a block takes S whole samples, M = S·R rows (primal and its K
// tangents together, M <= 128). The rows' activations stay in shared memory between layers,
// stored transposed ([feature][row], row stride ldm), and every layer is a block-wide GEMM
// against weights staged through shared memory in chunks of kChunk input features. After each
// GEMM the epilogue evaluates σ and σ' once per primal element and applies σ' to the sample's
// K tangent rows; it writes Z, A and dA (for the backward) to global memory. The last layer's
// output goes straight to global memory.
//
// Backward (mlp_backward_kernel): the same tiling runs the chain GZ_L → gA_{L-1} = GZ_L W_L →
// GZ_{L-1} → … → gXV = GZ_1 W_1, writing each GZ_l to global memory and the block's partial bias
// gradient (the sum of its primal rows of GZ_l) to a (blocks, Σ n_l) buffer. The weight
// gradients gW_l = GZ_lᵀ A_{l-1} are cuBLAS GEMMs over all rows, the bias gradients one sum of
// the partial buffer: 2 + L launches for the whole backward, deterministic.
//
// Arithmetic: plain float32 (or float64) FMAs, each thread an 8-row × 4-column tile of outputs,
// reading its operands from shared memory with 16-byte loads.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>

#include "../tangent_mlp.h"
#include "tangent_ops_cuda.h"

namespace injflow {
namespace {

constexpr int kThreads = 256;
constexpr int kTileRows = 8;  // output rows per thread
constexpr int kTileCols = 4;  // output columns per thread and column pass
constexpr int kChunk = 16;    // input features per staged weight chunk
constexpr int kMaxLayers = 8;
constexpr int kMaxRows = 128;  // rows per block: 16 row-threads × 8

template <typename T>
struct MlpLayerArgs {
  const T* W;   // (n_out, n_in)
  const T* b;   // (n_out,)
  T* Z;         // (B, R, n_out) pre-activations
  T* A;         // (B, R, n_out) outputs (the last layer: Y)
  T* dA;        // (B, n_out) σ' at the primal row
  T* GZ;        // backward: (B, R, n_out) pre-activation gradient (null: use grad_Y)
  int n_in, n_out, act, bias_offset;
};

template <typename T>
struct MlpArgs {
  MlpLayerArgs<T> layer[kMaxLayers];
  int L;
  int64_t B;
  int R, S, ldm;
  T slope;
  const T* in;   // forward: XV (B, R, n_0); backward: grad_Y (B, R, n_L)
  T* out;        // backward: grad_XV (B, R, n_0)
  T* bias_partial;  // backward: (blocks, bias_stride)
  int bias_stride;
};

// N consecutive values from 16-byte aligned shared memory.
template <int N>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 q = *reinterpret_cast<const float4*>(p + i);
    v[i] = q.x; v[i + 1] = q.y; v[i + 2] = q.z; v[i + 3] = q.w;
  }
}
template <int N>
__device__ __forceinline__ void load_vec(const double* p, double (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 2) {
    const double2 q = *reinterpret_cast<const double2*>(p + i);
    v[i] = q.x; v[i + 1] = q.y;
  }
}
template <int N>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 4)
    *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
}
template <int N>
__device__ __forceinline__ void store_vec(double* p, const double (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 2) *reinterpret_cast<double2*>(p + i) = make_double2(v[i], v[i + 1]);
}

// Row-thread count of the block layout for M rows: TY row-threads × (256 / TY) column-threads.
__host__ __device__ constexpr int weight_chunk_stride(int ty) {
  return (kThreads / ty) * kTileCols + 4;  // padded against bank conflicts, 16-byte multiple
}

// out[r][c] = Σ_k in[k][r] · W(k, c) for r < M, c < N (M <= TY·8), with in transposed
// ([Kd][ldm] in shared memory) and W(k, c) = W[c·Kd + k] (out_major: the forward's (N, Kd)
// weight) or W[k·N + c] (the backward's use of the same weight, (Kd, N)). Each column pass
// stages kChunk rows of W at a time in `chunk`, the next chunk's global loads in flight (in
// registers) while the current one is multiplied. The result is handed to store(r0, c0, acc)
// for the thread's rows r0..r0+7 and columns c0..c0+3. The caller synchronises before reading
// what store wrote.
template <typename T, int TY>
struct WeightChunk {
  static constexpr int TX = kThreads / TY;
  static constexpr int NP = TX * kTileCols;         // columns per pass
  static constexpr int LDW = weight_chunk_stride(TY);
  static constexpr int PER_THREAD = kChunk * NP / kThreads;
  T v[PER_THREAD];

  // element e of this thread: index idx = tid + e·256 of the kChunk × NP chunk
  __device__ __forceinline__ void load(const T* __restrict__ W, bool out_major, int Kd, int N,
                                       int k0, int c0) {
#pragma unroll
    for (int e = 0; e < PER_THREAD; ++e) {
      const int idx = threadIdx.x + e * kThreads;
      int kk, cc;
      if (out_major) { kk = idx % kChunk; cc = idx / kChunk; }  // consecutive k of one row
      else { cc = idx % NP; kk = idx / NP; }                      // consecutive c
      const int k = k0 + kk, c = c0 + cc;
      v[e] = (k < Kd && c < N) ? (out_major ? W[(int64_t)c * Kd + k] : W[(int64_t)k * N + c])
                               : T(0);
    }
  }
  __device__ __forceinline__ void store(T* chunk, bool out_major) const {
#pragma unroll
    for (int e = 0; e < PER_THREAD; ++e) {
      const int idx = threadIdx.x + e * kThreads;
      const int kk = out_major ? idx % kChunk : idx / NP;
      const int cc = out_major ? idx / kChunk : idx % NP;
      chunk[kk * LDW + cc] = v[e];
    }
  }
};

template <typename T, int TY, typename Store>
__device__ __forceinline__ void block_gemm(const T* in, int ldm, int M, int Kd, int N,
                                           const T* __restrict__ W, bool out_major, T* chunk,
                                           Store store) {
  using Chunk = WeightChunk<T, TY>;
  const int tid = threadIdx.x, tx = tid % Chunk::TX, ty = tid / Chunk::TX;
  const int r0 = ty * kTileRows;
  const bool active = r0 < M;
  for (int c0 = 0; c0 < N; c0 += Chunk::NP) {
    T acc[kTileRows][kTileCols];
#pragma unroll
    for (int i = 0; i < kTileRows; ++i)
#pragma unroll
      for (int j = 0; j < kTileCols; ++j) acc[i][j] = T(0);
    Chunk next;
    if (Kd > 0) next.load(W, out_major, Kd, N, 0, c0);
    for (int k0 = 0; k0 < Kd; k0 += kChunk) {
      const int kc = min(kChunk, Kd - k0);
      __syncthreads();  // the previous chunk is consumed
      next.store(chunk, out_major);
      __syncthreads();
      if (k0 + kChunk < Kd) next.load(W, out_major, Kd, N, k0 + kChunk, c0);
      if (active) {
#pragma unroll 4
        for (int kk = 0; kk < kc; ++kk) {
          T a[kTileRows], w[kTileCols];
          load_vec(in + (k0 + kk) * ldm + r0, a);
          load_vec(chunk + kk * Chunk::LDW + tx * kTileCols, w);
#pragma unroll
          for (int i = 0; i < kTileRows; ++i)
#pragma unroll
            for (int j = 0; j < kTileCols; ++j) acc[i][j] += a[i] * w[j];  // contracted to FMA
        }
      }
    }
    if (active) store(r0, c0 + tx * kTileCols, acc);
  }
}

// Into shared memory, transposed: out[c·ldm + r]. Rows past M land in the padding rows
// (ldm >= TY·8) and are never read as results.
template <typename T>
struct SharedStore {
  T* out;
  int ldm, N;
  __device__ __forceinline__ void operator()(int r0, int c0, const T (&acc)[kTileRows][kTileCols]) const {
#pragma unroll
    for (int j = 0; j < kTileCols; ++j) {
      if (c0 + j < N) {
        T col[kTileRows];
#pragma unroll
        for (int i = 0; i < kTileRows; ++i) col[i] = acc[i][j];
        store_vec(out + (c0 + j) * ldm + r0, col);
      }
    }
  }
};

// Into global memory, row-major (rows of this block from `out`): out[r·N + c] for r < M, c < N.
template <typename T>
struct GlobalStore {
  T* out;
  int M, N;
  __device__ __forceinline__ void operator()(int r0, int c0, const T (&acc)[kTileRows][kTileCols]) const {
#pragma unroll
    for (int i = 0; i < kTileRows; ++i) {
      if (r0 + i < M) {
#pragma unroll
        for (int j = 0; j < kTileCols; ++j)
          if (c0 + j < N) out[(int64_t)(r0 + i) * N + c0 + j] = acc[i][j];
      }
    }
  }
};

template <typename T>
__device__ __forceinline__ T* shared_base() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<T*>(smem_raw);
}

template <typename T, int TY>
__global__ void __launch_bounds__(kThreads) mlp_forward_kernel(const MlpArgs<T> p) {
  const int ldm = p.ldm, R = p.R, L = p.L, tid = threadIdx.x;
  int width = 0;
  for (int l = 0; l < L; ++l) width = max(width, p.layer[l].n_in);
  T* buf_in = shared_base<T>();
  T* buf_out = buf_in + width * ldm;
  T* chunk = buf_out + width * ldm;
  const int64_t s0 = (int64_t)blockIdx.x * p.S;
  const int S = static_cast<int>(p.B - s0 < p.S ? p.B - s0 : p.S);
  const int M = S * R;
  const int64_t row0 = s0 * R;

  {  // the block's rows of XV, transposed into shared memory
    const int n = p.layer[0].n_in;
    const T* x = p.in + row0 * n;
    for (int idx = tid; idx < M * n; idx += kThreads) {
      const int r = idx / n, c = idx - r * n;
      buf_in[c * ldm + r] = x[idx];
    }
  }
  __syncthreads();

  for (int l = 0; l < L; ++l) {
    const MlpLayerArgs<T>& ly = p.layer[l];
    const int n = ly.n_out;
    T* Z = ly.Z + row0 * n;
    T* A = ly.A + row0 * n;
    T* dA = ly.dA + s0 * n;
    if (l + 1 < L) {
      block_gemm<T, TY>(buf_in, ldm, M, ly.n_in, n, ly.W, true, chunk,
                        SharedStore<T>{buf_out, ldm, n});
      __syncthreads();
      for (int j = tid; j < n; j += kThreads) {
        const T bj = ly.b[j];
        T* zt = buf_out + j * ldm;
        for (int s = 0; s < S; ++s) {
          const int r = s * R;
          const T z0 = zt[r] + bj;
          const auto a = activation<T>(ly.act, z0, p.slope, false);
          Z[(int64_t)r * n + j] = z0;
          A[(int64_t)r * n + j] = a.f;
          dA[(int64_t)s * n + j] = a.df;
          zt[r] = a.f;
          for (int k = 1; k < R; ++k) {
            const T zk = zt[r + k];
            const T ak = a.df * zk;
            Z[(int64_t)(r + k) * n + j] = zk;
            A[(int64_t)(r + k) * n + j] = ak;
            zt[r + k] = ak;
          }
        }
      }
      __syncthreads();
      T* t = buf_in; buf_in = buf_out; buf_out = t;
    } else {
      block_gemm<T, TY>(buf_in, ldm, M, ly.n_in, n, ly.W, true, chunk, GlobalStore<T>{Z, M, n});
      __syncthreads();  // Z of this block's rows is written (and visible to the block)
      for (int j = tid; j < n; j += kThreads) {
        const T bj = ly.b[j];
        for (int s = 0; s < S; ++s) {
          const int64_t o = (int64_t)s * R * n + j;
          const T z0 = Z[o] + bj;
          const auto a = activation<T>(ly.act, z0, p.slope, false);
          Z[o] = z0;
          A[o] = a.f;
          dA[(int64_t)s * n + j] = a.df;
          for (int k = 1; k < R; ++k) A[o + (int64_t)k * n] = a.df * Z[o + (int64_t)k * n];
        }
      }
    }
  }
}

// GZ of a layer from the gradient with respect to its output, for the block's samples, in
// place in shared memory (g: [j][row] transposed) with the saved pre-activations Z (global,
// row-major, this block's rows): GZ[0] = g0·σ'(z0) + Σ_k gk·Zk·σ''(z0), GZ[k] = gk·σ'(z0).
// Writes GZ to global memory and the block's partial bias gradient Σ_s GZ[s, 0, j].
template <typename T>
__device__ __forceinline__ void grad_preact_block(T* g, int ldm, const T* Z, T* GZ, int S, int R,
                                                  int n, int act, T slope, T* bias_partial) {
  for (int j = threadIdx.x; j < n; j += kThreads) {
    T* gt = g + j * ldm;
    T sum = 0;
    for (int s = 0; s < S; ++s) {
      const int r = s * R;
      const int64_t o = (int64_t)r * n + j;
      const auto a = activation<T>(act, Z[o], slope, true);
      T g0 = gt[r] * a.df;
      for (int k = 1; k < R; ++k) {
        const T gk = gt[r + k];
        g0 += gk * Z[o + (int64_t)k * n] * a.d2f;
        const T gzk = gk * a.df;
        gt[r + k] = gzk;
        GZ[o + (int64_t)k * n] = gzk;
      }
      gt[r] = g0;
      GZ[o] = g0;
      sum += g0;
    }
    bias_partial[j] = sum;
  }
}

template <typename T, int TY>
__global__ void __launch_bounds__(kThreads) mlp_backward_kernel(const MlpArgs<T> p) {
  const int ldm = p.ldm, R = p.R, L = p.L, tid = threadIdx.x;
  int width = 0;
  for (int l = 0; l < L; ++l) width = max(width, p.layer[l].n_out);
  T* buf_g = shared_base<T>();
  T* buf_h = buf_g + width * ldm;
  T* chunk = buf_h + width * ldm;
  const int64_t s0 = (int64_t)blockIdx.x * p.S;
  const int S = static_cast<int>(p.B - s0 < p.S ? p.B - s0 : p.S);
  const int M = S * R;
  const int64_t row0 = s0 * R;
  T* partial = p.bias_partial + (int64_t)blockIdx.x * p.bias_stride;

  {  // the last layer: GZ_L from grad_Y
    const MlpLayerArgs<T>& ly = p.layer[L - 1];
    const int n = ly.n_out;
    const T* gy = p.in + row0 * n;
    for (int idx = tid; idx < M * n; idx += kThreads) {
      const int r = idx / n, c = idx - r * n;
      buf_g[c * ldm + r] = gy[idx];
    }
    __syncthreads();
    if (ly.GZ != nullptr) {
      grad_preact_block(buf_g, ldm, ly.Z + row0 * n, ly.GZ + row0 * n, S, R, n, ly.act, p.slope,
                        partial + ly.bias_offset);
    } else {  // linear last layer: GZ_L = grad_Y
      for (int j = tid; j < n; j += kThreads) {
        T sum = 0;
        for (int s = 0; s < S; ++s) sum += buf_g[j * ldm + s * R];
        partial[ly.bias_offset + j] = sum;
      }
    }
    __syncthreads();
  }
  for (int l = L - 1; l >= 0; --l) {
    const MlpLayerArgs<T>& ly = p.layer[l];
    if (l > 0) {
      const MlpLayerArgs<T>& prev = p.layer[l - 1];
      const int n = ly.n_in;
      block_gemm<T, TY>(buf_g, ldm, M, ly.n_out, n, ly.W, false, chunk,
                        SharedStore<T>{buf_h, ldm, n});
      __syncthreads();
      grad_preact_block(buf_h, ldm, prev.Z + row0 * n, prev.GZ + row0 * n, S, R, n, prev.act,
                        p.slope, partial + prev.bias_offset);
      __syncthreads();
      T* t = buf_g; buf_g = buf_h; buf_h = t;
    } else {
      block_gemm<T, TY>(buf_g, ldm, M, ly.n_out, ly.n_in, ly.W, false, chunk,
                        GlobalStore<T>{p.out + row0 * ly.n_in, M, ly.n_in});
    }
  }
}

// ------------------------------------------------------------------------------- launch plan

struct MlpPlan {
  int S = 0, TY = 0, ldm = 0;
  size_t smem = 0;
  int64_t blocks = 0;
  std::string why_not;  // empty when the fused kernels can run
};

MlpPlan unsupported(std::string why) {
  MlpPlan plan;
  plan.why_not = std::move(why);
  return plan;
}

int rows_threads_for(int M) { return M > 64 ? 16 : (M > 32 ? 8 : 4); }

size_t smem_bytes(int width, int TY, size_t elem) {
  const int ldm = TY * kTileRows + 4;
  return (2 * (size_t)width * ldm + (size_t)kChunk * weight_chunk_stride(TY)) * elem;
}

struct DeviceFacts {
  int sms = 0;
  size_t smem_optin = 0;
};

const DeviceFacts& device_facts(int device) {
  static std::mutex mu;
  static std::vector<DeviceFacts> facts;
  std::lock_guard<std::mutex> lock(mu);
  if ((int)facts.size() <= device) facts.resize(device + 1);
  if (facts[device].sms == 0) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
    facts[device].sms = prop->multiProcessorCount;
    facts[device].smem_optin = prop->sharedMemPerBlockOptin;
  }
  return facts[device];
}

// Samples per block: INJFLOW_MLP_SAMPLES_PER_BLOCK if set (benchmarks), else about one block per
// multiprocessor's worth of samples, as many as fit (rows <= 128, shared memory).
MlpPlan plan_mlp(int64_t B, int64_t R, int width, size_t elem, int device) {
  MlpPlan plan;
  if (R > kMaxRows) {
    plan.why_not = "1+K = " + std::to_string(R) + " rows per sample exceeds " +
                   std::to_string(kMaxRows);
    return plan;
  }
  const DeviceFacts& dev = device_facts(device);
  int64_t target = std::max<int64_t>(1, B / std::max(1, dev.sms));
  if (const char* env = std::getenv("INJFLOW_MLP_SAMPLES_PER_BLOCK")) {
    const int64_t v = std::atoll(env);
    if (v > 0) target = v;
  }
  target = std::min<int64_t>({target, kMaxRows / R, std::max<int64_t>(B, 1)});
  for (int64_t S = target; S >= 1; --S) {
    const int M = static_cast<int>(S * R);
    const int TY = rows_threads_for(M);
    const size_t bytes = smem_bytes(width, TY, elem);
    if (bytes <= dev.smem_optin) {
      plan.S = static_cast<int>(S);
      plan.TY = TY;
      plan.ldm = TY * kTileRows + 4;
      plan.smem = bytes;
      plan.blocks = (B + S - 1) / S;
      return plan;
    }
  }
  plan.why_not = "a width of " + std::to_string(width) + " features at 1+K = " +
                 std::to_string(R) + " needs " +
                 std::to_string(smem_bytes(width, rows_threads_for((int)R), elem)) +
                 " bytes of shared memory per block, more than the device's " +
                 std::to_string(dev.smem_optin);
  return plan;
}

// auto: fused when the rows fill the GPU (at least 32 rows per multiprocessor); below that the
// per-layer cuBLAS GEMMs spread over more multiprocessors than the fused kernel's few blocks.
bool choose_fused(int64_t path, const MlpPlan& plan, int64_t B, int64_t R, int device,
                  const char* op) {
  if (path == kMlpPerLayer) return false;
  if (path == kMlpFused) {
    TORCH_CHECK(plan.why_not.empty(), op, ": the fused path (path=2) cannot take these shapes: ",
                plan.why_not, "; use path=0 (auto) or 1 (per layer)");
    return true;
  }
  return plan.why_not.empty() && B * R >= 32 * (int64_t)device_facts(device).sms;
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  // raising the limit to the device maximum once per kernel and device is enough
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <typename T, template <typename, int> class KernelOf>
void launch(const MlpPlan& plan, const MlpArgs<T>& args, int device, cudaStream_t stream) {
  static std::once_flag flags[3][64];
  const int which = plan.TY == 16 ? 0 : (plan.TY == 8 ? 1 : 2);
  const size_t optin = device_facts(device).smem_optin;
  auto run = [&](auto kernel) {
    std::call_once(flags[which][device % 64], [&] { allow_shared_memory(kernel, optin); });
    kernel<<<static_cast<unsigned>(plan.blocks), kThreads, plan.smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (plan.TY == 16) run(KernelOf<T, 16>::get());
  else if (plan.TY == 8) run(KernelOf<T, 8>::get());
  else run(KernelOf<T, 4>::get());
}

template <typename T, int TY>
struct ForwardKernel {
  static auto get() { return &mlp_forward_kernel<T, TY>; }
};
template <typename T, int TY>
struct BackwardKernel {
  static auto get() { return &mlp_backward_kernel<T, TY>; }
};

int max_width(at::TensorList weights, bool inputs) {
  int64_t w = 0;
  for (const auto& W : weights) w = std::max<int64_t>(w, W.size(inputs ? 1 : 0));
  return static_cast<int>(w);
}

MlpForwardResult tangent_mlp_cuda(const at::Tensor& XV_in, at::TensorList weights,
                                  at::TensorList biases, int64_t act, double slope,
                                  int64_t last_act, int64_t path) {
  check_tangent_mlp_args(XV_in, weights, biases, act, last_act, path);
  const c10::cuda::CUDAGuard guard(XV_in.device());
  const int64_t B = XV_in.size(0), R = XV_in.size(1);
  const size_t L = weights.size();
  const int device = XV_in.get_device();
  const MlpPlan plan = L <= (size_t)kMaxLayers
                           ? plan_mlp(B, R, max_width(weights, true), XV_in.element_size(), device)
                           : unsupported("more than 8 layers");
  if (!choose_fused(path, plan, B, R, device, "tangent_mlp"))
    return tangent_mlp_per_layer(XV_in, weights, biases, act, slope, last_act,
                                 &tangent_linear_cuda);
  const at::Tensor XV = XV_in.contiguous();
  std::vector<at::Tensor> W(L), b(L), Z(L), A, dA(L);
  at::Tensor Y;
  for (size_t l = 0; l < L; ++l) {
    W[l] = weights[l].contiguous();
    b[l] = biases[l].contiguous();
    const int64_t n = W[l].size(0);
    Z[l] = at::empty({B, R, n}, XV.options());
    dA[l] = at::empty({B, n}, XV.options());
    if (l + 1 < L) A.push_back(at::empty({B, R, n}, XV.options()));
    else Y = at::empty({B, R, n}, XV.options());
  }
  if (B == 0) return {Y, Z, A, dA};
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_mlp_cuda", [&] {
    MlpArgs<scalar_t> args{};
    args.L = static_cast<int>(L);
    args.B = B;
    args.R = static_cast<int>(R);
    args.S = plan.S;
    args.ldm = plan.ldm;
    args.slope = static_cast<scalar_t>(slope);
    args.in = XV.const_data_ptr<scalar_t>();
    for (size_t l = 0; l < L; ++l) {
      auto& ly = args.layer[l];
      ly.W = W[l].const_data_ptr<scalar_t>();
      ly.b = b[l].const_data_ptr<scalar_t>();
      ly.Z = Z[l].mutable_data_ptr<scalar_t>();
      ly.A = (l + 1 < L ? A[l] : Y).mutable_data_ptr<scalar_t>();
      ly.dA = dA[l].mutable_data_ptr<scalar_t>();
      ly.n_in = static_cast<int>(W[l].size(1));
      ly.n_out = static_cast<int>(W[l].size(0));
      ly.act = static_cast<int>(mlp_layer_activation(l, L, act, last_act));
    }
    launch<scalar_t, ForwardKernel>(plan, args, device, at::cuda::getCurrentCUDAStream());
  });
  return {Y, Z, A, dA};
}

MlpBackwardResult tangent_mlp_backward_cuda(const at::Tensor& gY_in, const at::Tensor& XV_in,
                                            at::TensorList weights, const at::Tensor& Y,
                                            at::TensorList Z_in, at::TensorList A_in,
                                            at::TensorList dA, int64_t act, double slope,
                                            int64_t last_act, int64_t path) {
  check_tangent_mlp_backward_args(gY_in, XV_in, weights, Y, Z_in, A_in, dA, act, last_act, path);
  const c10::cuda::CUDAGuard guard(XV_in.device());
  const int64_t B = XV_in.size(0), R = XV_in.size(1);
  const size_t L = weights.size();
  const int device = XV_in.get_device();
  const MlpPlan plan = L <= (size_t)kMaxLayers
                           ? plan_mlp(B, R, max_width(weights, false), XV_in.element_size(),
                                      device)
                           : unsupported("more than 8 layers");
  if (!choose_fused(path, plan, B, R, device, "tangent_mlp_backward"))
    return tangent_mlp_backward_per_layer(gY_in, XV_in, weights, Y, Z_in, A_in, dA, act, slope,
                                          last_act, &tangent_linear_backward_cuda);
  const at::Tensor XV = XV_in.contiguous(), gY = gY_in.contiguous();
  std::vector<at::Tensor> W(L), Z(L), GZ(L), gW(L), gb(L);
  int64_t bias_total = 0;
  std::vector<int> bias_offset(L);
  for (size_t l = 0; l < L; ++l) {
    W[l] = weights[l].contiguous();
    Z[l] = Z_in[l].contiguous();
    const int64_t n = W[l].size(0);
    const bool linear_last = l + 1 == L && last_act == kActNone;
    GZ[l] = linear_last ? gY : at::empty({B, R, n}, XV.options());
    bias_offset[l] = static_cast<int>(bias_total);
    bias_total += n;
  }
  at::Tensor gXV = at::empty_like(XV);
  if (B == 0) {
    for (size_t l = 0; l < L; ++l) {
      gW[l] = at::zeros_like(W[l]);
      gb[l] = at::zeros({W[l].size(0)}, XV.options());
    }
    return {gXV, gW, gb};
  }
  at::Tensor partial = at::empty({plan.blocks, bias_total}, XV.options());
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_mlp_backward_cuda", [&] {
    MlpArgs<scalar_t> args{};
    args.L = static_cast<int>(L);
    args.B = B;
    args.R = static_cast<int>(R);
    args.S = plan.S;
    args.ldm = plan.ldm;
    args.slope = static_cast<scalar_t>(slope);
    args.in = gY.const_data_ptr<scalar_t>();
    args.out = gXV.mutable_data_ptr<scalar_t>();
    args.bias_partial = partial.mutable_data_ptr<scalar_t>();
    args.bias_stride = static_cast<int>(bias_total);
    for (size_t l = 0; l < L; ++l) {
      auto& ly = args.layer[l];
      const bool linear_last = l + 1 == L && last_act == kActNone;
      ly.W = W[l].const_data_ptr<scalar_t>();
      ly.Z = Z[l].mutable_data_ptr<scalar_t>();
      ly.GZ = linear_last ? nullptr : GZ[l].mutable_data_ptr<scalar_t>();
      ly.n_in = static_cast<int>(W[l].size(1));
      ly.n_out = static_cast<int>(W[l].size(0));
      ly.act = static_cast<int>(mlp_layer_activation(l, L, act, last_act));
      ly.bias_offset = bias_offset[l];
    }
    launch<scalar_t, BackwardKernel>(plan, args, device, at::cuda::getCurrentCUDAStream());
  });
  const at::Tensor bias_sums = partial.sum(0);
  for (size_t l = 0; l < L; ++l) {
    const int64_t n_out = W[l].size(0), n_in = W[l].size(1);
    const at::Tensor in = l == 0 ? XV : A_in[l - 1].contiguous();
    gW[l] = at::mm(GZ[l].view({B * R, n_out}).t(), in.view({B * R, n_in}));
    gb[l] = bias_sums.narrow(0, bias_offset[l], n_out);
  }
  return {gXV, gW, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CUDA, m) {
  m.impl("tangent_mlp", &tangent_mlp_cuda);
  m.impl("tangent_mlp_backward", &tangent_mlp_backward_cuda);
}

}  // namespace injflow
