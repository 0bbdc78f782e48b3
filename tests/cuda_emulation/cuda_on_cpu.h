// Just enough of CUDA, on the CPU, to run the library's CUDA kernels (csrc/cuda/*_kernels.cuh)
// thread by thread without a GPU.
//
// Every thread of a block is a fiber (ucontext for its first start, _setjmp/_longjmp after);
// one scheduler runs them on the calling thread and switches only where a GPU thread may wait:
// __syncthreads and the warp-wide collectives (mma.sync, __shfl_xor_sync). Blocks run one
// after another, so __shared__ variables are function statics and atomics plain updates. What
// it checks, on top of the results themselves:
// - barriers: a block whose threads cannot all arrive (some exited, or wait elsewhere) is a
//   reported deadlock, not a hang;
// - races: the threads of a phase, and the blocks of a launch, run in the order asked for
//   (forward, reverse, shuffled), so results that depend on it differ between runs;
// - memory: dynamic shared memory is exactly the launch's size, filled with NaN bytes and
//   fenced by guard bytes that must stay untouched; global buffers are fenced the same way by
//   the caller (GuardedBuffer); 16-byte vector accesses must be aligned;
// - cp.async: a copy lands in shared memory only when its thread waits for its group
//   (cp.async.wait_group), so a read before the wait and the barrier sees the old contents;
//   the destination must be shared memory, and no copy may be in flight when a thread exits;
// - warp shuffles: __shfl_xor_sync needs the whole warp, each lane gets its partner's value;
// - the tensor cores: mma.sync.m16n8k8 (TF32) is computed from the 32 lanes' fragments as the
//   PTX ISA lays them out ("Matrix Fragments for mma.m16n8k8"), independently of the kernels'
//   own fragment code (MmaLane), with the low 13 bits of every operand ignored, as the
//   hardware does; all 32 lanes must take part; cvt.rna.tf32.f32 rounds to nearest, ties away
//   from zero.
// Not emulated: warp-synchronous code without collectives, other shuffles and warp votes,
// anything the kernels do not use. Static __shared__ variables are not NaN-filled per block.
#pragma once

#undef _FORTIFY_SOURCE  // glibc's checked longjmp refuses jumps between fiber stacks

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define INJFLOW_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace injflow_emu {

struct Dim3 {  // CUDA's dim3
  unsigned x, y, z;
  Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) Float4 {
  float x, y, z, w;
};
struct alignas(16) Double2 {
  double x, y;
};

// One element copy of cp.async: src_bytes of src, then zeros up to bytes.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes, src_bytes;
};

// One GPU thread of the running block.
struct Fiber {
  jmp_buf resume;
  ucontext_t start;
  char* stack = nullptr;
  unsigned tid = 0;
  bool started = false, done = false;
  const unsigned* wait_on = nullptr;  // a generation counter to advance before it may go on
  unsigned wait_gen = 0;
  const char* wait_what = nullptr;
  std::vector<AsyncCopy> uncommitted;          // cp.async copies not yet committed
  std::deque<std::vector<AsyncCopy>> in_flight;  // committed groups, oldest first
};

// A warp's collective state: arrivals at the current mma and the 32 lanes' fragments.
struct Warp {
  unsigned arrived = 0, gen = 0;
  uint32_t a[32][4];
  uint32_t b[32][2];
  float* c[32];
  uint64_t shfl_in[32], shfl_out[32];
  int shfl_mask[32];
};

enum Order { kForward = 0, kReverse = 1, kShuffled = 2 };

struct Block {
  unsigned threads = 0;
  Dim3 block_dim, block_idx, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned bar_arrived = 0, bar_gen = 0;
  jmp_buf scheduler;
  Fiber* current = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  const std::function<void()>* body = nullptr;
  std::string error;
  int64_t mma_count = 0, barrier_count = 0;
};

inline Block*& running() {
  static thread_local Block* block = nullptr;
  return block;
}

inline Dim3 thread_idx() {
  const Block* b = running();
  const unsigned t = b->current->tid, bx = b->block_dim.x, by = b->block_dim.y;
  return {t % bx, (t / bx) % by, t / (bx * by)};
}
inline Dim3 block_idx() { return running()->block_idx; }
inline Dim3 block_dim() { return running()->block_dim; }
inline Dim3 grid_dim() { return running()->grid_dim; }
inline unsigned char* dynamic_shared() { return running()->smem; }

// Stop the running thread with an error: the launch reports it (exceptions cannot cross the
// fiber's stack, so it returns to the scheduler instead).
[[noreturn]] inline void fail(const std::string& what) {
  Block* b = running();
  if (b->error.empty())
    b->error = "block " + std::to_string(b->block_idx.x) + "," + std::to_string(b->block_idx.y) +
               ", thread " +
               std::to_string(b->current->tid) + ": " + what;
  b->current->done = true;
  _longjmp(b->scheduler, 1);
}

inline void wait_for(const unsigned* gen_counter, unsigned gen, const char* what) {
  Block* b = running();
  Fiber* f = b->current;
  f->wait_on = gen_counter;
  f->wait_gen = gen;
  f->wait_what = what;
  if (!_setjmp(f->resume)) _longjmp(b->scheduler, 1);
}

inline void syncthreads() {
  Block* b = running();
  const unsigned gen = b->bar_gen;
  if (++b->bar_arrived == b->threads) {
    b->bar_arrived = 0;
    ++b->bar_gen;
    ++b->barrier_count;
  } else {
    wait_for(&b->bar_gen, gen, "__syncthreads");
  }
}

inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    fail(std::string(what) + ": address not " + std::to_string(bytes) + "-byte aligned");
}

inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// cvt.rna.tf32.f32: 10 mantissa bits, to nearest, ties away from zero (NaN stays NaN).
inline uint32_t cvt_rna_tf32(float x) {
  if (std::isnan(x)) return 0x7fffffffu;
  return (as_bits(x) + 0x1000u) & 0xffffe000u;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, c += A·B, from the 32 lanes' fragments
// (PTX ISA): lane = 4·groupID + threadID_in_group;
//   A (16 × 8): a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
//   B (8 × 8):  b0 (t, g), b1 (t + 4, g)
//   C (16 × 8): c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1)
// The last lane to arrive computes every lane's tile (exact TF32 products summed in double per
// call, added to the float32 accumulator).
inline void mma_m16n8k8_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Block* blk = running();
  const unsigned tid = blk->current->tid, lane = tid % 32;
  Warp& w = blk->warps[tid / 32];
  for (int r = 0; r < 4; ++r) w.a[lane][r] = a[r];
  for (int r = 0; r < 2; ++r) w.b[lane][r] = b[r];
  w.c[lane] = c;
  const unsigned gen = w.gen;
  if (++w.arrived < 32) {
    wait_for(&w.gen, gen, "mma.sync");
    return;
  }
  auto A = [&](int i, int k) {
    return as_float(w.a[4 * (i % 8) + k % 4][i / 8 + 2 * (k / 4)] & 0xffffe000u);
  };
  auto B = [&](int k, int j) { return as_float(w.b[4 * j + k % 4][k / 4] & 0xffffe000u); };
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int q = 0; q < 4; ++q) {
      const int i = g + 8 * (q / 2), j = 2 * t + q % 2;
      double sum = 0;
      for (int k = 0; k < 8; ++k) sum += double(A(i, k)) * double(B(k, j));
      w.c[l][q] = float(double(w.c[l][q]) + sum);
    }
  }
  w.arrived = 0;
  ++w.gen;
  ++blk->mma_count;
}

// cp.async.ca.shared.global of `bytes` (src_bytes of them from src, zeros after): queued until
// the thread waits for it.
inline void cp_async(void* dst, const void* src, size_t bytes, size_t src_bytes) {
  Block* b = running();
  const auto* d = static_cast<unsigned char*>(dst);
  if (d < b->smem || d + bytes > b->smem + b->smem_size)
    fail("cp.async: destination outside the dynamic shared memory");
  check_aligned(dst, bytes, "cp.async destination");
  if (src_bytes > 0) check_aligned(src, bytes, "cp.async source");
  b->current->uncommitted.push_back({dst, src, bytes, src_bytes});
}

inline void cp_async_commit() {
  Fiber* f = running()->current;
  f->in_flight.push_back(std::move(f->uncommitted));
  f->uncommitted.clear();
}

// cp.async.wait_group n: every group of this thread but the newest n has landed.
inline void cp_async_wait(int n) {
  Fiber* f = running()->current;
  while (f->in_flight.size() > static_cast<size_t>(n)) {
    for (const AsyncCopy& c : f->in_flight.front()) {
      std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    f->in_flight.pop_front();
  }
}

// __shfl_xor_sync(mask, v, lane_mask): every lane of the warp (the full mask) exchanges v with
// lane ^ lane_mask.
template <typename T>
inline T shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  Block* blk = running();
  const unsigned tid = blk->current->tid, lane = tid % 32;
  if (mask != 0xffffffffu || blk->threads - (tid - lane) < 32)
    fail("__shfl_xor_sync: only whole warps with the full mask are emulated");
  Warp& w = blk->warps[tid / 32];
  w.shfl_in[lane] = 0;
  std::memcpy(&w.shfl_in[lane], &v, sizeof(T));
  w.shfl_mask[lane] = lane_mask;
  const unsigned gen = w.gen;
  if (++w.arrived < 32) {
    wait_for(&w.gen, gen, "__shfl_xor_sync");
  } else {
    for (int l = 0; l < 32; ++l) {
      if (w.shfl_mask[l] != lane_mask) fail("__shfl_xor_sync: lanes disagree on the lane mask");
      w.shfl_out[l] = w.shfl_in[(l ^ lane_mask) & 31];
    }
    w.arrived = 0;
    ++w.gen;
  }
  T out;
  std::memcpy(&out, &w.shfl_out[lane], sizeof(T));
  return out;
}

inline void fiber_main() {
  Block* b = running();
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    fail(std::string("exception: ") + e.what());
  }
  bool in_flight = !b->current->uncommitted.empty();
  for (const auto& group : b->current->in_flight) in_flight = in_flight || !group.empty();
  if (in_flight) fail("exited with cp.async copies in flight");
  b->current->done = true;
  _longjmp(b->scheduler, 1);
}

struct LaunchStats {
  int64_t blocks = 0, barriers = 0, mma = 0;
};

// Runs body() as the block_dim threads of each block of grid_dim (x fastest, as CUDA numbers
// them) with `smem_bytes` of dynamic shared memory. Throws std::runtime_error naming the block
// and thread on a failed check.
inline LaunchStats launch(Dim3 grid_dim, Dim3 block_dim, size_t smem_bytes,
                          const std::function<void()>& body, Order order = kForward,
                          uint64_t seed = 0) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  const uint64_t grid = uint64_t(grid_dim.x) * grid_dim.y * grid_dim.z;
  if (threads == 0 || threads > 1024)
    throw std::runtime_error("launch: " + std::to_string(threads) +
                             " threads per block (1 to 1024)");
  constexpr size_t kStack = 256 << 10, kGuard = 4096;
  std::unique_ptr<char[]> stacks(new char[kStack * threads]);
  // guard bytes before and after the dynamic shared memory; 256-byte aligned, like CUDA's
  std::vector<unsigned char> shared(smem_bytes + 2 * kGuard + 256);
  unsigned char* base = shared.data() + kGuard;
  base += (256 - reinterpret_cast<uintptr_t>(base) % 256) % 256;
  std::mt19937_64 rng(seed);
  LaunchStats stats;
  Block b;
  running() = &b;
  struct Reset {
    ~Reset() { running() = nullptr; }
  } reset;
  // blocks one after another, in the order asked for too (results that depend on it mean the
  // blocks race, e.g. atomics adding in a different order)
  std::vector<uint64_t> blocks(grid);
  for (uint64_t i = 0; i < grid; ++i) blocks[i] = order == kReverse ? grid - 1 - i : i;
  if (order == kShuffled) std::shuffle(blocks.begin(), blocks.end(), rng);
  for (const uint64_t blk : blocks) {
    b = Block{};
    b.threads = threads;
    b.block_dim = block_dim;
    b.block_idx = {unsigned(blk % grid_dim.x), unsigned(blk / grid_dim.x % grid_dim.y),
                   unsigned(blk / (uint64_t(grid_dim.x) * grid_dim.y))};
    b.grid_dim = grid_dim;
    b.body = &body;
    b.fibers.resize(threads);
    b.warps.resize((threads + 31) / 32);
    std::memset(shared.data(), 0xff, shared.size());  // NaN bytes, as unwritten memory might be
    b.smem = base;
    b.smem_size = smem_bytes;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = b.fibers[t];
      f.tid = t;
      f.stack = stacks.get() + kStack * t;
      getcontext(&f.start);
      f.start.uc_stack.ss_sp = f.stack;
      f.start.uc_stack.ss_size = kStack;
      f.start.uc_link = nullptr;
      makecontext(&f.start, fiber_main, 0);
    }
    std::vector<unsigned> sequence(threads);
    for (unsigned t = 0; t < threads; ++t) sequence[t] = order == kReverse ? threads - 1 - t : t;
    unsigned live = threads;
    while (live > 0 && b.error.empty()) {
      if (order == kShuffled) std::shuffle(sequence.begin(), sequence.end(), rng);
      bool progressed = false;
      for (unsigned i = 0; i < threads && b.error.empty(); ++i) {
        Fiber& f = b.fibers[sequence[i]];
        if (f.done || (f.wait_on != nullptr && *f.wait_on == f.wait_gen)) continue;
        f.wait_on = nullptr;
        b.current = &f;
        progressed = true;
        if (!_setjmp(b.scheduler)) {
          if (!f.started) {
            f.started = true;
            setcontext(&f.start);
          }
          _longjmp(f.resume, 1);
        }
        if (b.fibers[sequence[i]].done) --live;
      }
      if (!progressed && live > 0 && b.error.empty()) {
        unsigned at_barrier = 0, at_mma = 0;
        for (const Fiber& f : b.fibers) {
          if (f.done) continue;
          if (f.wait_what == std::string("__syncthreads")) ++at_barrier;
          else ++at_mma;  // a warp collective
        }
        b.error = "block " + std::to_string(blk) + ": deadlock: " +
                  std::to_string(threads - live) + " threads exited, " +
                  std::to_string(at_barrier) + " wait at __syncthreads, " +
                  std::to_string(at_mma) + " at a warp collective (mma.sync, shuffle)";
      }
    }
    if (!b.error.empty()) throw std::runtime_error(b.error);
    for (size_t i = 0; i < shared.size(); ++i) {
      const unsigned char* p = shared.data() + i;
      if ((p < base || p >= base + smem_bytes) && *p != 0xff)
        throw std::runtime_error("block " + std::to_string(blk) + ": shared memory written " +
                                 (p < base ? "before its start" : "past its end") + " (" +
                                 std::to_string(smem_bytes) + " bytes dynamic)");
    }
    ++stats.blocks;
    stats.barriers += b.barrier_count;
    stats.mma += b.mma_count;
  }
  return stats;
}

// The common 1-D launch: `grid` blocks of `threads` threads.
inline LaunchStats launch(unsigned grid, unsigned threads, size_t smem_bytes,
                          const std::function<void()>& body, Order order = kForward,
                          uint64_t seed = 0) {
  return launch(Dim3{grid, 1, 1}, Dim3{threads, 1, 1}, smem_bytes, body, order, seed);
}

// A global-memory buffer fenced by NaN guard bytes: checked() says whether the guards are
// intact (a kernel wrote outside the buffer otherwise).
class GuardedBuffer {
 public:
  static constexpr size_t kGuard = 1024;
  GuardedBuffer(const void* init, size_t bytes, bool poison) : bytes_(bytes) {
    storage_.assign(bytes + 2 * kGuard + 256, 0xff);
    data_ = storage_.data() + kGuard;
    data_ += (256 - reinterpret_cast<uintptr_t>(data_) % 256) % 256;
    if (init != nullptr && !poison) std::memcpy(data_, init, bytes);
  }
  unsigned char* data() { return data_; }
  bool checked() const {
    for (size_t i = 0; i < storage_.size(); ++i) {
      const unsigned char* p = storage_.data() + i;
      if ((p < data_ || p >= data_ + bytes_) && *p != 0xff) return false;
    }
    return true;
  }

 private:
  size_t bytes_;
  std::vector<unsigned char> storage_;
  unsigned char* data_;
};

}  // namespace injflow_emu

// The CUDA names the kernels use.
#define threadIdx (::injflow_emu::thread_idx())
#define blockIdx (::injflow_emu::block_idx())
#define blockDim (::injflow_emu::block_dim())
#define gridDim (::injflow_emu::grid_dim())
using float4 = ::injflow_emu::Float4;
using double2 = ::injflow_emu::Double2;
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline void __syncthreads() { ::injflow_emu::syncthreads(); }
inline uint32_t __float_as_uint(float f) { return ::injflow_emu::as_bits(f); }
inline float __uint_as_float(uint32_t u) { return ::injflow_emu::as_float(u); }
[[noreturn]] inline void __trap() { ::injflow_emu::fail("__trap()"); }
inline int min(int a, int b) { return a < b ? a : b; }
#define __shared__ static
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ::injflow_emu::shfl_xor_sync(mask, v, lane_mask);
}
template <typename T>
inline T atomicAdd(T* address, T v) {  // the block's threads run one at a time
  const T old = *address;
  *address = old + v;
  return old;
}
using dim3 = ::injflow_emu::Dim3;
// the device math functions the kernels call unqualified, with their float overloads
using std::exp;
using std::isfinite;
using std::log;
using std::sqrt;
