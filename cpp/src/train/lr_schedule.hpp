// Learning-rate schedules exactly as transformers defines them (optimization.py, LambdaLR:
// lr = base_lr * factor(step)), where `step` counts the optimizer steps already taken: the first
// step uses lr_at(0), which is 0 during a warmup, as with transformers' Trainer.
#pragma once
#include <cstdint>
#include <string>

namespace qlora::train {

enum class Schedule {
  Constant,             // get_constant_schedule: factor 1 (warmup ignored)
  ConstantWithWarmup,   // get_constant_schedule_with_warmup
  Linear,               // get_linear_schedule_with_warmup
  Cosine,               // get_cosine_schedule_with_warmup, num_cycles = 0.5
};

// "constant", "constant_with_warmup", "linear", "cosine" (transformers' lr_scheduler_type names);
// anything else raises ValueError listing these.
Schedule schedule_from_name(const std::string& name);
const char* schedule_name(Schedule s);

// transformers' TrainingArguments.get_warmup_steps: warmup >= 1 is a step count (truncated, as
// int() does), warmup in [0, 1) a ratio -> ceil(total_steps * ratio) computed in double.
// Negative or non-finite warmup, or total_steps < 0, raise ValueError.
int64_t warmup_steps_from(double warmup, int64_t total_steps);

// The factor of base_lr at `step` (>= 0). Past total_steps the formulas run on as transformers'
// do (linear clamps at 0; cosine with num_cycles 0.5 rises again). ValueError on bad arguments.
double lr_factor(Schedule s, int64_t step, int64_t warmup_steps, int64_t total_steps);

// base_lr * lr_factor(...); warmup given as in warmup_steps_from. base_lr must be finite and >= 0.
double lr_at(Schedule s, int64_t step, double base_lr, double warmup, int64_t total_steps);

}  // namespace qlora::train
