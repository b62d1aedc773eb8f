// AdamW: scalar setup in double (as torch does with Python floats), a plain vectorizable float
// loop per contiguous range, ranges spread over the CPU thread pool.
#include "train/optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "common/error.hpp"
#include "cpu/threads.hpp"

namespace qlora::train {

namespace {

// Work unit: a range of one tensor. Fixed size, so the split never depends on the thread count.
constexpr int64_t kChunk = int64_t{1} << 15;
// Below this many elements in total the step runs on the calling thread (pool wake-up costs more).
constexpr int64_t kParallelMin = int64_t{1} << 16;

struct Chunk {
  size_t tensor;
  int64_t begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<ParamRef>& params, int64_t* total) {
  std::vector<Chunk> out;
  *total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    for (int64_t b = 0; b < params[i].numel; b += kChunk) out.push_back({i, b, std::min(params[i].numel, b + kChunk)});
    *total += params[i].numel;
  }
  return out;
}

bool finite(double x) { return std::isfinite(x); }

}  // namespace

void AdamWConfig::validate() const {
  check_arg(finite(beta1) && beta1 >= 0.0 && beta1 < 1.0, "AdamW: beta1 must be in [0, 1), got " + std::to_string(beta1));
  check_arg(finite(beta2) && beta2 >= 0.0 && beta2 < 1.0, "AdamW: beta2 must be in [0, 1), got " + std::to_string(beta2));
  check_arg(finite(eps) && eps >= 0.0, "AdamW: eps must be finite and >= 0, got " + std::to_string(eps));
  check_arg(finite(weight_decay) && weight_decay >= 0.0,
            "AdamW: weight_decay must be finite and >= 0, got " + std::to_string(weight_decay));
}

AdamWScalars adamw_scalars(const AdamWConfig& c, int64_t t, double lr) {
  const double step = static_cast<double>(t);
  const double bc1 = 1.0 - std::pow(c.beta1, step);
  const double bc2 = 1.0 - std::pow(c.beta2, step);
  AdamWScalars s;
  s.apply_decay = c.weight_decay != 0.0;
  s.decay = static_cast<float>(1.0 - lr * c.weight_decay);
  s.one_minus_b1 = static_cast<float>(1.0 - c.beta1);
  s.beta2 = static_cast<float>(c.beta2);
  s.one_minus_b2 = static_cast<float>(1.0 - c.beta2);
  s.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));  // torch: bias_correction2**0.5
  s.eps = static_cast<float>(c.eps);
  s.neg_step = static_cast<float>(-(lr / bc1));
  return s;
}

void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  const float decay = s.apply_decay ? s.decay : 1.0f;  // x*1 is exact: one loop serves both cases
  const float w1 = s.one_minus_b1, b2 = s.beta2, w2 = s.one_minus_b2, bc2s = s.bc2_sqrt, eps = s.eps, ns = s.neg_step;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = m[i] + w1 * (gi - m[i]);
    const float vi = v[i] * b2 + w2 * gi * gi;
    const float denom = std::sqrt(vi) / bc2s + eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay + ns * mi / denom;
  }
}

void adamw_update_parallel(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  auto run = [&](int64_t c) {
    const int64_t b = c * kChunk;
    adamw_update(p + b, g + b, m + b, v + b, std::min(kChunk, n - b), s);
  };
  if (n < kParallelMin) {
    for (int64_t c = 0; c < n_chunks; ++c) run(c);
  } else {
    cpu::parallel_for(n_chunks, run);
  }
}

AdamW::AdamW(std::vector<ParamRef> params, AdamWConfig config) : params_(std::move(params)), config_(config) {
  config_.validate();
  check_arg(!params_.empty(), "AdamW: no parameters given");
  std::vector<std::pair<const float*, const float*>> ranges;  // [begin, end) of each param
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamRef& p = params_[i];
    check_arg(p.numel >= 0, "AdamW: parameter " + std::to_string(i) + " has a negative size");
    check_arg(p.numel == 0 || p.data != nullptr, "AdamW: parameter " + std::to_string(i) + " has no data");
    if (p.numel > 0) ranges.emplace_back(p.data, p.data + p.numel);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    check_arg(ranges[i].first >= ranges[i - 1].second, "AdamW: parameters share memory (the same tensor given twice?)");
  m_.resize(params_.size());
  v_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    m_[i].assign(static_cast<size_t>(params_[i].numel), 0.0f);
    v_[i].assign(static_cast<size_t>(params_[i].numel), 0.0f);
  }
}

void AdamW::step(const std::vector<GradRef>& grads, double lr) {
  check_arg(std::isfinite(lr) && lr >= 0.0, "AdamW.step: lr must be finite and >= 0, got " + std::to_string(lr));
  check_arg(grads.size() == params_.size(), "AdamW.step: got " + std::to_string(grads.size()) + " gradients for " +
                                                std::to_string(params_.size()) + " parameters");
  for (size_t i = 0; i < grads.size(); ++i) {
    check_arg(grads[i].numel == params_[i].numel, "AdamW.step: gradient " + std::to_string(i) + " has " +
                                                      std::to_string(grads[i].numel) + " elements, parameter has " +
                                                      std::to_string(params_[i].numel));
    check_arg(grads[i].numel == 0 || grads[i].data != nullptr, "AdamW.step: gradient " + std::to_string(i) + " has no data");
  }
  const AdamWScalars s = adamw_scalars(config_, step_ + 1, lr);
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(params_, &total);
  auto run = [&](int64_t c) {
    const Chunk& k = chunks[static_cast<size_t>(c)];
    const int64_t b = k.begin, n = k.end - k.begin;
    adamw_update(params_[k.tensor].data + b, grads[k.tensor].data + b, m_[k.tensor].data() + b, v_[k.tensor].data() + b, n, s);
  };
  if (total < kParallelMin) {
    for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c) run(c);
  } else {
    cpu::parallel_for(static_cast<int64_t>(chunks.size()), run);
  }
  ++step_;
}

AdamWState AdamW::state() const {
  AdamWState s;
  s.step = step_;
  s.config = config_;
  s.exp_avg = m_;
  s.exp_avg_sq = v_;
  return s;
}

void validate_adamw_state(const AdamWState& s, const std::vector<int64_t>& numels) {
  s.config.validate();
  check_arg(s.step >= 0, "AdamW state: step must be >= 0, got " + std::to_string(s.step));
  check_arg(s.exp_avg.size() == numels.size() && s.exp_avg_sq.size() == numels.size(),
            "AdamW state: holds " + std::to_string(s.exp_avg.size()) + " exp_avg and " + std::to_string(s.exp_avg_sq.size()) +
                " exp_avg_sq tensors for " + std::to_string(numels.size()) + " parameters");
  for (size_t i = 0; i < numels.size(); ++i) {
    const auto want = static_cast<size_t>(numels[i]);
    check_arg(s.exp_avg[i].size() == want && s.exp_avg_sq[i].size() == want,
              "AdamW state: tensor " + std::to_string(i) + " has " + std::to_string(s.exp_avg[i].size()) + "/" +
                  std::to_string(s.exp_avg_sq[i].size()) + " elements (exp_avg/exp_avg_sq), parameter has " + std::to_string(want));
    for (float x : s.exp_avg[i]) check_arg(std::isfinite(x), "AdamW state: exp_avg " + std::to_string(i) + " is not finite");
    for (float x : s.exp_avg_sq[i])
      check_arg(std::isfinite(x) && x >= 0.0f, "AdamW state: exp_avg_sq " + std::to_string(i) + " must be finite and >= 0");
  }
}

void AdamW::load_state(AdamWState s) {
  std::vector<int64_t> numels;
  for (const ParamRef& p : params_) numels.push_back(p.numel);
  validate_adamw_state(s, numels);
  step_ = s.step;
  config_ = s.config;
  m_ = std::move(s.exp_avg);
  v_ = std::move(s.exp_avg_sq);
}

}  // namespace qlora::train
