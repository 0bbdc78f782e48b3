// The fused tangent_mlp kernels (csrc/cuda/tangent_mlp_cuda.cu launches them) and their launch
// plan, in a header of their own so that the same source also compiles for the CPU under the
// CUDA emulation of tests/cuda_emulation/ (INJFLOW_CUDA_EMULATION): the kernels, their tiling,
// shared-memory layout and tensor-core fragments then run, thread by thread, without a GPU
// (docs/design.md, "Checking the CUDA kernels without a GPU"). Device code here uses only what
// that emulation provides: threadIdx/blockIdx/blockDim, __syncthreads, dynamic shared memory
// through dynamic_shared(), float4/double2, the two TF32 primitives to_tf32 and mma_tf32 and the
// cp.async ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../activations.h"
#include "emulation_hooks.cuh"

namespace injflow {
namespace fused_mlp {

// Block layout: WM × 2 warps (64·WM threads). A warp computes 32 rows × 64 columns of a layer's
// output, its lanes 4 × 8, each lane 8 × 8 outputs: rows {4·lr + i, 16 + 4·lr + i} and columns
// {4·lc + j, 32 + 4·lc + j} (i, j < 4) of the warp tile, so that every 16-byte shared-memory
// load of a warp touches one contiguous 64- or 128-byte span (no bank conflicts, 4 loads per 64
// FMAs). A block covers 32·WM rows and 128 columns per column pass.
constexpr int kWarpRows = 32;
constexpr int kPassCols = 128;
constexpr int kChunk = 16;     // input features per staged weight chunk (at most)
constexpr int kChunkStride = kPassCols + 4;  // padded row of a staged chunk (16-byte multiple)
constexpr int kMaxLayers = 8;
constexpr int kMaxRows = 128;  // rows per block at WM = 4

// How the weight reaches shared memory (RegisterStaging, AsyncStaging below).
enum MlpPipe : int { kPipeRegisters = 0, kPipeAsync = 1, kPipeCount = 2 };
constexpr int kAsyncStages = 3;  // chunk buffers of the cp.async pipeline
// input features per chunk there: 16, 8 in the 64-thread block (whose lanes would otherwise
// issue 32 copies per chunk, and spill)
constexpr int async_depth(int threads) { return threads >= 128 ? 16 : 8; }

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
  int width0, width1;  // features of the two activation buffers in shared memory
  T slope;
  const T* in;   // forward: XV (B, R, n_0); backward: grad_Y (B, R, n_L)
  T* out;        // backward: grad_XV (B, R, n_0)
  T* bias_partial;  // backward: (blocks, bias_stride)
  int bias_stride;
};

// 4 consecutive values from 16-byte aligned shared memory, and back.
__device__ __forceinline__ void load4(const float* p, float* v) {
  INJFLOW_EMU_CHECK_ALIGNED(p, 16, "load4");
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double* v) {
  INJFLOW_EMU_CHECK_ALIGNED(p, 16, "load4");
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void store4(float* p, const float* v) {
  INJFLOW_EMU_CHECK_ALIGNED(p, 16, "store4");
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(double* p, const double* v) {
  INJFLOW_EMU_CHECK_ALIGNED(p, 16, "store4");
  *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  *reinterpret_cast<double2*>(p + 2) = make_double2(v[2], v[3]);
}

// cp.async (sm_80+) of one 4- or 8-byte element from global to shared memory, zero-filled when
// !valid (src-size 0); then commit the thread's copies as a group, and wait until at most N of
// its groups are in flight. Code built for an older architecture copies synchronously.
template <typename T>
__device__ __forceinline__ void cp_async_elem(T* dst, const T* src, bool valid) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "cp.async of 4 or 8 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? static_cast<int>(sizeof(T)) : 0;
  if constexpr (sizeof(T) == 4)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(addr), "l"(src),
                 "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(addr), "l"(src),
                 "r"(src_bytes));
#elif defined(INJFLOW_CUDA_EMULATION)
  ::injflow_emu::cp_async(dst, src, sizeof(T), valid ? sizeof(T) : 0);
#else
  *dst = valid ? *src : T(0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::);
#elif defined(INJFLOW_CUDA_EMULATION)
  ::injflow_emu::cp_async_commit();
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif defined(INJFLOW_CUDA_EMULATION)
  ::injflow_emu::cp_async_wait(N);
#endif
}

// A lane's rows and columns in the block: row i < 8 is r_base + (i < 4 ? i : 12 + i), column
// j < 8 is c_base + (j < 4 ? j : 28 + j).
struct LaneTile {
  int r_base, c_base;
  __device__ __forceinline__ LaneTile() {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    r_base = (warp / 2) * kWarpRows + (lane / 8) * 4;
    c_base = (warp % 2) * 64 + (lane % 8) * 4;
  }
  __device__ __forceinline__ static int row(int i) { return i < 4 ? i : 12 + i; }
  __device__ __forceinline__ static int col(int j) { return j < 4 ? j : 28 + j; }
};

// ------------------------------------------------------------------ tensor cores (float32)

enum MlpMath : int { kMathFma = 0, kMathTf32 = 1, kMathTf32x3 = 2, kMathCount = 3 };

// Padding of the tensor-core path's shared-memory rows: a row stride ≡ 8 (mod 32 words) puts
// the 32 lanes' fragment loads (4 k-rows × 8 rows or columns) in 32 different banks.
constexpr int kMmaPad = 8;
constexpr int kMmaChunkStride = kPassCols + kMmaPad;

// A lane's share of the warp tile (32 rows × 64 columns) as 2 × 8 tiles of mma.sync m16n8k8,
// lane = 4·g + t. The PTX fragments of .tf32 (PTX ISA, "Matrix Fragments for mma.m16n8k8"):
//   A (16 × 8):  a[r] = A(g + 8·(r % 2), t + 4·(r / 2))
//   B (8 × 8):   b[r] = B(t + 4·r, g)
//   C (16 × 8):  c[r] = C(g + 8·(r / 2), 2·t + r % 2)
// so acc[mt][nt][2·h + e] is the output at row row(mt, h) and column col(nt, e) of the block.
// The default layout is the fused kernels' (warps in pairs across the two 64-column halves of
// a 128-column pass); MmaLane(warp_row, warp_col) places the calling warp's tile elsewhere.
struct MmaLane {
  int g, t, warp_row, warp_col;
  __device__ __forceinline__ MmaLane()
      : MmaLane((threadIdx.x / 32 / 2) * kWarpRows, (threadIdx.x / 32 % 2) * 64) {}
  __device__ __forceinline__ MmaLane(int warp_row_, int warp_col_)
      : g(threadIdx.x % 32 / 4), t(threadIdx.x % 4), warp_row(warp_row_), warp_col(warp_col_) {}
  __device__ __forceinline__ int row(int mt, int h) const { return warp_row + mt * 16 + 8 * h + g; }
  __device__ __forceinline__ int col(int nt, int e) const { return warp_col + nt * 8 + 2 * t + e; }
};

// float32 → TF32 (10-bit mantissa), rounded to nearest, ties away from zero; the result is a
// float32 bit pattern whose low 13 bits are zero.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#elif defined(INJFLOW_CUDA_EMULATION)
  r = ::injflow_emu::cvt_rna_tf32(x);
#else
  r = __float_as_uint(x) & 0xffffe000u;  // never run: the host picks FMAs below sm_80
#endif
  return r;
}

// c += a·b on one 16 × 8 tile (TF32 operands, float32 accumulation).
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(INJFLOW_CUDA_EMULATION)
  ::injflow_emu::mma_m16n8k8_tf32(c, a, b);
#else
  __trap();  // the host picks FMAs below sm_80
#endif
}

// One k-step of 8 of the warp tile: acc[mt][nt] += A_mt · B_nt for the lane's fragments a, b
// (float32 values). MATH = kMathTf32: one mma per tile on the rounded operands;
// kMathTf32x3: x = head + tail with both TF32, per tile the tails' products first
// (tail·head, head·tail, head·head). B's head and tail are formed one column tile at a time,
// so that only A's stay live across the tiles (fewer registers).
template <int MATH>
__device__ __forceinline__ void mma_k_step(float (&acc)[2][8][4], const float (&a)[2][4],
                                           const float (&b)[8][2]) {
  uint32_t ah[2][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) ah[mt][r] = to_tf32(a[mt][r]);
  if constexpr (MATH == kMathTf32x3) {
    uint32_t at[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) at[mt][r] = to_tf32(a[mt][r] - __uint_as_float(ah[mt][r]));
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      uint32_t bh[2], bt[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        bh[r] = to_tf32(b[nt][r]);
        bt[r] = to_tf32(b[nt][r] - __uint_as_float(bh[r]));
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        mma_tf32(acc[mt][nt], at[mt], bh);
        mma_tf32(acc[mt][nt], ah[mt], bt);
        mma_tf32(acc[mt][nt], ah[mt], bh);
      }
    }
  } else {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      uint32_t bh[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) bh[r] = to_tf32(b[nt][r]);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) mma_tf32(acc[mt][nt], ah[mt], bh);
    }
  }
}

// The next kChunk × 128 block of the weight, loaded into registers while the current one is
// multiplied, then stored to shared memory: chunk[kk][cc] = W(k0 + kk, c0 + cc) with
// W(k, c) = W[c·Kd + k] (out_major: the forward's (N, Kd) weight) or W[k·N + c] (the
// backward's use of the same weight, (Kd, N)); zero outside.
// Depth: 16 input features, 8 for the 64-thread block (whose lanes would otherwise hold 32
// prefetched values each and spill).
template <typename T, int THREADS, int STRIDE = kChunkStride>
struct WeightChunk {
  static constexpr int DEPTH = THREADS >= 128 ? kChunk : kChunk / 2;
  static constexpr int PER_THREAD = DEPTH * kPassCols / THREADS;
  T v[PER_THREAD];

  // element e of this thread in a chunk of `depth` input features
  __device__ __forceinline__ static void coords_at(int e, int depth, bool out_major, int& kk,
                                                   int& cc) {
    const int idx = threadIdx.x + e * THREADS;
    if (out_major) { kk = idx % depth; cc = idx / depth; }    // consecutive k of one row
    else { cc = idx % kPassCols; kk = idx / kPassCols; }       // consecutive c
  }
  __device__ __forceinline__ static void coords(int e, bool out_major, int& kk, int& cc) {
    coords_at(e, DEPTH, out_major, kk, cc);
  }
  __device__ __forceinline__ void load(const T* __restrict__ W, bool out_major, int Kd, int N,
                                       int k0, int c0) {
#pragma unroll
    for (int e = 0; e < PER_THREAD; ++e) {
      int kk, cc;
      coords(e, out_major, kk, cc);
      const int k = k0 + kk, c = c0 + cc;
      v[e] = (k < Kd && c < N) ? (out_major ? W[(int64_t)c * Kd + k] : W[(int64_t)k * N + c])
                               : T(0);
    }
  }
  __device__ __forceinline__ void store(T* chunk, bool out_major) const {
#pragma unroll
    for (int e = 0; e < PER_THREAD; ++e) {
      int kk, cc;
      coords(e, out_major, kk, cc);
      chunk[kk * STRIDE + cc] = v[e];
    }
  }
};

// The weight staging both block GEMMs share (MlpPipe picks one of the two below): per pass of
// kPassCols output columns (from c0), begin(), then the weight staged chunk by chunk into
// shared memory, while step(k0, kc, chunk) uses the staged chunk (input features k0 .. k0 + kc,
// chunk[kk · STRIDE + cc] = W(k0 + kk, c0 + cc)), then end(c0). Every thread of the block runs
// it (it holds the block's barriers).
//
// kPipeRegisters: one chunk buffer; the next chunk's loads in flight in registers while the
// current one is used, two barriers per chunk.
template <typename T, int THREADS, int STRIDE>
struct RegisterStaging {
  using Chunk = WeightChunk<T, THREADS, STRIDE>;
  static constexpr int DEPTH = Chunk::DEPTH;

  template <typename Begin, typename Step, typename End>
  __device__ __forceinline__ static void passes(const T* __restrict__ W, bool out_major, int Kd,
                                                int N, T* chunk, Begin begin, Step step,
                                                End end) {
    for (int c0 = 0; c0 < N; c0 += kPassCols) {
      begin();
      Chunk next;
      if (Kd > 0) next.load(W, out_major, Kd, N, 0, c0);
      for (int k0 = 0; k0 < Kd; k0 += DEPTH) {
        __syncthreads();  // the previous chunk is consumed
        next.store(chunk, out_major);
        __syncthreads();
        if (k0 + DEPTH < Kd) next.load(W, out_major, Kd, N, k0 + DEPTH, c0);
        step(k0, min(DEPTH, Kd - k0), static_cast<const T*>(chunk));
      }
      end(c0);
    }
  }
};

// kPipeAsync (sm_80+): kAsyncStages chunk buffers filled by cp.async straight from global
// memory (no registers held), kAsyncStages - 1 chunks in flight while one is used, one barrier
// per chunk (and one per pass). Element copies with zero fill outside W.
template <typename T, int THREADS, int STRIDE>
struct AsyncStaging {
  static constexpr int DEPTH = async_depth(THREADS);
  static constexpr int STAGES = kAsyncStages;
  static constexpr int PER_THREAD = DEPTH * kPassCols / THREADS;
  static_assert(DEPTH * kPassCols % THREADS == 0, "whole chunks per thread");

  // this thread's copies of chunk (k0, c0) into buf, then one commit (also when past Kd: the
  // group counting stays uniform)
  __device__ __forceinline__ static void issue(const T* __restrict__ W, bool out_major, int Kd,
                                               int N, int k0, int c0, T* buf) {
    if (k0 < Kd) {
#pragma unroll
      for (int e = 0; e < PER_THREAD; ++e) {
        int kk, cc;
        WeightChunk<T, THREADS, STRIDE>::coords_at(e, DEPTH, out_major, kk, cc);
        const int k = k0 + kk, c = c0 + cc;
        const bool inside = k < Kd && c < N;
        const T* src = inside ? (out_major ? W + (int64_t)c * Kd + k : W + (int64_t)k * N + c)
                              : W;
        cp_async_elem(buf + kk * STRIDE + cc, src, inside);
      }
    }
    cp_async_commit();
  }

  template <typename Begin, typename Step, typename End>
  __device__ __forceinline__ static void passes(const T* __restrict__ W, bool out_major, int Kd,
                                                int N, T* chunk, Begin begin, Step step,
                                                End end) {
    const int n = (Kd + DEPTH - 1) / DEPTH;
    for (int c0 = 0; c0 < N; c0 += kPassCols) {
      __syncthreads();  // every thread is done with the previous pass's (or GEMM's) chunks
      begin();
#pragma unroll
      for (int s = 0; s + 1 < STAGES; ++s)
        issue(W, out_major, Kd, N, s * DEPTH, c0, chunk + s * DEPTH * STRIDE);
      for (int i = 0; i < n; ++i) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of chunk i have landed
        __syncthreads();  // everyone's have; and everyone is done with chunk i - 1
        const int ahead = i + STAGES - 1;  // into the buffer chunk i - 1 used
        issue(W, out_major, Kd, N, ahead * DEPTH, c0, chunk + (ahead % STAGES) * DEPTH * STRIDE);
        step(i * DEPTH, min(DEPTH, Kd - i * DEPTH),
             static_cast<const T*>(chunk + (i % STAGES) * DEPTH * STRIDE));
      }
      cp_async_wait<0>();
      end(c0);
    }
  }
};

template <typename T, int THREADS, int STRIDE, int PIPE>
using Staging = typename std::conditional<PIPE == kPipeAsync, AsyncStaging<T, THREADS, STRIDE>,
                                          RegisterStaging<T, THREADS, STRIDE>>::type;

// out[r][c] = Σ_k in[k][r] · W(k, c) for r < M, c < N (M <= 32·WM), with in transposed
// ([Kd][ldm] in shared memory) and W(k, c) as in WeightChunk. The result is handed to
// store(tile, c0, acc) per column pass. The caller synchronises before reading what store
// wrote. Rows past M are computed from padding rows and never stored as results.
template <typename T, int WM, int PIPE, typename Store>
__device__ __forceinline__ void block_gemm(const T* in, int ldm, int M, int Kd, int N,
                                           const T* __restrict__ W, bool out_major, T* chunk,
                                           Store store) {
  using Stage = Staging<T, 64 * WM, kChunkStride, PIPE>;
  const LaneTile tile;
  const bool active = tile.r_base < M;
  T acc[8][8];
  auto begin = [&] {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = T(0);
  };
  auto step = [&](int k0, int kc, const T* staged) {
    if (!active) return;
    const T* a_col = in + k0 * ldm + tile.r_base;
    const T* w_row = staged + tile.c_base;
#pragma unroll 2
    for (int kk = 0; kk < kc; ++kk) {
      T a[8], w[8];
      load4(a_col + kk * ldm, a);
      load4(a_col + kk * ldm + 16, a + 4);
      load4(w_row + kk * kChunkStride, w);
      load4(w_row + kk * kChunkStride + 32, w + 4);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * w[j];  // contracted to FMA
    }
  };
  auto end = [&](int c0) {
    if (active) store(tile, c0, acc);
  };
  Stage::passes(W, out_major, Kd, N, chunk, begin, step, end);
}

// block_gemm on the tensor cores (float32, MATH = kMathTf32 or kMathTf32x3): the same
// contract, tiling and weight staging, each warp's 32 × 64 tile as 2 × 8 mma tiles (MmaLane).
// `in` rows and the chunk's rows are padded to ≡ 8 (mod 32) words (plan_mlp, kMmaChunkStride).
// Input features past Kd are read as zero (the chunk holds zeros there too), so whatever the
// shared memory holds beyond a layer's width never reaches a result.
template <int WM, int MATH, int PIPE, typename Store>
__device__ __forceinline__ void block_gemm_mma(const float* in, int ldm, int M, int Kd, int N,
                                               const float* __restrict__ W, bool out_major,
                                               float* chunk, Store store) {
  using Stage = Staging<float, 64 * WM, kMmaChunkStride, PIPE>;
  static_assert(Stage::DEPTH % 8 == 0, "a weight chunk must hold whole k-steps of 8");
  const MmaLane lane;
  const bool active = lane.warp_row < M;
  float acc[2][8][4];
  auto begin = [&] {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
  };
  auto step = [&](int k0, int kc, const float* staged) {
    if (!active) return;
    const float* a_chunk = in + (int64_t)k0 * ldm;
#pragma unroll
    for (int ks = 0; ks < Stage::DEPTH; ks += 8) {
      if (ks < kc) {
        float a[2][4], b[8][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int k = ks + lane.t + 4 * (r / 2);
            a[mt][r] = k < kc ? a_chunk[k * ldm + lane.row(mt, r % 2)] : 0.f;
          }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            b[nt][r] = staged[(ks + lane.t + 4 * r) * kMmaChunkStride + lane.warp_col + nt * 8 +
                              lane.g];
        mma_k_step<MATH>(acc, a, b);
      }
    }
  };
  auto end = [&](int c0) {
    if (active) store(lane, c0, acc);
  };
  Stage::passes(W, out_major, Kd, N, chunk, begin, step, end);
}

// The layer GEMMs of the kernels: FMAs, or (float32) the tensor cores.
// The layer GEMMs of the kernels: FMAs, or (float32) the tensor cores; the weight staged
// through registers or by cp.async (PIPE).
template <typename T, int WM, int MATH, int PIPE, typename Store>
__device__ __forceinline__ void layer_gemm(const T* in, int ldm, int M, int Kd, int N,
                                           const T* __restrict__ W, bool out_major, T* chunk,
                                           Store store) {
  if constexpr (MATH == kMathFma) {
    block_gemm<T, WM, PIPE>(in, ldm, M, Kd, N, W, out_major, chunk, store);
  } else {
    static_assert(std::is_same<T, float>::value, "the tensor-core path is float32 only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // code built for an architecture without mma.sync TF32 (run through PTX on a newer
    // device): FMAs (the plan's padded strides suit them too)
    block_gemm<T, WM, PIPE>(in, ldm, M, Kd, N, W, out_major, chunk, store);
#else
    block_gemm_mma<WM, MATH, PIPE>(in, ldm, M, Kd, N, W, out_major, chunk, store);
#endif
  }
}

// Into shared memory, transposed: out[c·ldm + r] (rows past M land in padding rows).
template <typename T>
struct SharedStore {
  T* out;
  int ldm, N;
  __device__ __forceinline__ void operator()(const LaneTile& t, int c0,
                                             const T (&acc)[8][8]) const {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = c0 + t.c_base + LaneTile::col(j);
      if (c < N) {
        T col[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) col[i] = acc[i][j];
        store4(out + c * ldm + t.r_base, col);
        store4(out + c * ldm + t.r_base + 16, col + 4);
      }
    }
  }
  __device__ __forceinline__ void operator()(const MmaLane& t, int c0,
                                             const float (&acc)[2][8][4]) const {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = c0 + t.col(nt, e);
        if (c < N) {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) out[c * ldm + t.row(mt, h)] = acc[mt][nt][2 * h + e];
        }
      }
  }
};

// Into global memory, row-major (this block's rows from `out`): out[r·N + c] for r < M, c < N.
template <typename T>
struct GlobalStore {
  T* out;
  int M, N;
  __device__ __forceinline__ void operator()(const LaneTile& t, int c0,
                                             const T (&acc)[8][8]) const {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = t.r_base + LaneTile::row(i);
      if (r < M) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int c = c0 + t.c_base + LaneTile::col(j);
          if (c < N) out[(int64_t)r * N + c] = acc[i][j];
        }
      }
    }
  }
  __device__ __forceinline__ void operator()(const MmaLane& t, int c0,
                                             const float (&acc)[2][8][4]) const {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = t.row(mt, h);
        if (r < M) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = c0 + t.col(nt, e);
              if (c < N) out[(int64_t)r * N + c] = acc[mt][nt][2 * h + e];
            }
        }
      }
  }
};

// The block's samples s0 .. s0 + S of the batch: M = S·R rows from row0 = s0·R.
struct BlockRows {
  int64_t s0, row0;
  int S, M;
  template <typename T>
  __device__ __forceinline__ explicit BlockRows(const MlpArgs<T>& p) {
    s0 = (int64_t)blockIdx.x * p.S;
    S = static_cast<int>(p.B - s0 < p.S ? p.B - s0 : p.S);
    M = S * p.R;
    row0 = s0 * p.R;
  }
};

// The block's M rows of a row-major (·, n) matrix at src (its first row), transposed into
// shared memory: dst[c·ldm + r].
template <int THREADS, typename T>
__device__ __forceinline__ void load_rows_transposed(const T* src, int M, int n, T* dst,
                                                     int ldm) {
  for (int idx = threadIdx.x; idx < M * n; idx += THREADS) {
    const int r = idx / n, c = idx - r * n;
    dst[c * ldm + r] = src[idx];
  }
}

template <typename T, int WM, int MATH, int PIPE>
__global__ void __launch_bounds__(64 * WM) mlp_forward_kernel(const MlpArgs<T> p) {
  constexpr int THREADS = 64 * WM;
  const int ldm = p.ldm, R = p.R, L = p.L, tid = threadIdx.x;
  T* buf_in = dynamic_shared<T>();
  T* buf_out = buf_in + p.width0 * ldm;
  T* chunk = buf_out + p.width1 * ldm;
  const BlockRows rows(p);
  const int64_t s0 = rows.s0, row0 = rows.row0;
  const int S = rows.S, M = rows.M;

  // the block's rows of XV, transposed into shared memory
  load_rows_transposed<THREADS>(p.in + row0 * p.layer[0].n_in, M, p.layer[0].n_in, buf_in, ldm);
  __syncthreads();

  for (int l = 0; l < L; ++l) {
    const MlpLayerArgs<T>& ly = p.layer[l];
    const int n = ly.n_out;
    T* Z = ly.Z + row0 * n;
    T* A = ly.A + row0 * n;
    T* dA = ly.dA + s0 * n;
    if (l + 1 < L) {
      layer_gemm<T, WM, MATH, PIPE>(buf_in, ldm, M, ly.n_in, n, ly.W, true, chunk,
                                    SharedStore<T>{buf_out, ldm, n});
      __syncthreads();
      for (int j = tid; j < n; j += THREADS) {
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
      layer_gemm<T, WM, MATH, PIPE>(buf_in, ldm, M, ly.n_in, n, ly.W, true, chunk,
                                    GlobalStore<T>{Z, M, n});
      __syncthreads();  // Z of this block's rows is written (and visible to the block)
      for (int j = tid; j < n; j += THREADS) {
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
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
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

template <typename T, int WM, int MATH, int PIPE>
__global__ void __launch_bounds__(64 * WM) mlp_backward_kernel(const MlpArgs<T> p) {
  constexpr int THREADS = 64 * WM;
  const int ldm = p.ldm, R = p.R, L = p.L, tid = threadIdx.x;
  // width0 holds the last layer's output gradient (and any hidden width), width1 the hidden
  // widths: the buffers swap roles after the first layer
  T* buf_g = dynamic_shared<T>();
  T* buf_h = buf_g + p.width0 * ldm;
  T* chunk = buf_h + p.width1 * ldm;
  const BlockRows rows(p);
  const int64_t row0 = rows.row0;
  const int S = rows.S, M = rows.M;
  T* partial = p.bias_partial + (int64_t)blockIdx.x * p.bias_stride;

  {  // the last layer: GZ_L from grad_Y
    const MlpLayerArgs<T>& ly = p.layer[L - 1];
    const int n = ly.n_out;
    load_rows_transposed<THREADS>(p.in + row0 * n, M, n, buf_g, ldm);
    __syncthreads();
    if (ly.GZ != nullptr) {
      grad_preact_block(buf_g, ldm, ly.Z + row0 * n, ly.GZ + row0 * n, S, R, n, ly.act, p.slope,
                        partial + ly.bias_offset);
    } else {  // linear last layer: GZ_L = grad_Y
      for (int j = tid; j < n; j += THREADS) {
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
      layer_gemm<T, WM, MATH, PIPE>(buf_g, ldm, M, ly.n_out, n, ly.W, false, chunk,
                                    SharedStore<T>{buf_h, ldm, n});
      __syncthreads();
      grad_preact_block(buf_h, ldm, prev.Z + row0 * n, prev.GZ + row0 * n, S, R, n, prev.act,
                        p.slope, partial + prev.bias_offset);
      __syncthreads();
      T* t = buf_g; buf_g = buf_h; buf_h = t;
    } else {
      layer_gemm<T, WM, MATH, PIPE>(buf_g, ldm, M, ly.n_out, ly.n_in, ly.W, false, chunk,
                                    GlobalStore<T>{p.out + row0 * ly.n_in, M, ly.n_in});
    }
  }
}

// ------------------------------------------------------------------------------- launch plan

struct MlpPlan {
  int S = 0, WM = 0, ldm = 0, math = kMathFma, pipe = kPipeRegisters;
  size_t smem = 0;
  int64_t blocks = 0;
  std::string why_not;  // empty when the fused kernels can run
};

inline MlpPlan unsupported(std::string why) {
  MlpPlan plan;
  plan.why_not = std::move(why);
  return plan;
}

inline int warps_for_rows(int M) { return M > 64 ? 4 : (M > 32 ? 2 : 1); }

// Row stride of the shared-memory activation buffers: 16-byte multiples; ≡ 4 (mod 32) words
// for the FMA path's vector loads, ≡ 8 for the tensor-core fragments (kMmaPad).
inline int buffer_ldm(int WM, int math) {
  return WM * kWarpRows + (math == kMathFma ? 4 : kMmaPad);
}

// Two activation buffers (width0 and width1 features of ldm rows) and the pipeline's weight
// chunk buffers: kChunk rows (RegisterStaging), kAsyncStages chunks of async_depth rows
// (AsyncStaging).
inline size_t smem_bytes(int width0, int width1, int WM, size_t elem, int math, int pipe) {
  const int ldm = buffer_ldm(WM, math);
  const int chunk_stride = math == kMathFma ? kChunkStride : kMmaChunkStride;
  const int chunk_rows = pipe == kPipeAsync ? kAsyncStages * async_depth(64 * WM) : kChunk;
  return ((size_t)(width0 + width1) * ldm + (size_t)chunk_rows * chunk_stride) * elem;
}

struct DeviceFacts {
  int sms = 0, major = 0;
  size_t smem_optin = 0;
};

// Samples per block: `per_block` if positive (benchmarks and tests pin it), else the most that
// still give every multiprocessor of `dev` two blocks (one sample per block when the batch is
// smaller), as many as fit (rows <= 128, shared memory). B samples of R rows; width0, width1:
// the features of the two activation buffers (buffer_widths); elem: bytes per value. The
// cp.async pipeline (pipe = kPipeAsync) needs sm_80 and more shared memory; without either,
// the plan stages through registers.
inline MlpPlan plan_mlp(int64_t B, int64_t R, int width0, int width1, size_t elem, int math,
                        int pipe, const DeviceFacts& dev, int64_t per_block) {
  if (pipe == kPipeAsync) {
    if (dev.major >= 8) {
      MlpPlan plan = plan_mlp(B, R, width0, width1, elem, math, kPipeRegisters, dev, per_block);
      if (!plan.why_not.empty()) return plan;
      // the same tiling with the async pipeline's chunk buffers, if they fit
      if (smem_bytes(width0, width1, plan.WM, elem, math, kPipeAsync) <= dev.smem_optin) {
        plan.pipe = kPipeAsync;
        plan.smem = smem_bytes(width0, width1, plan.WM, elem, math, kPipeAsync);
      }
      return plan;
    }
    pipe = kPipeRegisters;
  }
  if (R > kMaxRows)
    return unsupported("1+K = " + std::to_string(R) + " rows per sample exceeds " +
                       std::to_string(kMaxRows));
  int64_t target = std::max<int64_t>(1, B / (2 * std::max(1, dev.sms)));
  if (per_block > 0) target = per_block;
  target = std::min<int64_t>({target, kMaxRows / R, std::max<int64_t>(B, 1)});
  for (int64_t S = target; S >= 1; --S) {
    const int WM = warps_for_rows(static_cast<int>(S * R));
    const size_t bytes = smem_bytes(width0, width1, WM, elem, math, pipe);
    if (bytes <= dev.smem_optin) {
      MlpPlan plan;
      plan.S = static_cast<int>(S);
      plan.WM = WM;
      plan.math = math;
      plan.ldm = buffer_ldm(WM, math);
      plan.smem = bytes;
      plan.blocks = (B + S - 1) / S;
      return plan;
    }
  }
  const int WM = warps_for_rows(static_cast<int>(R));
  return unsupported("widths of " + std::to_string(width0) + " and " + std::to_string(width1) +
                     " features at 1+K = " + std::to_string(R) + " need " +
                     std::to_string(smem_bytes(width0, width1, WM, elem, math, pipe)) +
                     " bytes of shared memory per block, more than the device's " +
                     std::to_string(dev.smem_optin));
}

// The kernels' arguments that come from the plan and the shapes, alike for the forward and the
// backward (the caller adds the buffers and the layers).
template <typename T>
inline MlpArgs<T> plan_args(const MlpPlan& plan, std::pair<int, int> widths, int64_t B, int R,
                            int L, double slope) {
  MlpArgs<T> args{};
  args.L = L;
  args.B = B;
  args.R = R;
  args.S = plan.S;
  args.ldm = plan.ldm;
  args.width0 = widths.first;
  args.width1 = widths.second;
  args.slope = static_cast<T>(slope);
  return args;
}

// Widths of the two shared-memory activation buffers for layers of n_out[l] outputs and an
// input of n_in0 features. Forward: the input and every hidden width (the buffers alternate),
// the last layer's output goes to global memory. Backward: the last layer's output gradient
// and every hidden width, then the hidden widths.
inline std::pair<int, int> buffer_widths(const std::vector<int>& n_out, int n_in0,
                                         bool backward) {
  int hidden = 0;
  for (size_t l = 0; l + 1 < n_out.size(); ++l) hidden = std::max(hidden, n_out[l]);
  const int first = backward ? n_out.back() : n_in0;
  return {std::max(hidden, first), hidden};
}

// The plan of the forward or the backward kernel for a network of layers with n_out[l] outputs
// on an input of n_in0 features (plan_mlp's other arguments), and in *widths its activation
// buffers' widths (buffer_widths). What the CUDA op (tangent_mlp_cuda.cu) and the CUDA
// emulation's harness both call.
inline MlpPlan plan_network(int64_t B, int64_t R, const std::vector<int>& n_out, int n_in0,
                            bool backward, size_t elem, int math, int pipe,
                            const DeviceFacts& dev, int64_t per_block,
                            std::pair<int, int>* widths) {
  if (n_out.size() > static_cast<size_t>(kMaxLayers))
    return unsupported("more than " + std::to_string(kMaxLayers) + " layers");
  *widths = buffer_widths(n_out, n_in0, backward);
  return plan_mlp(B, R, widths->first, widths->second, elem, math, pipe, dev, per_block);
}

template <typename T, int WM, int MATH, int PIPE>
struct ForwardKernel {
  static auto get() { return &mlp_forward_kernel<T, WM, MATH, PIPE>; }
};
template <typename T, int WM, int MATH, int PIPE>
struct BackwardKernel {
  static auto get() { return &mlp_backward_kernel<T, WM, MATH, PIPE>; }
};

// run(kernel, threads) with the kernel instance of the plan (its WM, math and pipeline); false
// when the plan's math is not one of T's (the tensor-core math is float32 only).
template <typename T, template <typename, int, int, int> class KernelOf, typename Run>
bool dispatch_kernel(const MlpPlan& plan, Run run) {
  auto by_pipe = [&](auto math_tag, auto pipe_tag) {
    constexpr int MATH = decltype(math_tag)::value, PIPE = decltype(pipe_tag)::value;
    if (plan.WM == 4) run(KernelOf<T, 4, MATH, PIPE>::get(), 256);
    else if (plan.WM == 2) run(KernelOf<T, 2, MATH, PIPE>::get(), 128);
    else run(KernelOf<T, 1, MATH, PIPE>::get(), 64);
    return true;
  };
  auto by_warps = [&](auto math_tag) {
    if (plan.pipe == kPipeAsync)
      return by_pipe(math_tag, std::integral_constant<int, kPipeAsync>{});
    return by_pipe(math_tag, std::integral_constant<int, kPipeRegisters>{});
  };
  if constexpr (std::is_same<T, float>::value) {
    if (plan.math == kMathTf32) return by_warps(std::integral_constant<int, kMathTf32>{});
    if (plan.math == kMathTf32x3) return by_warps(std::integral_constant<int, kMathTf32x3>{});
  }
  if (plan.math != kMathFma) return false;
  return by_warps(std::integral_constant<int, kMathFma>{});
}

}  // namespace fused_mlp
}  // namespace injflow
