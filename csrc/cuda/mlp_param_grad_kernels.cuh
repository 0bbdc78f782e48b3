// The parameter gradients of the fused tangent_mlp backward (csrc/cuda/tangent_mlp_cuda.cu
// launches these): after mlp_backward_kernel has written every layer's pre-activation gradient
// GZ_l (B·R rows) and per-block partial bias sums,
//   gW_l = GZ_lᵀ A_{l-1}   (A_0 = XV; summed over all M = B·R rows, primal and tangent rows)
//   gb_l = Σ over the primal rows of GZ_l = the column sums of the bias partial buffer.
// Two launches for all layers together, deterministic (fixed summation order, no atomics):
// - mlp_weight_grad_kernel (the op's fused weight_grads option "kernel"; cuBLAS GEMMs
//   otherwise): split-K over the rows. Block (tile, split) computes a 64 × 64 tile of one layer's gW over one contiguous
//   range of rows, staging 16 rows of GZ and A at a time in shared memory (the next 16 rows
//   are loaded into registers while the current ones are used); 64 threads. With FMAs each
//   thread takes 8 × 8 outputs strided by 8 (rows ty + 8u, columns tx + 8v), so that a warp's
//   shared loads hit 4 or 8 consecutive words (no bank conflicts); on the tensor cores (the
//   fused kernels' math of the call: TF32 or 3×TF32 mma.sync, float32 accumulation, as cuBLAS
//   would under TF32) each warp takes half the tile's rows as 2 × 8 mma tiles. Writes
//   (splits, Σ n_out·n_in) partials.
// - sum_partials_kernel: column sums of partial buffers into separate outputs (each layer's gW
//   from the split partials, each layer's gb from the backward kernel's per-block partials),
//   rows added in a fixed order.
// In a header of its own, like tangent_mlp_kernels.cuh, so that it also runs on the CPU under
// the CUDA emulation of tests/cuda_emulation/ (docs/design.md, "Checking the CUDA kernels
// without a GPU").
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "emulation_hooks.cuh"
#include "tangent_mlp_kernels.cuh"

namespace injflow {
namespace fused_mlp {

constexpr int kGradTile = 64;     // a block's tile of gW: kGradTile × kGradTile outputs
constexpr int kGradThreads = 64;  // 8 × 8 threads, 8 × 8 outputs each
constexpr int kGradDepth = 16;    // rows of GZ and A staged in shared memory per step
// Shared-memory row stride: ≡ 8 (mod 32) words, so that the tensor-core fragment loads are
// conflict-free (the FMA reads are within one row per warp, so any stride suits them).
constexpr int kGradStride = kGradTile + kMmaPad;

template <typename T>
struct GradLayer {
  const T* GZ;         // (M, n_out) pre-activation gradient (grad_Y for a linear last layer)
  const T* A;          // (M, n_in) the layer's input (XV for the first layer)
  int n_out, n_in;
  int tiles_in;        // tiles across n_in: ceil(n_in / kGradTile)
  int tile_begin;      // index of the layer's first tile in the launch's grid.x
  int64_t offset;      // where gW_l (row-major n_out × n_in) starts in a row of the partials
};

template <typename T>
struct GradArgs {
  GradLayer<T> layer[kMaxLayers];
  int L;
  int64_t M;               // rows: B·R
  int64_t rows_per_split;  // rows of one split (grid.y); a multiple of kGradDepth
  T* partial;              // (splits, stride): each split's sums of every gW_l
  int64_t stride;          // Σ n_out·n_in
};

// One 16-row step of a block's gW tile from the staged rows, FMAs: thread (ty, tx) adds the
// products of its 8 × 8 outputs (rows ty + 8u, columns tx + 8v).
template <typename T>
__device__ __forceinline__ void weight_grad_step_fma(T (&acc)[8][8], const T* Gs, const T* As) {
  const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
  for (int k = 0; k < kGradDepth; ++k) {
    T g[8], a[8];
    for (int u = 0; u < 8; ++u) {
      g[u] = Gs[k * kGradStride + ty + 8 * u];
      a[u] = As[k * kGradStride + tx + 8 * u];
    }
    for (int u = 0; u < 8; ++u)
      for (int v = 0; v < 8; ++v) acc[u][v] += g[u] * a[v];
  }
}

// The tensor-core lane of the gW tile: warp w takes rows 32w … 32w + 31 (gW's output
// features) and all 64 columns (input features), as 2 × 8 mma tiles (MmaLane).
__device__ __forceinline__ MmaLane weight_grad_lane() {
  return MmaLane((threadIdx.x / 32) * 32, 0);
}

// The same step on the tensor cores (float32, MATH = kMathTf32 or kMathTf32x3), two k-steps of
// 8 rows per step. In mma terms the tile is GZᵀ (M = outputs, K = rows) · A (K = rows,
// N = inputs); the fragments (MmaLane's comment) read Gs[k][o] and As[k][i] at k = t + 4·j,
// o or i = g + 8·j', which the row stride kGradStride ≡ 8 (mod 32) puts in 32 different banks.
// acc[mt][nt][2h + e] is the output (lane.row(mt, h), lane.col(nt, e)).
template <int MATH>
__device__ __forceinline__ void weight_grad_step_mma(float (&acc)[2][8][4], const float* Gs,
                                                     const float* As) {
  const MmaLane lane = weight_grad_lane();
#pragma unroll
  for (int ks = 0; ks < kGradDepth; ks += 8) {
    float a[2][4], b[8][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        a[mt][r] = Gs[(ks + lane.t + 4 * (r / 2)) * kGradStride + lane.row(mt, r % 2)];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        b[nt][r] = As[(ks + lane.t + 4 * r) * kGradStride + lane.warp_col + 8 * nt + lane.g];
    mma_k_step<MATH>(acc, a, b);
  }
}

// gW partials (see the top of the file). MATH: kMathFma (float32 or float64 FMAs) or, float32
// only, kMathTf32 / kMathTf32x3 (the tensor cores, what the fused kernels of the same call
// use; built for an architecture without mma.sync TF32 the kernel runs FMAs).
template <typename T, int MATH>
__global__ void __launch_bounds__(kGradThreads) mlp_weight_grad_kernel(const GradArgs<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  constexpr bool kMma = false;
#else
  constexpr bool kMma = MATH != kMathFma;
#endif
  static_assert(MATH == kMathFma || std::is_same<T, float>::value,
                "the tensor-core math is float32 only");
  int l = 0;
  while (l + 1 < p.L && (int)blockIdx.x >= p.layer[l + 1].tile_begin) ++l;
  const GradLayer<T>& ly = p.layer[l];
  const int tile = (int)blockIdx.x - ly.tile_begin;
  const int o0 = (tile / ly.tiles_in) * kGradTile, i0 = (tile % ly.tiles_in) * kGradTile;
  const int64_t r_begin = (int64_t)blockIdx.y * p.rows_per_split;
  const int64_t r_end = r_begin + p.rows_per_split < p.M ? r_begin + p.rows_per_split : p.M;
  T* Gs = dynamic_shared<T>();           // [kGradDepth][kGradStride]: GZ rows, tile's columns
  T* As = Gs + kGradDepth * kGradStride;  // [kGradDepth][kGradStride]: A rows, tile's columns
  const int t = threadIdx.x;
  const int o_load = o0 + t, i_load = i0 + t;  // the column this thread stages
  // the accumulators: FMAs 8 × 8 per thread, mma 2 × 8 tiles of 4 (64 either way)
  T acc[8][8];
  float acc_mma[2][8][4];
  if constexpr (kMma) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc_mma[mt][nt][r] = 0.f;
  } else {
    for (int u = 0; u < 8; ++u)
      for (int v = 0; v < 8; ++v) acc[u][v] = T(0);
  }
  // the step's rows of the thread's column of GZ and A, loaded a step ahead (in flight while
  // the block computes the current step); coalesced: thread t reads column t of each row
  T g_next[kGradDepth], a_next[kGradDepth];
  auto load = [&](int64_t r0) {
    for (int q = 0; q < kGradDepth; ++q) {
      const int64_t r = r0 + q;
      const bool row_ok = r < r_end;
      g_next[q] = row_ok && o_load < ly.n_out ? ly.GZ[r * ly.n_out + o_load] : T(0);
      a_next[q] = row_ok && i_load < ly.n_in ? ly.A[r * ly.n_in + i_load] : T(0);
    }
  };
  load(r_begin);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kGradDepth) {
    for (int q = 0; q < kGradDepth; ++q) {
      Gs[q * kGradStride + t] = g_next[q];
      As[q * kGradStride + t] = a_next[q];
    }
    __syncthreads();
    if (r0 + kGradDepth < r_end) load(r0 + kGradDepth);
    if constexpr (kMma)
      weight_grad_step_mma<MATH>(acc_mma, Gs, As);
    else
      weight_grad_step_fma(acc, Gs, As);
    __syncthreads();  // the next step overwrites what this one read
  }
  T* out = p.partial + (int64_t)blockIdx.y * p.stride + ly.offset;
  auto put = [&](int o, int i, T v) {
    if (o < ly.n_out && i < ly.n_in) out[(int64_t)o * ly.n_in + i] = v;
  };
  if constexpr (kMma) {
    const MmaLane lane = weight_grad_lane();
    // unrolled, so that acc_mma stays in registers
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          put(o0 + lane.row(mt, r / 2), i0 + lane.col(nt, r % 2), acc_mma[mt][nt][r]);
  } else {
    const int ty = t / 8, tx = t % 8;
    for (int u = 0; u < 8; ++u)
      for (int v = 0; v < 8; ++v) put(o0 + ty + 8 * u, i0 + tx + 8 * v, acc[u][v]);
  }
}

constexpr int kSumCols = 32;   // sum_partials_kernel: a block sums 32 columns
constexpr int kSumLanes = 8;   // with 8 threads per column, rows lane, lane + 8, ...
constexpr int kMaxSegments = 2 * kMaxLayers;

template <typename T>
struct SumSegment {
  const T* partial;     // (rows, stride)
  int64_t rows, stride, count;
  T* out;               // (count,): out[j] = Σ_r partial[r·stride + j], r in order
  int block_begin;      // index of the segment's first block
};

template <typename T>
struct SumArgs {
  SumSegment<T> seg[kMaxSegments];
  int n;
};

template <typename T>
__global__ void __launch_bounds__(kSumCols * kSumLanes) sum_partials_kernel(const SumArgs<T> p) {
  int s = 0;
  while (s + 1 < p.n && (int)blockIdx.x >= p.seg[s + 1].block_begin) ++s;
  const SumSegment<T>& sg = p.seg[s];
  const int c = threadIdx.x % kSumCols, lane = threadIdx.x / kSumCols;
  const int64_t j = (int64_t)((int)blockIdx.x - sg.block_begin) * kSumCols + c;
  T sum = T(0);
  if (j < sg.count)
    for (int64_t r = lane; r < sg.rows; r += kSumLanes) sum += sg.partial[r * sg.stride + j];
  T* lanes = dynamic_shared<T>();  // [kSumLanes][kSumCols]
  lanes[lane * kSumCols + c] = sum;
  __syncthreads();
  if (lane == 0 && j < sg.count) {
    T total = lanes[c];
    for (int q = 1; q < kSumLanes; ++q) total += lanes[q * kSumCols + c];
    sg.out[j] = total;
  }
}

inline size_t weight_grad_smem(size_t elem) { return 2 * kGradDepth * kGradStride * elem; }
inline size_t sum_partials_smem(size_t elem) { return kSumLanes * kSumCols * elem; }

// Rows per split of mlp_weight_grad_kernel for M rows and `tiles` output tiles on a device of
// `sms` multiprocessors: about four blocks per multiprocessor (64-thread blocks, so several
// fit), in multiples of kGradDepth; `pinned` > 0 pins it (tests, benchmarks).
inline int64_t weight_grad_rows_per_split(int64_t M, int tiles, int sms, int64_t pinned) {
  int64_t rows;
  if (pinned > 0) {
    rows = pinned;
  } else {
    const int64_t target = std::max<int64_t>(1, 4 * (int64_t)std::max(1, sms));
    const int64_t splits = std::max<int64_t>(1, (target + tiles - 1) / std::max(1, tiles));
    rows = (std::max<int64_t>(M, 1) + splits - 1) / splits;
  }
  return (rows + kGradDepth - 1) / kGradDepth * kGradDepth;
}

// Lays out the layers of args (their n_out, n_in set) in the grid and the partial buffer:
// fills tiles_in, tile_begin, offset and stride; returns the tiles (grid.x).
template <typename T>
inline int weight_grad_layout(GradArgs<T>& args) {
  int tiles = 0;
  int64_t offset = 0;
  for (int l = 0; l < args.L; ++l) {
    GradLayer<T>& ly = args.layer[l];
    ly.tiles_in = (ly.n_in + kGradTile - 1) / kGradTile;
    ly.tile_begin = tiles;
    ly.offset = offset;
    tiles += ly.tiles_in * ((ly.n_out + kGradTile - 1) / kGradTile);
    offset += (int64_t)ly.n_out * ly.n_in;
  }
  args.stride = offset;
  return tiles;
}

// The splits (grid.y) of args' M rows and rows_per_split.
template <typename T>
inline int64_t weight_grad_splits(const GradArgs<T>& args) {
  return (args.M + args.rows_per_split - 1) / args.rows_per_split;
}

// Appends the segment out[j] = Σ_r partial[r·stride + j] (j < count) to args; returns the
// blocks of sum_partials_kernel so far.
template <typename T>
inline int add_sum_segment(SumArgs<T>& args, const T* partial, int64_t rows, int64_t stride,
                           int64_t count, T* out) {
  int blocks = args.n == 0 ? 0
                           : args.seg[args.n - 1].block_begin +
                                 (int)((args.seg[args.n - 1].count + kSumCols - 1) / kSumCols);
  args.seg[args.n] = SumSegment<T>{partial, rows, stride, count, out, blocks};
  ++args.n;
  return blocks + (int)((count + kSumCols - 1) / kSumCols);
}

// ------------------------------------------------------- the host's part, over raw pointers
// What param_grads in tangent_mlp_cuda.cu does around the two launches, written once here so
// that the CUDA emulation's harness (tests/cuda_emulation/) runs the very same code.

template <typename T>
struct ParamGradLaunches {
  GradArgs<T> wgrad{};   // mlp_weight_grad_kernel's arguments (launched only with gW wanted)
  int tiles = 0;         // its grid.x
  int64_t splits = 0;    // its grid.y; its partials are (splits, wgrad.stride)
  SumArgs<T> sums{};     // sum_partials_kernel's segments (add_param_grad_sums)
  int sum_blocks = 0;    // its grid
};

// Lays out L layers for mlp_weight_grad_kernel over M rows: GZ[l] (M, n_out[l]) the layer's
// pre-activation gradient, A[l] (M, n_in[l]) its input; the split for `sms` multiprocessors
// (`pinned` > 0 rows per split pins it, weight_grad_rows_per_split). The caller then allocates
// the split partials, (splits, wgrad.stride), and calls add_param_grad_sums.
template <typename T>
inline ParamGradLaunches<T> plan_param_grads(int L, int64_t M, const T* const* GZ,
                                             const T* const* A, const int* n_out,
                                             const int* n_in, int sms, int64_t pinned) {
  ParamGradLaunches<T> p;
  p.wgrad.L = L;
  p.wgrad.M = M;
  for (int l = 0; l < L; ++l) {
    GradLayer<T>& ly = p.wgrad.layer[l];
    ly.GZ = GZ[l];
    ly.A = A[l];
    ly.n_out = n_out[l];
    ly.n_in = n_in[l];
  }
  p.tiles = weight_grad_layout(p.wgrad);
  p.wgrad.rows_per_split = weight_grad_rows_per_split(M, p.tiles, sms, pinned);
  p.splits = weight_grad_splits(p.wgrad);
  return p;
}

// The segments of sum_partials_kernel: with gW (not null: mlp_weight_grad_kernel runs and
// writes weight_partial, (splits, wgrad.stride)) each layer's gW (n_out × n_in) from the split
// partials; then each layer's gb (n_out) from the backward kernel's bias partials, (bias_rows,
// Σ n_out), layer l's columns from Σ_{k<l} n_out[k] on, as mlp_backward_kernel writes them.
template <typename T>
inline void add_param_grad_sums(ParamGradLaunches<T>& p, T* weight_partial, T* const* gW,
                                const T* bias_partial, int64_t bias_rows, T* const* gb) {
  p.wgrad.partial = weight_partial;
  int64_t bias_total = 0;
  for (int l = 0; l < p.wgrad.L; ++l) bias_total += p.wgrad.layer[l].n_out;
  if (gW != nullptr)
    for (int l = 0; l < p.wgrad.L; ++l) {
      const GradLayer<T>& ly = p.wgrad.layer[l];
      p.sum_blocks = add_sum_segment(p.sums, weight_partial + ly.offset, p.splits,
                                     p.wgrad.stride, (int64_t)ly.n_out * ly.n_in, gW[l]);
    }
  int64_t offset = 0;
  for (int l = 0; l < p.wgrad.L; ++l) {
    const int n = p.wgrad.layer[l].n_out;
    p.sum_blocks = add_sum_segment(p.sums, bias_partial + offset, bias_rows, bias_total,
                                   (int64_t)n, gb[l]);
    offset += n;
  }
}

}  // namespace fused_mlp
}  // namespace injflow
