// Autograd of the tangent ops (tangent_linear, tangent_coupling, tangent_mlp), in C++ (the Autograd dispatch key), for every device.
//
// The layers call these ops ~10 times per coupling layer and step; registering their autograd
// in Python (torch.library.register_autograd) cost ~0.25 ms of interpreter time per call and
// made the fused ops slower than plain PyTorch on small tensors. Here the forward redispatches
// to the device kernel (or the fake kernel under torch.compile) and the backward calls the
// registered backward op, so torch.compile and opcheck see the same ops as before.
//
// The backward ops themselves are first-order only: their own autograd raises a clear error if
// a second derivative is requested.

#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

constexpr const char* kNoDoubleBackward =
    " supports first derivatives only (double backward through a tangent op is not "
    "implemented); the exact and Hutchinson volume-term gradients need only first derivatives.";

std::tuple<Tensor, Tensor, Tensor> call_tangent_linear(const Tensor& XV, const Tensor& W,
                                                       const c10::optional<Tensor>& b,
                                                       int64_t act, double slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_linear", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const c10::optional<Tensor>&, int64_t,
                           double)>();
  return op.call(XV, W, b, act, slope);
}

std::tuple<Tensor, Tensor, Tensor> call_tangent_linear_backward(
    const Tensor& gY, const Tensor& XV, const Tensor& W, const Tensor& Z, const Tensor& Y,
    const Tensor& dA, int64_t act, double slope, bool input_only) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_linear_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, int64_t, double, bool)>();
  return op.call(gY, XV, W, Z, Y, dA, act, slope, input_only);
}

std::tuple<Tensor, Tensor, Tensor> call_tangent_epilogue(const Tensor& Z,
                                                         const c10::optional<Tensor>& b,
                                                         int64_t act, double slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_epilogue", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const c10::optional<Tensor>&, int64_t, double)>();
  return op.call(Z, b, act, slope);
}

std::tuple<Tensor, Tensor> call_tangent_epilogue_backward(const Tensor& gY, const Tensor& Z,
                                                          const Tensor& Y, const Tensor& dA,
                                                          int64_t act, double slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_epilogue_backward", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, int64_t,
                                                         double)>();
  return op.call(gY, Z, Y, dA, act, slope);
}

std::tuple<Tensor, Tensor> call_tangent_coupling(const Tensor& XV, const Tensor& ST,
                                                 int64_t scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_coupling", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t)>();
  return op.call(XV, ST, scale);
}

std::tuple<Tensor, Tensor> call_tangent_coupling_backward(const Tensor& gY, const Tensor& glad,
                                                          const Tensor& XV, const Tensor& ST,
                                                          int64_t scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_coupling_backward", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, int64_t)>();
  return op.call(gY, glad, XV, ST, scale);
}

using MlpForwardOut =
    std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;
using MlpBackwardOut = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>;

MlpForwardOut call_tangent_mlp(const Tensor& XV, at::TensorList weights, at::TensorList biases,
                               int64_t act, double slope, int64_t last_act, int64_t path,
                               at::IntArrayRef fused) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_mlp", "")
                       .typed<MlpForwardOut(const Tensor&, at::TensorList, at::TensorList,
                                            int64_t, double, int64_t, int64_t,
                                            at::IntArrayRef)>();
  return op.call(XV, weights, biases, act, slope, last_act, path, fused);
}

MlpBackwardOut call_tangent_mlp_backward(const Tensor& gY, const Tensor& XV,
                                         at::TensorList weights, const Tensor& Y,
                                         at::TensorList Z, at::TensorList A, at::TensorList dA,
                                         int64_t act, double slope, int64_t last_act,
                                         int64_t path, at::IntArrayRef fused, bool input_only) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_mlp_backward", "")
                       .typed<MlpBackwardOut(const Tensor&, const Tensor&, at::TensorList,
                                             const Tensor&, at::TensorList, at::TensorList,
                                             at::TensorList, int64_t, double, int64_t,
                                             int64_t, at::IntArrayRef, bool)>();
  return op.call(gY, XV, weights, Y, Z, A, dA, act, slope, last_act, path, fused, input_only);
}

class TangentLinearFunction : public torch::autograd::Function<TangentLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& XV, const Tensor& W,
                               const c10::optional<Tensor>& b, int64_t act, double slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = call_tangent_linear(XV, W, b, act, slope);
    const Tensor& Y = std::get<0>(out);
    const Tensor& Z = std::get<1>(out);
    const Tensor& dA = std::get<2>(out);
    ctx->save_for_backward({XV, W, Z, Y, dA});
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["has_bias"] = b.has_value() && b->defined();
    ctx->mark_non_differentiable({Z, dA});
    ctx->set_materialize_grads(false);  // Z and dA never receive gradients
    return {Y, Z, dA};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    auto s = ctx->get_saved_variables();
    // a gradient with respect to the input alone (autograd.grad(y, x)) skips the weight GEMM
    const bool want_W = ctx->needs_input_grad(1);
    const bool want_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    auto g = call_tangent_linear_backward(grads[0], s[0], s[1], s[2], s[3], s[4],
                                          ctx->saved_data["act"].toInt(),
                                          ctx->saved_data["slope"].toDouble(),
                                          !want_W && !want_b);
    return {std::get<0>(g), want_W ? std::get<1>(g) : Tensor(),
            want_b ? std::get<2>(g) : Tensor(), Tensor(), Tensor()};
  }
};

// tangent_epilogue: outputs Y (differentiable), Z_biased and dA (internals for the backward).
class TangentEpilogueFunction : public torch::autograd::Function<TangentEpilogueFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& Z, const c10::optional<Tensor>& b,
                               int64_t act, double slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = call_tangent_epilogue(Z, b, act, slope);
    const Tensor& Y = std::get<0>(out);
    const Tensor& Zb = std::get<1>(out);
    const Tensor& dA = std::get<2>(out);
    ctx->save_for_backward({Zb, Y, dA});
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["has_bias"] = b.has_value() && b->defined();
    ctx->mark_non_differentiable({Zb, dA});
    ctx->set_materialize_grads(false);
    return {Y, Zb, dA};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    auto s = ctx->get_saved_variables();
    auto g = call_tangent_epilogue_backward(grads[0], s[0], s[1], s[2],
                                            ctx->saved_data["act"].toInt(),
                                            ctx->saved_data["slope"].toDouble());
    const bool want_b = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(1);
    return {std::get<0>(g), want_b ? std::get<1>(g) : Tensor(), Tensor(), Tensor()};
  }
};

class TangentEpilogueBackwardFunction
    : public torch::autograd::Function<TangentEpilogueBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Tensor& gY, const Tensor& Z,
                               const Tensor& Y, const Tensor& dA, int64_t act, double slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto g = call_tangent_epilogue_backward(gY, Z, Y, dA, act, slope);
    return {std::get<0>(g), std::get<1>(g)};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "tangent_epilogue_backward", kNoDoubleBackward);
    return {};
  }
};

class TangentCouplingFunction : public torch::autograd::Function<TangentCouplingFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& XV, const Tensor& ST,
                               int64_t scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = call_tangent_coupling(XV, ST, scale);
    ctx->save_for_backward({XV, ST});
    ctx->saved_data["scale"] = scale;
    ctx->set_materialize_grads(false);
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() && !grads[1].defined()) return {Tensor(), Tensor(), Tensor()};
    auto s = ctx->get_saved_variables();
    // the backward kernel takes both gradients; a missing one is zero
    Tensor gY = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    Tensor glad = grads[1].defined() ? grads[1] : at::zeros({s[0].size(0)}, s[0].options());
    auto g = call_tangent_coupling_backward(gY, glad, s[0], s[1],
                                            ctx->saved_data["scale"].toInt());
    return {std::get<0>(g), std::get<1>(g), Tensor()};
  }
};

// tangent_mlp: outputs Y, then Z (L), A (L - 1) and dA (L) flattened; only Y is
// differentiable. Saved: XV, the weights, Y and the Z, A, dA lists.
class TangentMlpFunction : public torch::autograd::Function<TangentMlpFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& XV, at::TensorList weights,
                               at::TensorList biases, int64_t act, double slope,
                               int64_t last_act, int64_t path, at::IntArrayRef fused) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = call_tangent_mlp(XV, weights, biases, act, slope, last_act, path, fused);
    const Tensor& Y = std::get<0>(out);
    const auto &Z = std::get<1>(out), &A = std::get<2>(out), &dA = std::get<3>(out);
    variable_list saved{XV};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.push_back(Y);
    variable_list outputs{Y};
    variable_list internals;
    for (const auto* list : {&Z, &A, &dA}) {
      saved.insert(saved.end(), list->begin(), list->end());
      outputs.insert(outputs.end(), list->begin(), list->end());
      internals.insert(internals.end(), list->begin(), list->end());
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["last_act"] = last_act;
    ctx->saved_data["path"] = path;
    ctx->saved_data["fused"] = fused.vec();
    ctx->mark_non_differentiable(internals);
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t L = ctx->saved_data["layers"].toInt();
    variable_list result(1 + 2 * L + 5);  // XV, weights, biases, five non-tensor arguments
    if (!grads[0].defined()) return result;
    auto s = ctx->get_saved_variables();
    const at::TensorList all(s);
    const at::TensorList weights = all.slice(1, L);
    const Tensor& Y = s[1 + L];
    const at::TensorList Z = all.slice(2 + L, L), A = all.slice(2 + 2 * L, L - 1),
                         dA = all.slice(1 + 3 * L, L);
    // a gradient with respect to the input alone (autograd.grad(y, x): the Hutchinson matvec,
    // the encoder surrogate) skips every layer's weight GEMM and bias sum
    bool want_params = false;
    for (int64_t i = 1; i <= 2 * L; ++i) want_params = want_params || ctx->needs_input_grad(i);
    auto g = call_tangent_mlp_backward(grads[0], s[0], weights, Y, Z, A, dA,
                                       ctx->saved_data["act"].toInt(),
                                       ctx->saved_data["slope"].toDouble(),
                                       ctx->saved_data["last_act"].toInt(),
                                       ctx->saved_data["path"].toInt(),
                                       ctx->saved_data["fused"].toIntVector(), !want_params);
    result[0] = std::get<0>(g);
    for (int64_t l = 0; l < L && want_params; ++l) {
      if (ctx->needs_input_grad(1 + l)) result[1 + l] = std::get<1>(g)[l];
      if (ctx->needs_input_grad(1 + L + l)) result[1 + L + l] = std::get<2>(g)[l];
    }
    return result;
  }
};

class TangentMlpBackwardFunction : public torch::autograd::Function<TangentMlpBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Tensor& gY, const Tensor& XV,
                               at::TensorList weights, const Tensor& Y, at::TensorList Z,
                               at::TensorList A, at::TensorList dA, int64_t act, double slope,
                               int64_t last_act, int64_t path, at::IntArrayRef fused,
                               bool input_only) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto g = call_tangent_mlp_backward(gY, XV, weights, Y, Z, A, dA, act, slope, last_act, path,
                                       fused, input_only);
    variable_list out{std::get<0>(g)};
    out.insert(out.end(), std::get<1>(g).begin(), std::get<1>(g).end());
    out.insert(out.end(), std::get<2>(g).begin(), std::get<2>(g).end());
    return out;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "tangent_mlp_backward", kNoDoubleBackward);
    return {};
  }
};

// The backward ops: differentiable inputs are allowed (they are called under create_graph),
// but asking for their gradient fails with a clear message.
constexpr const char* kLinearBackwardName = "tangent_linear_backward";
constexpr const char* kCouplingBackwardName = "tangent_coupling_backward";

class TangentLinearBackwardFunction
    : public torch::autograd::Function<TangentLinearBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Tensor& gY, const Tensor& XV,
                               const Tensor& W, const Tensor& Z, const Tensor& Y,
                               const Tensor& dA, int64_t act, double slope, bool input_only) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto g = call_tangent_linear_backward(gY, XV, W, Z, Y, dA, act, slope, input_only);
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g)};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, kLinearBackwardName, kNoDoubleBackward);
    return {};
  }
};

class TangentCouplingBackwardFunction
    : public torch::autograd::Function<TangentCouplingBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Tensor& gY, const Tensor& glad,
                               const Tensor& XV, const Tensor& ST, int64_t scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto g = call_tangent_coupling_backward(gY, glad, XV, ST, scale);
    return {std::get<0>(g), std::get<1>(g)};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, kCouplingBackwardName, kNoDoubleBackward);
    return {};
  }
};

std::tuple<Tensor, Tensor, Tensor> tangent_epilogue_autograd(const Tensor& Z,
                                                             const c10::optional<Tensor>& b,
                                                             int64_t act, double slope) {
  auto out = TangentEpilogueFunction::apply(Z, b, act, slope);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> tangent_epilogue_backward_autograd(const Tensor& gY, const Tensor& Z,
                                                              const Tensor& Y, const Tensor& dA,
                                                              int64_t act, double slope) {
  auto out = TangentEpilogueBackwardFunction::apply(gY, Z, Y, dA, act, slope);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> tangent_linear_autograd(const Tensor& XV, const Tensor& W,
                                                           const c10::optional<Tensor>& b,
                                                           int64_t act, double slope) {
  auto out = TangentLinearFunction::apply(XV, W, b, act, slope);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> tangent_linear_backward_autograd(
    const Tensor& gY, const Tensor& XV, const Tensor& W, const Tensor& Z, const Tensor& Y,
    const Tensor& dA, int64_t act, double slope, bool input_only) {
  auto out = TangentLinearBackwardFunction::apply(gY, XV, W, Z, Y, dA, act, slope, input_only);
  return {out[0], out[1], out[2]};
}

MlpForwardOut tangent_mlp_autograd(const Tensor& XV, at::TensorList weights,
                                   at::TensorList biases, int64_t act, double slope,
                                   int64_t last_act, int64_t path, at::IntArrayRef fused) {
  auto out = TangentMlpFunction::apply(XV, weights, biases, act, slope, last_act, path, fused);
  const int64_t L = static_cast<int64_t>(weights.size());
  auto slice = [&](int64_t start, int64_t count) {
    return std::vector<Tensor>(out.begin() + start, out.begin() + start + count);
  };
  return {out[0], slice(1, L), slice(1 + L, L - 1), slice(2 * L, L)};
}

MlpBackwardOut tangent_mlp_backward_autograd(const Tensor& gY, const Tensor& XV,
                                             at::TensorList weights, const Tensor& Y,
                                             at::TensorList Z, at::TensorList A,
                                             at::TensorList dA, int64_t act, double slope,
                                             int64_t last_act, int64_t path,
                                             at::IntArrayRef fused, bool input_only) {
  auto out = TangentMlpBackwardFunction::apply(gY, XV, weights, Y, Z, A, dA, act, slope,
                                               last_act, path, fused, input_only);
  const int64_t L = static_cast<int64_t>(weights.size());
  return {out[0], std::vector<Tensor>(out.begin() + 1, out.begin() + 1 + L),
          std::vector<Tensor>(out.begin() + 1 + L, out.begin() + 1 + 2 * L)};
}

std::tuple<Tensor, Tensor> tangent_coupling_autograd(const Tensor& XV, const Tensor& ST,
                                                     int64_t scale) {
  auto out = TangentCouplingFunction::apply(XV, ST, scale);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> tangent_coupling_backward_autograd(const Tensor& gY,
                                                              const Tensor& glad,
                                                              const Tensor& XV, const Tensor& ST,
                                                              int64_t scale) {
  auto out = TangentCouplingBackwardFunction::apply(gY, glad, XV, ST, scale);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(injflow, Autograd, m) {
  m.impl("tangent_epilogue", &tangent_epilogue_autograd);
  m.impl("tangent_epilogue_backward", &tangent_epilogue_backward_autograd);
  m.impl("tangent_linear", &tangent_linear_autograd);
  m.impl("tangent_linear_backward", &tangent_linear_backward_autograd);
  m.impl("tangent_coupling", &tangent_coupling_autograd);
  m.impl("tangent_coupling_backward", &tangent_coupling_backward_autograd);
  m.impl("tangent_mlp", &tangent_mlp_autograd);
  m.impl("tangent_mlp_backward", &tangent_mlp_backward_autograd);
}
