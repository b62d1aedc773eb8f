// The CPU backend's LoRA dropout ops (Backend::lora_dropout / lora_dropout_backward): the keep
// mask from train::Philox::fill_bernoulli (threaded, the rule of train/philox_block.hpp that the
// CUDA kernel runs too), then the masked scale, as model/lora.cpp computed it before dropout
// became a backend op.
#include <cstdint>
#include <vector>

#include "common/error.hpp"
#include "cpu/cpu_backend.hpp"
#include "train/rng.hpp"

namespace qlora::cpu {

namespace {
// keep[n]: outputs offset .. offset+n-1 of the stream of `seed`, each 1 with probability 1 - p.
std::vector<uint8_t> keep_mask(uint64_t seed, uint64_t offset, float p, int64_t n) {
  check_arg(p >= 0.0f && p < 1.0f, "lora_dropout: p must be in [0, 1)");
  check_arg(n >= 0, "lora_dropout: negative size");
  train::Philox rng(seed);
  rng.set_state({seed, offset});
  std::vector<uint8_t> keep(static_cast<size_t>(n));
  rng.fill_bernoulli(keep.data(), n, 1.0 - static_cast<double>(p));
  return keep;
}
}  // namespace

void CpuBackend::lora_dropout(uint64_t seed, uint64_t offset, float p, int64_t M, int64_t in, const float* x,
                              int64_t ldx, float* out) {
  const std::vector<uint8_t> keep = keep_mask(seed, offset, p, M * in);
  const float s = 1.0f / (1.0f - p);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < in; ++j) out[i * in + j] = keep[i * in + j] ? x[i * ldx + j] * s : 0.0f;
}

void CpuBackend::lora_dropout_backward(uint64_t seed, uint64_t offset, float p, int64_t M, int64_t in, const float* g,
                                       float* dx, int64_t lddx) {
  const std::vector<uint8_t> keep = keep_mask(seed, offset, p, M * in);
  const float s = 1.0f / (1.0f - p);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < in; ++j)
      if (keep[i * in + j]) dx[i * lddx + j] += g[i * in + j] * s;
}

}  // namespace qlora::cpu
