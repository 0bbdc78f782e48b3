// CPU kernels of the batched conjugate-gradient solver, parallel over the systems.
// The per-system arithmetic is shared with the CUDA kernels (cg.h).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../cg.h"

namespace injflow {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cg_init_cpu(
    const at::Tensor& r_in, const at::Tensor& b_in, double rtol, double atol) {
  const at::Tensor r = r_in.contiguous(), b = b_in.contiguous();
  check_cg_vectors("cg_init", {&r, &b});
  const int64_t N = r.size(0), d = r.size(1), K = r.size(2);
  at::Tensor p, rs, tol2, status, iterations;
  std::tie(p, rs, tol2, status, iterations) = cg_init_outputs(r);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "cg_init_cpu", [&] {
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    scalar_t* rsp = rs.mutable_data_ptr<scalar_t>();
    scalar_t* tp = tol2.mutable_data_ptr<scalar_t>();
    int32_t* sp = status.mutable_data_ptr<int32_t>();
    int32_t* ip = iterations.mutable_data_ptr<int32_t>();
    const scalar_t rtol2 = scalar_t(rtol * rtol), atol2 = scalar_t(atol * atol);
    at::parallel_for(0, N * K, std::max<int64_t>(1, 8192 / (d + 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; ++s)
        cg_init_system<scalar_t>(s, d, K, rp, bp, rtol2, atol2, pp, rsp, tp, sp, ip);
    });
  });
  return {p, rs, tol2, status, iterations};
}

// One CG iteration for the K systems sharing matrix n, vectorised over k (contiguous in the
// (N, d, K) layout). Same arithmetic as cg_step_system (cg.h), written with per-k multipliers
// so that stopped systems are left unchanged without branches in the inner loops.
template <typename T>
void cg_step_matrix_row(int64_t n, int64_t d, int64_t K, T* x, T* r, T* p, const T* Ap, T* rs,
                        const T* tol2, int32_t* status, int32_t* iterations, T* work) {
  T* pAp = work;        // K
  T* alpha = work + K;  // K
  T* rr = work + 2 * K; // K
  T* keep = work + 3 * K;  // 1 where p is replaced by r + beta p
  T* beta = work + 4 * K;
  const int64_t base = n * d * K;
  int32_t* st = status + n * K;
  for (int64_t k = 0; k < K; ++k) pAp[k] = rr[k] = T(0);
  for (int64_t i = 0; i < d; ++i) {
    const T* pi = p + base + i * K;
    const T* ai = Ap + base + i * K;
    for (int64_t k = 0; k < K; ++k) pAp[k] += pi[k] * ai[k];
  }
  for (int64_t k = 0; k < K; ++k) {
    alpha[k] = T(0);
    if (st[k] != kCGRunning) continue;
    if (!(pAp[k] > T(0)) || !cg_isfinite(pAp[k])) {
      st[k] = kCGBreakdown;
      continue;
    }
    alpha[k] = rs[n * K + k] / pAp[k];
  }
  for (int64_t i = 0; i < d; ++i) {
    T* xi = x + base + i * K;
    T* ri = r + base + i * K;
    const T* pi = p + base + i * K;
    const T* ai = Ap + base + i * K;
    for (int64_t k = 0; k < K; ++k) {
      xi[k] += alpha[k] * pi[k];
      ri[k] -= alpha[k] * ai[k];
      rr[k] += ri[k] * ri[k];
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    keep[k] = T(0);
    beta[k] = T(1);
    if (st[k] != kCGRunning || alpha[k] == T(0)) continue;  // stopped, or broke down just now
    iterations[n * K + k] += 1;
    const T rs_old = rs[n * K + k];
    rs[n * K + k] = rr[k];
    if (rr[k] <= tol2[n * K + k]) {
      st[k] = kCGConverged;
      continue;
    }
    keep[k] = T(1);
    beta[k] = rr[k] / rs_old;
  }
  for (int64_t i = 0; i < d; ++i) {
    T* pi = p + base + i * K;
    const T* ri = r + base + i * K;
    for (int64_t k = 0; k < K; ++k) pi[k] = keep[k] * ri[k] + beta[k] * pi[k];
  }
}

void cg_step_cpu(at::Tensor& x, at::Tensor& r, at::Tensor& p, at::Tensor& Ap,
                 const c10::optional<at::Tensor>& A_in, at::Tensor& rs, const at::Tensor& tol2,
                 at::Tensor& status, at::Tensor& iterations) {
  check_cg_vectors("cg_step", {&x, &r, &p, &Ap});
  check_cg_matrix(x, A_in);
  check_cg_state(x, rs, tol2, status, iterations);
  const at::Tensor A = A_in.has_value() ? A_in->contiguous() : at::Tensor();
  const int64_t N = x.size(0), d = x.size(1), K = x.size(2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cpu", [&] {
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    scalar_t* rp = r.mutable_data_ptr<scalar_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    scalar_t* ap = Ap.mutable_data_ptr<scalar_t>();
    const scalar_t* Ap_mat = A.defined() ? A.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* rsp = rs.mutable_data_ptr<scalar_t>();
    const scalar_t* tp = tol2.const_data_ptr<scalar_t>();
    int32_t* sp = status.mutable_data_ptr<int32_t>();
    int32_t* ip = iterations.mutable_data_ptr<int32_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / (d * K + 1)), [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> work(5 * K);
      for (int64_t n = lo; n < hi; ++n) {
        if (Ap_mat) {
          for (int64_t k = 0; k < K; ++k)
            if (sp[n * K + k] == kCGRunning)
              cg_matvec_system<scalar_t>(n * K + k, d, K, Ap_mat, pp, ap);
        }
        cg_step_matrix_row<scalar_t>(n, d, K, xp, rp, pp, ap, rsp, tp, sp, ip, work.data());
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CPU, m) {
  m.impl("cg_init", &cg_init_cpu);
  m.impl("cg_step", &cg_step_cpu);
}

}  // namespace injflow
