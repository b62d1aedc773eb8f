// Next-token selection from one row of logits, following transformers' logits-processor order:
// repetition penalty, then temperature, top-k, top-p, then a draw (or argmax when greedy).
#pragma once
#include <cstdint>
#include <random>

namespace qlora::model {

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy (argmax)
  int64_t top_k = 0;                // 0: off
  float top_p = 1.0f;               // 1: off
  float repetition_penalty = 1.0f;  // 1: off; HF rule: logit > 0 ? logit / p : logit * p
  void validate() const;            // throws ValueError naming the bad field
};

class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}
  // logits[V] is modified in place (penalties, scaling). history[n_hist]: tokens seen so far in
  // this row (prompt + generated) for the repetition penalty.
  int32_t sample(float* logits, int64_t V, const int32_t* history, int64_t n_hist, const SamplingParams& p);

  // One token for each of n rows (batched decode): row i reads logits + rows[i] * ldl (left
  // intact: penalties work on a copy) and histories[i][0, n_hists[i]), and writes out[i]. Rows
  // draw from the generator in order, so a seed gives the same tokens as n calls of sample();
  // greedy rows (no draw) run in parallel on the host thread pool.
  void sample_rows(const float* logits, int64_t ldl, int64_t V, const int32_t* rows, int64_t n,
                   const int32_t* const* histories, const int64_t* n_hists, const SamplingParams& p, int32_t* out);

 private:
  std::mt19937_64 rng_;
};

}  // namespace qlora::model
