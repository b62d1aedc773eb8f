// NF4 dequantization: one thread per element (grid-stride), coalesced fp32 stores.
#include <algorithm>

#include "cuda_check.hpp"
#include "nf4_decode.cuh"
#include "nf4_dequant.cuh"

namespace qlora::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) dequant_kernel(Nf4Dev w, float* __restrict__ out) {
  __shared__ float lut[kNf4LutSize];
  nf4_fill_lut(w, lut);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < w.n; j += stride)
    out[j] = nf4_element(w, lut, j);
}

}  // namespace

void nf4_dequantize(cudaStream_t stream, int sm_count, const Nf4Ref& W, float* out) {
  const int64_t need = (W.numel() + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(need, int64_t{sm_count} * 16)));
  dequant_kernel<<<blocks, kThreads, 0, stream>>>(make_nf4_dev(W), out);
  QLORA_CUDA_CHECK_LAUNCH("nf4_dequantize");
}

}  // namespace qlora::cuda
