// The schema of every injflow op, in one place, and the Python module that carries them.
//
// Kernels: csrc/cpu/*_cpu.cpp register the CPU implementations, csrc/cuda/*_cuda.cu the CUDA
// ones (built only with CUDA). Autograd: csrc/tangent_autograd.cpp for the tangent ops,
// injflow_ext/ops/ for the others; fake (meta) kernels in injflow_ext/ops/.

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <initializer_list>
#include <utility>

#include "activations.h"
#include "cg.h"
#include "gram_logdet.h"
#include "tangent_mlp.h"

#ifdef INJFLOW_WITH_CUDA
namespace injflow { int cuda_runtime_version(); }
#endif

TORCH_LIBRARY(injflow, m) {
  // log det(JᵀJ) per batch element, with bounded jitter.
  //   J: (B, D, d), d <= D, float32/float64.
  //   returns logdet (B,) in J's dtype, jitter (B,) absolute jitter added to the diagonal of G
  //   (in the factorisation dtype), status (B,) int32 (0 ok, 1 jitter added, 2 failed),
  //   L (B, d, d) lower Cholesky factor of G + jitter·I in the factorisation dtype (float64 when
  //   J is float64 or accumulate_float64 is set, else float32).
  m.def("gram_logdet(Tensor J, bool accumulate_float64, float max_relative_jitter) -> "
        "(Tensor logdet, Tensor jitter, Tensor status, Tensor L)");
  // Backward of gram_logdet: grad_J = 2 · grad[b] · J G⁻¹ with G⁻¹ from the saved factor L.
  //   grad: (B,), J: (B, D, d), L: (B, d, d), status: (B,). Failed samples get a zero gradient.
  m.def("gram_logdet_backward(Tensor grad, Tensor J, Tensor L, Tensor status) -> Tensor");

  // Linear layer with activation on a primal row and K tangent rows, stacked (B, 1+K, n):
  //   Z = XV Wᵀ (one GEMM over all rows), Z[:,0] += b, Y[:,0] = σ(Z[:,0]),
  //   Y[:,k] = σ'(Z[:,0]) ⊙ Z[:,k]. Returns Y (B, 1+K, n_out), and for the backward Z and
  //   dA = σ'(Z[:,0]) (B, n_out). activation: code of csrc/activations.h; slope: leaky_relu
  //   slope or elu alpha.
  m.def("tangent_linear(Tensor XV, Tensor W, Tensor? b, int activation, float slope) -> "
        "(Tensor Y, Tensor Z, Tensor dA)");
  // input_only: only grad_XV is wanted (autograd.grad with respect to the input, e.g. the
  //   VJPs of the Hutchinson matvec and of the encoder surrogate): grad_W and grad_b are
  //   returned as zeros without their GEMM and sum.
  m.def("tangent_linear_backward(Tensor grad_Y, Tensor XV, Tensor W, Tensor Z, Tensor Y, "
        "Tensor dA, int activation, float slope, bool input_only=False) -> (Tensor grad_XV, "
        "Tensor grad_W, Tensor grad_b)");
  // The activation rule of tangent_linear on pre-activations computed elsewhere (e.g. one
  //   convolution of the stacked primal and tangent rows, tangent_conv2d):
  //   Z (B, 1+K, n), b (n,) added to row 0; Y[:,0] = σ(Z[:,0] + b), Y[:,k] = σ'(·)·Z[:,k].
  //   Returns Y, Z_biased (Z with b on row 0, for the backward) and dA = σ'(Z[:,0] + b).
  m.def("tangent_epilogue(Tensor Z, Tensor? b, int activation, float slope) -> "
        "(Tensor Y, Tensor Z_biased, Tensor dA)");
  m.def("tangent_epilogue_backward(Tensor grad_Y, Tensor Z_biased, Tensor Y, Tensor dA, "
        "int activation, float slope) -> (Tensor grad_Z, Tensor grad_b)");
  // Affine coupling (transformed half) on a primal row and K tangent rows:
  //   XV (B, 1+K, m) = [x; V], ST (B, 1+K, 2m) = [[s, t]; [Ṡ, Ṫ]],
  //   y = x ⊙ exp(s̃) + t, ẏ = v ⊙ exp(s̃) + x ⊙ exp(s̃) ⊙ s̃'(s) ⊙ ṡ + ṫ, s̃ = scale(s),
  //   logabsdet = Σ s̃. scale: 0 = tanh, 1 = identity (plain exp(s) multiplier).
  m.def("tangent_coupling(Tensor XV, Tensor ST, int scale) -> (Tensor Y, Tensor logabsdet)");
  m.def("tangent_coupling_backward(Tensor grad_Y, Tensor grad_logabsdet, Tensor XV, Tensor ST, "
        "int scale) -> (Tensor grad_XV, Tensor grad_ST)");

  // A whole fully connected network on a primal row and K tangent rows (csrc/tangent_mlp.h):
  //   XV (B, 1+K, n_in), weights[l] (n_l, n_{l-1}), biases[l] (n_l,); hidden layers use
  //   `activation`, the last `last_activation` (codes of csrc/activations.h; `slope` for both).
  //   Returns Y (B, 1+K, n_L) and, for the backward, Z (every layer's pre-activations),
  //   A (every hidden layer's output) and dA (σ' at each layer's primal row, (B, n_l)).
  //   path: 0 auto (today: per layer), 1 per layer (tangent_linear each), 2 fused (CUDA: one
  //   kernel for the forward, one for the backward's activation-gradient chain).
  //   fused: the fused path's choices, [math, pipeline, weight_grads, samples_per_block,
  //   weight_grad_rows] (codes of csrc/tangent_mlp.h, FusedMlpOptions; 0 = automatic), or []
  //   for all automatic; checked on every path, used by the fused one.
  m.def("tangent_mlp(Tensor XV, Tensor[] weights, Tensor[] biases, int activation, float slope, "
        "int last_activation, int path, int[] fused) -> (Tensor Y, Tensor[] Z, Tensor[] A, "
        "Tensor[] dA)");
  m.def("tangent_mlp_backward(Tensor grad_Y, Tensor XV, Tensor[] weights, Tensor Y, Tensor[] Z, "
        "Tensor[] A, Tensor[] dA, int activation, float slope, int last_activation, int path, "
        "int[] fused, bool input_only=False) -> (Tensor grad_XV, Tensor[] grad_weights, "
        "Tensor[] grad_biases)");

  // Batched conjugate gradients on systems stacked as (N, d, K) (K right-hand sides each).
  // cg_init: from the initial residual r and right-hand side b, p = r, rs = Σ_d r², the squared
  //   tolerance tol2 = max(rtol²·‖b‖², atol²), status (0 running, 1 converged, 2 breakdown) and
  //   zero iteration counts, all (N, K).
  m.def("cg_init(Tensor r, Tensor b, float rtol, float atol) -> "
        "(Tensor p, Tensor rs, Tensor tol2, Tensor status, Tensor iterations)");
  // cg_step: one CG iteration for every running system, fused: Ap = A p when the matrices A
  //   (N, d, d) are given (else Ap holds A p on entry), pᵀAp, α, x and r updates, rᵀr,
  //   convergence and breakdown (pᵀAp <= 0) tests, β, p update. Systems that are not running
  //   are left unchanged.
  m.def("cg_step(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor(d!) Ap, Tensor? A, "
        "Tensor(e!) rs, Tensor tol2, Tensor(f!) status, Tensor(g!) iterations) -> ()");
}

namespace {

bool cuda_compiled() {
#ifdef INJFLOW_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string built_torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

int cuda_runtime_version_or_zero() {
#ifdef INJFLOW_WITH_CUDA
  return injflow::cuda_runtime_version();
#else
  return 0;
#endif
}

// {name: code} for Python.
pybind11::dict code_dict(std::initializer_list<std::pair<const char*, int64_t>> codes) {
  pybind11::dict d;
  for (const auto& [name, code] : codes) d[name] = static_cast<int>(code);
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "injflow_ext compiled kernels (ops are registered under torch.ops.injflow)";
  m.def("cuda_compiled", &cuda_compiled, "Whether the CUDA kernels were compiled in.");
  m.def("built_torch_version", &built_torch_version,
        "major.minor.patch of the torch headers this module was compiled against.");
  m.def("cuda_runtime_version", &cuda_runtime_version_or_zero,
        "CUDART_VERSION the CUDA kernels were compiled with (0 without CUDA).");
  // The codes the kernels use, exported so that Python never keeps a copy of them.
  using namespace injflow;
  m.attr("ACTIVATION_CODES") = code_dict(
      {{"none", kActNone}, {"tanh", kActTanh}, {"relu", kActRelu}, {"leaky_relu", kActLeakyRelu},
       {"elu", kActElu}, {"softplus", kActSoftplus}, {"silu", kActSilu},
       {"sigmoid", kActSigmoid}});
  m.attr("COUPLING_SCALE_CODES") = code_dict({{"tanh", kScaleTanh}, {"exp", kScaleExp}});
  m.attr("MLP_PATH_CODES") =
      code_dict({{"auto", kMlpAuto}, {"per_layer", kMlpPerLayer}, {"fused", kMlpFused}});
  m.attr("MLP_FUSED_MATH_CODES") = code_dict({{"auto", kFusedMathAuto}, {"fma", kFusedMathFma},
                                              {"tf32", kFusedMathTf32},
                                              {"tf32x3", kFusedMathTf32x3}});
  m.attr("MLP_FUSED_PIPELINE_CODES") =
      code_dict({{"registers", kFusedPipeRegisters}, {"async", kFusedPipeAsync}});
  m.attr("MLP_FUSED_WEIGHT_GRAD_CODES") =
      code_dict({{"cublas", kFusedWgradCublas}, {"kernel", kFusedWgradKernel}});
  m.attr("GRAM_STATUS_CODES") =
      code_dict({{"ok", kGramOk}, {"jittered", kGramJittered}, {"failed", kGramFailed}});
  m.attr("CG_STATUS_CODES") = code_dict(
      {{"running", kCGRunning}, {"converged", kCGConverged}, {"breakdown", kCGBreakdown}});
}
