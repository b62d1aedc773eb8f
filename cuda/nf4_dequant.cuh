// NF4 dequantization launcher (host declaration; kernel in nf4_dequant.cu):
// out[W.rows * W.cols] = deq(W), all device memory; arguments validated by the caller.
#pragma once
#include <cuda_runtime_api.h>

#include "tensor_types.hpp"

namespace qlora::cuda {

void nf4_dequantize(cudaStream_t stream, int sm_count, const Nf4Ref& W, float* out);

}  // namespace qlora::cuda
