// Next-token selection settings, shared by the host sampler (model/sampler.hpp) and the backends'
// sample_rows op (backend.hpp). The rule follows transformers' logits-processor order: repetition
// penalty, then temperature, top-k, top-p, then a draw (or argmax when greedy).
#pragma once
#include <cstdint>

namespace qlora {

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy (argmax)
  int64_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off
  float repetition_penalty = 1.0f;  // 1: off; HF rule: logit > 0 ? logit / p : logit * p
  void validate() const;            // throws ValueError naming the bad field (model/sampler.cpp)
  bool draws() const { return temperature != 0.0f; }  // a sampling row takes one uniform draw
};

}  // namespace qlora
