#include "model/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common/error.hpp"
#include "cpu/threads.hpp"

namespace qlora {

void SamplingParams::validate() const {
  check_arg(std::isfinite(temperature) && temperature >= 0, "temperature must be >= 0 (0 = greedy)");
  check_arg(top_k >= 0, "top_k must be >= 0 (0 = off)");
  check_arg(top_p > 0 && top_p <= 1, "top_p must be in (0, 1]");
  check_arg(std::isfinite(repetition_penalty) && repetition_penalty > 0, "repetition_penalty must be > 0");
}

}  // namespace qlora

namespace qlora::model {

namespace {
// NaN check as a branch-free reduction (vectorizes; a throwing check per element does not).
bool has_nan(const float* x, int64_t n) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) nan |= x[i] != x[i];
  return nan;
}
}  // namespace

void Sampler::draw(int64_t n, const SamplingParams& p, double* u) {
  if (!p.draws()) return;
  // What std::uniform_real_distribution<double>(0, total) computes before scaling by total
  // (libstdc++: generate_canonical<double, 53> * (b - a) + a), one engine call per draw.
  for (int64_t i = 0; i < n; ++i) u[i] = std::generate_canonical<double, std::numeric_limits<double>::digits>(rng_);
}

void sample_rows_host(const float* logits, int64_t ldl, int64_t V, const int32_t* rows, int64_t n,
                      const int32_t* const* histories, const int64_t* n_hists, const SamplingParams& p,
                      const double* u, int32_t* out) {
  p.validate();
  check_arg(n <= 0 || V >= 1, "sample: empty logits");
  auto one = [&](int64_t i, std::vector<float>& buf) {
    const float* row = logits + static_cast<int64_t>(rows[i]) * ldl;  // [V]
    if (!p.draws() && p.repetition_penalty == 1.0f) {  // argmax only: no copy needed
      check_arg(!has_nan(row, V), "sample: logits contain NaN");
      out[i] = static_cast<int32_t>(std::max_element(row, row + V) - row);
      return;
    }
    buf.assign(row, row + V);
    out[i] = sample_token(buf.data(), V, histories[i], n_hists[i], p, p.draws() ? u[i] : 0.0);
  };
  // The draws are given: rows are independent (sampling rows too).
  cpu::parallel_range(n, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf;
    for (int64_t i = i0; i < i1; ++i) one(i, buf);
  });
}

void Sampler::sample_rows(const float* logits, int64_t ldl, int64_t V, const int32_t* rows, int64_t n,
                          const int32_t* const* histories, const int64_t* n_hists, const SamplingParams& p,
                          int32_t* out) {
  p.validate();
  std::vector<double> u(p.draws() ? n : 0);
  draw(n, p, u.data());
  sample_rows_host(logits, ldl, V, rows, n, histories, n_hists, p, u.data(), out);
}

int32_t Sampler::sample(float* logits, int64_t V, const int32_t* history, int64_t n_hist, const SamplingParams& p) {
  check_arg(V >= 1, "sample: empty logits");
  check_arg(!has_nan(logits, V), "sample: logits contain NaN");
  double u = 0.0;
  draw(1, p, &u);
  return sample_token(logits, V, history, n_hist, p, u);
}

int32_t sample_token(float* logits, int64_t V, const int32_t* history, int64_t n_hist, const SamplingParams& p,
                     double u) {
  check_arg(V >= 1, "sample: empty logits");
  check_arg(!has_nan(logits, V), "sample: logits contain NaN");
  if (p.repetition_penalty != 1.0f) {
    // Each distinct token once (HF gathers then scatters, so duplicates are penalized once).
    std::vector<int32_t> seen(history, history + n_hist);
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int32_t t : seen) {
      if (t < 0 || t >= V) continue;
      float& l = logits[t];
      l = l < 0 ? l * p.repetition_penalty : l / p.repetition_penalty;
    }
  }
  if (p.temperature == 0.0f) return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);

  // Scaled logits in double: a tiny temperature must not overflow to inf (inf - inf = NaN).
  std::vector<double> z(V);  // [V]
  for (int64_t i = 0; i < V; ++i) z[i] = static_cast<double>(logits[i]) / p.temperature;
  std::vector<int32_t> order(V);  // token ids by descending logit (stable: lower id first on ties)
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return z[a] > z[b]; });
  int64_t keep = V;
  if (p.top_k > 0) keep = std::min<int64_t>(keep, p.top_k);
  const double mx = z[order[0]];
  if (!std::isfinite(mx)) return order[0];  // +inf logit (or all -inf): nothing to draw from
  std::vector<double> w(keep);  // unnormalized probabilities of the kept tokens, descending
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += (w[i] = std::exp(z[order[i]] - mx));
  if (p.top_p < 1.0f) {
    // HF TopP: drop the tokens whose ascending cumulative probability is <= 1 - top_p, always
    // keeping the most likely one; equivalently keep the shortest prefix reaching mass top_p.
    double cum = 0;
    int64_t n = 0;
    while (n < keep) {
      cum += w[n] / total;
      ++n;
      if (cum >= p.top_p) break;
    }
    keep = std::max<int64_t>(n, 1);
    total = 0;
    for (int64_t i = 0; i < keep; ++i) total += w[i];
  }
  double r = u * total;  // = uniform_real_distribution<double>(0, total) with the same engine call
  for (int64_t i = 0; i < keep; ++i) {
    if (r < w[i]) return order[i];
    r -= w[i];
  }
  return order[keep - 1];
}

}  // namespace qlora::model
