// Error checking for CUDA runtime calls: every call goes through QLORA_CUDA_CHECK, which throws
// std::runtime_error naming the op, the failing call and cudaGetErrorString (Python: RuntimeError).
#pragma once
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace qlora::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* op, const char* expr) {
  throw std::runtime_error(std::string("cuda backend: ") + op + ": " + cudaGetErrorString(err) + " (" + expr + ")");
}

}  // namespace qlora::cuda

// QLORA_CUDA_CHECK(cudaMemcpyAsync(...), "download")
#define QLORA_CUDA_CHECK(call, op)                                                \
  do {                                                                            \
    const cudaError_t qlora_err_ = (call);                                        \
    if (qlora_err_ != cudaSuccess) ::qlora::cuda::throw_cuda_error(qlora_err_, (op), #call); \
  } while (0)

// After a kernel launch: reports bad launch configurations (asynchronous faults surface at the
// next synchronizing call, which is checked too).
#define QLORA_CUDA_CHECK_LAUNCH(op) QLORA_CUDA_CHECK(cudaGetLastError(), (op))
