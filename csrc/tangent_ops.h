// Shared declarations of the tangent ops (tangent_linear, tangent_coupling): argument checks
// and the device-independent parts (the GEMMs), parameterised by each device's fused
// elementwise kernels. Layout: primal and K tangents stacked, (B, R, n) with R = 1 + K and row 0
// the primal, so that one GEMM serves all rows.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "activations.h"

namespace injflow {

// The GEMMs of the ops run in the op's dtype whatever the caller's autocast state: a backward
// evaluated inside an autocast region (torch.autograd.grad in the Hutchinson CG's matvec) would
// otherwise send at::mm to bfloat16 and mix dtypes. Hold one around ATen calls:
//   const NoAutocast guard(c10::autocast_dispatch_keyset);
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

inline void check_tangent_linear_args(const at::Tensor& XV, const at::Tensor& W,
                                      const c10::optional<at::Tensor>& b, int64_t act) {
  TORCH_CHECK(XV.dim() == 3 && XV.size(1) >= 1,
              "tangent_linear: XV must be (B, 1+K, n_in), got ", XV.sizes());
  TORCH_CHECK(W.dim() == 2 && W.size(1) == XV.size(2),
              "tangent_linear: W must be (n_out, n_in) with n_in = ", XV.size(2), ", got ",
              W.sizes());
  TORCH_CHECK(XV.scalar_type() == at::kFloat || XV.scalar_type() == at::kDouble,
              "tangent_linear: inputs must be float32 or float64, got ", XV.scalar_type());
  TORCH_CHECK(W.scalar_type() == XV.scalar_type(), "tangent_linear: W must have dtype ",
              XV.scalar_type(), ", got ", W.scalar_type());
  TORCH_CHECK(W.device() == XV.device(), "tangent_linear: W must be on ", XV.device());
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == W.size(0),
                "tangent_linear: b must be (n_out,) = (", W.size(0), ",), got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == XV.scalar_type() && b->device() == XV.device(),
                "tangent_linear: b must match XV's dtype and device");
  }
  TORCH_CHECK(act >= 0 && act < kActCount, "tangent_linear: unknown activation code ", act);
}

inline void check_tangent_epilogue_args(const at::Tensor& Z, const c10::optional<at::Tensor>& b,
                                        int64_t act) {
  TORCH_CHECK(Z.dim() == 3 && Z.size(1) >= 1,
              "tangent_epilogue: Z must be (B, 1+K, n), got ", Z.sizes());
  TORCH_CHECK(Z.scalar_type() == at::kFloat || Z.scalar_type() == at::kDouble,
              "tangent_epilogue: Z must be float32 or float64, got ", Z.scalar_type());
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == Z.size(2),
                "tangent_epilogue: b must be (n,) = (", Z.size(2), ",), got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == Z.scalar_type() && b->device() == Z.device(),
                "tangent_epilogue: b must match Z's dtype and device");
  }
  TORCH_CHECK(act >= 0 && act < kActCount, "tangent_epilogue: unknown activation code ", act);
}

inline void check_tangent_coupling_args(const at::Tensor& XV, const at::Tensor& ST,
                                        int64_t scale) {
  TORCH_CHECK(XV.dim() == 3, "tangent_coupling: XV must be (B, 1+K, m), got ", XV.sizes());
  TORCH_CHECK(ST.dim() == 3 && ST.size(0) == XV.size(0) && ST.size(1) == XV.size(1) &&
                  ST.size(2) == 2 * XV.size(2),
              "tangent_coupling: ST must be (B, 1+K, 2m) = (", XV.size(0), ", ", XV.size(1),
              ", ", 2 * XV.size(2), "), got ", ST.sizes());
  TORCH_CHECK(XV.scalar_type() == at::kFloat || XV.scalar_type() == at::kDouble,
              "tangent_coupling: inputs must be float32 or float64, got ", XV.scalar_type());
  TORCH_CHECK(ST.scalar_type() == XV.scalar_type() && ST.device() == XV.device(),
              "tangent_coupling: ST must match XV's dtype and device");
  TORCH_CHECK(scale >= 0 && scale < kScaleCount, "tangent_coupling: unknown scale code ", scale);
}

// Device kernels, implemented in cpu/tangent_ops_cpu.cpp and cuda/tangent_ops_cuda.cu.
// linear_epilogue: Z (B,R,n) pre-activations of all rows, adds b to row 0 in place and writes
//   Y[:,0] = σ(z), Y[:,k] = σ'(z)·Z[:,k]; returns dA = σ'(z) (B, n).
// linear_grad_preact: GZ[:,0] = gY0·σ'(z) + Σ_k gYk·Z[:,k]·σ''(z), GZ[:,k] = gYk·σ'(z), given
//   the forward's Z, Y and dA (a device may use them or recompute from Z). A device may also
//   set gb = Σ_b GZ[b,0] (the bias gradient) in the same pass; left undefined, the composite
//   sums it. (The CUDA backward runs through tangent_linear_backward_composite; the CPU backward
//   runs its own loop over batch blocks, see cpu/tangent_ops_cpu.cpp.)
using LinearEpilogueFn = at::Tensor (*)(at::Tensor& Z, const c10::optional<at::Tensor>& b,
                                        int64_t act, double slope, at::Tensor& Y);
using LinearGradPreactFn = void (*)(const at::Tensor& gY, const at::Tensor& Z,
                                    const at::Tensor& Y, const at::Tensor& dA, int64_t act,
                                    double slope, at::Tensor& GZ, at::Tensor& gb);

// y-rows of tangent_linear: one GEMM over the stacked rows, then the fused epilogue.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_composite(
    const at::Tensor& XV, const at::Tensor& W, const c10::optional<at::Tensor>& b, int64_t act,
    double slope, LinearEpilogueFn epilogue) {
  check_tangent_linear_args(XV, W, b, act);
  const NoAutocast guard(c10::autocast_dispatch_keyset);
  const int64_t B = XV.size(0), R = XV.size(1), n_in = XV.size(2), n_out = W.size(0);
  at::Tensor Z = at::mm(XV.reshape({B * R, n_in}), W.t()).view({B, R, n_out});
  at::Tensor Y = at::empty_like(Z);
  at::Tensor dA = epilogue(Z, b, act, slope, Y);
  return {Y, Z, dA};
}

// tangent_epilogue: the activation rule of tangent_linear on pre-activations Z (B, 1+K, n) of all
// rows computed elsewhere (a convolution of the stacked rows): Y[:,0] = σ(Z[:,0] + b),
// Y[:,k] = σ'(Z[:,0] + b)·Z[:,k]. Returns Y, Z with b added to row 0 (a copy; for the
// backward) and dA = σ'(Z[:,0] + b).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_epilogue_composite(
    const at::Tensor& Z_in, const c10::optional<at::Tensor>& b, int64_t act, double slope,
    LinearEpilogueFn epilogue) {
  check_tangent_epilogue_args(Z_in, b, act);
  const NoAutocast guard(c10::autocast_dispatch_keyset);
  at::Tensor Z = Z_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor Y = at::empty_like(Z);
  if (Z.numel() == 0) return {Y, Z, at::empty({Z.size(0), Z.size(2)}, Z.options())};
  at::Tensor dA = epilogue(Z, b, act, slope, Y);
  return {Y, Z, dA};
}

// Its backward: grad_Z (the pre-activation gradient of every row) and grad_b = Σ_b grad_Z[b, 0].
inline std::tuple<at::Tensor, at::Tensor> tangent_epilogue_backward_composite(
    const at::Tensor& gY_in, const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& dA,
    int64_t act, double slope, LinearGradPreactFn grad_preact) {
  check_tangent_epilogue_args(Z, c10::nullopt, act);
  TORCH_CHECK(gY_in.sizes() == Z.sizes() && Y.sizes() == Z.sizes() && dA.dim() == 2 &&
                  dA.size(0) == Z.size(0) && dA.size(1) == Z.size(2),
              "tangent_epilogue_backward: grad_Y and Y must be ", Z.sizes(),
              " and dA (B, n), got ", gY_in.sizes(), ", ", Y.sizes(), " and ", dA.sizes());
  const NoAutocast guard(c10::autocast_dispatch_keyset);
  const at::Tensor gY = gY_in.contiguous();
  at::Tensor GZ, gb;
  if (Z.numel() == 0) return {at::zeros_like(Z), at::zeros({Z.size(2)}, Z.options())};
  if (act == kActNone) {
    GZ = gY.clone();
  } else {
    GZ = at::empty_like(gY);
    grad_preact(gY, Z.contiguous(), Y.contiguous(), dA.contiguous(), act, slope, GZ, gb);
  }
  if (!gb.defined()) gb = GZ.select(1, 0).sum(0);
  return {GZ, gb};
}

inline void check_tangent_linear_backward_args(const at::Tensor& gY_in, const at::Tensor& XV,
                                               const at::Tensor& W, const at::Tensor& Z,
                                               const at::Tensor& Y, const at::Tensor& dA,
                                               int64_t act) {
  check_tangent_linear_args(XV, W, c10::nullopt, act);
  TORCH_CHECK(gY_in.sizes() == Z.sizes() && Z.size(0) == XV.size(0) && Z.size(1) == XV.size(1) &&
                  Z.size(2) == W.size(0),
              "tangent_linear_backward: grad and Z must be (B, 1+K, n_out), got ", gY_in.sizes(),
              " and ", Z.sizes());
  TORCH_CHECK(Y.sizes() == Z.sizes() && dA.dim() == 2 && dA.size(0) == Z.size(0) &&
                  dA.size(1) == Z.size(2),
              "tangent_linear_backward: Y must be ", Z.sizes(), " and dA (B, n_out), got ",
              Y.sizes(), " and ", dA.sizes());
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_backward_composite(
    const at::Tensor& gY_in, const at::Tensor& XV, const at::Tensor& W, const at::Tensor& Z,
    const at::Tensor& Y, const at::Tensor& dA, int64_t act, double slope, bool input_only,
    LinearGradPreactFn grad_preact) {
  check_tangent_linear_backward_args(gY_in, XV, W, Z, Y, dA, act);
  const NoAutocast guard(c10::autocast_dispatch_keyset);
  const int64_t B = XV.size(0), R = XV.size(1), n_in = XV.size(2), n_out = W.size(0);
  const at::Tensor gY = gY_in.contiguous();
  at::Tensor GZ, gb;
  if (act == kActNone) {
    GZ = gY;
  } else {
    GZ = at::empty_like(gY);
    grad_preact(gY, Z.contiguous(), Y.contiguous(), dA.contiguous(), act, slope, GZ, gb);
  }
  const at::Tensor GZ2 = GZ.view({B * R, n_out});
  at::Tensor gXV = at::mm(GZ2, W).view({B, R, n_in});
  if (input_only)  // grad_W and grad_b not wanted: zeros, no GEMM (see csrc/injflow.cpp)
    return {gXV, at::zeros({n_out, n_in}, XV.options()), at::zeros({n_out}, XV.options())};
  at::Tensor gW = at::mm(GZ2.t(), XV.reshape({B * R, n_in}));
  if (!gb.defined()) gb = GZ.select(1, 0).sum(0);
  return {gXV, gW, gb};
}

}  // namespace injflow
