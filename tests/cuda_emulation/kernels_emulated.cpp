// The CUDA kernels of cg, gram_logdet and the tangent ops (csrc/cuda/*_kernels.cuh) run on the
// CPU under the CUDA emulation of cuda_on_cpu.h, behind the same host code as the CUDA ops
// (csrc/cuda/*_cuda.cu, mirrored here with emulated launches; the tangent ops through the very
// composites of csrc/tangent_ops.h). A torch extension of CPU tensors, built and called by
// tests/emulated_cuda.py.
//
// Every output and every input a kernel sees is a copy inside a NaN-filled, fenced buffer
// (Guards), so an element never written shows as NaN and a write out of bounds fails the call.

#include <torch/extension.h>

#include "cg.h"
#include "gram_logdet.h"
#include "tangent_mlp.h"
#include "tangent_ops.h"
// the emulation after ATen: its CUDA names must not reach torch's headers
#include "cuda_on_cpu.h"
#include "cuda/cg_kernels.cuh"
#include "cuda/gram_logdet_kernels.cuh"
#include "cuda/tangent_ops_kernels.cuh"

namespace {

using namespace injflow;

struct Settings {
  int order = injflow_emu::kForward;
  uint64_t seed = 0;
  bool deterministic = false;  // what at::globalContext().deterministicAlgorithms() says
};
Settings settings;

void run(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  injflow_emu::launch(grid, block, smem, body, static_cast<injflow_emu::Order>(settings.order),
                      settings.seed);
}

// Tensors in injflow_emu::GuardedBuffers (NaN-filled, fenced); check() fails if a kernel wrote
// outside one.
struct Guards {
  std::vector<std::unique_ptr<injflow_emu::GuardedBuffer>> buffers;

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
    buffers.push_back(std::make_unique<injflow_emu::GuardedBuffer>(nullptr, bytes, true));
    return at::from_blob(buffers.back()->data(), sizes, options);
  }
  at::Tensor copy(const at::Tensor& t) { return empty(t.sizes(), t.options()).copy_(t); }
  void check(const char* op) const {
    for (const auto& buf : buffers)
      TORCH_CHECK(buf->checked(), op, " (emulated): a kernel wrote outside a buffer");
  }
};

template <typename F>
void emulate(const char* op, F&& launches) {
  try {
    launches();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, op, " (emulated): ", e.what());
  }
}

// ------------------------------------------------------------------------------------- cg

std::vector<at::Tensor> emu_cg_init(const at::Tensor& r_in, const at::Tensor& b_in, double rtol,
                                    double atol) {
  Guards g;
  const at::Tensor r = g.copy(r_in.contiguous()), b = g.copy(b_in.contiguous());
  check_cg_vectors("cg_init", {&r, &b});
  const int64_t N = r.size(0), d = r.size(1), K = r.size(2), systems = N * K;
  at::Tensor p = g.empty(r.sizes(), r.options());
  at::Tensor rs = g.empty({N, K}, r.options()), tol2 = g.empty({N, K}, r.options());
  at::Tensor status = g.empty({N, K}, r.options().dtype(at::kInt));
  at::Tensor iterations = g.empty({N, K}, r.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "emu_cg_init", [&] {
    emulate("cg_init", [&] {
      run((systems + cg_kernels::kThreads - 1) / cg_kernels::kThreads, cg_kernels::kThreads, 0,
          [&] {
            cg_kernels::cg_init_kernel<scalar_t>(
                systems, d, K, r.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                scalar_t(rtol * rtol), scalar_t(atol * atol), p.mutable_data_ptr<scalar_t>(),
                rs.mutable_data_ptr<scalar_t>(), tol2.mutable_data_ptr<scalar_t>(),
                status.mutable_data_ptr<int32_t>(), iterations.mutable_data_ptr<int32_t>());
          });
    });
  });
  g.check("cg_init");
  return {p.clone(), rs.clone(), tol2.clone(), status.clone(), iterations.clone()};
}

// One cg_step on copies of the state; returns the new x, r, p, Ap, rs, status, iterations.
std::vector<at::Tensor> emu_cg_step(const at::Tensor& x_in, const at::Tensor& r_in,
                                    const at::Tensor& p_in, const at::Tensor& Ap_in,
                                    const c10::optional<at::Tensor>& A_in,
                                    const at::Tensor& rs_in, const at::Tensor& tol2_in,
                                    const at::Tensor& status_in,
                                    const at::Tensor& iterations_in) {
  Guards g;
  at::Tensor x = g.copy(x_in), r = g.copy(r_in), p = g.copy(p_in), Ap = g.copy(Ap_in);
  at::Tensor rs = g.copy(rs_in), tol2 = g.copy(tol2_in), status = g.copy(status_in);
  at::Tensor iterations = g.copy(iterations_in);
  check_cg_vectors("cg_step", {&x, &r, &p, &Ap});
  check_cg_matrix(x, A_in);
  const at::Tensor A = A_in.has_value() ? g.copy(A_in->contiguous()) : at::Tensor();
  check_cg_state(x, rs, tol2, status, iterations);
  const int64_t N = x.size(0), d = x.size(1), K = x.size(2), systems = N * K;
  constexpr int threads = cg_kernels::kThreads;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "emu_cg_step", [&] {
    const scalar_t* Ad = A.defined() ? A.const_data_ptr<scalar_t>() : nullptr;
    emulate("cg_step", [&] {
      if (systems == 0) return;
      if (K == 1) {
        const int64_t warps = threads / 32;
        run((systems + warps - 1) / warps, threads, 0, [&] {
          cg_kernels::cg_step_warp_kernel<scalar_t>(
              systems, d, x.mutable_data_ptr<scalar_t>(), r.mutable_data_ptr<scalar_t>(),
              p.mutable_data_ptr<scalar_t>(), Ap.mutable_data_ptr<scalar_t>(), Ad,
              rs.mutable_data_ptr<scalar_t>(), tol2.const_data_ptr<scalar_t>(),
              status.mutable_data_ptr<int32_t>(), iterations.mutable_data_ptr<int32_t>());
        });
        return;
      }
      run((systems + threads - 1) / threads, threads, 0, [&] {
        cg_kernels::cg_step_kernel<scalar_t>(
            systems, d, K, x.mutable_data_ptr<scalar_t>(), r.mutable_data_ptr<scalar_t>(),
            p.mutable_data_ptr<scalar_t>(), Ap.mutable_data_ptr<scalar_t>(), Ad,
            rs.mutable_data_ptr<scalar_t>(), tol2.const_data_ptr<scalar_t>(),
            status.mutable_data_ptr<int32_t>(), iterations.mutable_data_ptr<int32_t>());
      });
    });
  });
  g.check("cg_step");
  return {x.clone(), r.clone(), p.clone(), Ap.clone(), rs.clone(), status.clone(),
          iterations.clone()};
}

// ---------------------------------------------------------------------------- gram_logdet

std::vector<at::Tensor> emu_gram_logdet(const at::Tensor& J_in, bool accumulate_float64,
                                        double max_relative_jitter) {
  check_gram_logdet_input(J_in);
  Guards g;
  const at::Tensor J = g.copy(J_in.contiguous());
  const int64_t B = J.size(0), D = J.size(1);
  const int d = static_cast<int>(J.size(2));
  const auto acc = gram_factor_dtype(J, accumulate_float64);
  at::Tensor logdet = g.empty({B}, J.options());
  at::Tensor jitter = g.empty({B}, J.options().dtype(acc));
  at::Tensor status = g.empty({B}, J.options().dtype(at::kInt));
  at::Tensor L = g.empty({B, d, d}, J.options().dtype(acc));
  const bool in_shared = gram_kernels::gram_launch(d, 8).in_shared;
  at::Tensor diag_ws = in_shared ? at::Tensor() : g.empty({B, d}, J.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "emu_gram_logdet", [&] {
    auto launch = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const auto shape = gram_kernels::gram_launch(d, sizeof(acc_t));
      emulate("gram_logdet", [&] {
        if (B == 0) return;
        run(B, gram_kernels::kThreads, shape.forward_smem, [&] {
          gram_kernels::gram_logdet_kernel<scalar_t, acc_t>(
              J.const_data_ptr<scalar_t>(), D, d, static_cast<acc_t>(max_relative_jitter),
              logdet.mutable_data_ptr<scalar_t>(), jitter.mutable_data_ptr<acc_t>(),
              status.mutable_data_ptr<int32_t>(), L.mutable_data_ptr<acc_t>(),
              in_shared ? nullptr : diag_ws.mutable_data_ptr<acc_t>(), in_shared,
              shape.tile_elems);
        });
      });
    };
    if (acc == at::kDouble) launch(double(0)); else launch(float(0));
  });
  g.check("gram_logdet");
  return {logdet.clone(), jitter.clone(), status.clone(), L.clone()};
}

at::Tensor emu_gram_logdet_backward(const at::Tensor& grad_in, const at::Tensor& J_in,
                                    const at::Tensor& L_in, const at::Tensor& status_in) {
  check_gram_logdet_backward_input(grad_in, J_in, L_in, status_in);
  Guards g;
  const at::Tensor J = g.copy(J_in.contiguous());
  const at::Tensor grad = g.copy(grad_in.to(J.scalar_type()).contiguous());
  const at::Tensor L = g.copy(L_in.contiguous()), status = g.copy(status_in.contiguous());
  const int64_t B = J.size(0), D = J.size(1);
  const int d = static_cast<int>(J.size(2));
  at::Tensor out = g.empty(J.sizes(), J.options());
  const bool in_shared = gram_kernels::gram_launch(d, 8).in_shared;
  at::Tensor ws = in_shared ? at::Tensor() : g.empty({B, d, d}, L.options());
  AT_DISPATCH_FLOATING_TYPES(J.scalar_type(), "emu_gram_logdet_backward", [&] {
    auto launch = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      emulate("gram_logdet_backward", [&] {
        if (B == 0) return;
        run(B, gram_kernels::kThreads, gram_kernels::gram_launch(d, sizeof(acc_t)).backward_smem,
            [&] {
              gram_kernels::gram_logdet_backward_kernel<scalar_t, acc_t>(
                  grad.const_data_ptr<scalar_t>(), J.const_data_ptr<scalar_t>(),
                  L.const_data_ptr<acc_t>(), status.const_data_ptr<int32_t>(), D, d,
                  out.mutable_data_ptr<scalar_t>(),
                  in_shared ? nullptr : ws.mutable_data_ptr<acc_t>(), in_shared);
            });
      });
    };
    if (L.scalar_type() == at::kDouble) launch(double(0)); else launch(float(0));
  });
  g.check("gram_logdet_backward");
  return out.clone();
}

// ------------------------------------------------------------------------------ tangent ops

using tangent_kernels::blocks_for;
using tangent_kernels::kThreads;

// linear_epilogue_cuda (csrc/cuda/tangent_ops_cuda.cu) with the emulated kernel
at::Tensor linear_epilogue_emulated(at::Tensor& Z, const c10::optional<at::Tensor>& b,
                                    int64_t act, double slope, at::Tensor& Y) {
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  Guards g;
  at::Tensor dA = g.empty({B, n}, Z.options());
  const at::Tensor bias = b.has_value() ? g.copy(b->contiguous()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "linear_epilogue_emulated", [&] {
    emulate("tangent_linear", [&] {
      run(blocks_for(B * n), kThreads, 0, [&] {
        tangent_kernels::linear_epilogue_kernel<scalar_t>(
            Z.mutable_data_ptr<scalar_t>(),
            bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, B, R, n, act,
            static_cast<scalar_t>(slope), Y.mutable_data_ptr<scalar_t>(),
            dA.mutable_data_ptr<scalar_t>());
      });
    });
  });
  g.check("tangent_linear");
  return dA.clone();
}

// linear_grad_preact_cuda with the emulated kernels (the bias one unless deterministic)
void linear_grad_preact_emulated(const at::Tensor& gY, const at::Tensor& Z, const at::Tensor&,
                                 const at::Tensor&, int64_t act, double slope, at::Tensor& GZ,
                                 at::Tensor& gb) {
  const int64_t B = Z.size(0), R = Z.size(1), n = Z.size(2);
  const bool with_bias = !settings.deterministic && B > 0 && n > 0;
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "linear_grad_preact_emulated", [&] {
    emulate("tangent_linear_backward", [&] {
      if (with_bias) {
        gb = at::zeros({n}, Z.options());
        const dim3 block(32, tangent_kernels::kBiasRows);
        const int64_t rows = tangent_kernels::kBiasRows;
        const int64_t row_blocks = std::min<int64_t>((B + rows - 1) / rows, 1024);
        const dim3 grid(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>(row_blocks));
        run(grid, block, 0, [&] {
          tangent_kernels::linear_grad_preact_bias_kernel<scalar_t>(
              gY.const_data_ptr<scalar_t>(), Z.const_data_ptr<scalar_t>(), B, R, n, act,
              static_cast<scalar_t>(slope), GZ.mutable_data_ptr<scalar_t>(),
              gb.mutable_data_ptr<scalar_t>());
        });
        return;
      }
      run(blocks_for(B * n), kThreads, 0, [&] {
        tangent_kernels::linear_grad_preact_kernel<scalar_t>(
            gY.const_data_ptr<scalar_t>(), Z.const_data_ptr<scalar_t>(), B, R, n, act,
            static_cast<scalar_t>(slope), GZ.mutable_data_ptr<scalar_t>());
      });
    });
  });
}

// tangent_linear_cuda and tangent_linear_backward_cuda with the emulated kernels
std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_emulated(
    const at::Tensor& XV, const at::Tensor& W, const c10::optional<at::Tensor>& b, int64_t act,
    double slope) {
  return tangent_linear_composite(XV, W, b, act, slope, &linear_epilogue_emulated);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tangent_linear_backward_emulated(
    const at::Tensor& gY, const at::Tensor& XV, const at::Tensor& W, const at::Tensor& Z,
    const at::Tensor& Y, const at::Tensor& dA, int64_t act, double slope, bool input_only) {
  return tangent_linear_backward_composite(gY, XV, W, Z, Y, dA, act, slope, input_only,
                                           &linear_grad_preact_emulated);
}

std::vector<at::Tensor> emu_tangent_linear(const at::Tensor& XV, const at::Tensor& W,
                                           const c10::optional<at::Tensor>& b, int64_t act,
                                           double slope) {
  auto [Y, Z, dA] = tangent_linear_emulated(XV, W, b, act, slope);
  return {Y, Z, dA};
}

std::vector<at::Tensor> emu_tangent_linear_backward(const at::Tensor& gY, const at::Tensor& XV,
                                                    const at::Tensor& W, const at::Tensor& Z,
                                                    const at::Tensor& Y, const at::Tensor& dA,
                                                    int64_t act, double slope, bool input_only,
                                                    bool deterministic) {
  settings.deterministic = deterministic;
  auto [gXV, gW, gb] = tangent_linear_backward_emulated(gY, XV, W, Z, Y, dA, act, slope,
                                                        input_only);
  return {gXV, gW, gb};
}

// tangent_epilogue_cuda and its backward (the op under tangent_conv2d) with the emulated
// kernels
std::vector<at::Tensor> emu_tangent_epilogue(const at::Tensor& Z,
                                             const c10::optional<at::Tensor>& b, int64_t act,
                                             double slope) {
  auto [Y, Zb, dA] = tangent_epilogue_composite(Z, b, act, slope, &linear_epilogue_emulated);
  return {Y, Zb, dA};
}

std::vector<at::Tensor> emu_tangent_epilogue_backward(const at::Tensor& gY, const at::Tensor& Z,
                                                      const at::Tensor& Y, const at::Tensor& dA,
                                                      int64_t act, double slope,
                                                      bool deterministic) {
  settings.deterministic = deterministic;
  auto [GZ, gb] = tangent_epilogue_backward_composite(gY, Z, Y, dA, act, slope,
                                                      &linear_grad_preact_emulated);
  return {GZ, gb};
}

// The CUDA tangent_mlp's per-layer path (the default, path 0 or 1) with the emulated kernels:
// Y, then every layer's Z, the hidden A and every dA.
std::vector<at::Tensor> emu_tangent_mlp(const at::Tensor& XV, std::vector<at::Tensor> weights,
                                        std::vector<at::Tensor> biases, int64_t act, double slope,
                                        int64_t last_act) {
  check_tangent_mlp_args(XV, weights, biases, act, last_act, kMlpPerLayer, {});
  auto [Y, Z, A, dA] = tangent_mlp_per_layer(XV, weights, biases, act, slope, last_act,
                                             &tangent_linear_emulated);
  std::vector<at::Tensor> out{Y};
  for (auto* list : {&Z, &A, &dA}) out.insert(out.end(), list->begin(), list->end());
  return out;
}

// Its backward (input_only: only grad_XV wanted): grad_XV, then every grad_W and grad_b.
std::vector<at::Tensor> emu_tangent_mlp_backward(const at::Tensor& gY, const at::Tensor& XV,
                                                 std::vector<at::Tensor> weights,
                                                 const at::Tensor& Y, std::vector<at::Tensor> Z,
                                                 std::vector<at::Tensor> A,
                                                 std::vector<at::Tensor> dA, int64_t act,
                                                 double slope, int64_t last_act, bool input_only,
                                                 bool deterministic) {
  settings.deterministic = deterministic;
  check_tangent_mlp_backward_args(gY, XV, weights, Y, Z, A, dA, act, last_act, kMlpPerLayer,
                                  {});
  auto [gXV, gW, gb] = tangent_mlp_backward_per_layer(gY, XV, weights, Y, Z, A, dA, act, slope,
                                                      last_act, input_only,
                                                      &tangent_linear_backward_emulated);
  std::vector<at::Tensor> out{gXV};
  out.insert(out.end(), gW.begin(), gW.end());
  out.insert(out.end(), gb.begin(), gb.end());
  return out;
}

std::vector<at::Tensor> emu_tangent_coupling(const at::Tensor& XV_in, const at::Tensor& ST_in,
                                             int64_t scale) {
  check_tangent_coupling_args(XV_in, ST_in, scale);
  Guards g;
  const at::Tensor XV = g.copy(XV_in.contiguous()), ST = g.copy(ST_in.contiguous());
  const int64_t B = XV.size(0), R = XV.size(1), m = XV.size(2);
  at::Tensor Y = g.empty(XV.sizes(), XV.options()), lad = g.empty({B}, XV.options());
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "emu_tangent_coupling", [&] {
    emulate("tangent_coupling", [&] {
      if (B == 0) return;
      run(B, kThreads, 0, [&] {
        tangent_kernels::coupling_kernel<scalar_t>(
            XV.const_data_ptr<scalar_t>(), ST.const_data_ptr<scalar_t>(), R, m, scale,
            Y.mutable_data_ptr<scalar_t>(), lad.mutable_data_ptr<scalar_t>());
      });
    });
  });
  g.check("tangent_coupling");
  return {Y.clone(), lad.clone()};
}

std::vector<at::Tensor> emu_tangent_coupling_backward(const at::Tensor& gY_in,
                                                      const at::Tensor& gl_in,
                                                      const at::Tensor& XV_in,
                                                      const at::Tensor& ST_in, int64_t scale) {
  check_tangent_coupling_args(XV_in, ST_in, scale);
  Guards g;
  const at::Tensor XV = g.copy(XV_in.contiguous()), ST = g.copy(ST_in.contiguous());
  const at::Tensor gY = g.copy(gY_in.contiguous()), gl = g.copy(gl_in.contiguous());
  const int64_t B = XV.size(0), R = XV.size(1), m = XV.size(2);
  at::Tensor gXV = g.empty(XV.sizes(), XV.options()), gST = g.empty(ST.sizes(), ST.options());
  AT_DISPATCH_FLOATING_TYPES(XV.scalar_type(), "emu_tangent_coupling_backward", [&] {
    emulate("tangent_coupling_backward", [&] {
      if (B == 0) return;
      run(blocks_for(B * m), kThreads, 0, [&] {
        tangent_kernels::coupling_backward_kernel<scalar_t>(
            XV.const_data_ptr<scalar_t>(), ST.const_data_ptr<scalar_t>(),
            gY.const_data_ptr<scalar_t>(), gl.const_data_ptr<scalar_t>(), B, R, m, scale,
            gXV.mutable_data_ptr<scalar_t>(), gST.mutable_data_ptr<scalar_t>());
      });
    });
  });
  g.check("tangent_coupling_backward");
  return {gXV.clone(), gST.clone()};
}

void set_order(int order, int64_t seed) {
  settings.order = order;
  settings.seed = static_cast<uint64_t>(seed);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_order", &set_order, "thread order of every later launch: 0 forward, 1 reverse, "
                                 "2 shuffled (with seed)");
  m.def("cg_init", &emu_cg_init);
  m.def("cg_step", &emu_cg_step);
  m.def("gram_logdet", &emu_gram_logdet);
  m.def("gram_logdet_backward", &emu_gram_logdet_backward);
  m.def("tangent_linear", &emu_tangent_linear);
  m.def("tangent_linear_backward", &emu_tangent_linear_backward);
  m.def("tangent_epilogue", &emu_tangent_epilogue);
  m.def("tangent_epilogue_backward", &emu_tangent_epilogue_backward);
  m.def("tangent_mlp", &emu_tangent_mlp);
  m.def("tangent_mlp_backward", &emu_tangent_mlp_backward);
  m.def("tangent_coupling", &emu_tangent_coupling);
  m.def("tangent_coupling_backward", &emu_tangent_coupling_backward);
}
