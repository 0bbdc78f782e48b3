// Activation functions with their first and second derivatives, shared by the CPU and CUDA
// kernels of tangent_linear (forward needs σ and σ', the backward also σ'').
// The codes match injflow_ext/ops.py ACTIVATIONS.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace injflow {

enum Activation : int64_t {
  kActNone = 0,
  kActTanh = 1,
  kActRelu = 2,
  kActLeakyRelu = 3,  // slope = negative_slope
  kActElu = 4,        // slope = alpha
  kActSoftplus = 5,   // beta = 1, threshold = 20 (as torch.nn.functional.softplus)
  kActSilu = 6,
  kActSigmoid = 7,
  kActCount = 8,
};

template <typename T>
struct ActValues {
  T f, df, d2f;
};

template <typename T>
C10_HOST_DEVICE inline T sigmoid_of(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

// σ(z), σ'(z), σ''(z) for activation `act` (d2f only computed when want_d2).
template <typename T>
C10_HOST_DEVICE inline ActValues<T> activation(int64_t act, T z, T slope, bool want_d2) {
  ActValues<T> v{z, T(1), T(0)};
  switch (act) {
    case kActTanh: {
      const T t = std::tanh(z);
      const T dt = T(1) - t * t;
      v = {t, dt, want_d2 ? T(-2) * t * dt : T(0)};
      break;
    }
    case kActRelu:
      v = {z > T(0) ? z : T(0), z > T(0) ? T(1) : T(0), T(0)};
      break;
    case kActLeakyRelu:
      v = {z > T(0) ? z : slope * z, z > T(0) ? T(1) : slope, T(0)};
      break;
    case kActElu: {
      if (z > T(0)) {
        v = {z, T(1), T(0)};
      } else {
        const T e = slope * std::exp(z);
        v = {e - slope, e, e};
      }
      break;
    }
    case kActSoftplus: {
      if (z > T(20)) {
        v = {z, T(1), T(0)};
      } else {
        const T s = sigmoid_of(z);
        v = {std::log1p(std::exp(z)), s, s * (T(1) - s)};
      }
      break;
    }
    case kActSilu: {
      const T s = sigmoid_of(z);
      const T ds = s * (T(1) - s);
      v = {z * s, s + z * ds, want_d2 ? ds * (T(2) + z * (T(1) - T(2) * s)) : T(0)};
      break;
    }
    case kActSigmoid: {
      const T s = sigmoid_of(z);
      const T ds = s * (T(1) - s);
      v = {s, ds, ds * (T(1) - T(2) * s)};
      break;
    }
    default:
      break;
  }
  return v;
}

// σ''(z) from z, σ(z) and σ'(z) without transcendental functions, for every activation but
// silu (whose σ'' needs sigmoid(z); callers compute it from z). Used by the CPU backward.
template <typename T>
C10_HOST_DEVICE inline T second_derivative_from(int64_t act, T z, T f, T df) {
  switch (act) {
    case kActTanh:
      return T(-2) * f * df;
    case kActSigmoid:
      return df * (T(1) - T(2) * f);
    case kActElu:
      return z > T(0) ? T(0) : df;
    case kActSoftplus:
      return z > T(20) ? T(0) : df * (T(1) - df);
    default:  // none, relu, leaky_relu: piecewise linear
      return T(0);
  }
}

// Affine-coupling scale functions s̃ = scale(s): 0 = tanh (bounded), 1 = identity ("exp":
// the multiplier is exp(s)). Returns s̃, s̃', s̃''.
enum CouplingScale : int64_t { kScaleTanh = 0, kScaleExp = 1, kScaleCount = 2 };

// The same from s̃ itself, when it is already evaluated (arithmetic only): tanh: s̃' = 1 − s̃²,
// s̃'' = −2 s̃ s̃'; identity: 1, 0.
template <typename T>
C10_HOST_DEVICE inline ActValues<T> coupling_scale_from(int64_t scale, T st) {
  if (scale == kScaleTanh) {
    const T dt = T(1) - st * st;
    return {st, dt, T(-2) * st * dt};
  }
  return {st, T(1), T(0)};
}

template <typename T>
C10_HOST_DEVICE inline ActValues<T> coupling_scale(int64_t scale, T s) {
  return coupling_scale_from<T>(scale, scale == kScaleTanh ? std::tanh(s) : s);
}

}  // namespace injflow
