// CPU kernels of the tangent ops: the fused elementwise parts (the GEMMs are shared, see
// tangent_ops.h), parallel over the batch.
//
// On the CPU the transcendental functions are evaluated once per primal element with ATen's
// vectorised ops (σ, σ', σ'' of the primal pre-activation; exp(s̃) and s̃' of the coupling); the
// fused loops then apply them to the primal and all K tangent rows with arithmetic only, which
// the compiler vectorises. (The CUDA kernels evaluate everything in one kernel.)

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../tangent_ops.h"
#include "multiversion.h"
#include "tangent_ops_cpu.h"

namespace injflow {
namespace {

struct ActTensors {
  at::Tensor f, df, d2f;  // (B, n) each, contiguous; d2f undefined unless requested
};

// σ(z), σ'(z) and optionally σ''(z) of activation `act` with vectorised ATen ops; the same
// functions as activations.h (tests compare both with torch.func.jvp of torch's activations).
ActTensors activation_values(const at::Tensor& z_in, int64_t act, double slope, bool want_d2) {
  // a strided row view would send ATen's transcendental kernels down their slow scalar path
  const at::Tensor z = z_in.contiguous();
  ActTensors r;
  switch (act) {
    case kActNone:
      r.f = z;
      r.df = at::ones_like(z);
      if (want_d2) r.d2f = at::zeros_like(z);
      break;
    case kActTanh:
      r.f = at::tanh(z);
      r.df = (r.f * r.f).neg_().add_(1);
      if (want_d2) r.d2f = (r.f * r.df).mul_(-2);
      break;
    case kActRelu:
      r.f = at::relu(z);
      r.df = (z > 0).to(z.scalar_type());
      if (want_d2) r.d2f = at::zeros_like(z);
      break;
    case kActLeakyRelu:
      r.f = at::leaky_relu(z, slope);
      r.df = at::where(z > 0, at::ones_like(z), at::full_like(z, slope));
      if (want_d2) r.d2f = at::zeros_like(z);
      break;
    case kActElu: {
      const at::Tensor pos = z > 0;
      const at::Tensor e = slope * at::exp(at::clamp_max(z, 0));
      r.f = at::where(pos, z, e - slope);
      r.df = at::where(pos, at::ones_like(z), e);
      if (want_d2) r.d2f = at::where(pos, at::zeros_like(z), e);
      break;
    }
    case kActSoftplus: {
      const at::Tensor lin = z > 20;
      const at::Tensor s = at::sigmoid(z);
      r.f = at::softplus(z, 1, 20);
      r.df = at::where(lin, at::ones_like(z), s);
      if (want_d2) r.d2f = at::where(lin, at::zeros_like(z), s * (1 - s));
      break;
    }
    case kActSilu: {
      const at::Tensor s = at::sigmoid(z);
      const at::Tensor ds = s * (1 - s);
      r.f = z * s;
      r.df = s + z * ds;
      if (want_d2) r.d2f = ds * (2 + z * (1 - 2 * s));
      break;
    }
    case kActSigmoid: {
      r.f = at::sigmoid(z);
      r.df = r.f * (1 - r.f);
      if (want_d2) r.d2f = r.df * (1 - 2 * r.f);
      break;
    }
    default:
      TORCH_CHECK(false, "tangent_linear: unknown activation code ", act);
  }
  r.f = r.f.contiguous();
  r.df = r.df.contiguous();
  if (want_d2) r.d2f = r.d2f.contiguous();
  return r;
}

// Y[b,0,:] = f[b,:], Y[b,k,:] = df[b,:] ⊙ Z[b,k,:]  (rows of n, R rows per batch element)
#define INJFLOW_APPLY_TANGENT(T)                                                             \
  INJFLOW_MULTIVERSION void apply_tangent_rows(const T* f, const T* df, const T* Z, int64_t R, \
                                               int64_t n, T* Y) {                            \
    for (int64_t j = 0; j < n; ++j) Y[j] = f[j];                                             \
    for (int64_t k = 1; k < R; ++k) {                                                        \
      const T* z = Z + k * n;                                                                \
      T* y = Y + k * n;                                                                      \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) y[j] = df[j] * z[j];               \
    }                                                                                        \
  }
INJFLOW_APPLY_TANGENT(float)
INJFLOW_APPLY_TANGENT(double)

// GZ[0] = gY[0] ⊙ df + Σ_k gY[k] ⊙ Z[k] ⊙ d2f,  GZ[k] = gY[k] ⊙ df. d2f is given, or (when
// null) derived from z = Z[0], f = Y[0] and df by second_derivative_from (no transcendentals).
#define INJFLOW_GRAD_PREACT(T)                                                                \
  INJFLOW_MULTIVERSION void grad_preact_rows(const T* g, const T* Z, const T* Y, const T* df, \
                                             const T* d2f_in, int64_t act, int64_t R,         \
                                             int64_t n, T* GZ, T* d2f) {                      \
    if (d2f_in) {                                                                             \
      for (int64_t j = 0; j < n; ++j) d2f[j] = d2f_in[j];                                     \
    } else {                                                                                  \
      for (int64_t j = 0; j < n; ++j)                                                         \
        d2f[j] = second_derivative_from<T>(act, Z[j], Y[j], df[j]);                           \
    }                                                                                         \
    _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) GZ[j] = g[j] * df[j];                 \
    for (int64_t k = 1; k < R; ++k) {                                                         \
      const T* gk = g + k * n;                                                                \
      const T* zk = Z + k * n;                                                                \
      T* gzk = GZ + k * n;                                                                    \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                   \
        GZ[j] += gk[j] * zk[j] * d2f[j];                                                      \
        gzk[j] = gk[j] * df[j];                                                               \
      }                                                                                       \
    }                                                                                         \
  }
INJFLOW_GRAD_PREACT(float)
INJFLOW_GRAD_PREACT(double)

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / (work_per_item + 1));
}

// tanh, the common case, with fewer passes: z = Z[:,0] + b into a dense buffer (one ATen op),
// tanh of it (one), then per batch element one loop that writes z back into Z and σ' = 1 − f²
// into dA, and apply_tangent_rows for σ = f and σ'·Z[:,k] into Y.
#define INJFLOW_TANH_DERIVATIVE_ROW(T)                                                        \
  INJFLOW_MULTIVERSION void tanh_derivative_row(const T* zc, const T* f, int64_t n,          \
                                                bool write_z, T* Z, T* df) {                  \
    _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) df[j] = T(1) - f[j] * f[j];           \
    if (write_z) {                                                                            \
      _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) Z[j] = zc[j];                       \
    }                                                                                         \
  }
INJFLOW_TANH_DERIVATIVE_ROW(float)
INJFLOW_TANH_DERIVATIVE_ROW(double)

at::Tensor linear_epilogue_tanh_cpu(at::Tensor& Z, const c10::optional<at::Tensor>& b,
                                    at::Tensor& Y) {
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  const at::Tensor z0 = Z.select(1, 0);
  const at::Tensor zc = (b.has_value() ? at::add(z0, *b) : z0).contiguous();
  const at::Tensor f = at::tanh(zc);
  at::Tensor dA = at::empty({B, n}, Z.options());
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tangent_linear_cpu", [&] {
    const scalar_t* zcp = zc.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    scalar_t* zp = Z.mutable_data_ptr<scalar_t>();
    scalar_t* yp = Y.mutable_data_ptr<scalar_t>();
    scalar_t* dfp = dA.mutable_data_ptr<scalar_t>();
    const bool write_z = b.has_value();
    at::parallel_for(0, B, grain_for(R * n), [&](int64_t lo, int64_t hi) {
      for (int64_t bi = lo; bi < hi; ++bi) {
        tanh_derivative_row(zcp + bi * n, fp + bi * n, n, write_z, zp + bi * R * n,
                            dfp + bi * n);
        apply_tangent_rows(fp + bi * n, dfp + bi * n, zp + bi * R * n, R, n, yp + bi * R * n);
      }
    });
  });
  return dA;
}

at::Tensor linear_epilogue_cpu(at::Tensor& Z, const c10::optional<at::Tensor>& b, int64_t act,
                               double slope, at::Tensor& Y) {
  if (act == kActTanh && Z.is_contiguous() && Y.is_contiguous())
    return linear_epilogue_tanh_cpu(Z, b, Y);
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  at::Tensor z0 = Z.select(1, 0);
  if (b.has_value()) z0.add_(*b);
  const ActTensors a = activation_values(z0, act, slope, false);
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tangent_linear_cpu", [&] {
    const scalar_t* zp = Z.const_data_ptr<scalar_t>();
    const scalar_t* fp = a.f.const_data_ptr<scalar_t>();
    const scalar_t* dfp = a.df.const_data_ptr<scalar_t>();
    scalar_t* yp = Y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(R * n), [&](int64_t lo, int64_t hi) {
      for (int64_t bi = lo; bi < hi; ++bi)
        apply_tangent_rows(fp + bi * n, dfp + bi * n, zp + bi * R * n, R, n, yp + bi * R * n);
    });
  });
  return a.df;
}

// GZ of a block of the batch (formula in tangent_ops.h); the blocked backward below sums the
// bias gradient from it.
void linear_grad_preact_cpu(const at::Tensor& gY, const at::Tensor& Z, const at::Tensor& Y,
                            const at::Tensor& dA, int64_t act, double slope, at::Tensor& GZ) {
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  // σ' comes from the forward; σ'' from (z, σ, σ') by arithmetic, except silu (ATen, from z)
  at::Tensor d2f_silu;
  if (act == kActSilu) d2f_silu = activation_values(Z.select(1, 0), act, slope, true).d2f;
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tangent_linear_backward_cpu", [&] {
    const scalar_t* g = gY.const_data_ptr<scalar_t>();
    const scalar_t* z = Z.const_data_ptr<scalar_t>();
    const scalar_t* y = Y.const_data_ptr<scalar_t>();
    const scalar_t* dfp = dA.const_data_ptr<scalar_t>();
    const scalar_t* d2p = d2f_silu.defined() ? d2f_silu.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gz = GZ.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(R * n), [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> d2f(n);
      for (int64_t bi = lo; bi < hi; ++bi)
        grad_preact_rows(g + bi * R * n, z + bi * R * n, y + bi * R * n, dfp + bi * n,
                         d2p ? d2p + bi * n : nullptr, act, R, n, gz + bi * R * n, d2f.data());
    });
  });
}

}  // namespace

// Declared in cpu/tangent_ops_cpu.h (tangent_mlp composes them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_cpu(
    const at::Tensor& XV, const at::Tensor& W, const c10::optional<at::Tensor>& b, int64_t act,
    double slope) {
  return tangent_linear_composite(XV, W, b, act, slope, &linear_epilogue_cpu);
}

// Batch elements per block of the CPU backward: the block's pre-activation gradient GZ (R·n_out
// values per element) is about 4 MiB, which stays in the last-level cache between the loop that
// writes it and the two GEMMs that read it and keeps the per-block operator calls few (a
// 512 KiB block added ~7 000 operator calls to a MINIBOONE training step); and a block has at
// least 2·n_in rows, so that accumulating the n_out × n_in weight gradient once per block moves
// less memory than the block's GZ itself.
static int64_t backward_block(int64_t R, int64_t n_in, int64_t n_out, int64_t elem_size) {
  const int64_t cache_sized = (int64_t(1) << 22) / (R * n_out * elem_size);
  const int64_t gemm_sized = (2 * n_in + R - 1) / R;
  return std::max<int64_t>({int64_t(1), cache_sized, gemm_sized});
}

// The CPU backward runs block by block over the batch: GZ of a block (a reused buffer), then
// gXV of the block = GZ·W written in place and gW += GZᵀ·XV of the block. The whole-batch GZ,
// B·R·n_out values, is never allocated, which lowers the backward's peak memory by that much
// (225 MB at B = 5000, K = 21, n_out = 512 in float32); a fresh multi-MB buffer per call can
// also cost a page fault per 4 KiB touched (glibc returns large freed blocks to the OS), and the
// GEMMs read the block's GZ back while it is still in cache. Same GEMM flops either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_backward_cpu(
    const at::Tensor& gY_in, const at::Tensor& XV_in, const at::Tensor& W, const at::Tensor& Z_in,
    const at::Tensor& Y_in, const at::Tensor& dA_in, int64_t act, double slope,
    bool input_only) {
  check_tangent_linear_backward_args(gY_in, XV_in, W, Z_in, Y_in, dA_in, act);
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);  // see tangent_ops.h
  const int64_t B = XV_in.size(0), R = XV_in.size(1), n_in = XV_in.size(2), n_out = W.size(0);
  const at::Tensor gY = gY_in.contiguous(), XV = XV_in.contiguous();
  at::Tensor gXV = at::empty({B, R, n_in}, XV.options());
  at::Tensor gW = at::zeros({n_out, n_in}, XV.options());
  at::Tensor gb = at::zeros({n_out}, XV.options());
  if (B == 0) return {gXV, gW, gb};
  const at::Tensor Z = Z_in.contiguous(), Y = Y_in.contiguous(), dA = dA_in.contiguous();
  // equal blocks (400 elements in blocks of at most 372: two of 200, not 372 and 28)
  const int64_t max_block = std::min(B, backward_block(R, n_in, n_out, XV.element_size()));
  const int64_t n_blocks = (B + max_block - 1) / max_block;
  const int64_t block = (B + n_blocks - 1) / n_blocks;
  at::Tensor GZ_buffer;
  if (act != kActNone) GZ_buffer = at::empty({block, R, n_out}, XV.options());
  for (int64_t b0 = 0; b0 < B; b0 += block) {
    const int64_t nb = std::min(block, B - b0);
    at::Tensor GZ;
    if (act == kActNone) {
      GZ = gY.narrow(0, b0, nb);
    } else {
      GZ = GZ_buffer.narrow(0, 0, nb);
      linear_grad_preact_cpu(gY.narrow(0, b0, nb), Z.narrow(0, b0, nb), Y.narrow(0, b0, nb),
                             dA.narrow(0, b0, nb), act, slope, GZ);
    }
    const at::Tensor GZ2 = GZ.view({nb * R, n_out});
    at::Tensor gXV2 = gXV.narrow(0, b0, nb).view({nb * R, n_in});
    at::mm_out(gXV2, GZ2, W);
    if (input_only) continue;  // grad_W and grad_b stay zero (see csrc/injflow.cpp)
    gW.addmm_(GZ2.t(), XV.narrow(0, b0, nb).view({nb * R, n_in}));
    gb.add_(GZ.select(1, 0).sum(0));
  }
  return {gXV, gW, gb};
}

namespace {

// s̃ = scale(s) and e = exp(s̃) of the primal scale pre-activations s (B, m), contiguous. The
// derivatives s̃' and s̃'' are arithmetic in s̃ (coupling_scale_from), evaluated in the loops.
struct ScaleTensors {
  at::Tensor st, e;
};

ScaleTensors scale_values(const at::Tensor& s_in, int64_t scale) {
  const at::Tensor s = s_in.contiguous();  // vectorised tanh/exp need a dense input
  ScaleTensors r;
  r.st = scale == kScaleTanh ? at::tanh(s) : s;
  r.e = at::exp(r.st);
  return r;
}

// One batch element of the coupling forward: y rows from x rows and [s,t] rows.
#define INJFLOW_COUPLING_ROWS(T)                                                              \
  INJFLOW_MULTIVERSION void coupling_rows(const T* x0, const T* st0, const T* e0, const T* sc0, \
                                          int64_t scale, int64_t count, int64_t R, int64_t m, \
                                          T* y0, T* xec) {                                    \
   for (int64_t bi = 0; bi < count; ++bi) {                                                   \
    const T *x = x0 + bi * R * m, *st = st0 + bi * R * 2 * m, *e = e0 + bi * m;               \
    const T* sc = sc0 + bi * m;                                                               \
    T* y = y0 + bi * R * m;                                                                   \
    _Pragma("omp simd") for (int64_t j = 0; j < m; ++j) {                                     \
      const T c = coupling_scale_from<T>(scale, sc[j]).df;                                    \
      y[j] = x[j] * e[j] + st[m + j];                                                         \
      xec[j] = x[j] * e[j] * c;                                                               \
    }                                                                                         \
    for (int64_t k = 1; k < R; ++k) {                                                         \
      const T* xk = x + k * m;                                                                \
      const T* sk = st + k * 2 * m;                                                           \
      T* yk = y + k * m;                                                                      \
      _Pragma("omp simd") for (int64_t j = 0; j < m; ++j)                                     \
        yk[j] = xk[j] * e[j] + xec[j] * sk[j] + sk[m + j];                                    \
    }                                                                                         \
   }                                                                                          \
  }
INJFLOW_COUPLING_ROWS(float)
INJFLOW_COUPLING_ROWS(double)

// One batch element of the coupling backward (formulas in ops/tangent.py's module docstring).
#define INJFLOW_COUPLING_BACKWARD_ROWS(T)                                                     \
  INJFLOW_MULTIVERSION void coupling_backward_rows(                                           \
      const T* x0, const T* st0, const T* g0, const T* gl0, const T* e0, const T* sc0,        \
      int64_t scale, int64_t count, int64_t R, int64_t m, T* gx0, T* gs0, T* ec, T* curv) {  \
   for (int64_t bi = 0; bi < count; ++bi) {                                                   \
    const T *x = x0 + bi * R * m, *st = st0 + bi * R * 2 * m, *g = g0 + bi * R * m;           \
    const T *e = e0 + bi * m, *sc = sc0 + bi * m;                                             \
    const T gl = gl0[bi];                                                                     \
    T *gx = gx0 + bi * R * m, *gs = gs0 + bi * R * 2 * m;                                     \
    _Pragma("omp simd") for (int64_t j = 0; j < m; ++j) {                                     \
      const auto d = coupling_scale_from<T>(scale, sc[j]);                                    \
      ec[j] = e[j] * d.df;                                                                    \
      curv[j] = e[j] * (d.df * d.df + d.d2f);                                                 \
      gx[j] = g[j] * e[j];                                                                    \
      gs[j] = g[j] * x[j] * ec[j] + gl * d.df;                                                \
      gs[m + j] = g[j];                                                                       \
    }                                                                                         \
    for (int64_t k = 1; k < R; ++k) {                                                         \
      const T* gk = g + k * m;                                                                \
      const T* xk = x + k * m;                                                                \
      const T* sk = st + k * 2 * m;                                                           \
      T* gxk = gx + k * m;                                                                    \
      T* gsk = gs + k * 2 * m;                                                                \
      _Pragma("omp simd") for (int64_t j = 0; j < m; ++j) {                                   \
        gx[j] += gk[j] * ec[j] * sk[j];                                                       \
        gs[j] += gk[j] * (ec[j] * xk[j] + x[j] * curv[j] * sk[j]);                            \
        gxk[j] = gk[j] * e[j];                                                                \
        gsk[j] = gk[j] * x[j] * ec[j];                                                        \
        gsk[m + j] = gk[j];                                                                   \
      }                                                                                       \
    }                                                                                         \
   }                                                                                          \
  }
INJFLOW_COUPLING_BACKWARD_ROWS(float)
INJFLOW_COUPLING_BACKWARD_ROWS(double)

std::tuple<at::Tensor, at::Tensor> tangent_coupling_cpu(const at::Tensor& XV_in,
                                                        const at::Tensor& ST_in, int64_t scale) {
  check_tangent_coupling_args(XV_in, ST_in, scale);
  const at::Tensor XV = XV_in.contiguous(), ST = ST_in.contiguous();
  const int64_t B = XV.size(0), R = XV.size(1), m = XV.size(2);
  const ScaleTensors sv = scale_values(ST.select(1, 0).narrow(1, 0, m), scale);
  at::Tensor Y = at::empty_like(XV);
  at::Tensor lad = sv.st.sum(1);
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_coupling_cpu", [&] {
    const scalar_t* xv = XV.const_data_ptr<scalar_t>();
    const scalar_t* st = ST.const_data_ptr<scalar_t>();
    const scalar_t* e = sv.e.const_data_ptr<scalar_t>();
    const scalar_t* sc = sv.st.const_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(R * m), [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> xec(m);
      coupling_rows(xv + lo * R * m, st + lo * R * 2 * m, e + lo * m, sc + lo * m,
                    scale, hi - lo, R, m, y + lo * R * m, xec.data());
    });
  });
  return {Y, lad};
}

std::tuple<at::Tensor, at::Tensor> tangent_coupling_backward_cpu(
    const at::Tensor& gY_in, const at::Tensor& gl_in, const at::Tensor& XV_in,
    const at::Tensor& ST_in, int64_t scale) {
  check_tangent_coupling_args(XV_in, ST_in, scale);
  TORCH_CHECK(gY_in.sizes() == XV_in.sizes() && gl_in.dim() == 1 && gl_in.size(0) == XV_in.size(0),
              "tangent_coupling_backward: grad shapes must be (B, 1+K, m) and (B,), got ",
              gY_in.sizes(), " and ", gl_in.sizes());
  const at::Tensor XV = XV_in.contiguous(), ST = ST_in.contiguous();
  const at::Tensor gY = gY_in.contiguous(), gl = gl_in.contiguous();
  const int64_t B = XV.size(0), R = XV.size(1), m = XV.size(2);
  const ScaleTensors sv = scale_values(ST.select(1, 0).narrow(1, 0, m), scale);
  at::Tensor gXV = at::empty_like(XV);
  at::Tensor gST = at::empty_like(ST);
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_coupling_backward_cpu", [&] {
    const scalar_t* xv = XV.const_data_ptr<scalar_t>();
    const scalar_t* st = ST.const_data_ptr<scalar_t>();
    const scalar_t* g = gY.const_data_ptr<scalar_t>();
    const scalar_t* glp = gl.const_data_ptr<scalar_t>();
    const scalar_t* e = sv.e.const_data_ptr<scalar_t>();
    const scalar_t* sc = sv.st.const_data_ptr<scalar_t>();
    scalar_t* gx = gXV.mutable_data_ptr<scalar_t>();
    scalar_t* gs = gST.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(R * m), [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> ec(m), curv(m);  // e·s̃' and e·(s̃'² + s̃'') of one batch element
      coupling_backward_rows(xv + lo * R * m, st + lo * R * 2 * m, g + lo * R * m, glp + lo,
                             e + lo * m, sc + lo * m, scale, hi - lo, R, m,
                             gx + lo * R * m, gs + lo * R * 2 * m, ec.data(), curv.data());
    });
  });
  return {gXV, gST};
}

}  // namespace

namespace {

void linear_grad_preact_cpu_gb(const at::Tensor& gY, const at::Tensor& Z, const at::Tensor& Y,
                               const at::Tensor& dA, int64_t act, double slope, at::Tensor& GZ,
                               at::Tensor& /*gb: summed by the composite*/) {
  linear_grad_preact_cpu(gY, Z, Y, dA, act, slope, GZ);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_epilogue_cpu(
    const at::Tensor& Z, const c10::optional<at::Tensor>& b, int64_t act, double slope) {
  return tangent_epilogue_composite(Z, b, act, slope, &linear_epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor> tangent_epilogue_backward_cpu(
    const at::Tensor& gY, const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& dA,
    int64_t act, double slope) {
  return tangent_epilogue_backward_composite(gY, Z, Y, dA, act, slope,
                                             &linear_grad_preact_cpu_gb);
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CPU, m) {
  m.impl("tangent_epilogue", &tangent_epilogue_cpu);
  m.impl("tangent_epilogue_backward", &tangent_epilogue_backward_cpu);
  m.impl("tangent_linear", &tangent_linear_cpu);
  m.impl("tangent_linear_backward", &tangent_linear_backward_cpu);
  m.impl("tangent_coupling", &tangent_coupling_cpu);
  m.impl("tangent_coupling_backward", &tangent_coupling_backward_cpu);
}

}  // namespace injflow
