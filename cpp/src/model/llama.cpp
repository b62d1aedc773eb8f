#include "model/llama.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/error.hpp"
#include "model/lora_infer.hpp"

namespace qlora::model {

namespace {
// The backend ops a forward pass / generation of this config needs, checked before any upload.
const Backend& require_forward_ops(const Backend& be, const LlamaConfig& cfg) {
  std::vector<std::string> ops = {"embedding", "rmsnorm", "gemm_nt", "nf4_gemm_nt", "nf4_gemm_nt_many", "rope",
                                  "kv_write", "attention", "add_inplace", "swiglu", "lora_segments_many",
                                  "host_output"};
  if (cfg.qkv_bias || cfg.o_bias) ops.push_back("add_bias");
  if (be.has_bf16_compute()) {  // compute_dtype="bfloat16" keeps its KV cache in bf16
    ops.push_back("kv_write_bf16");
    ops.push_back("attention_kv_bf16");
  }
  be.require_ops(ops, "model");
  return be;
}
}  // namespace

LlamaModel::LlamaModel(Backend& be, const LlamaConfig& cfg, const QuantSpec& quant)
    : be_((require_forward_ops(be, cfg), be)), w_(std::make_unique<LlamaWeights>(be, cfg, quant)) {
  const std::vector<float> inv = rope_inv_freq(w_->cfg);
  inv_freq_ = DeviceBuffer(be, sizeof(float) * inv.size());
  be.upload(inv_freq_.data(), inv.data(), sizeof(float) * inv.size());
  want_bf16_.store(be.default_compute_bf16());
}

void LlamaModel::check_complete() const {
  const std::vector<std::string> miss = w_->missing();
  if (miss.empty()) return;
  std::string msg = "missing tensor";
  msg += miss.size() > 1 ? "s: " : ": ";
  for (size_t i = 0; i < miss.size() && i < 8; ++i) msg += (i ? ", " : "") + miss[i];
  if (miss.size() > 8) msg += ", ... (" + std::to_string(miss.size()) + " in all)";
  throw ValueError(msg);
}

void LlamaModel::forward(const int32_t* ids, const int32_t* mask, int64_t B, int64_t T, float* logits) {
  forward(active_use(), ids, mask, B, T, logits);
}

namespace {
void check_set(const AdapterSet& uses, int64_t B) {
  check_arg(uses.size() == 1 || static_cast<int64_t>(uses.size()) == B,
            "adapter_names: " + std::to_string(uses.size()) + " names for a batch of " + std::to_string(B) +
                " rows (one per row)");
}
// The module of projection p of layer l a row uses and its factor (null: none; scale 0 counts as none).
const LoraModule* row_module(const AdapterUse& u, int64_t l, int p) {
  return u.ad && u.scale != 0.0f ? u.ad->at(l, p) : nullptr;
}
}  // namespace

void LlamaModel::forward(const AdapterSet& uses, const int32_t* ids, const int32_t* mask, int64_t B, int64_t T,
                         float* logits) {
  check_arg(B >= 1 && T >= 1, "forward: input_ids must be a non-empty [batch, seq] array");
  check_set(uses, B);
  std::shared_lock<std::shared_mutex> wl(weights_mu_);  // no merge while the pass reads the weights
  KvCache tmp(be_, w_->cfg, B, T, compute_bf16());  // the pass computes in its cache's dtype
  run(tmp, uses, ids, mask, T, /*all_rows=*/true, logits, nullptr, adapter_bf16(tmp.bf16()));  // `uses` held by the caller
}

GenerationContext::GenerationContext(LlamaModel& m, int64_t B, int64_t capacity, AdapterSet uses)
    : m_(m),
      cache_(m.be_, m.w_->cfg, B, capacity, m.compute_bf16()),
      uses_(std::move(uses)),
      bytes_(cache_.bytes()),
      lora_bf16_(m.adapter_bf16(cache_.bf16())) {
  // Counted under weights_mu_ shared: merge_adapter (exclusive) sees this context or it does not
  // exist yet, and a context created while a merge runs waits for the merge to finish.
  std::shared_lock<std::shared_mutex> wl(m.weights_mu_);
  m.open_contexts_.fetch_add(1);
  m.ctx_bytes_.fetch_add(bytes_);
}

GenerationContext::~GenerationContext() {
  m_.ctx_bytes_.fetch_sub(bytes_);
  m_.open_contexts_.fetch_sub(1);
}

void GenerationContext::feed(const int32_t* ids, const int32_t* mask, int64_t T, float* logits) {
  std::shared_lock<std::shared_mutex> wl(m_.weights_mu_);
  m_.run(cache_, uses_, ids, mask, T, /*all_rows=*/false, logits, nullptr, lora_bf16_);
}

void GenerationContext::feed_sample(const int32_t* ids, const int32_t* mask, int64_t T, Sampler& s,
                                    const SamplingParams& p, const int32_t* rows, int64_t n,
                                    const int32_t* const* hist, const int64_t* n_hist, int32_t* out) {
  p.validate();  // before any compute
  check_arg(n >= 0, "feed_sample: negative row count");
  for (int64_t i = 0; i < n; ++i)
    check_arg(rows[i] >= 0 && rows[i] < batch(), "feed_sample: row index " + std::to_string(rows[i]) +
                                                     " out of range for a batch of " + std::to_string(batch()));
  std::vector<double> u(p.draws() ? n : 0);  // drawn on the host: one generator stream for every backend
  s.draw(n, p, u.data());
  const LlamaModel::SampleRequest req{&p, rows, n, hist, n_hist, u.data(), out};
  std::shared_lock<std::shared_mutex> wl(m_.weights_mu_);
  m_.run(cache_, uses_, ids, mask, T, /*all_rows=*/false, nullptr, &req, lora_bf16_);
}

std::unique_ptr<GenerationContext> LlamaModel::new_context(int64_t B, int64_t capacity, AdapterSet uses) {
  check_set(uses, B);
  return std::unique_ptr<GenerationContext>(new GenerationContext(*this, B, capacity, std::move(uses)));
}

void LlamaModel::start(int64_t B, int64_t capacity) {
  stop();  // the previous cache is freed before the new one is allocated
  gen_ = new_context(B, capacity);
}

void LlamaModel::feed(const int32_t* ids, const int32_t* mask, int64_t T, float* logits) {
  check_arg(gen_ != nullptr, "feed: no generation started (call start first)");
  gen_->feed(ids, mask, T, logits);
}

bool LlamaModel::adapter_bf16(bool compute_bf16) const {
  const AdapterDtype d = adapter_dtype();
  return (d == AdapterDtype::BF16 || (d == AdapterDtype::Auto && compute_bf16)) && be_.lora_bf16_bytes(1, 1, 1) > 0;
}

void LlamaModel::run(KvCache& cache, const AdapterSet& uses, const int32_t* ids, const int32_t* mask, int64_t T,
                     bool all_rows, float* logits_host, const SampleRequest* sample, bool lora_bf16) {
  // The cache's stream and arena (CUDA) for the whole pass: its scratch below is freed there too.
  Backend::ExecScope scope(be_, cache.exec());
  check_complete();
  const LlamaConfig& c = w_->cfg;
  const int64_t B = cache.batch(), M = B * T;
  const int64_t D = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, hd = c.head_dim;
  const int64_t Hq = c.num_heads, Hkv = c.num_kv_heads, QD = c.q_dim(), KD = c.kv_dim();
  // compute_dtype of the pass = its cache's (fixed when the context was created): bf16 runs the base
  // projections and the fp32 lm_head in bf16 compute and keeps K/V in bf16; LoRA terms, norms,
  // RoPE, softmax and the residual stream stay fp32.
  const bool bf16 = cache.bf16();
  for (int64_t i = 0; i < M; ++i)
    if (ids[i] < 0 || ids[i] >= V)  // the message is built only on failure
      throw ValueError("token id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
                       " is out of range [0, " + std::to_string(V) + ")");
  if (c.sliding_window > 0)
    check_arg(cache.used() + T <= c.sliding_window,
              "sequence length " + std::to_string(cache.used() + T) + " exceeds sliding_window " +
                  std::to_string(c.sliding_window) + " (sliding-window attention is not implemented)");
  std::vector<int32_t> ones;
  if (!mask) {
    ones.assign(M, 1);
    mask = ones.data();
  }
  std::vector<int32_t> pos_host;  // [B*T]
  const int64_t start = cache.append(mask, T, pos_host);

  DeviceBuffer ids_d(be_, sizeof(int32_t) * M);  // [M]
  DeviceBuffer pos_d(be_, sizeof(int32_t) * M);  // [M]
  be_.upload(ids_d.data(), ids, sizeof(int32_t) * M);
  be_.upload(pos_d.data(), pos_host.data(), sizeof(int32_t) * M);

  DeviceBuffer x(be_, sizeof(float) * M * D);     // [M, D] residual stream
  DeviceBuffer h(be_, sizeof(float) * M * D);     // [M, D] normed input / block output
  DeviceBuffer q(be_, sizeof(float) * M * QD);    // [M, Hq*hd]
  DeviceBuffer k(be_, sizeof(float) * M * KD);    // [M, Hkv*hd]
  DeviceBuffer v(be_, sizeof(float) * M * KD);    // [M, Hkv*hd]
  DeviceBuffer att(be_, sizeof(float) * M * QD);  // [M, Hq*hd]
  DeviceBuffer g(be_, sizeof(float) * M * I);     // [M, I] gate, then silu(gate)*up
  DeviceBuffer u(be_, sizeof(float) * M * I);     // [M, I]
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // The base projections run once for all rows, then the LoRA terms of each group of projections
  // sharing an input (q/k/v, o, gate/up, down) as one Backend::lora_segments_many call (the CPU
  // runs a decode step's as one thread-pool job): one segment of all rows when every row uses the
  // same adapter (also when every row names it), else one per run of rows sharing an adapter.
  check_set(uses, B);
  bool mixed = false;
  int64_t rmax = 0;
  for (const AdapterUse& u : uses) {
    const bool same = (u.ad && u.scale != 0.0f) ? (u.ad == uses[0].ad && u.scale == uses[0].scale)
                                                 : !(uses[0].ad && uses[0].scale != 0.0f);
    mixed = mixed || !same;
    if (u.ad) rmax = std::max(rmax, u.ad->max_rank());
  }
  // bf16 inference copies of the pass's adapters, taken now and held to the end of the pass (a
  // training step or lora_set meanwhile makes later passes build fresh ones).
  std::vector<std::pair<const LoraAdapter*, std::shared_ptr<const LoraBf16Copy>>> copies;
  if (lora_bf16)
    for (const AdapterUse& u : uses) {
      if (!u.ad || u.scale == 0.0f) continue;
      bool have = false;
      for (const auto& c : copies) have = have || c.first == u.ad.get();
      if (!have) copies.emplace_back(u.ad.get(), lora_bf16_copy(be_, *u.ad));
    }
  auto copy_of = [&](const AdapterUse& u, int64_t l, int p) -> const void* {
    for (const auto& c : copies)
      if (c.first == u.ad.get()) return c.second ? c.second->mod[static_cast<size_t>(l * kNumProj + p)] : nullptr;
    return nullptr;
  };
  DeviceBuffer lora_t;  // [M, rmax] scratch of lora_segments_many
  if (rmax > 0) lora_t = DeviceBuffer(be_, sizeof(float) * M * rmax);
  std::vector<Backend::LoraSegment> segs[3];  // per projection of a group
  std::vector<Backend::LoraProblem> probs;    // the group's projections (n = 0: no row adapts it)
  // Queues the LoRA terms of projection p (layer l) of every row: x[M, lin.in] -> y[M, lin.out].
  auto add_lora = [&](int64_t l, int p, const Linear& lin, const float* xin, int64_t ldx, float* y, int64_t ldy) {
    std::vector<Backend::LoraSegment>& sg = segs[probs.size()];
    sg.clear();
    for (int64_t b = 0; b < (mixed ? B : 1); ++b) {
      const LoraModule* m = row_module(uses[b], l, p);
      if (!m) continue;
      const float alpha = uses[b].scale * m->scaling;
      const int64_t row0 = mixed ? b * T : 0, rows = mixed ? T : M;
      if (!sg.empty()) {  // extend the previous segment when this row continues it with the same adapter
        Backend::LoraSegment& s = sg.back();
        if (s.A == m->A.f32() && s.alpha == alpha && s.row0 + s.rows == row0) {
          s.rows += rows;
          continue;
        }
      }
      sg.push_back({row0, rows, m->r, m->A.f32(), m->B.f32(), alpha});
      if (lora_bf16) sg.back().AB16 = copy_of(uses[b], l, p);
    }
    probs.push_back({lin.in, lin.out, xin, ldx, static_cast<int64_t>(sg.size()), sg.data(), y, ldy});
  };
  // Projections lin[0..n) sharing the input xin: base outputs and LoRA terms as one call.
  auto project = [&](int64_t l, int p0, int n, const Linear* const* lin, const float* xin, int64_t ldx,
                     float* const* out, const int64_t* ld) {
    probs.clear();
    bool any = false;
    for (int i = 0; i < n; ++i) {
      add_lora(l, p0 + i, *lin[i], xin, ldx, out[i], ld[i]);
      any = any || probs.back().n > 0;
    }
    if (any)
      Linear::forward_many_lora(be_, M, xin, ldx, n, lin, out, ld, probs.data(), lora_t.f32(), bf16);
    else if (n == 1)
      lin[0]->forward(be_, M, xin, ldx, out[0], ld[0], nullptr, nullptr, 0, nullptr, 1.0f, bf16);
    else
      Linear::forward_many(be_, M, xin, ldx, n, lin, out, ld, nullptr, 1.0f, bf16);
  };

  if (w_->head_half())  // head_format f16 / bf16
    be_.half_rows(w_->half_type(), M, D, w_->embed_h.data(), ids_d.data<int32_t>(), x.f32());
  else if (w_->embed_is_q8_0())
    be_.q8_0_rows(M, D, w_->embed_q8.data(), ids_d.data<int32_t>(), x.f32());
  else
    be_.embedding(M, D, w_->embed.f32(), ids_d.data<int32_t>(), x.f32());
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = w_->layers[l];
    // Attention block.
    be_.rmsnorm(M, D, x.f32(), L.input_norm.f32(), c.rms_norm_eps, h.f32());
    {
      const Linear* lin[] = {&L.q, &L.k, &L.v};
      float* out[] = {q.f32(), k.f32(), v.f32()};
      const int64_t ld[] = {QD, KD, KD};
      project(l, 0, 3, lin, h.f32(), D, out, ld);
    }
    be_.rope(M, Hq, hd, q.f32(), QD, pos_d.data<int32_t>(), inv_freq_.f32());
    be_.rope(M, Hkv, hd, k.f32(), KD, pos_d.data<int32_t>(), inv_freq_.f32());
    if (bf16) {
      be_.kv_write_bf16(B, T, Hkv, hd, k.f32(), KD, cache.k_bf16(l), cache.capacity(), start);
      be_.kv_write_bf16(B, T, Hkv, hd, v.f32(), KD, cache.v_bf16(l), cache.capacity(), start);
      be_.attention_kv_bf16(B, T, Hq, Hkv, hd, q.f32(), QD, cache.k_bf16(l), cache.v_bf16(l), cache.capacity(), start,
                            cache.key_mask_device(), scale, att.f32(), QD);
    } else {
      be_.kv_write(B, T, Hkv, hd, k.f32(), KD, cache.k(l), cache.capacity(), start);
      be_.kv_write(B, T, Hkv, hd, v.f32(), KD, cache.v(l), cache.capacity(), start);
      be_.attention(B, T, Hq, Hkv, hd, q.f32(), QD, cache.k(l), cache.v(l), cache.capacity(), start,
                    cache.key_mask_device(), scale, att.f32(), QD);
    }
    {
      const Linear* lin[] = {&L.o};
      float* out[] = {h.f32()};
      const int64_t ld[] = {D};
      project(l, 3, 1, lin, att.f32(), QD, out, ld);
    }
    be_.add_inplace(M * D, h.f32(), x.f32());
    // MLP block.
    be_.rmsnorm(M, D, x.f32(), L.post_norm.f32(), c.rms_norm_eps, h.f32());
    {
      const Linear* lin[] = {&L.gate, &L.up};
      float* out[] = {g.f32(), u.f32()};
      const int64_t ld[] = {I, I};
      project(l, 4, 2, lin, h.f32(), D, out, ld);
    }
    be_.swiglu(M, I, g.f32(), I, u.f32(), I, g.f32(), I);
    {
      const Linear* lin[] = {&L.down};
      float* out[] = {h.f32()};
      const int64_t ld[] = {D};
      project(l, 6, 1, lin, g.f32(), I, out, ld);
    }
    be_.add_inplace(M * D, h.f32(), x.f32());
  }
  be_.rmsnorm(M, D, x.f32(), w_->norm.f32(), c.rms_norm_eps, h.f32());
  // lm_head on every row, or on row b*T + T-1 of each batch row (stride T*D: no gather needed).
  const int64_t rows = all_rows ? M : B;
  const float* hin = all_rows ? h.f32() : h.f32() + (T - 1) * D;
  const int64_t ldh = all_rows ? D : T * D;
  // A tied Q8_0 embedding is the lm_head as stored (half the bytes of fp32 per decode step).
  auto lm_head = [&](float* out) {
    if (const void* q8 = w_->lm_head_q8_0())  // a GGUF's tied Q8_0 embedding, or head_format q8_0
      be_.q8_0_gemm_nt(rows, V, D, hin, ldh, q8, out, V);
    else if (const void* h16 = w_->lm_head_half())  // head_format f16 / bf16: fp32 compute, as Q8_0
      be_.half_gemm_nt(w_->half_type(), rows, V, D, hin, ldh, h16, out, V);
    else if (bf16)
      be_.gemm_nt_bf16(rows, V, D, 1.0f, hin, ldh, w_->lm_head_weight(), D, 0.0f, out, V);
    else
      be_.gemm_nt(rows, V, D, 1.0f, hin, ldh, w_->lm_head_weight(), D, 0.0f, out, V);
  };
  if (sample) {  // the logits stay in backend memory: only token ids come back
    DeviceBuffer lg(be_, sizeof(float) * rows * V);  // [rows, V]
    lm_head(lg.f32());
    be_.sample_rows(sample->n, V, lg.f32(), V, sample->rows, sample->hist, sample->n_hist, *sample->p, sample->u,
                    sample->out);
    return;
  }
  // Host backends write straight into the caller's array (no [rows, V] buffer and copy per step).
  HostOutput logits(be_, logits_host, sizeof(float) * rows * V);  // [rows, V]
  lm_head(logits.f32());
  logits.finish();
}

std::map<std::string, size_t> LlamaModel::memory_footprint() const {
  size_t nf4 = 0, quant = 0, other = 0;
  other += w_->embed.bytes() + w_->embed_q8.bytes() + w_->norm.bytes() + w_->lm_head.bytes() + w_->lm_head_q8.bytes() +
           w_->embed_h.bytes() + w_->lm_head_h.bytes() +
           inv_freq_.bytes();
  for (const LayerWeights& L : w_->layers) {
    other += L.input_norm.bytes() + L.post_norm.bytes();
    for (const Linear* lin : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) {
      (lin->is_nf4 ? nf4 : other) += lin->weight_bytes();
      quant += lin->quant_bytes();
      other += lin->bias_bytes();
    }
  }
  size_t lora = 0, lora16 = 0;  // A, B, their gradients once allocated (first training use) and AdamW moments
  std::lock_guard<std::mutex> lk(adapters_mu_);
  for (const auto& kv : adapters_) {
    // dA/dB have A/B's sizes; read the flag, not the buffers, which a training call may be creating.
    const size_t k = kv.second->grads_ready.load(std::memory_order_acquire) ? 2 : 1;
    lora16 += lora_bf16_copy_bytes(*kv.second);  // bf16 inference copy, where one is held
    for (const auto& m : kv.second->modules)
      if (m) lora += k * (m->A.bytes() + m->B.bytes());
    if (kv.second->opt)
      for (size_t i = 0; i < kv.second->opt->num_params(); ++i) lora += 2 * sizeof(float) * kv.second->opt->numel(i);
  }
  return {{"nf4_weights", nf4},
          {"quant_constants", quant},
          {"other_weights", other},
          {"kv_cache", ctx_bytes_.load()},
          {"lora_adapters", lora},
          {"lora_adapters_bf16", lora16}};
}

}  // namespace qlora::model
