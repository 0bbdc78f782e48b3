// The schema of every injflow op, in one place, and the Python module that carries them.
//
// Kernels: csrc/cpu/*_cpu.cpp register the CPU implementations, csrc/cuda/*_cuda.cu the CUDA
// ones (built only with CUDA). Autograd and fake (meta) kernels live in injflow_ext/ops.py.

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "injflow_ext compiled kernels (ops are registered under torch.ops.injflow)";
  m.def("cuda_compiled", &cuda_compiled, "Whether the CUDA kernels were compiled in.");
  m.def("built_torch_version", &built_torch_version,
        "major.minor.patch of the torch headers this module was compiled against.");
  m.def("cuda_runtime_version", &cuda_runtime_version_or_zero,
        "CUDART_VERSION the CUDA kernels were compiled with (0 without CUDA).");
}
