// Entry points of the CUDA backend used by the engine's backend registry (cpp/src/backend.cpp).
#pragma once
#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"

namespace qlora::cuda {

int device_count();          // 0 on any error (no driver, no GPU)
std::string device_summary();  // "NVIDIA H200 (sm_90, 139 GiB)" or why there is no device
std::unique_ptr<Backend> make_backend(int device);
// The ops the CUDA backend implements (Backend::supports_op), known without a device.
std::vector<std::string> supported_ops();
// For code that hands the backend's memory to another CUDA library (NCCL, cuda/nccl_comm.cpp): the
// device of a CUDA backend (-1 for any other backend), and the calling thread's stream of it (its
// bound Exec's, else the default one) with its device made current.
int device_of(const Backend& be);
cudaStream_t current_stream(Backend& be);

}  // namespace qlora::cuda
