// What the CUDA kernel headers (csrc/cuda/*_kernels.cuh) need to also compile for the CPU
// under the CUDA emulation of tests/cuda_emulation/ (INJFLOW_CUDA_EMULATION; docs/design.md,
// "Checking the CUDA kernels without a GPU"): the block's dynamic shared memory, and alignment
// checks of vector accesses. On a real build both are what CUDA does (no check).
#pragma once

#ifdef INJFLOW_CUDA_EMULATION
#define INJFLOW_EMU_CHECK_ALIGNED(p, bytes, what) ::injflow_emu::check_aligned(p, bytes, what)
#else
#define INJFLOW_EMU_CHECK_ALIGNED(p, bytes, what) ((void)0)
#endif

namespace injflow {

// The block's dynamic shared memory (the launch's third argument), as T.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef INJFLOW_CUDA_EMULATION
  return reinterpret_cast<T*>(::injflow_emu::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char injflow_smem_raw[];
  return reinterpret_cast<T*>(injflow_smem_raw);
#endif
}

}  // namespace injflow
