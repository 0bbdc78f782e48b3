// CPU kernels of the tangent ops: the fused elementwise parts (the GEMMs are shared, see
// tangent_ops.h), parallel over the batch.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../tangent_ops.h"

namespace injflow {
namespace {

void linear_epilogue_cpu(at::Tensor& Z, const c10::optional<at::Tensor>& b, int64_t act,
                         double slope, at::Tensor& Y) {
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  const at::Tensor bias = b.has_value() ? b->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tangent_linear_cpu", [&] {
    scalar_t* z = Z.mutable_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t sl = static_cast<scalar_t>(slope);
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / (R * n + 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t bi = lo; bi < hi; ++bi) {
        scalar_t* zb = z + bi * R * n;
        scalar_t* yb = y + bi * R * n;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t z0 = zb[j] + (bp ? bp[j] : scalar_t(0));
          zb[j] = z0;
          const auto a = activation<scalar_t>(act, z0, sl, false);
          yb[j] = a.f;
          for (int64_t k = 1; k < R; ++k) yb[k * n + j] = a.df * zb[k * n + j];
        }
      }
    });
  });
}

void linear_grad_preact_cpu(const at::Tensor& gY, const at::Tensor& Z, int64_t act, double slope,
                            at::Tensor& GZ) {
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "tangent_linear_backward_cpu", [&] {
    const scalar_t* g = gY.const_data_ptr<scalar_t>();
    const scalar_t* z = Z.const_data_ptr<scalar_t>();
    scalar_t* gz = GZ.mutable_data_ptr<scalar_t>();
    const scalar_t sl = static_cast<scalar_t>(slope);
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / (R * n + 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t bi = lo; bi < hi; ++bi) {
        const int64_t o = bi * R * n;
        for (int64_t j = 0; j < n; ++j) {
          const auto a = activation<scalar_t>(act, z[o + j], sl, true);
          scalar_t g0 = g[o + j] * a.df;
          for (int64_t k = 1; k < R; ++k) {
            g0 += g[o + k * n + j] * z[o + k * n + j] * a.d2f;
            gz[o + k * n + j] = g[o + k * n + j] * a.df;
          }
          gz[o + j] = g0;
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> tangent_linear_cpu(const at::Tensor& XV, const at::Tensor& W,
                                                      const c10::optional<at::Tensor>& b,
                                                      int64_t act, double slope) {
  return tangent_linear_composite(XV, W, b, act, slope, &linear_epilogue_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_backward_cpu(
    const at::Tensor& gY, const at::Tensor& XV, const at::Tensor& W, const at::Tensor& Z,
    int64_t act, double slope) {
  return tangent_linear_backward_composite(gY, XV, W, Z, act, slope, &linear_grad_preact_cpu);
}

std::tuple<at::Tensor, at::Tensor> tangent_coupling_cpu(const at::Tensor& XV_in,
                                                        const at::Tensor& ST_in, int64_t scale) {
  check_tangent_coupling_args(XV_in, ST_in, scale);
  const at::Tensor XV = XV_in.contiguous(), ST = ST_in.contiguous();
  const int64_t B = XV.size(0), R = XV.size(1), m = XV.size(2);
  at::Tensor Y = at::empty_like(XV);
  at::Tensor lad = at::empty({B}, XV.options());
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_coupling_cpu", [&] {
    const scalar_t* xv = XV.const_data_ptr<scalar_t>();
    const scalar_t* st = ST.const_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    scalar_t* l = lad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / (R * m + 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t bi = lo; bi < hi; ++bi) {
        const scalar_t* x = xv + bi * R * m;
        const scalar_t* s = st + bi * R * 2 * m;
        scalar_t* yb = y + bi * R * m;
        scalar_t acc = 0;
        for (int64_t j = 0; j < m; ++j) {
          const auto sc = coupling_scale<scalar_t>(scale, s[j]);
          const scalar_t e = std::exp(sc.f);
          const scalar_t xec = x[j] * e * sc.df;
          yb[j] = x[j] * e + s[m + j];
          for (int64_t k = 1; k < R; ++k)
            yb[k * m + j] = x[k * m + j] * e + xec * s[k * 2 * m + j] + s[k * 2 * m + m + j];
          acc += sc.f;
        }
        l[bi] = acc;
      }
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
  at::Tensor gXV = at::empty_like(XV);
  at::Tensor gST = at::empty_like(ST);
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "tangent_coupling_backward_cpu", [&] {
    const scalar_t* xv = XV.const_data_ptr<scalar_t>();
    const scalar_t* st = ST.const_data_ptr<scalar_t>();
    const scalar_t* g = gY.const_data_ptr<scalar_t>();
    const scalar_t* glp = gl.const_data_ptr<scalar_t>();
    scalar_t* gx = gXV.mutable_data_ptr<scalar_t>();
    scalar_t* gs = gST.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / (R * m + 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t bi = lo; bi < hi; ++bi) {
        const scalar_t* x = xv + bi * R * m;
        const scalar_t* s = st + bi * R * 2 * m;
        const scalar_t* gb = g + bi * R * m;
        scalar_t* gxb = gx + bi * R * m;
        scalar_t* gsb = gs + bi * R * 2 * m;
        for (int64_t j = 0; j < m; ++j) {
          const auto sc = coupling_scale<scalar_t>(scale, s[j]);
          const scalar_t e = std::exp(sc.f);
          const scalar_t ec = e * sc.df;
          const scalar_t curv = e * (sc.df * sc.df + sc.d2f);  // d(e·s̃')/ds
          const scalar_t x0 = x[j], g0 = gb[j];
          scalar_t gx0 = g0 * e;
          scalar_t gs0 = g0 * x0 * ec + glp[bi] * sc.df;
          for (int64_t k = 1; k < R; ++k) {
            const scalar_t gk = gb[k * m + j];
            const scalar_t sdot = s[k * 2 * m + j];
            gx0 += gk * ec * sdot;
            gs0 += gk * (ec * x[k * m + j] + x0 * curv * sdot);
            gxb[k * m + j] = gk * e;
            gsb[k * 2 * m + j] = gk * x0 * ec;
            gsb[k * 2 * m + m + j] = gk;
          }
          gxb[j] = gx0;
          gsb[j] = gs0;
          gsb[m + j] = g0;
        }
      }
    });
  });
  return {gXV, gST};
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, CPU, m) {
  m.impl("tangent_linear", &tangent_linear_cpu);
  m.impl("tangent_linear_backward", &tangent_linear_backward_cpu);
  m.impl("tangent_coupling", &tangent_coupling_cpu);
  m.impl("tangent_coupling_backward", &tangent_coupling_backward_cpu);
}

}  // namespace injflow
