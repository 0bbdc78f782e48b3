// CUDA tangent_mlp: the whole network in one kernel for the forward and one for the backward's
// activation-gradient chain (csrc/tangent_mlp.h has the math and the per-layer path). The
// kernels and their launch plan are in tangent_mlp_kernels.cuh (which also compiles for the
// CPU under the CUDA emulation of tests/cuda_emulation/); this file launches them from ATen.
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
// gradients gW_l = GZ_lᵀ A_{l-1} are cuBLAS GEMMs over all rows, or with weight_grads=kernel
// one launch of mlp_weight_grad_kernel for every layer (mlp_param_grad_kernels.cuh, in the
// call's arithmetic below); the bias gradients (and that kernel's split partials) are added up
// by one sum_partials_kernel: 2 + L launches for the whole backward (3 with the weight-gradient
// kernel), deterministic.
//
// Arithmetic (MlpMath, chosen per call on the host, see mlp_math):
// - kMathFma: plain float32 (or float64) FMAs, each lane an 8 × 8 tile of outputs, reading its
//   operands from shared memory with conflict-free 16-byte loads (LaneTile below). The default.
// - kMathTf32: float32 on the tensor cores (sm_80+), mma.sync m16n8k8 with TF32 operands
//   (rounded to nearest) and float32 accumulation, the same warp tile as 2 × 8 mma tiles
//   (MmaLane, block_gemm_mma). Used when torch allows TF32 for float32 matmuls
//   (torch.backends.cuda.matmul.allow_tf32, what TrainStep(precision="tf32") sets), so the
//   fused kernels follow the same switch as the per-layer path's cuBLAS GEMMs.
// - kMathTf32x3: 3×TF32 (each operand split into a TF32 head and a TF32 tail, three mma per
//   tile, head·head + head·tail + tail·head): float32-level accuracy on the tensor cores. Only
//   through the op's fused math option tf32x3 (benchmarks) until a GPU run shows it pays.
//
// Weight staging (MlpPipe, see mlp_pipe): kPipeRegisters (the default) holds the next chunk of
// the weight in registers while the current one is used, two barriers per chunk; kPipeAsync
// (the op's fused pipeline option async, sm_80+) keeps two chunks in flight with cp.async into three
// shared-memory buffers, one barrier per chunk (item 2 of the H200 profile's list; unmeasured).
//
// Status (bench/RESULTS.md, "Fused tangent MLP", H200): the FMA kernels are correct, but slower
// than the per-layer path at every measured size (MINIBOONE forward 105 µs and backward 124 µs
// per conditioner, ~10 TFLOP/s; the per-layer cuBLAS path is faster), so the fused path runs
// only when asked for (path=2). The tensor-core math (kMathTf32, kMathTf32x3) passes its tests
// under the CPU emulation (tests/test_tangent_mlp_emulated.py) and has CUDA tests
// (tests/test_tangent_mlp.py, "CUDA: TF32"), but has not run on a GPU yet.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>
#include <type_traits>
#include <utility>

#include "../tangent_mlp.h"
#include "../tangent_ops.h"
#include "mlp_param_grad_kernels.cuh"
#include "tangent_mlp_kernels.cuh"
#include "tangent_ops_cuda.h"

namespace injflow {
namespace {

using namespace fused_mlp;

const DeviceFacts& device_facts(int device) {
  static std::mutex mu;
  static std::vector<DeviceFacts> facts;
  std::lock_guard<std::mutex> lock(mu);
  if ((int)facts.size() <= device) facts.resize(device + 1);
  if (facts[device].sms == 0) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
    facts[device].sms = prop->multiProcessorCount;
    facts[device].major = prop->major;
    facts[device].smem_optin = prop->sharedMemPerBlockOptin;
  }
  return facts[device];
}

// How the fused kernels stage the weights (the op's fused pipeline option): registers (the
// default: the next chunk's loads held in registers) | async (cp.async into three chunk
// buffers, sm_80+; not yet measured on a GPU, so opt-in).
int mlp_pipe(const FusedMlpOptions& o) {
  return o.pipeline == kFusedPipeAsync ? kPipeAsync : kPipeRegisters;
}

// The arithmetic of the fused kernels for this call (see the top of the file): float64 and
// devices below sm_80 use FMAs; float32 follows torch's TF32 switch for matmuls
// (at::globalContext().allowTF32CuBLAS(), as cuBLAS does for the per-layer path), unless the
// op's fused math option pins fma, tf32 or tf32x3.
int mlp_math(at::ScalarType dtype, int device, const FusedMlpOptions& o) {
  if (dtype != at::kFloat || device_facts(device).major < 8) return kMathFma;
  switch (o.math) {
    case kFusedMathFma: return kMathFma;
    case kFusedMathTf32: return kMathTf32;
    case kFusedMathTf32x3: return kMathTf32x3;
    default: return at::globalContext().allowTF32CuBLAS() ? kMathTf32 : kMathFma;
  }
}

// The fused kernels' plan for this call on XV's device (plan_network; widths: the activation
// buffers'), or an error that says why the fused path cannot take the shapes. The fused path
// runs only when asked for (path=2); auto is the per-layer path: on an H200 the fused kernels
// were slower than the per-layer cuBLAS GEMMs at every measured size (bench/RESULTS.md, "Fused
// tangent MLP"). The fused samples_per_block option pins the samples per block (benchmarks,
// tests).
MlpPlan fused_plan(const at::Tensor& XV, at::TensorList weights, bool backward, const char* op,
                   const FusedMlpOptions& o, std::pair<int, int>* widths) {
  std::vector<int> n_out;
  for (const auto& W : weights) n_out.push_back(static_cast<int>(W.size(0)));
  const int device = XV.get_device();
  const MlpPlan plan = plan_network(XV.size(0), XV.size(1), n_out,
                                    static_cast<int>(weights.front().size(1)), backward,
                                    XV.element_size(), mlp_math(XV.scalar_type(), device, o),
                                    mlp_pipe(o), device_facts(device), o.samples_per_block,
                                    widths);
  TORCH_CHECK(plan.why_not.empty(), op,
              ": the fused path (path=\"fused\", 2) cannot take these shapes: ", plan.why_not,
              "; use path=\"auto\" (0) or \"per_layer\" (1)");
  return plan;
}

template <typename T, template <typename, int, int, int> class KernelOf>
void launch(const MlpPlan& plan, const MlpArgs<T>& args, int device, cudaStream_t stream) {
  static std::once_flag flags[3][kMathCount][kPipeCount][64];
  const int which = plan.WM == 4 ? 0 : (plan.WM == 2 ? 1 : 2);
  const size_t optin = device_facts(device).smem_optin;
  const bool launched = dispatch_kernel<T, KernelOf>(plan, [&](auto kernel, int threads) {
    // raise the kernel's shared-memory limit to the device maximum, once per device
    std::call_once(flags[which][plan.math][plan.pipe][device % 64], [&] {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(optin)));
    });
    kernel<<<static_cast<unsigned>(plan.blocks), threads, plan.smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  TORCH_INTERNAL_ASSERT(launched, "tangent_mlp: tensor-core math for ",
                        c10::CppTypeToScalarType<T>::value);
}

MlpForwardResult tangent_mlp_cuda(const at::Tensor& XV_in, at::TensorList weights,
                                  at::TensorList biases, int64_t act, double slope,
                                  int64_t last_act, int64_t path, at::IntArrayRef fused) {
  check_tangent_mlp_args(XV_in, weights, biases, act, last_act, path, fused);
  const c10::cuda::CUDAGuard guard(XV_in.device());
  const int64_t B = XV_in.size(0), R = XV_in.size(1);
  const size_t L = weights.size();
  const int device = XV_in.get_device();
  if (path != kMlpFused)
    return tangent_mlp_per_layer(XV_in, weights, biases, act, slope, last_act,
                                 &tangent_linear_cuda);
  std::pair<int, int> widths;
  const MlpPlan plan = fused_plan(XV_in, weights, false, "tangent_mlp",
                                  fused_mlp_options(fused, "tangent_mlp"), &widths);
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
    MlpArgs<scalar_t> args = plan_args<scalar_t>(plan, widths, B, static_cast<int>(R),
                                                  static_cast<int>(L), slope);
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

// One launch of mlp_weight_grad_kernel on `grid` in `math` (the tensor cores: float32 only).
template <typename T>
void launch_weight_grad(const GradArgs<T>& args, int math, dim3 grid, cudaStream_t stream) {
  const size_t smem = weight_grad_smem(sizeof(T));
  if constexpr (std::is_same<T, float>::value) {
    if (math == kMathTf32)
      mlp_weight_grad_kernel<float, kMathTf32><<<grid, kGradThreads, smem, stream>>>(args);
    else if (math == kMathTf32x3)
      mlp_weight_grad_kernel<float, kMathTf32x3><<<grid, kGradThreads, smem, stream>>>(args);
    else
      mlp_weight_grad_kernel<float, kMathFma><<<grid, kGradThreads, smem, stream>>>(args);
  } else {
    TORCH_INTERNAL_ASSERT(math == kMathFma, "tangent_mlp: tensor-core math for ",
                          c10::CppTypeToScalarType<T>::value);
    mlp_weight_grad_kernel<T, kMathFma><<<grid, kGradThreads, smem, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gW_l and gb_l of the fused backward (mlp_param_grad_kernels.cuh) from GZ (every layer's
// pre-activation gradient, (B, R, n_out)), the layers' inputs (XV, then A_in) and the backward
// kernel's per-block bias partials (blocks, Σ n_out): the bias sums, and the weight gradients
// with the fused weight_grads option "kernel", in one launch of sum_partials_kernel (after one of
// mlp_weight_grad_kernel, in the fused kernels' math); without it the weight gradients are
// cuBLAS GEMMs (TF32 under the same switch). The launches' arguments come from
// plan_param_grads and add_param_grad_sums, which the CUDA emulation's tests run too.
void param_grads(const at::Tensor& XV, const std::vector<at::Tensor>& W, at::TensorList A_in,
                 const std::vector<at::Tensor>& GZ, const at::Tensor& partial, int64_t M,
                 int math, int device, const FusedMlpOptions& o, std::vector<at::Tensor>& gW,
                 std::vector<at::Tensor>& gb) {
  const size_t L = W.size();
  // how the weight gradients are computed: one cuBLAS GEMM per layer (the default) or
  // mlp_weight_grad_kernel, every layer in one launch (not yet measured on a GPU, so opt-in)
  const bool own_gemm = o.weight_grads == kFusedWgradKernel;
  std::vector<at::Tensor> in(L);
  std::vector<int> n_out(L), n_in(L);
  for (size_t l = 0; l < L; ++l) {
    in[l] = l == 0 ? XV : A_in[l - 1].contiguous();
    n_out[l] = static_cast<int>(W[l].size(0));
    n_in[l] = static_cast<int>(W[l].size(1));
    gb[l] = at::empty({n_out[l]}, XV.options());
    gW[l] = own_gemm ? at::empty_like(W[l])
                     : at::mm(GZ[l].view({M, n_out[l]}).t(), in[l].view({M, n_in[l]}));
  }
  const int64_t pinned = o.weight_grad_rows;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_mlp_param_grads", [&] {
    std::vector<const scalar_t*> gz_ptr(L), in_ptr(L);
    std::vector<scalar_t*> gW_ptr(L), gb_ptr(L);
    for (size_t l = 0; l < L; ++l) {
      gz_ptr[l] = GZ[l].const_data_ptr<scalar_t>();
      in_ptr[l] = in[l].const_data_ptr<scalar_t>();
      gW_ptr[l] = gW[l].mutable_data_ptr<scalar_t>();
      gb_ptr[l] = gb[l].mutable_data_ptr<scalar_t>();
    }
    ParamGradLaunches<scalar_t> p =
        plan_param_grads<scalar_t>(static_cast<int>(L), M, gz_ptr.data(), in_ptr.data(),
                                   n_out.data(), n_in.data(), device_facts(device).sms, pinned);
    at::Tensor wpartial;  // the weight-gradient kernel's split partials
    if (own_gemm) wpartial = at::empty({p.splits, p.wgrad.stride}, XV.options());
    add_param_grad_sums(p, own_gemm ? wpartial.mutable_data_ptr<scalar_t>() : nullptr,
                        own_gemm ? gW_ptr.data() : nullptr, partial.const_data_ptr<scalar_t>(),
                        partial.size(0), gb_ptr.data());
    if (own_gemm && p.tiles > 0)
      launch_weight_grad(p.wgrad, math,
                         dim3(static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.splits)),
                         stream);
    if (p.sum_blocks > 0) {
      sum_partials_kernel<scalar_t><<<static_cast<unsigned>(p.sum_blocks), kSumCols * kSumLanes,
                                      sum_partials_smem(sizeof(scalar_t)), stream>>>(p.sums);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

MlpBackwardResult tangent_mlp_backward_cuda(const at::Tensor& gY_in, const at::Tensor& XV_in,
                                            at::TensorList weights, const at::Tensor& Y,
                                            at::TensorList Z_in, at::TensorList A_in,
                                            at::TensorList dA, int64_t act, double slope,
                                            int64_t last_act, int64_t path,
                                            at::IntArrayRef fused, bool input_only) {
  check_tangent_mlp_backward_args(gY_in, XV_in, weights, Y, Z_in, A_in, dA, act, last_act, path,
                                  fused);
  const FusedMlpOptions options = fused_mlp_options(fused, "tangent_mlp_backward");
  const c10::cuda::CUDAGuard guard(XV_in.device());
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);  // see tangent_ops.h
  const int64_t B = XV_in.size(0), R = XV_in.size(1);
  const size_t L = weights.size();
  const int device = XV_in.get_device();
  if (path != kMlpFused)
    return tangent_mlp_backward_per_layer(gY_in, XV_in, weights, Y, Z_in, A_in, dA, act, slope,
                                          last_act, input_only, &tangent_linear_backward_cuda);
  std::pair<int, int> widths;
  const MlpPlan plan = fused_plan(XV_in, weights, true, "tangent_mlp_backward", options,
                                  &widths);
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
    MlpArgs<scalar_t> args = plan_args<scalar_t>(plan, widths, B, static_cast<int>(R),
                                                  static_cast<int>(L), slope);
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
  if (input_only) {  // grad_W and grad_b not wanted: zeros (see csrc/injflow.cpp)
    for (size_t l = 0; l < L; ++l) {
      gW[l] = at::zeros_like(W[l]);
      gb[l] = at::zeros({W[l].size(0)}, XV.options());
    }
    return {gXV, gW, gb};
  }
  param_grads(XV, W, A_in, GZ, partial, B * R, plan.math, device, options, gW, gb);
  return {gXV, gW, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CUDA, m) {
  m.impl("tangent_mlp", &tangent_mlp_cuda);
  m.impl("tangent_mlp_backward", &tangent_mlp_backward_cuda);
}

}  // namespace injflow
