// Next-token selection from rows of logits, following transformers' logits-processor order:
// repetition penalty, then temperature, top-k, top-p, then a draw (or argmax when greedy).
// The rule itself takes the draw as an argument (sample_token, sample_rows_host: the CPU
// implementation of Backend::sample_rows); Sampler owns the generator and draws one uniform per
// sampling row, in row order, so a seed gives the same tokens wherever the rule runs.
#pragma once
#include <cstdint>
#include <random>

#include "sampling_params.hpp"

namespace qlora::model {

using SamplingParams = qlora::SamplingParams;

// The rule on one row with its draw u in [0, 1) given (read only when p.draws()): logits[V] is
// modified in place (penalties). Sorted by descending logit (lower id first on ties), the kept
// tokens (top-k, then the shortest prefix reaching mass top_p) have weights w_i =
// exp(z_i - z_max), z = logit / temperature in double; the token is the first i with
// r < w_i after subtracting the weights before it, r = u * Σ kept w. A non-finite z_max picks the
// first maximum. ValueError on NaN.
int32_t sample_token(float* logits, int64_t V, const int32_t* history, int64_t n_hist, const SamplingParams& p,
                     double u);

// One token for each of n rows: row i reads logits + rows[i] * ldl (left intact: penalties work on
// a copy), histories[i][0, n_hists[i]) and u[i], and writes out[i]. Rows run in parallel on the
// host thread pool (the draws are given, so rows are independent). u may be null when !p.draws().
void sample_rows_host(const float* logits, int64_t ldl, int64_t V, const int32_t* rows, int64_t n,
                      const int32_t* const* histories, const int64_t* n_hists, const SamplingParams& p,
                      const double* u, int32_t* out);

class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}
  // One uniform in [0, 1) per row into u[n] when p.draws() (nothing is drawn for greedy): the
  // value std::uniform_real_distribution<double>(0, total) scales by total, so u * total is the
  // draw the sampler has always made.
  void draw(int64_t n, const SamplingParams& p, double* u);
  // logits[V] is modified in place (penalties, scaling). history[n_hist]: tokens seen so far in
  // this row (prompt + generated) for the repetition penalty. draw(1) + sample_token.
  int32_t sample(float* logits, int64_t V, const int32_t* history, int64_t n_hist, const SamplingParams& p);

  // One token for each of n rows of host logits (see sample_rows_host): rows draw from the
  // generator in order, so a seed gives the same tokens as n calls of sample().
  void sample_rows(const float* logits, int64_t ldl, int64_t V, const int32_t* rows, int64_t n,
                   const int32_t* const* histories, const int64_t* n_hists, const SamplingParams& p, int32_t* out);

 private:
  std::mt19937_64 rng_;
};

}  // namespace qlora::model
