// CPU kernels of gram_logdet and its backward, parallel over the batch.
//
// Forward, per sample b: G = JᵀJ (accumulated in the factorisation dtype acc_t), Cholesky of
// G + λI with the bounded jitter schedule of gram_logdet.h, logdet = 2 Σ log L_ii.
// The Gram matrix lives in the upper triangle of the output buffer L[b] and its diagonal in a
// small side vector, so the factor (lower triangle) can be retried with a larger jitter without
// recomputing G. For large D·d², G comes from one batched BLAS call instead of the loop.
//
// Backward, per sample: G⁻¹ = L⁻ᵀ L⁻¹, grad_J = 2 · grad[b] · J G⁻¹.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../gram_logdet.h"
#include "multiversion.h"

namespace injflow {
namespace {

// Upper triangle (with diagonal) of G = PᵀP from the transposed panel Pt (d×D, row i holds
// column i of J): G[i][j] = <Pt[i], Pt[j]>, vectorised over D, four entries of a row of G at a
// time so that four independent accumulators hide the FMA latency and Pt[i] is loaded once.
#define INJFLOW_GRAM_FROM_PANEL(T)                                                       \
  INJFLOW_MULTIVERSION void gram_from_panel(const T* Pt, int64_t D, int64_t d, T* G) {   \
    for (int64_t i = 0; i < d; ++i) {                                                    \
      const T* a = Pt + i * D;                                                           \
      int64_t j = i;                                                                     \
      for (; j + 4 <= d; j += 4) {                                                       \
        const T *c0 = Pt + j * D, *c1 = c0 + D, *c2 = c1 + D, *c3 = c2 + D;              \
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                \
        _Pragma("omp simd reduction(+ : s0, s1, s2, s3)")                                \
        for (int64_t r = 0; r < D; ++r) {                                                \
          const T x = a[r];                                                              \
          s0 += x * c0[r]; s1 += x * c1[r]; s2 += x * c2[r]; s3 += x * c3[r];            \
        }                                                                                \
        G[i * d + j] = s0; G[i * d + j + 1] = s1; G[i * d + j + 2] = s2;                 \
        G[i * d + j + 3] = s3;                                                           \
      }                                                                                  \
      for (; j < d; ++j) {                                                               \
        const T* c = Pt + j * D;                                                         \
        T s = 0;                                                                         \
        _Pragma("omp simd reduction(+ : s)") for (int64_t r = 0; r < D; ++r) s += a[r] * c[r]; \
        G[i * d + j] = s;                                                                \
      }                                                                                  \
    }                                                                                    \
  }
INJFLOW_GRAM_FROM_PANEL(double)
INJFLOW_GRAM_FROM_PANEL(float)

// out (D×d, row-major) = P · M for the panel Pt = Pᵀ (d×D) and a symmetric M (d×d).
// Blocks of 4 columns × 8 rows of out are accumulated in registers over i, so each load of
// the panel feeds four FMAs; edges go through the plain loop.
#define INJFLOW_PANEL_TIMES_MATRIX(S, T)                                                 \
  INJFLOW_MULTIVERSION void panel_times_matrix(const T* Pt, int64_t D, int64_t d,        \
                                               const T* M, S* out) {                     \
    constexpr int RB = 8, CB = 4;                                                        \
    const int64_t d_full = d - d % CB, D_full = D - D % RB;                              \
    for (int64_t j0 = 0; j0 < d_full; j0 += CB) {                                        \
      for (int64_t r0 = 0; r0 < D_full; r0 += RB) {                                      \
        T acc[CB][RB] = {};                                                              \
        for (int64_t i = 0; i < d; ++i) {                                                \
          const T* p = Pt + i * D + r0;                                                  \
          const T m0 = M[j0 * d + i], m1 = M[(j0 + 1) * d + i];                          \
          const T m2 = M[(j0 + 2) * d + i], m3 = M[(j0 + 3) * d + i];                    \
          _Pragma("omp simd") for (int q = 0; q < RB; ++q) {                             \
            acc[0][q] += m0 * p[q]; acc[1][q] += m1 * p[q];                              \
            acc[2][q] += m2 * p[q]; acc[3][q] += m3 * p[q];                              \
          }                                                                              \
        }                                                                                \
        for (int q = 0; q < RB; ++q)                                                     \
          for (int c = 0; c < CB; ++c) out[(r0 + q) * d + j0 + c] = S(acc[c][q]);       \
      }                                                                                  \
    }                                                                                    \
    for (int64_t r = 0; r < D; ++r) {                                                    \
      const int64_t j_start = r < D_full ? d_full : 0;                                   \
      for (int64_t j = j_start; j < d; ++j) {                                            \
        T s = 0;                                                                         \
        for (int64_t i = 0; i < d; ++i) s += M[j * d + i] * Pt[i * D + r];              \
        out[r * d + j] = S(s);                                                           \
      }                                                                                  \
    }                                                                                    \
  }
INJFLOW_PANEL_TIMES_MATRIX(float, double)
INJFLOW_PANEL_TIMES_MATRIX(double, double)
INJFLOW_PANEL_TIMES_MATRIX(float, float)
INJFLOW_PANEL_TIMES_MATRIX(double, float)  // unreachable (checked), keeps dispatch complete

// Transposed copy of one sample's J (D×d, row-major) into Pt (d×D) in the accumulation type.
template <typename scalar_t, typename acc_t>
void transpose_to_panel(const scalar_t* J, int64_t D, int64_t d, acc_t* Pt) {
  for (int64_t r = 0; r < D; ++r)
    for (int64_t i = 0; i < d; ++i) Pt[i * D + r] = static_cast<acc_t>(J[r * d + i]);
}

// Cholesky of (G + lambda·I) where G's upper triangle is in A and its diagonal in diag; writes
// the lower factor into A's lower triangle (diagonal included). Returns false on a non-positive
// or non-finite pivot.
template <typename acc_t>
bool cholesky_lower_from_upper(acc_t* A, const acc_t* diag, int64_t d, acc_t lambda) {
  for (int64_t j = 0; j < d; ++j) {
    acc_t s = diag[j] + lambda;
    const acc_t* Lj = A + j * d;
    for (int64_t k = 0; k < j; ++k) s -= Lj[k] * Lj[k];
    if (!(s > acc_t(0)) || !std::isfinite(s)) return false;
    const acc_t ljj = std::sqrt(s);
    A[j * d + j] = ljj;
    for (int64_t i = j + 1; i < d; ++i) {
      acc_t* Li = A + i * d;
      acc_t v = A[j * d + i];  // G[j][i] from the untouched upper triangle
      for (int64_t k = 0; k < j; ++k) v -= Li[k] * Lj[k];
      Li[j] = v / ljj;
    }
  }
  return true;
}

template <typename scalar_t, typename acc_t>
void gram_logdet_cpu_impl(const at::Tensor& J, double max_rel, at::Tensor& logdet,
                          at::Tensor& jitter, at::Tensor& status, at::Tensor& L) {
  const int64_t B = J.size(0), D = J.size(1), d = J.size(2);
  const scalar_t* Jp = J.const_data_ptr<scalar_t>();
  acc_t* Lp = L.mutable_data_ptr<acc_t>();
  scalar_t* outp = logdet.mutable_data_ptr<scalar_t>();
  acc_t* jitp = jitter.mutable_data_ptr<acc_t>();
  int32_t* stp = status.mutable_data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D * d * d / 8 + 1));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> diag(d), panel(D * d);
    for (int64_t b = begin; b < end; ++b) {
      acc_t* A = Lp + b * d * d;
      transpose_to_panel<scalar_t, acc_t>(Jp + b * D * d, D, d, panel.data());
      gram_from_panel(panel.data(), D, d, A);
      acc_t trace = 0;
      for (int64_t i = 0; i < d; ++i) {
        diag[i] = A[i * d + i];
        trace += diag[i];
      }
      const acc_t scale = trace / acc_t(d);
      int32_t st = kGramFailed;
      acc_t lambda = 0;
      if (std::isfinite(scale) && scale > acc_t(0)) {
        for (int attempt = 0;; ++attempt) {
          const acc_t rel = jitter_relative<acc_t>(attempt, static_cast<acc_t>(max_rel));
          if (rel < acc_t(0)) break;
          lambda = rel * scale;
          if (cholesky_lower_from_upper<acc_t>(A, diag.data(), d, lambda)) {
            st = attempt == 0 ? kGramOk : kGramJittered;
            break;
          }
        }
      }
      acc_t ld;
      if (st == kGramFailed) {
        ld = failed_logdet<acc_t>(scale);
        lambda = 0;
        for (int64_t i = 0; i < d * d; ++i) A[i] = acc_t(0);
      } else {
        ld = 0;
        for (int64_t i = 0; i < d; ++i) {
          ld += std::log(A[i * d + i]);
          for (int64_t j = i + 1; j < d; ++j) A[i * d + j] = acc_t(0);  // clear G's copy
        }
        ld *= acc_t(2);
      }
      outp[b] = static_cast<scalar_t>(ld);
      jitp[b] = lambda;
      stp[b] = st;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_logdet_cpu(
    const at::Tensor& J_in, bool accumulate_float64, double max_relative_jitter) {
  check_gram_logdet_input(J_in);
  TORCH_CHECK(J_in.device().is_cpu(), "gram_logdet (CPU kernel): J must be on the CPU");
  const at::Tensor J = J_in.contiguous();
  const int64_t B = J.size(0), d = J.size(2);
  const auto acc = gram_factor_dtype(J, accumulate_float64);
  at::Tensor logdet = at::empty({B}, J.options());
  at::Tensor jitter = at::empty({B}, J.options().dtype(acc));
  at::Tensor status = at::empty({B}, J.options().dtype(at::kInt));
  at::Tensor L = at::empty({B, d, d}, J.options().dtype(acc));
  if (B == 0) return {logdet, jitter, status, L};
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "gram_logdet_cpu", [&] {
    if (acc == at::kDouble)
      gram_logdet_cpu_impl<scalar_t, double>(J, max_relative_jitter, logdet, jitter, status, L);
    else
      gram_logdet_cpu_impl<scalar_t, float>(J, max_relative_jitter, logdet, jitter, status, L);
  });
  return {logdet, jitter, status, L};
}

// G⁻¹ (d×d, row-major, full) from the lower Cholesky factor L; W is d×d scratch.
template <typename acc_t>
void inverse_from_cholesky(const acc_t* L, int64_t d, acc_t* W, acc_t* Ginv) {
  // W = L⁻¹ (lower triangular), column by column by forward substitution.
  for (int64_t i = 0; i < d * d; ++i) W[i] = acc_t(0);
  for (int64_t j = 0; j < d; ++j) {
    W[j * d + j] = acc_t(1) / L[j * d + j];
    for (int64_t i = j + 1; i < d; ++i) {
      acc_t s = 0;
      for (int64_t k = j; k < i; ++k) s -= L[i * d + k] * W[k * d + j];
      W[i * d + j] = s / L[i * d + i];
    }
  }
  // G⁻¹ = L⁻ᵀ L⁻¹: Ginv[i][j] = Σ_{k >= max(i,j)} W[k][i] W[k][j].
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = i; j < d; ++j) {
      acc_t s = 0;
      for (int64_t k = j; k < d; ++k) s += W[k * d + i] * W[k * d + j];
      Ginv[i * d + j] = s;
      Ginv[j * d + i] = s;
    }
  }
}

template <typename scalar_t, typename acc_t>
void gram_logdet_backward_cpu_impl(const at::Tensor& grad, const at::Tensor& J,
                                   const at::Tensor& L, const at::Tensor& status,
                                   at::Tensor& out) {
  const int64_t B = J.size(0), D = J.size(1), d = J.size(2);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* Jp = J.const_data_ptr<scalar_t>();
  const acc_t* Lp = L.const_data_ptr<acc_t>();
  const int32_t* stp = status.const_data_ptr<int32_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D * d * d / 8 + 1));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> W(d * d), Gbuf(d * d), panel(D * d);
    for (int64_t b = begin; b < end; ++b) {
      acc_t* Ginv = Gbuf.data();
      const acc_t g2 = acc_t(2) * static_cast<acc_t>(gp[b]);
      if (stp[b] == kGramFailed) {
        for (int64_t i = 0; i < d * d; ++i) Ginv[i] = acc_t(0);
      } else {
        inverse_from_cholesky<acc_t>(Lp + b * d * d, d, W.data(), Ginv);
        for (int64_t i = 0; i < d * d; ++i) Ginv[i] *= g2;
      }
      transpose_to_panel<scalar_t, acc_t>(Jp + b * D * d, D, d, panel.data());
      panel_times_matrix(panel.data(), D, d, Ginv, op + b * D * d);
    }
  });
}

at::Tensor gram_logdet_backward_cpu(const at::Tensor& grad_in, const at::Tensor& J_in,
                                    const at::Tensor& L_in, const at::Tensor& status_in) {
  check_gram_logdet_backward_input(grad_in, J_in, L_in, status_in);
  TORCH_CHECK(J_in.device().is_cpu(), "gram_logdet_backward (CPU kernel): J must be on the CPU");
  const at::Tensor J = J_in.contiguous();
  const at::Tensor grad = grad_in.to(J.scalar_type()).contiguous();
  const at::Tensor L = L_in.contiguous();
  const at::Tensor status = status_in.contiguous();
  at::Tensor out = at::empty_like(J);
  if (J.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "gram_logdet_backward_cpu", [&] {
    if (L.scalar_type() == at::kDouble)
      gram_logdet_backward_cpu_impl<scalar_t, double>(grad, J, L, status, out);
    else
      gram_logdet_backward_cpu_impl<scalar_t, float>(grad, J, L, status, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CPU, m) {
  m.impl("gram_logdet", &gram_logdet_cpu);
  m.impl("gram_logdet_backward", &gram_logdet_backward_cpu);
}

}  // namespace injflow
