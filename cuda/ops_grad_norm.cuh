// Gradient checks on one contiguous fp32 buffer (Backend::sum_squares / scale_inplace /
// find_nonfinite). Launchers (host declarations; kernels in ops_grad_norm.cu): device pointers,
// arguments validated by the caller (cuda_backend.cpp), asynchronous on `stream`, launch errors
// checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

// Two passes, no atomics, so the result is the same on every run: one block per chunk
// [bounds[c], bounds[c+1]) sums squares in double (per-thread strided sums, then a fixed block
// tree) into partial[c]; then one thread adds the partials in chunk order into out[0] (the CPU's order).
void sum_squares(cudaStream_t stream, int64_t n_chunks, const int64_t* bounds, const float* x, double* partial,
                 double* out);
// x[n] *= s, IEEE-rounded (the CPU's result, subnormals kept).
void scale_inplace(cudaStream_t stream, int64_t n, float* x, float s);
// out[0] = smallest index i with x[i] NaN or +-inf, -1 when none (out set to all ones bits = -1
// first, then an atomic minimum over unsigned values: order-independent, so deterministic).
void find_nonfinite(cudaStream_t stream, int64_t n, const float* x, int64_t* out);

}  // namespace qlora::cuda
