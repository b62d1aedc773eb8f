// Softmax cross-entropy per row (Backend::cross_entropy_rows): logits[M, V] (row stride ldl),
// labels int32 [M] in [0, V) or -100 (ignored); loss[M] = logsumexp(row) - row[label] (0 if
// ignored); want_grad: row = grad_scale * (softmax(row) - onehot(label)), zeros on ignored rows.
// Launcher (host declaration; kernel in ops_cross_entropy.cu): device pointers, arguments validated by the
// caller (cuda_backend.cpp), asynchronous on `stream`, launch errors checked.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace qlora::cuda {

void cross_entropy_rows(cudaStream_t stream, int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels,
                        float grad_scale, bool want_grad, float* loss);

}  // namespace qlora::cuda
