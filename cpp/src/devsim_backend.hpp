// "cpu:devsim": a test backend that runs the CPU kernels but behaves as a device backend to its
// callers: host_memory() is false (so every device path of the model and the bindings is taken:
// uploads, staged logits, downloads) and it implements exactly the CUDA backend's op table, core
// ops through the same Backend defaults CUDA uses. It lets the CPU CI run the code a GPU build
// takes, so host/device mix-ups in model code show up without a GPU. Not listed by
// available_backends(); resolved by name only.
#pragma once
#include <memory>

#include "backend.hpp"

namespace qlora {

// The optional ops (beyond Backend's core) that have CUDA kernels (cuda/ops_*.cu): the CUDA
// backend's table, mirrored by cpu:devsim.
const std::vector<std::string>& cuda_kernel_ops();

std::unique_ptr<Backend> make_devsim_backend(Backend& cpu);

}  // namespace qlora
