// Next-token sampling on the device (Backend::sample_rows): the rule of model/sampler.cpp
// (sample_token) on rows of logits that never leave the GPU; only token ids come back.
// Launchers (host declarations; kernels in ops_sample.cu): device pointers, arguments validated by
// the caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

// Candidates per selection pass of the sampling kernel: the kept tokens are walked in descending
// order one chunk of this many at a time (top-k <= this: one chunk).
constexpr int kSampleChunk = 1024;

// work[i, :] = row logits + src_off[i] ([V]) with the repetition penalty applied to the tokens
// pen_tok[pen_off[i], pen_off[i+1]) (distinct, in [0, V)): l < 0 ? l * penalty : l / penalty
// (IEEE, as the host rule). work is [n, V].
void sample_penalize(cudaStream_t stream, int64_t n, int64_t V, const float* logits, const int64_t* src_off,
                     const int32_t* pen_off, const int32_t* pen_tok, float penalty, float* work);

// out[i] = the token of row base + off[i] ([V]): the first argmax when temperature == 0, else the
// draw u[i] in [0, 1) through temperature, top-k (0: off) and top-p (1: off); -1 when the row
// holds NaN. V < 2^31.
void sample_rows(cudaStream_t stream, int64_t n, int64_t V, const float* base, const int64_t* off, const double* u,
                 float temperature, int64_t top_k, float top_p, int32_t* out);

}  // namespace qlora::cuda

#include "backend.hpp"

namespace qlora::cuda {

// The whole of CudaBackend::sample_rows (ops_sample_host.cpp): checks the arguments, stages the
// row offsets, draws and de-duplicated penalty tokens in one upload to a buffer from be.alloc,
// runs the kernels on `stream` and downloads the n ids (synchronizes). ValueError on NaN.
void sample_rows_op(Backend& be, cudaStream_t stream, int64_t n, int64_t V, const float* logits, int64_t ldl,
                    const int32_t* rows, const int32_t* const* histories, const int64_t* n_hists,
                    const SamplingParams& p, const double* u, int32_t* out);

}  // namespace qlora::cuda
