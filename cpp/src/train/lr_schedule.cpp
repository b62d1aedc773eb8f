// Each formula is transformers' lr lambda written in the same order of double operations, so
// the values agree bit for bit.
#include "train/lr_schedule.hpp"

#include <algorithm>
#include <cmath>

#include "common/error.hpp"

namespace qlora::train {

constexpr double kPi = 3.141592653589793;  // == Python math.pi (M_PI is not standard C++)

Schedule schedule_from_name(const std::string& name) {
  if (name == "constant") return Schedule::Constant;
  if (name == "constant_with_warmup") return Schedule::ConstantWithWarmup;
  if (name == "linear") return Schedule::Linear;
  if (name == "cosine") return Schedule::Cosine;
  throw ValueError("unknown lr schedule '" + name + "' (supported: constant, constant_with_warmup, linear, cosine)");
}

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::Constant: return "constant";
    case Schedule::ConstantWithWarmup: return "constant_with_warmup";
    case Schedule::Linear: return "linear";
    case Schedule::Cosine: return "cosine";
  }
  return "?";
}

int64_t warmup_steps_from(double warmup, int64_t total_steps) {
  check_arg(std::isfinite(warmup) && warmup >= 0.0, "warmup must be a finite number >= 0 (steps, or a ratio < 1), got " +
                                                        std::to_string(warmup));
  check_arg(total_steps >= 0, "total_steps must be >= 0, got " + std::to_string(total_steps));
  if (warmup >= 1.0) {
    check_arg(warmup < 9.2e18, "warmup steps too large: " + std::to_string(warmup));
    return static_cast<int64_t>(warmup);  // int(): truncation
  }
  return static_cast<int64_t>(std::ceil(static_cast<double>(total_steps) * warmup));
}

double lr_factor(Schedule s, int64_t step, int64_t warmup_steps, int64_t total_steps) {
  check_arg(step >= 0, "lr schedule: step must be >= 0, got " + std::to_string(step));
  check_arg(warmup_steps >= 0, "lr schedule: warmup_steps must be >= 0, got " + std::to_string(warmup_steps));
  check_arg(total_steps >= 0, "lr schedule: total_steps must be >= 0, got " + std::to_string(total_steps));
  const double cur = static_cast<double>(step);
  if (s == Schedule::Constant) return 1.0;
  if (step < warmup_steps) {
    // constant_with_warmup divides by max(1.0, warmup), the others by max(1, warmup): same value.
    return cur / static_cast<double>(std::max<int64_t>(1, warmup_steps));
  }
  if (s == Schedule::ConstantWithWarmup) return 1.0;
  const double span = static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  if (s == Schedule::Linear) return std::max(0.0, static_cast<double>(total_steps - step) / span);
  // Cosine: 0.5 * (1 + cos(pi * num_cycles * 2 * progress)), evaluated left to right as Python does.
  const double progress = static_cast<double>(step - warmup_steps) / span;
  const double num_cycles = 0.5;
  return std::max(0.0, 0.5 * (1.0 + std::cos(kPi * num_cycles * 2.0 * progress)));
}

double lr_at(Schedule s, int64_t step, double base_lr, double warmup, int64_t total_steps) {
  check_arg(std::isfinite(base_lr) && base_lr >= 0.0, "lr schedule: base_lr must be finite and >= 0, got " + std::to_string(base_lr));
  return base_lr * lr_factor(s, step, warmup_steps_from(warmup, total_steps), total_steps);
}

}  // namespace qlora::train
