// Placeholder until the CUDA kernels land (the CUDA backend work replaces this file).
#include <stdexcept>

#include "cuda_backend.hpp"

namespace qlora::cuda {
std::unique_ptr<Backend> make_backend(int) { throw std::runtime_error("CUDA backend not implemented yet"); }
}  // namespace qlora::cuda
