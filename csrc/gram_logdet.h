// Shared definitions of gram_logdet for the CPU and CUDA kernels: status codes, the bounded
// jitter schedule and input checks. The schedule lives here once so that both devices add the
// same jitter to the same matrix.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>

namespace injflow {

// Per-sample status returned by gram_logdet.
enum GramStatus : int32_t {
  kGramOk = 0,        // Cholesky of G succeeded without jitter
  kGramJittered = 1,  // succeeded after adding jitter·I (jitter reported)
  kGramFailed = 2,    // failed even with the largest allowed jitter (G == 0 or non-finite)
};

// Jitter schedule: try 0, then rel = 100·eps(T)·10^k, k = 0, 1, ..., capped at
// max_relative_jitter (which is always tried last), times scale = tr(G)/d.
// Returns the relative jitter of attempt `attempt` (0 = none) or a negative value once the
// schedule is exhausted. The number of attempts is bounded by about 16.
template <typename T>
C10_HOST_DEVICE inline T jitter_relative(int attempt, T max_relative_jitter) {
  if (attempt == 0) return T(0);
  if (!(max_relative_jitter > T(0))) return T(-1);
  const T eps = sizeof(T) == 8 ? T(DBL_EPSILON) : T(FLT_EPSILON);
  T rel = T(100) * eps;
  T prev = T(0);
  for (int k = 1; k < attempt; ++k) {
    prev = rel;
    rel *= T(10);
  }
  if (prev >= max_relative_jitter) return T(-1);  // the cap was already tried
  return rel < max_relative_jitter ? rel : max_relative_jitter;
}

// The value returned for a sample whose factorisation failed: -inf when G is exactly zero
// (its determinant is 0), NaN when G is not finite (non-finite or overflowing input).
template <typename T>
C10_HOST_DEVICE inline T failed_logdet(T scale) {
  return scale == T(0) ? -INFINITY : NAN;
}

inline void check_gram_logdet_input(const at::Tensor& J) {
  TORCH_CHECK(J.dim() == 3, "gram_logdet: J must be (B, D, d), got shape ", J.sizes());
  TORCH_CHECK(J.scalar_type() == at::kFloat || J.scalar_type() == at::kDouble,
              "gram_logdet: J must be float32 or float64, got ", J.scalar_type());
  TORCH_CHECK(J.size(2) >= 1 && J.size(1) >= 1,
              "gram_logdet: J must have D >= 1 and d >= 1, got shape ", J.sizes());
  TORCH_CHECK(J.size(2) <= J.size(1),
              "gram_logdet: J must be (B, D, d) with d <= D (JᵀJ is singular otherwise), got D=",
              J.size(1), ", d=", J.size(2));
}

inline at::ScalarType gram_factor_dtype(const at::Tensor& J, bool accumulate_float64) {
  return (J.scalar_type() == at::kDouble || accumulate_float64) ? at::kDouble : at::kFloat;
}

inline void check_gram_logdet_backward_input(const at::Tensor& grad, const at::Tensor& J,
                                             const at::Tensor& L, const at::Tensor& status) {
  check_gram_logdet_input(J);
  const auto B = J.size(0), d = J.size(2);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == B,
              "gram_logdet_backward: grad must be (B,) = (", B, ",), got ", grad.sizes());
  TORCH_CHECK(L.dim() == 3 && L.size(0) == B && L.size(1) == d && L.size(2) == d,
              "gram_logdet_backward: L must be (B, d, d) = (", B, ", ", d, ", ", d, "), got ",
              L.sizes());
  TORCH_CHECK(status.dim() == 1 && status.size(0) == B && status.scalar_type() == at::kInt,
              "gram_logdet_backward: status must be int32 (B,), got ", status.scalar_type(), " ",
              status.sizes());
  TORCH_CHECK(L.scalar_type() == at::kFloat || L.scalar_type() == at::kDouble,
              "gram_logdet_backward: L must be float32 or float64, got ", L.scalar_type());
  TORCH_CHECK(J.scalar_type() != at::kDouble || L.scalar_type() == at::kDouble,
              "gram_logdet_backward: L must be float64 when J is float64, got ", L.scalar_type());
  TORCH_CHECK(grad.device() == J.device() && L.device() == J.device() &&
                  status.device() == J.device(),
              "gram_logdet_backward: all tensors must be on ", J.device());
}

}  // namespace injflow
