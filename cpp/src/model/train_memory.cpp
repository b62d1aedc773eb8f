// The training pass's allocation plan (see train_memory.hpp).
#include "model/train_memory.hpp"

#include <algorithm>
#include <cmath>

#include "backend.hpp"
#include "common/error.hpp"
#include "model/lm_loss.hpp"  // cross_entropy_workspace_bytes, kCrossEntropyChunkRows (the loss driver's)

namespace qlora::model {

const std::vector<std::string>& head_format_names() {
  static const std::vector<std::string> names{"float32", "bf16", "f16", "q8_0"};
  return names;
}

HeadRows head_rows_from_name(const std::string& name) {
  if (name == "float32") return HeadRows::F32;
  if (name == "bf16" || name == "f16") return HeadRows::Half;
  if (name == "q8_0") return HeadRows::Q8_0;
  std::string all;
  for (const std::string& n : head_format_names()) all += (all.empty() ? "'" : ", '") + n + "'";
  throw ValueError("head_format must be one of " + all + ", got '" + name + "'");
}

void TrainShape::validate() const {
  const std::pair<const char*, int64_t> dims[] = {
      {"batch", batch},         {"seq", seq},         {"hidden_size", hidden},         {"intermediate_size", intermediate},
      {"vocab_size", vocab},    {"num_attention_heads", num_heads}, {"num_key_value_heads", num_kv_heads},
      {"head_dim", head_dim},   {"num_hidden_layers", num_layers},  {"r", max_rank}};
  double biggest = 1.0;
  for (const auto& [name, v] : dims) {
    check_arg(v >= 1, std::string(name) + " must be >= 1, got " + std::to_string(v));
    biggest = std::max(biggest, static_cast<double>(v));
  }
  check_activation_budget(activation_budget);
  // Every count below is at most M x (the largest other dimension) x (L + 1) floats.
  const double m = static_cast<double>(batch) * static_cast<double>(seq);
  check_arg(m * biggest * static_cast<double>(num_layers + 1) * 16.0 < 9.0e18,
            "memory plan: batch x seq x the model's dimensions overflow 64-bit byte counts");
}

Backend::LmHeadCall lm_head_call(const TrainShape& s) {
  return {s.batch * s.seq, s.hidden, s.vocab, kCrossEntropyChunkRows, s.bf16, s.backward};
}

size_t lm_loss_workspace_bytes(int64_t N, int64_t D, int64_t V, int64_t chunk_rows, HeadRows head, bool want_grad,
                               bool bf16, bool device, const Backend::LmHeadExtras& extras, bool q8_0_rows) {
  if (N <= 0) return 0;
  size_t b = cross_entropy_workspace_bytes(std::min(N, chunk_rows), V, D, device);
  // The widened chunk: the lm_head backward's, and the bf16 forward's (one at a time).
  if (head == HeadRows::Q8_0 && (want_grad || bf16)) b += Backend::q8_0_gemm_nn_scratch_bytes(V, D);
  if (head == HeadRows::Half && (want_grad || bf16)) b += Backend::half_chunk_scratch_bytes(V, D);
  // An fp32 table, or the Q8_0 rows standing in for it: the backend's own scratch (CPU: bf16 panels,
  // none for fp32 over Q8_0 rows: its GEMMs decode them into their B panels).
  if (head == HeadRows::F32) b += q8_0_rows ? extras.q8_0_rows_bytes : extras.f32_table_bytes;
  return b;
}

void check_activation_budget(double budget) {
  check_arg(budget >= 0.0 && budget <= 1.0,  // NaN fails both
            "activation_memory_budget must be a number in [0, 1] (0: recompute every checkpointed layer, 1: keep "
            "every layer's intermediates), got " + std::to_string(budget));
}

namespace {

LayerActsFloats layer_acts_floats(const TrainShape& s) {
  const int64_t B = s.batch, T = s.seq, M = B * T, D = s.hidden, I = s.intermediate;
  const int64_t QD = s.num_heads * s.head_dim, KD = s.num_kv_heads * s.head_dim;
  return {M * D, M * QD, M * KD, M * KD, M * QD, B * s.num_heads * T, M * D, M * D, M * I, M * I, M * I};
}

}  // namespace

KeptParts kept_parts(const TrainShape& s) {
  const int64_t L = s.num_layers;
  if (!s.backward) return {1, 0};             // eval: one set, reused layer by layer
  if (!s.checkpointing) return {L, 0};        // every layer's intermediates
  // PyTorch's normalisation: budget b allows b x (max - min) floats above the recompute-all minimum;
  // max - min is L - 1 LayerActs sets here. Whole parts only, rounded down (a budget is a cap); the
  // 1e-9 keeps b = k / (L - 1) from rounding a whole-layer count down to k - 1.
  const LayerActsFloats f = layer_acts_floats(s);
  const double set = static_cast<double>(f.total()), att = static_cast<double>(f.attention());
  const double allow = s.activation_budget * static_cast<double>(L - 1) * set;
  const double all_att = static_cast<double>(L - 1) * att;
  // The attention halves first (more recompute skipped per byte), the highest checkpointed layers first.
  if (allow < all_att) return {1, std::min<int64_t>(L - 1, static_cast<int64_t>(std::floor(allow / att + 1e-9)))};
  // Every checkpointed layer keeps its attention half; the rest turns the highest of them into whole
  // sets, each costing the set minus the half it already keeps.
  const double more = std::floor((allow - all_att) / (set - att) + 1e-9);
  const int64_t full = std::min<int64_t>(L - 1, static_cast<int64_t>(more));
  return {1 + full, L - 1 - full};
}

TrainMemoryPlan train_memory_plan(const TrainShape& s) {
  s.validate();
  const int64_t B = s.batch, T = s.seq, M = B * T, D = s.hidden, I = s.intermediate, L = s.num_layers;
  const int64_t QD = s.num_heads * s.head_dim, KD = s.num_kv_heads * s.head_dim;
  const bool offload = s.backward && s.checkpointing && s.offload;  // two device slots, the rest on the host
  TrainMemoryPlan p;
  p.lora_t = M * std::max<int64_t>(s.max_rank, 1);
  p.dropout_buf = s.dropout ? M * std::max({D, I, QD}) : 0;
  p.x = M * D;
  p.num_x = s.backward && !offload ? L + 1 : 2;
  p.layer = layer_acts_floats(s);
  const KeptParts kept = kept_parts(s);
  p.num_layer_acts = kept.layers;
  p.num_attention_kept = kept.attention;
  p.final_norm = M * D;
  if (s.backward) p.bwd = {M * I, M * D, M * QD, M * QD, M * KD, M * KD};

  constexpr size_t F = sizeof(float);
  auto bytes = [&](int64_t n) { return F * static_cast<size_t>(n); };
  p.lora_scratch = 2 * bytes(p.lora_t);
  p.dropout = 2 * bytes(p.dropout_buf);
  p.checkpoints = static_cast<size_t>(p.num_x) * bytes(p.x);
  p.layer_activations = static_cast<size_t>(p.num_layer_acts) * bytes(p.layer.total()) +
                        static_cast<size_t>(p.num_attention_kept) * bytes(p.layer.attention());
  p.final_norm_bytes = bytes(p.final_norm);
  p.backward_scratch = bytes(p.bwd.total());
  p.cross_entropy = lm_loss_workspace_bytes(M, D, s.vocab, kCrossEntropyChunkRows, s.head, s.backward, s.bf16, s.device,
                                            s.lm_head, s.loss_reads_q8_0_rows());
  p.offload_host = offload ? static_cast<size_t>(L) * bytes(p.x) : 0;

  // The pass's timeline (train_pass's order of allocation), as its MemCounter sees it.
  size_t cur = 0, peak = 0;
  auto add = [&](size_t b) { peak = std::max(peak, cur += b); };
  add(p.lora_scratch);
  add(p.dropout);
  add(p.checkpoints);
  add(p.layer_activations);                   // every kept set and half, all live at the end of the forward
  if (!s.backward) cur -= p.layer_activations;  // eval: freed before the loss
  add(p.final_norm_bytes);
  peak = std::max(peak, cur + p.cross_entropy);  // the loss's scratch, freed when it returns
  add(p.backward_scratch);                       // the layer intermediates are released only after this
  p.peak = peak;
  return p;
}

}  // namespace qlora::model
