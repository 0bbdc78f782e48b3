// The fused tangent_mlp kernels (csrc/cuda/tangent_mlp_kernels.cuh), their launch plan and
// kernel choice, run on the CPU under the CUDA emulation of cuda_on_cpu.h. A C interface for
// ctypes (tests/emulated_cuda.py builds and calls it): the same arguments the CUDA op passes
// (csrc/cuda/tangent_mlp_cuda.cu), with the device's facts given instead of queried.
//
// Return codes: 0 ran; 1 the plan refuses the shapes (err: why, as the op would say);
// 2 a check of the emulation failed or a kernel wrote outside a buffer (err: what and where).

#include "activations.h"
#include "cuda_on_cpu.h"
#include "cuda/mlp_param_grad_kernels.cuh"
#include "cuda/tangent_mlp_kernels.cuh"

#include <cstdio>

using namespace injflow::fused_mlp;

namespace {

struct Device {
  int pipe;  // MlpPipe asked for (the plan may fall back to kPipeRegisters)
  int sms, major;
  int64_t smem_optin;
  int64_t per_block;  // samples per block (0: the plan's choice)
  int order;          // injflow_emu::Order
  uint64_t seed;
};

int report(char* err, int errlen, const std::string& what, int code) {
  std::snprintf(err, errlen, "%s", what.c_str());
  return code;
}

MlpPlan plan_for(int dtype, int math, int64_t B, int R, int L, const int* n_in, const int* n_out,
                 bool backward, const Device& dev, std::pair<int, int>* widths_out) {
  std::pair<int, int> widths;
  const DeviceFacts facts{dev.sms, dev.major, static_cast<size_t>(dev.smem_optin)};
  const MlpPlan plan = plan_network(B, R, std::vector<int>(n_out, n_out + L), n_in[0], backward,
                                    dtype == 0 ? 4 : 8, math, dev.pipe, facts, dev.per_block,
                                    &widths);
  if (widths_out) *widths_out = widths;
  return plan;
}

void plan_out(const MlpPlan& plan, int64_t* out) {
  out[0] = plan.S;
  out[1] = plan.WM;
  out[2] = plan.ldm;
  out[3] = plan.blocks;
  out[4] = static_cast<int64_t>(plan.smem);
  out[5] = plan.math;
  out[6] = plan.pipe;
}

// Copies of the caller's arrays in guarded buffers (outputs poisoned with NaN), copied back
// after the launch; fails if a guard was overwritten.
struct Buffers {
  struct Entry {
    std::unique_ptr<injflow_emu::GuardedBuffer> buf;
    void* user;
    size_t bytes;
    bool output;
    std::string name;
  };
  std::vector<Entry> entries;
  template <typename T>
  T* in(const void* user, size_t count, const std::string& name) {
    return add<T>(const_cast<void*>(user), count, false, name);
  }
  template <typename T>
  T* out(void* user, size_t count, const std::string& name) {
    return add<T>(user, count, true, name);
  }
  template <typename T>
  T* add(void* user, size_t count, bool output, const std::string& name) {
    if (user == nullptr) return nullptr;
    const size_t bytes = count * sizeof(T);
    entries.push_back({std::make_unique<injflow_emu::GuardedBuffer>(user, bytes, output), user,
                       bytes, output, name});
    return reinterpret_cast<T*>(entries.back().buf->data());
  }
  std::string finish() {
    for (auto& e : entries) {
      if (!e.buf->checked()) return "a kernel wrote outside " + e.name;
      if (e.output) std::memcpy(e.user, e.buf->data(), e.bytes);
    }
    return "";
  }
};

template <typename T, template <typename, int, int, int> class KernelOf>
int run(const MlpPlan& plan, const MlpArgs<T>& args, const Device& dev, Buffers& bufs,
        int64_t* stats_out, char* err, int errlen) {
  injflow_emu::LaunchStats stats;
  try {
    const bool ok = dispatch_kernel<T, KernelOf>(plan, [&](auto kernel, int threads) {
      stats = injflow_emu::launch(static_cast<unsigned>(plan.blocks), threads, plan.smem,
                                  [&] { kernel(args); },
                                  static_cast<injflow_emu::Order>(dev.order), dev.seed);
    });
    if (!ok) return report(err, errlen, "no kernel for this math and dtype", 2);
  } catch (const std::exception& e) {
    return report(err, errlen, e.what(), 2);
  }
  const std::string bad = bufs.finish();
  if (!bad.empty()) return report(err, errlen, bad, 2);
  stats_out[0] = stats.blocks;
  stats_out[1] = stats.barriers;
  stats_out[2] = stats.mma;
  return 0;
}

template <typename T>
int forward(int math, int64_t B, int R, int L, const int* n_in, const int* n_out,
            const int* acts, double slope, const void* XV, const void* const* W,
            const void* const* b, void* const* Z, void* const* A, void* const* dA,
            const Device& dev, int64_t* plan_o, int64_t* stats_o, char* err, int errlen) {
  std::pair<int, int> widths;
  const MlpPlan plan = plan_for(sizeof(T) == 4 ? 0 : 1, math, B, R, L, n_in, n_out, false, dev,
                                &widths);
  if (!plan.why_not.empty()) return report(err, errlen, plan.why_not, 1);
  plan_out(plan, plan_o);
  Buffers bufs;
  MlpArgs<T> args = plan_args<T>(plan, widths, B, R, L, slope);
  args.in = bufs.in<T>(XV, B * R * n_in[0], "XV");
  for (int l = 0; l < L; ++l) {
    auto& ly = args.layer[l];
    const std::string s = std::to_string(l);
    ly.W = bufs.in<T>(W[l], (size_t)n_out[l] * n_in[l], "W" + s);
    ly.b = bufs.in<T>(b[l], n_out[l], "b" + s);
    ly.Z = bufs.out<T>(Z[l], B * R * n_out[l], "Z" + s);
    ly.A = bufs.out<T>(A[l], B * R * n_out[l], "A" + s);
    ly.dA = bufs.out<T>(dA[l], B * n_out[l], "dA" + s);
    ly.n_in = n_in[l];
    ly.n_out = n_out[l];
    ly.act = acts[l];
  }
  return run<T, ForwardKernel>(plan, args, dev, bufs, stats_o, err, errlen);
}

template <typename T>
int backward(int math, int64_t B, int R, int L, const int* n_in, const int* n_out,
             const int* acts, double slope, const void* gY, const void* const* W,
             const void* const* Z, void* const* GZ, void* gXV, void* partial,
             const Device& dev, int64_t* plan_o, int64_t* stats_o, char* err, int errlen) {
  std::pair<int, int> widths;
  const MlpPlan plan = plan_for(sizeof(T) == 4 ? 0 : 1, math, B, R, L, n_in, n_out, true, dev,
                                &widths);
  if (!plan.why_not.empty()) return report(err, errlen, plan.why_not, 1);
  plan_out(plan, plan_o);
  int bias_total = 0;
  for (int l = 0; l < L; ++l) bias_total += n_out[l];
  Buffers bufs;
  MlpArgs<T> args = plan_args<T>(plan, widths, B, R, L, slope);
  args.in = bufs.in<T>(gY, B * R * n_out[L - 1], "grad_Y");
  args.out = bufs.out<T>(gXV, B * R * n_in[0], "grad_XV");
  args.bias_partial = bufs.out<T>(partial, plan.blocks * bias_total, "bias_partial");
  args.bias_stride = bias_total;
  int offset = 0;
  for (int l = 0; l < L; ++l) {
    auto& ly = args.layer[l];
    const std::string s = std::to_string(l);
    ly.W = bufs.in<T>(W[l], (size_t)n_out[l] * n_in[l], "W" + s);
    ly.Z = bufs.in<T>(Z[l], B * R * n_out[l], "Z" + s);
    ly.GZ = bufs.out<T>(GZ[l], B * R * n_out[l], "GZ" + s);  // null: linear last layer
    ly.n_in = n_in[l];
    ly.n_out = n_out[l];
    ly.act = acts[l];
    ly.bias_offset = offset;
    offset += n_out[l];
  }
  return run<T, BackwardKernel>(plan, args, dev, bufs, stats_o, err, errlen);
}

// The host's part of the fused backward after mlp_backward_kernel over M rows, through the
// same plan_param_grads and add_param_grad_sums as param_grads in tangent_mlp_cuda.cu: with
// gW given (INJFLOW_MLP_WGRAD=kernel), mlp_weight_grad_kernel and then sum_partials_kernel for
// gW and gb; without, the bias sums alone. inputs[l]: the layer's input (M, n_in[l]); partial:
// (partial_rows, Σ n_out) the backward kernel's bias partials; math: the weight-gradient
// kernel's (MlpMath, float32 only for the tensor cores). info: rows per split, splits, tiles,
// blocks of the sums, mma.sync calls.
template <typename T>
int param_grads(int math, int64_t M, int L, const int* n_in, const int* n_out,
                const void* const* GZ, const void* const* inputs, const void* partial,
                int64_t partial_rows, void* const* gW, void* const* gb, int64_t pinned_rows,
                const Device& dev, int64_t* info, char* err, int errlen) {
  if (L > kMaxLayers) return report(err, errlen, "more than 8 layers", 2);
  Buffers bufs;
  std::vector<const T*> gz_ptr(L), in_ptr(L);
  std::vector<T*> gW_ptr(L), gb_ptr(L);
  int64_t bias_total = 0;
  for (int l = 0; l < L; ++l) {
    const std::string s = std::to_string(l);
    gz_ptr[l] = bufs.in<T>(GZ[l], M * n_out[l], "GZ" + s);
    in_ptr[l] = bufs.in<T>(inputs[l], M * n_in[l], "input" + s);
    if (gW != nullptr) gW_ptr[l] = bufs.out<T>(gW[l], (size_t)n_out[l] * n_in[l], "gW" + s);
    gb_ptr[l] = bufs.out<T>(gb[l], n_out[l], "gb" + s);
    bias_total += n_out[l];
  }
  const T* bias_partial = bufs.in<T>(partial, partial_rows * bias_total, "bias_partial");
  ParamGradLaunches<T> p = plan_param_grads<T>(L, M, gz_ptr.data(), in_ptr.data(), n_out, n_in,
                                               dev.sms, pinned_rows);
  std::vector<T> weight_partial;
  T* weight_partial_ptr = nullptr;
  if (gW != nullptr) {
    weight_partial.resize(p.splits * p.wgrad.stride);
    weight_partial_ptr =
        bufs.out<T>(weight_partial.data(), weight_partial.size(), "weight_partial");
  }
  add_param_grad_sums(p, weight_partial_ptr, gW != nullptr ? gW_ptr.data() : nullptr,
                      bias_partial, partial_rows, gb_ptr.data());
  const auto order = static_cast<injflow_emu::Order>(dev.order);
  int64_t mma = 0;
  try {
    if (gW != nullptr && p.tiles > 0) {
      auto body = [&]() -> std::function<void()> {
        if constexpr (std::is_same<T, float>::value) {
          if (math == kMathTf32) return [&] { mlp_weight_grad_kernel<float, kMathTf32>(p.wgrad); };
          if (math == kMathTf32x3)
            return [&] { mlp_weight_grad_kernel<float, kMathTf32x3>(p.wgrad); };
        }
        if (math != kMathFma) throw std::runtime_error("tensor-core math for float64");
        return [&] { mlp_weight_grad_kernel<T, kMathFma>(p.wgrad); };
      }();
      mma = injflow_emu::launch(injflow_emu::Dim3{(unsigned)p.tiles, (unsigned)p.splits, 1},
                                injflow_emu::Dim3{kGradThreads, 1, 1},
                                weight_grad_smem(sizeof(T)), body, order, dev.seed)
                .mma;
    }
    if (p.sum_blocks > 0)
      injflow_emu::launch((unsigned)p.sum_blocks, kSumCols * kSumLanes,
                          sum_partials_smem(sizeof(T)), [&] { sum_partials_kernel<T>(p.sums); },
                          order, dev.seed);
  } catch (const std::exception& e) {
    return report(err, errlen, e.what(), 2);
  }
  const std::string bad = bufs.finish();
  if (!bad.empty()) return report(err, errlen, bad, 2);
  const bool own_gemm = gW != nullptr;
  info[0] = own_gemm ? p.wgrad.rows_per_split : 0;
  info[1] = own_gemm ? p.splits : 0;
  info[2] = own_gemm ? p.tiles : 0;
  info[3] = p.sum_blocks;
  info[4] = mma;
  return 0;
}

// Kernels that break one rule each, so that the tests can see every check of the emulation
// fail (see emu_selftest).
void overflow_shared() {
  float* s = injflow::dynamic_shared<float>();
  s[threadIdx.x + 64] = 1.f;  // the launch gives 64 floats
}
void divergent_barrier() {
  if (threadIdx.x < 32) __syncthreads();
}
void misaligned_load() {
  float v[4];
  load4(injflow::dynamic_shared<float>() + 1, v);
}
void partial_warp_mma() {
  if (threadIdx.x % 32 < 16) {
    float c[4] = {0, 0, 0, 0};
    const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    mma_tf32(c, a, b);
  }
}
// thread t writes s[t] while thread t + 1 reads it with no barrier between: the result
// depends on the order the threads run in
float racy_sum = 0;
void racy() {
  float* s = injflow::dynamic_shared<float>();
  const unsigned t = threadIdx.x;
  s[t] = float(t);
  if (t == 0) s[63] = 0.f;
  __syncthreads();
  if (t > 0) s[t - 1] = s[t] + 1.f;
  __syncthreads();
  if (t == 0) {
    racy_sum = 0;
    for (int i = 0; i < 64; ++i) racy_sum += s[i];
  }
}
// cp.async of 64 ones into shared memory, read back after a barrier: with the wait for the
// copies (64), without it (NaN: they have not landed), or never waited for at all (an error).
const std::vector<float> kOnes(64, 1.f);
float async_sum = 0;
template <int MODE>  // 0 waited, 1 not waited before the read, 2 never waited
void async_copy() {
  float* s = injflow::dynamic_shared<float>();
  const unsigned t = threadIdx.x;
  cp_async_elem(s + t, kOnes.data() + t, true);
  cp_async_commit();
  if (MODE == 0) cp_async_wait<0>();
  __syncthreads();
  if (t == 0) {
    async_sum = 0;
    for (int i = 0; i < 64; ++i) async_sum += s[i];
  }
  if (MODE == 1) cp_async_wait<0>();
}

// One m16n8k8 through MmaLane's fragment code (the kernels' own): C = A·B of small integers
// (exact in TF32), A 16 × 8 and B 8 × 8 row-major, C 16 × 8.
const float* mma_a = nullptr;
const float* mma_b = nullptr;
float* mma_c = nullptr;
void one_mma() {
  const MmaLane lane;
  float a[2][4] = {}, b[8][2] = {}, acc[2][8][4] = {};
  for (int r = 0; r < 4; ++r) {
    const int row = lane.row(0, r % 2) - lane.warp_row, k = lane.t + 4 * (r / 2);
    a[0][r] = mma_a[row * 8 + k];
  }
  for (int r = 0; r < 2; ++r) b[0][r] = mma_b[(lane.t + 4 * r) * 8 + lane.g];
  mma_k_step<kMathTf32>(acc, a, b);
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 2; ++e)
      mma_c[(lane.row(0, h) - lane.warp_row) * 8 + lane.col(0, e) - lane.warp_col] =
          acc[0][0][2 * h + e];
}

}  // namespace

extern "C" {

int emu_mlp_plan(int dtype, int math, int pipe, int64_t B, int R, int L, const int* n_in,
                 const int* n_out, int backward, int sms, int major, int64_t smem_optin,
                 int64_t per_block, int64_t* plan_o, char* err, int errlen) {
  const Device dev{pipe, sms, major, smem_optin, per_block, 0, 0};
  const MlpPlan plan = plan_for(dtype, math, B, R, L, n_in, n_out, backward != 0, dev, nullptr);
  if (!plan.why_not.empty()) return report(err, errlen, plan.why_not, 1);
  plan_out(plan, plan_o);
  return 0;
}

// dtype: 0 float32, 1 float64; math: kMathFma, kMathTf32, kMathTf32x3; pipe: kPipeRegisters,
// kPipeAsync; A[L - 1] is Y.
int emu_mlp_forward(int dtype, int math, int pipe, int64_t B, int R, int L, const int* n_in,
                    const int* n_out, const int* acts, double slope, const void* XV,
                    const void* const* W, const void* const* b, void* const* Z, void* const* A,
                    void* const* dA, int sms, int major, int64_t smem_optin, int64_t per_block,
                    int order, uint64_t seed, int64_t* plan_o, int64_t* stats_o, char* err,
                    int errlen) {
  const Device dev{pipe, sms, major, smem_optin, per_block, order, seed};
  if (dtype == 0)
    return forward<float>(math, B, R, L, n_in, n_out, acts, slope, XV, W, b, Z, A, dA, dev,
                          plan_o, stats_o, err, errlen);
  return forward<double>(math, B, R, L, n_in, n_out, acts, slope, XV, W, b, Z, A, dA, dev,
                         plan_o, stats_o, err, errlen);
}

// GZ[l] null for a linear last layer; partial: (plan's blocks, Σ n_out) bias partial sums.
int emu_mlp_backward(int dtype, int math, int pipe, int64_t B, int R, int L, const int* n_in,
                     const int* n_out, const int* acts, double slope, const void* gY,
                     const void* const* W, const void* const* Z, void* const* GZ, void* gXV,
                     void* partial, int sms, int major, int64_t smem_optin, int64_t per_block,
                     int order, uint64_t seed, int64_t* plan_o, int64_t* stats_o, char* err,
                     int errlen) {
  const Device dev{pipe, sms, major, smem_optin, per_block, order, seed};
  if (dtype == 0)
    return backward<float>(math, B, R, L, n_in, n_out, acts, slope, gY, W, Z, GZ, gXV, partial,
                           dev, plan_o, stats_o, err, errlen);
  return backward<double>(math, B, R, L, n_in, n_out, acts, slope, gY, W, Z, GZ, gXV, partial,
                          dev, plan_o, stats_o, err, errlen);
}

// The parameter gradients after the backward kernel (param_grads above); gW null: only the
// bias sums. rows_per_split > 0 pins the split (INJFLOW_MLP_WGRAD_ROWS); math as MlpMath.
int emu_mlp_param_grads(int dtype, int math, int64_t M, int L, const int* n_in,
                        const int* n_out, const void* const* GZ, const void* const* inputs,
                        const void* partial, int64_t partial_rows, void* const* gW,
                        void* const* gb, int sms, int64_t rows_per_split, int order,
                        uint64_t seed, int64_t* info, char* err, int errlen) {
  const Device dev{kPipeRegisters, sms, 9, 0, 0, order, seed};
  if (dtype == 0)
    return param_grads<float>(math, M, L, n_in, n_out, GZ, inputs, partial, partial_rows, gW, gb,
                              rows_per_split, dev, info, err, errlen);
  return param_grads<double>(math, M, L, n_in, n_out, GZ, inputs, partial, partial_rows, gW, gb,
                             rows_per_split, dev, info, err, errlen);
}

// Rule-breaking kernels (which: 0 shared overflow, 1 divergent barrier, 2 misaligned load,
// 3 an mma by half a warp, 7 exit with cp.async copies in flight) give 2 and the check's
// message; the others give 0 and what they computed in *value: 4 (a race) a sum that depends
// on `order`; 5, 6 the sum of 64 ones copied by cp.async, read after the wait (64) or before
// it (NaN).
int emu_selftest(int which, int order, double* value, char* err, int errlen) {
  void (*kernels[])() = {overflow_shared, divergent_barrier, misaligned_load, partial_warp_mma,
                         racy, async_copy<0>, async_copy<1>, async_copy<2>};
  racy_sum = async_sum = 0;
  try {
    injflow_emu::launch(1, 64, 64 * sizeof(float), kernels[which],
                        static_cast<injflow_emu::Order>(order), 7);
  } catch (const std::exception& e) {
    return report(err, errlen, e.what(), 2);
  }
  *value = which == 4 ? racy_sum : async_sum;
  return 0;
}

// C (16 × 8) = A (16 × 8) · B (8 × 8), row-major, through one warp's MmaLane fragments.
int emu_one_mma(const float* a, const float* b, float* c, char* err, int errlen) {
  mma_a = a;
  mma_b = b;
  mma_c = c;
  try {
    injflow_emu::launch(1, 32, 0, one_mma);
  } catch (const std::exception& e) {
    return report(err, errlen, e.what(), 2);
  }
  return 0;
}

}  // extern "C"
