#include "model/lora_setup.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "io/adapter_write.hpp"
#include "io/safetensors.hpp"
#include "json/json.hpp"
#include "model/linear.hpp"
#include "model/lora_check.hpp"
#include "model/lora_infer.hpp"
#include "model/peft_config.hpp"
#include "model/train_memory.hpp"
#include "model/weights.hpp"
#include "train/grad_utils.hpp"
#include "train/rng.hpp"

namespace qlora::model {

void init_lora_factors(train::Philox& rng, LoraInit how, int64_t r, int64_t in, int64_t out, float* A, float* B) {
  check_arg(r >= 1 && in >= 1 && out >= 1, "LoRA init: r, in_features and out_features must be >= 1");
  const int64_t na = r * in, nb = out * r;
  if (how == LoraInit::Gaussian) {
    rng.fill_normal(A, na, 0.0f, static_cast<float>(1.0 / static_cast<double>(r)));
  } else {
    const float bound = 1.0f / std::sqrt(static_cast<float>(in));
    rng.fill_uniform(A, na, -bound, bound);
  }
  if (how == LoraInit::LinearDefault) {
    const float bound = 1.0f / std::sqrt(static_cast<float>(r));  // lora_B is nn.Linear(r, out)
    rng.fill_uniform(B, nb, -bound, bound);
  } else {
    std::fill(B, B + nb, 0.0f);
  }
}

void configure_lora_optimizer(Backend& be, LoraAdapter& a, const train::AdamWConfig& c) {
  pack_lora_params(be, a);  // no-op for an adapter added to a model (add_adapter packs it)
  std::vector<int64_t> numels;
  for (const train::ParamRef& p : a.params()) numels.push_back(p.numel);
  a.opt = std::make_unique<train::FlatAdamW>(be, a.param_arena.f32(), std::move(numels), c, a.peft_order());
}

std::unique_ptr<LoraAdapter> new_lora_adapter(LlamaModel& m, const LoraInitSpec& s) {
  check_arg(s.r >= 1, "LoRA r must be >= 1, got " + std::to_string(s.r));
  check_arg(std::isfinite(s.alpha) && s.alpha > 0.0f, "LoRA alpha must be finite and > 0");
  check_arg(s.dropout >= 0.0f && s.dropout < 1.0f, "LoRA dropout must be in [0, 1)");
  check_arg(s.target_mask != 0 && (s.target_mask >> kNumProj) == 0,
            "LoRA target mask must be a nonzero combination of the 7 projection bits (0x01..0x7F), got " +
                std::to_string(s.target_mask));
  const float scaling = static_cast<float>(lora_scaling(s.alpha, s.r, s.use_rslora));
  const int64_t L = m.config().num_layers;
  auto a = std::make_unique<LoraAdapter>();
  a->modules.resize(L * kNumProj);
  a->dropout = s.dropout, a->seed = s.seed;
  train::Philox rng = lora_init_rng(s.seed);
  for (int64_t l = 0; l < L; ++l)
    for (int p = 0; p < kNumProj; ++p) {
      if (!(s.target_mask & (1u << p))) continue;
      const Linear& lin = proj(m.weights().layers[l], p);
      check_arg(s.r <= lin.in && s.r <= lin.out, "LoRA r exceeds a projection's dimensions");
      std::vector<float> A(static_cast<size_t>(s.r * lin.in));   // [r, in]
      std::vector<float> B(static_cast<size_t>(lin.out * s.r));  // [out, r]
      init_lora_factors(rng, LoraInit::KaimingUniform, s.r, lin.in, lin.out, A.data(), B.data());
      a->modules[l * kNumProj + p] = make_lora_module(m.backend(), s.r, lin.in, lin.out, scaling, A.data(), B.data());
    }
  return a;
}

double lora_train_step(LlamaModel& m, const int32_t* ids, const int32_t* labels, int64_t B, int64_t T, double lr,
                       double max_grad_norm) {
  const LlamaModel::AdapterRef ap = m.active_adapter();  // held for the whole step
  check_arg(ap != nullptr, "no active LoRA adapter: add one first");
  LoraAdapter& a = *ap;
  check_arg(a.opt != nullptr, "the optimizer is not configured: call train_configure first");
  check_arg(std::isfinite(lr) && lr >= 0.0, "lr must be finite and >= 0");
  const int64_t V = m.config().vocab_size;
  std::vector<int32_t> shifted(static_cast<size_t>(B * T), -100);  // [B, T] target of position t
  int64_t count = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int32_t v = labels[b * T + t];
      check_arg(v == -100 || (v >= 0 && v < V), "label " + std::to_string(v) + " at [" + std::to_string(b) + ", " +
                                                     std::to_string(t) + "] is out of range [0, " + std::to_string(V) +
                                                     ") and not -100");
      if (t > 0 && v != -100) shifted[b * T + t - 1] = v, ++count;
    }
  check_arg(count > 0, "no label to train on (all -100 after the shift)");
  const TrainStepResult r = lora_train_step(m, {{ids, nullptr, shifted.data(), B, T, count}}, lr, max_grad_norm, true, true);
  check_arg(r.stepped, "non-finite loss or gradient norm: the optimizer step was not taken");
  return r.loss;
}

TrainStepResult lora_train_step(LlamaModel& m, const std::vector<MicroBatch>& micro, double lr, double max_grad_norm,
                                bool training, bool checkpointing, const StepReducer* dp, double activation_budget) {
  const LlamaModel::AdapterRef ap = m.active_adapter();  // held for the whole step
  check_arg(ap != nullptr, "no active LoRA adapter: add one first");
  LoraAdapter& a = *ap;
  check_arg(a.opt != nullptr, "the optimizer is not configured: call configure_optimizer first");
  check_arg(std::isfinite(lr) && lr >= 0.0, "lr must be finite and >= 0");
  check_arg(!std::isnan(max_grad_norm), "max_grad_norm is NaN");
  check_activation_budget(activation_budget);  // before the gradients are zeroed
  check_arg(dp == nullptr || (dp->sum_scalars && dp->sum_grads), "data-parallel reducer without its sum functions");
  check_arg(!micro.empty(), "no counted tokens in the step's micro-batches");
  check_arg(micro.size() <= static_cast<size_t>(INT32_MAX), "too many micro-batches");
  const int G = static_cast<int>(micro.size());
  TrainStepResult out;
  // n[i]: counted tokens of micro-batch i over every rank (the local count without dp).
  std::vector<double> n(static_cast<size_t>(G));
  for (int i = 0; i < G; ++i) {
    check_arg(micro[i].B > 0 || (dp != nullptr && micro[i].count == 0),
              "micro-batch " + std::to_string(i) + " has no rows");
    check_arg(micro[i].row0 >= 0 && (micro[i].T <= 0 || micro[i].row0 <= INT64_MAX / micro[i].T),
              "micro-batch " + std::to_string(i) + ": row offset " + std::to_string(micro[i].row0) + " out of range");
    n[i] = static_cast<double>(micro[i].count);
  }
  if (dp) dp->sum_scalars(n.data(), G);
  double N = 0.0;
  for (double c : n) N += c;
  out.count = static_cast<int64_t>(N);
  check_arg(out.count > 0, "no counted tokens in the step's micro-batches");
  zero_lora_grads(m.backend(), a);
  std::vector<double> loss_sum(static_cast<size_t>(G), 0.0);
  bool stop = false;  // dp: a local non-finite loss; the remaining passes are skipped
  for (int i = 0; i < G; ++i) {
    const MicroBatch& mb = micro[i];
    if (n[i] == 0) continue;  // no rank counts a token here: no pass anywhere (as on one process)
    if (mb.count == 0 || stop) {
      ++a.micro_step;  // dp: others run this micro-batch; the dropout step counter stays in step with them
      continue;
    }
    a.dropout_row0 = mb.row0;
    LlamaModel::LossResult r;
    try {
      r = m.forward_backward(mb.ids, mb.mask, mb.labels, mb.B, mb.T, static_cast<float>(n[i] / N / n[i]), training,
                             checkpointing, activation_budget);
    } catch (...) {
      a.dropout_row0 = 0;
      throw;
    }
    a.dropout_row0 = 0;
    check_arg(r.count == mb.count, "micro-batch " + std::to_string(i) + ": counted " + std::to_string(r.count) +
                                       " labels, expected " + std::to_string(mb.count));
    out.peak_train_bytes = std::max(out.peak_train_bytes, r.peak_train_bytes);
    loss_sum[i] = r.loss_sum;
    if (!std::isfinite(r.loss_sum)) {
      if (!dp) {  // one process: stop at once, as before
        out.bad_micro = i, out.bad_loss = r.loss_sum / n[i];
        return out;
      }
      stop = true;
    }
  }
  if (dp) dp->sum_scalars(loss_sum.data(), G);  // identical on every rank from here on
  for (int i = 0; i < G; ++i) {
    if (n[i] == 0) continue;
    const double loss = loss_sum[i] / n[i];
    if (!std::isfinite(loss)) {
      out.bad_micro = i, out.bad_loss = loss;
      return out;
    }
    out.loss += loss * n[i] / N;
  }
  ensure_lora_grads(m.backend(), a);
  float* g = a.grad_arena.f32();
  if (dp) dp->sum_grads(g, a.num_params());  // one buffer, one all-reduce per step
  // Clip and step on the contiguous buffers through the backend's optimizer ops (on the device for
  // CUDA; on the CPU bit-identical to the host clip_grad_norm + AdamW).
  out.norm = a.opt->clip_grad_norm(g, max_grad_norm > 0.0 ? max_grad_norm : INFINITY);
  if (!std::isfinite(out.norm)) return out;
  a.opt->step(g, lr);
  lora_factors_changed(a);  // later passes rebuild the bf16 inference copy
  out.stepped = true;
  return out;
}

void save_lora_adapter(LlamaModel& m, const LoraAdapter& a, const LoraInitSpec& s, const std::string& dir) {
  const int64_t L = m.config().num_layers;
  std::vector<std::vector<float>> host;  // one [numel] per written tensor
  std::vector<io::TensorToWrite> ts;
  host.reserve(static_cast<size_t>(2 * L * kNumProj));
  for (int64_t l = 0; l < L; ++l)
    for (int p = 0; p < kNumProj; ++p)
      if (const LoraModule* mod = a.at(l, p)) {
        const std::string parent = p < 4 ? "self_attn" : "mlp";  // q, k, v, o | gate, up, down
        const std::string base = "base_model.model.model.layers." + std::to_string(l) + "." + parent + "." + proj_name(p);
        for (int w = 0; w < 2; ++w) {
          const DeviceBuffer& buf = w == 0 ? mod->A : mod->B;
          std::vector<int64_t> shape = w == 0 ? std::vector<int64_t>{mod->r, mod->in} : std::vector<int64_t>{mod->out, mod->r};
          host.emplace_back(static_cast<size_t>(shape[0] * shape[1]));
          m.backend().download(host.back().data(), buf.data(), sizeof(float) * host.back().size());
          ts.push_back({base + (w == 0 ? ".lora_A.weight" : ".lora_B.weight"), DType::F32, shape, host.back().data(),
                        sizeof(float) * host.back().size()});
        }
        // Loading refuses factors beyond the engine's one bound (training with a huge lr can get
        // there): refuse them here, before anything is written, rather than save an unloadable file.
        const size_t n = ts.size();
        check_lora_factors(mod->r, mod->in, mod->out, mod->scaling, host[n - 2].data(), host[n - 1].data(),
                           "qlora_adapter_save", "tensor '" + ts[n - 2].name + "'", "tensor '" + ts[n - 1].name + "'");
      }
  PeftConfigFields cfg;  // the C API's settings; the rest of PEFT's fields keep their defaults
  cfg.r = s.r;
  cfg.lora_alpha = float_as_written(s.alpha);
  cfg.lora_dropout = float_as_written(s.dropout);
  cfg.use_rslora = s.use_rslora;
  for (int p = 0; p < kNumProj; ++p)
    if (s.target_mask & (1u << p)) cfg.target_modules.push_back(proj_name(p));
  io::write_peft_adapter(dir, ts, peft_config_json(cfg));  // the one writer and config builder (Python's too)
}

}  // namespace qlora::model
