// Shared parts of the batched conjugate-gradient kernels: status codes, checks, and the
// per-system iteration written once for both devices. Vectors are (N, d, K): system (n, k) has
// its elements at n·d·K + i·K + k, i = 0..d-1.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>

namespace injflow {

template <typename T>
C10_HOST_DEVICE inline bool cg_isfinite(T v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

enum CGStatus : int32_t { kCGRunning = 0, kCGConverged = 1, kCGBreakdown = 2 };

inline void check_cg_vectors(const char* op, std::initializer_list<const at::Tensor*> ts) {
  const at::Tensor& ref = **ts.begin();
  TORCH_CHECK(ref.dim() == 3, op, ": vectors must be (N, d, K), got ", ref.sizes());
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op,
              ": vectors must be float32 or float64, got ", ref.scalar_type());
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->sizes() == ref.sizes() && t->scalar_type() == ref.scalar_type() &&
                    t->device() == ref.device(),
                op, ": all vectors must be ", ref.sizes(), " ", ref.scalar_type(), " on ",
                ref.device(), ", got ", t->sizes(), " ", t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": vectors must be contiguous");
  }
}

// The tensors cg_init returns for vectors r (N, d, K): p like r; rs, tol2 (N, K) in r's dtype;
// status, iterations (N, K) int32. Allocated here once for both devices.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cg_init_outputs(
    const at::Tensor& r) {
  const int64_t N = r.size(0), K = r.size(2);
  return {at::empty_like(r), at::empty({N, K}, r.options()), at::empty({N, K}, r.options()),
          at::empty({N, K}, r.options().dtype(at::kInt)),
          at::empty({N, K}, r.options().dtype(at::kInt))};
}

inline void check_cg_matrix(const at::Tensor& x, const c10::optional<at::Tensor>& A) {
  if (!A.has_value()) return;
  const auto N = x.size(0), d = x.size(1);
  TORCH_CHECK(A->dim() == 3 && A->size(0) == N && A->size(1) == d && A->size(2) == d &&
                  A->scalar_type() == x.scalar_type() && A->device() == x.device(),
              "cg_step: A must be (N, d, d) = (", N, ", ", d, ", ", d, ") ", x.scalar_type(),
              " on ", x.device(), ", got ", A->sizes(), " ", A->scalar_type());
}

inline void check_cg_state(const at::Tensor& x, const at::Tensor& rs, const at::Tensor& tol2,
                           const at::Tensor& status, const at::Tensor& iterations) {
  const auto N = x.size(0), K = x.size(2);
  for (const at::Tensor* t : {&rs, &tol2}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == K &&
                    t->scalar_type() == x.scalar_type() && t->is_contiguous() &&
                    t->device() == x.device(),
                "cg_step: rs and tol2 must be contiguous (N, K) = (", N, ", ", K, ") ",
                x.scalar_type(), ", got ", t->sizes());
  }
  for (const at::Tensor* t : {&status, &iterations}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == K &&
                    t->scalar_type() == at::kInt && t->is_contiguous() && t->device() == x.device(),
                "cg_step: status and iterations must be contiguous int32 (N, K), got ",
                t->sizes(), " ", t->scalar_type());
  }
}

// Initial state of system `sys` (= n·K + k): p = r, rs = rᵀr, tol2, status.
template <typename T>
C10_HOST_DEVICE inline void cg_init_system(int64_t sys, int64_t d, int64_t K, const T* r,
                                           const T* b, T rtol2, T atol2, T* p, T* rs, T* tol2,
                                           int32_t* status, int32_t* iterations) {
  const int64_t n = sys / K, k = sys - n * K;
  const int64_t base = n * d * K + k;
  T rr = 0, bb = 0;
  for (int64_t i = 0; i < d; ++i) {
    const T ri = r[base + i * K], bi = b[base + i * K];
    p[base + i * K] = ri;
    rr += ri * ri;
    bb += bi * bi;
  }
  const T t2 = rtol2 * bb > atol2 ? rtol2 * bb : atol2;
  rs[sys] = rr;
  tol2[sys] = t2;
  iterations[sys] = 0;
  status[sys] = rr <= t2 ? kCGConverged : kCGRunning;
}

// Ap = A[n]·p for system `sys` (A: (N, d, d) row-major), fused into the step for dense A.
template <typename T>
C10_HOST_DEVICE inline void cg_matvec_system(int64_t sys, int64_t d, int64_t K, const T* A,
                                             const T* p, T* Ap) {
  const int64_t n = sys / K, k = sys - n * K;
  const int64_t base = n * d * K + k;
  const T* An = A + n * d * d;
  for (int64_t i = 0; i < d; ++i) {
    T s = 0;
    for (int64_t j = 0; j < d; ++j) s += An[i * d + j] * p[base + j * K];
    Ap[base + i * K] = s;
  }
}

// One CG iteration of system `sys`, given Ap = A·p; no-op unless the system is running.
template <typename T>
C10_HOST_DEVICE inline void cg_step_system(int64_t sys, int64_t d, int64_t K, T* x, T* r, T* p,
                                           const T* Ap, T* rs, const T* tol2, int32_t* status,
                                           int32_t* iterations) {
  if (status[sys] != kCGRunning) return;
  const int64_t n = sys / K, k = sys - n * K;
  const int64_t base = n * d * K + k;
  T pAp = 0;
  for (int64_t i = 0; i < d; ++i) pAp += p[base + i * K] * Ap[base + i * K];
  if (!(pAp > T(0)) || !cg_isfinite(pAp)) {  // zero or negative curvature: A is not SPD here
    status[sys] = kCGBreakdown;
    return;
  }
  const T alpha = rs[sys] / pAp;
  T rr = 0;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t o = base + i * K;
    x[o] += alpha * p[o];
    const T ri = r[o] - alpha * Ap[o];
    r[o] = ri;
    rr += ri * ri;
  }
  iterations[sys] += 1;
  const T rs_old = rs[sys];
  rs[sys] = rr;
  if (rr <= tol2[sys]) {
    status[sys] = kCGConverged;
    return;
  }
  const T beta = rr / rs_old;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t o = base + i * K;
    p[o] = r[o] + beta * p[o];
  }
}

}  // namespace injflow
