// Autograd of the tangent ops, in C++ (the Autograd dispatch key), for every device.
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
    const Tensor& dA, int64_t act, double slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("injflow::tangent_linear_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, int64_t, double)>();
  return op.call(gY, XV, W, Z, Y, dA, act, slope);
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
    auto g = call_tangent_linear_backward(grads[0], s[0], s[1], s[2], s[3], s[4],
                                          ctx->saved_data["act"].toInt(),
                                          ctx->saved_data["slope"].toDouble());
    Tensor gb = ctx->saved_data["has_bias"].toBool() ? std::get<2>(g) : Tensor();
    return {std::get<0>(g), std::get<1>(g), gb, Tensor(), Tensor()};
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

// The backward ops: differentiable inputs are allowed (they are called under create_graph),
// but asking for their gradient fails with a clear message.
constexpr const char* kLinearBackwardName = "tangent_linear_backward";
constexpr const char* kCouplingBackwardName = "tangent_coupling_backward";

class TangentLinearBackwardFunction
    : public torch::autograd::Function<TangentLinearBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const Tensor& gY, const Tensor& XV,
                               const Tensor& W, const Tensor& Z, const Tensor& Y,
                               const Tensor& dA, int64_t act, double slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto g = call_tangent_linear_backward(gY, XV, W, Z, Y, dA, act, slope);
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

std::tuple<Tensor, Tensor, Tensor> tangent_linear_autograd(const Tensor& XV, const Tensor& W,
                                                           const c10::optional<Tensor>& b,
                                                           int64_t act, double slope) {
  auto out = TangentLinearFunction::apply(XV, W, b, act, slope);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> tangent_linear_backward_autograd(
    const Tensor& gY, const Tensor& XV, const Tensor& W, const Tensor& Z, const Tensor& Y,
    const Tensor& dA, int64_t act, double slope) {
  auto out = TangentLinearBackwardFunction::apply(gY, XV, W, Z, Y, dA, act, slope);
  return {out[0], out[1], out[2]};
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
  m.impl("tangent_linear", &tangent_linear_autograd);
  m.impl("tangent_linear_backward", &tangent_linear_backward_autograd);
  m.impl("tangent_coupling", &tangent_coupling_autograd);
  m.impl("tangent_coupling_backward", &tangent_coupling_backward_autograd);
}
