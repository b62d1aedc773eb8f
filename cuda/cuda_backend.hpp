// Entry points of the CUDA backend used by the engine's backend registry (cpp/src/backend.cpp).
#pragma once
#include <memory>
#include <string>

#include "backend.hpp"

namespace qlora::cuda {

int device_count();          // 0 on any error (no driver, no GPU)
std::string device_summary();  // "NVIDIA H200 (sm_90, 139 GiB)" or why there is no device
std::unique_ptr<Backend> make_backend(int device);

}  // namespace qlora::cuda
