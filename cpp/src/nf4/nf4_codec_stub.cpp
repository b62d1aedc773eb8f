// Placeholder until the codec lands (the NF4 codec work replaces this file).
#include <stdexcept>

#include "nf4/nf4_codec.hpp"

namespace qlora::nf4 {
void dequantize(cpu::SimdLevel, const Nf4Ref&, float*) { throw std::runtime_error("not implemented yet"); }
}  // namespace qlora::nf4
