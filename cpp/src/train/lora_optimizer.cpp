#include "train/lora_optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "common/error.hpp"

namespace qlora::train {

namespace {
// Zeros into a backend buffer without one host vector of the whole size.
void upload_zeros(Backend& be, void* dst, size_t bytes) {
  constexpr size_t kStep = size_t{1} << 22;
  const std::vector<unsigned char> z(std::min(bytes, kStep), 0);
  for (size_t off = 0; off < bytes; off += kStep)
    be.upload(static_cast<unsigned char*>(dst) + off, z.data(), std::min(kStep, bytes - off));
}
}  // namespace

FlatGradOps::FlatGradOps(Backend& be, std::vector<int64_t> numels) : be_(be), numels_(std::move(numels)) {
  be.require_ops({"sum_squares", "scale_inplace", "find_nonfinite"}, "the gradient checks");
  for (size_t i = 0; i < numels_.size(); ++i) {
    check_arg(numels_[i] >= 0, "gradient " + std::to_string(i) + " has a negative size");
    total_ += numels_[i];
  }
  const std::vector<int64_t> bounds = norm_chunk_bounds(numels_);
  n_chunks_ = static_cast<int64_t>(bounds.size()) - 1;
  bounds_ = model::DeviceBuffer(be, sizeof(int64_t) * bounds.size());
  be.upload(bounds_.data(), bounds.data(), sizeof(int64_t) * bounds.size());
  partial_ = model::DeviceBuffer(be, sizeof(double) * static_cast<size_t>(std::max<int64_t>(n_chunks_, 1)));
  scalar_ = model::DeviceBuffer(be, 8);
  be.synchronize();  // `bounds` (the upload's source) goes out of scope
}

double FlatGradOps::grad_norm(const float* grads) {
  check_arg(total_ == 0 || grads != nullptr, "grad_norm: no gradient buffer");
  be_.sum_squares(n_chunks_, bounds_.data<int64_t>(), grads, partial_.data<double>(), scalar_.data<double>());
  double sum = 0.0;
  be_.download(&sum, scalar_.data(), sizeof(double));
  be_.synchronize();
  return std::sqrt(sum);
}

double FlatGradOps::clip_grad_norm(float* grads, double max_norm) {
  check_arg(!std::isnan(max_norm) && max_norm > 0.0, "clip_grad_norm: max_norm must be > 0, got " + std::to_string(max_norm));
  const double norm = grad_norm(grads);
  if (!std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return norm;
  be_.scale_inplace(total_, grads, static_cast<float>(coef));
  return norm;
}

NonFinite FlatGradOps::find_nonfinite(const float* grads) {
  check_arg(total_ == 0 || grads != nullptr, "find_nonfinite: no gradient buffer");
  int64_t flat = -1;
  be_.find_nonfinite(total_, grads, scalar_.data<int64_t>());
  be_.download(&flat, scalar_.data(), sizeof(int64_t));
  be_.synchronize();
  NonFinite r;
  if (flat < 0) return r;
  int64_t off = 0;
  for (size_t t = 0; t < numels_.size(); off += numels_[t], ++t)
    if (flat < off + numels_[t]) {
      r.tensor = static_cast<int64_t>(t), r.index = flat - off;
      be_.download(&r.value, grads + flat, sizeof(float));
      be_.synchronize();
      break;
    }
  return r;
}

FlatAdamW::FlatAdamW(Backend& be, float* params, std::vector<int64_t> numels, AdamWConfig config,
                     std::vector<size_t> state_order)
    : be_(be), params_(params), checks_(be, std::move(numels)), config_(config), order_(std::move(state_order)) {
  config_.validate();
  check_arg(checks_.num_params() > 0, "AdamW: no parameters given");
  const size_t n = checks_.num_params();
  if (order_.empty())
    for (size_t i = 0; i < n; ++i) order_.push_back(i);
  std::vector<bool> seen(n, false);
  check_arg(order_.size() == n, "AdamW: state order has the wrong length");
  for (size_t j : order_) {
    check_arg(j < n && !seen[j], "AdamW: state order is not a permutation");
    seen[j] = true;
  }
  int64_t off = 0;
  for (int64_t x : checks_.numels()) offset_.push_back(off), off += x;
  be.require_ops({"adamw_update"}, "the optimizer");
  const int64_t total = checks_.numel_total();
  check_arg(total == 0 || params_ != nullptr, "AdamW: no parameter buffer");
  const size_t fb = sizeof(float) * static_cast<size_t>(total);
  m_ = model::DeviceBuffer(be, fb);
  v_ = model::DeviceBuffer(be, fb);
  upload_zeros(be, m_.data(), fb);
  upload_zeros(be, v_.data(), fb);
  be.synchronize();  // the zero source is a host vector that goes out of scope
}

void FlatAdamW::step(const float* grads, double lr) {
  check_arg(std::isfinite(lr) && lr >= 0.0, "AdamW.step: lr must be finite and >= 0, got " + std::to_string(lr));
  check_arg(numel_total() == 0 || grads != nullptr, "AdamW.step: no gradient buffer");
  const AdamWScalars s = adamw_scalars(config_, step_ + 1, lr);
  be_.adamw_update(numel_total(), params_, grads, m_.f32(), v_.f32(), s);
  ++step_;
}

AdamWState FlatAdamW::state() const {
  AdamWState s;
  s.step = step_;
  s.config = config_;
  for (size_t j : order_) {
    const int64_t n = checks_.numel(j), off = offset_[j];
    s.exp_avg.emplace_back(static_cast<size_t>(n));
    s.exp_avg_sq.emplace_back(static_cast<size_t>(n));
    be_.download(s.exp_avg.back().data(), m_.f32() + off, sizeof(float) * n);
    be_.download(s.exp_avg_sq.back().data(), v_.f32() + off, sizeof(float) * n);
  }
  be_.synchronize();
  return s;
}

void FlatAdamW::load_state(AdamWState s) {
  std::vector<int64_t> numels;  // in state order
  for (size_t j : order_) numels.push_back(checks_.numel(j));
  validate_adamw_state(s, numels);
  for (size_t i = 0; i < numels.size(); ++i) {
    be_.upload(m_.f32() + offset_[order_[i]], s.exp_avg[i].data(), sizeof(float) * numels[i]);
    be_.upload(v_.f32() + offset_[order_[i]], s.exp_avg_sq[i].data(), sizeof(float) * numels[i]);
  }
  be_.synchronize();  // s (the upload sources) is destroyed on return
  step_ = s.step;
  config_ = s.config;
}

}  // namespace qlora::train
