// LoRA adapters of LlamaModel and its training passes: forward + backward through the frozen
// (NF4 or fp32) base, producing gradients for the active adapter's A/B only, with optional
// gradient checkpointing (keep each layer's input, recompute the layer in the backward), and the
// eval loss. The base weights are only read (nf4_gemm_nn for input gradients, never dequantized
// to a full fp32 matrix). Layer math mirrors LlamaModel::run (llama.cpp) with the training
// attention (no KV cache; logsumexp kept for the backward).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "model/llama.hpp"
#include "model/lm_loss.hpp"
#include "model/lora_check.hpp"
#include "model/lora_infer.hpp"
#include "model/train_memory.hpp"
#include "model/train_ops.hpp"

namespace qlora::model {

// ------------------------------------------------------------------ adapters
void LlamaModel::add_adapter(const std::string& name, std::unique_ptr<LoraAdapter> a) {
  check_arg(!name.empty(), "adapter name must not be empty");
  const int64_t L = w_->cfg.num_layers;
  check_arg(a && static_cast<int64_t>(a->modules.size()) == L * kNumProj, "adapter: wrong module table size");
  check_arg(a->dropout >= 0.0f && a->dropout < 1.0f, "lora_dropout must be in [0, 1)");
  for (int64_t l = 0; l < L; ++l)
    for (int p = 0; p < kNumProj; ++p) {
      const LoraModule* m = a->at(l, p);
      const Linear& lin = proj(w_->layers[l], p);
      if (m)
        check_arg(m->in == lin.in && m->out == lin.out,
                  "adapter '" + name + "': layer " + std::to_string(l) + " " + proj_name(p) + " has shape [" +
                      std::to_string(m->out) + ", " + std::to_string(m->in) + "], the model's is [" +
                      std::to_string(lin.out) + ", " + std::to_string(lin.in) + "]");
    }
  pack_lora_params(be_, *a);  // A/B contiguous (the optimizer's buffer), before any request can see them
  // The bf16 inference copy now, when a pass starting now would use it (else at first use).
  if (adapter_bf16(compute_bf16())) lora_bf16_copy(be_, *a);
  std::lock_guard<std::mutex> lk(adapters_mu_);
  check_arg(!adapters_.count(name), "an adapter named '" + name + "' already exists");
  adapters_[name] = AdapterRef(std::move(a));
  scales_[name] = 1.0f;
}

AdapterUse LlamaModel::active_use() const {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  if (!active_) return {};
  return {active_, scales_.at(active_name_)};
}

AdapterUse LlamaModel::use(const std::string& name) const {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  auto it = adapters_.find(name);
  check_arg(it != adapters_.end(), "no adapter named '" + name + "'");
  return {it->second, scales_.at(name)};
}

AdapterSet LlamaModel::uses(const std::vector<std::string>& names) const {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  AdapterSet out;
  out.reserve(names.size());
  for (const std::string& name : names) {
    if (name == "__base__") {
      out.emplace_back();
      continue;
    }
    auto it = adapters_.find(name);
    check_arg(it != adapters_.end(), "no adapter named '" + name + "'");
    out.push_back({it->second, scales_.at(name)});
  }
  return out;
}

void LlamaModel::set_adapter_scale(const std::string& name, double scale) {
  std::lock_guard<std::mutex> lk(adapters_mu_);  // held: the adapter checked is the one scaled
  auto it = adapters_.find(name);
  check_arg(it != adapters_.end(), "no adapter named '" + name + "'");
  check_lora_scale(be_, *it->second, scale, "adapter '" + name + "'");  // the load bound, as every factor path
  scales_[name] = static_cast<float>(scale);  // requests already running keep the scale they took at their start
}

float LlamaModel::adapter_scale(const std::string& name) const {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  auto it = scales_.find(name);
  check_arg(it != scales_.end(), "no adapter named '" + name + "'");
  return it->second;
}

LlamaModel::AdapterRef LlamaModel::adapter(const std::string& name) const {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  auto it = adapters_.find(name);
  check_arg(it != adapters_.end(), "no adapter named '" + name + "'");
  return it->second;
}

void LlamaModel::set_active_adapter(const std::string& name) {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  AdapterRef a;
  if (!name.empty()) {
    auto it = adapters_.find(name);
    check_arg(it != adapters_.end(), "no adapter named '" + name + "'");
    a = it->second;
  }
  // Requests already running keep the adapter they took at their start.
  active_ = std::move(a);
  active_name_ = name;
}

std::string LlamaModel::active_adapter_name() const {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  return active_name_;
}

LlamaModel::AdapterRef LlamaModel::active_adapter() const {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  return active_;
}

void LlamaModel::delete_adapter(const std::string& name) {
  AdapterRef dropped;  // released after the lock: the last reference may free device memory
  std::lock_guard<std::mutex> lk(adapters_mu_);
  auto it = adapters_.find(name);
  check_arg(it != adapters_.end(), "no adapter named '" + name + "'");
  dropped = std::move(it->second);
  adapters_.erase(it);
  scales_.erase(name);
  if (active_name_ == name) active_.reset(), active_name_.clear();
  // Requests holding the adapter keep it alive until they end.
}

std::vector<std::string> LlamaModel::adapter_names() const {
  std::lock_guard<std::mutex> lk(adapters_mu_);
  std::vector<std::string> out;
  for (const auto& kv : adapters_) out.push_back(kv.first);
  return out;
}

void LlamaModel::set_head_q8_0() {
  std::unique_lock<std::shared_mutex> wl(weights_mu_);  // no pass reads the head while it changes
  check_arg(open_contexts_.load() == 0, "head_format: close the open generation contexts first");
  w_->set_head_q8_0();
}

void LlamaModel::set_head_half(Backend::HalfType t) {
  std::unique_lock<std::shared_mutex> wl(weights_mu_);  // no pass reads the head while it changes
  check_arg(open_contexts_.load() == 0, "head_format: close the open generation contexts first");
  w_->set_head_half(t);
}

// ------------------------------------------------------------------ training pass
// The offload staging of one pass: the model's cached host buffer when it is free and large
// enough, else a new one; given back (kept for the next pass) at the end. The destructor waits
// for the backend first, so no queued copy outlives the memory.
class LlamaModel::OffloadStage {
 public:
  OffloadStage(LlamaModel& m, size_t bytes) : m_(m) {
    if (!bytes) return;
    {
      std::lock_guard<std::mutex> lk(m.offload_mu_);
      if (m.offload_host_ && m.offload_host_bytes_ >= bytes) buf_ = std::move(m.offload_host_), bytes_ = m.offload_host_bytes_;
    }
    if (!buf_) {
      Backend* be = &m.be_;
      buf_ = std::shared_ptr<void>(be->host_alloc(bytes), [be](void* p) { be->host_free(p); });
      bytes_ = bytes;
    }
  }
  ~OffloadStage() {
    if (!buf_) return;
    try {
      m_.be_.synchronize();
    } catch (...) {  // a failed device: the memory is dropped, not reused
      return;
    }
    std::lock_guard<std::mutex> lk(m_.offload_mu_);
    if (!m_.offload_host_ || m_.offload_host_bytes_ < bytes_) m_.offload_host_ = std::move(buf_), m_.offload_host_bytes_ = bytes_;
  }
  void* at(int64_t l, size_t slot_bytes) const { return static_cast<char*>(buf_.get()) + static_cast<size_t>(l) * slot_bytes; }

 private:
  LlamaModel& m_;
  std::shared_ptr<void> buf_;
  size_t bytes_ = 0;
};

namespace {

// Live / peak bytes of one pass's buffers: the activation-memory measure tests report.
struct MemCounter {
  size_t cur = 0, peak = 0;
  void add(size_t b) { peak = std::max(peak, cur += b); }
  void sub(size_t b) { cur -= b; }
};

// A DeviceBuffer of floats counted by a MemCounter while it lives.
class ActBuf {
 public:
  ActBuf() = default;
  ActBuf(Backend& be, MemCounter& mc, int64_t n) : buf_(be, sizeof(float) * n), mc_(&mc) { mc.add(buf_.bytes()); }
  ActBuf(ActBuf&& o) noexcept : buf_(std::move(o.buf_)), mc_(o.mc_) { o.mc_ = nullptr; }
  ActBuf& operator=(ActBuf&& o) noexcept {
    release();
    buf_ = std::move(o.buf_), mc_ = o.mc_, o.mc_ = nullptr;
    return *this;
  }
  ~ActBuf() { release(); }
  void release() {
    if (mc_) mc_->sub(buf_.bytes());
    mc_ = nullptr;
    buf_.reset();
  }
  float* f() const { return buf_.f32(); }

 private:
  DeviceBuffer buf_;
  MemCounter* mc_ = nullptr;
};

struct Dims {
  int64_t B, T, M, D, I, V, Hq, Hkv, hd, QD, KD;
};

// Where one layer's forward writes its intermediates and its backward reads them (shapes:
// train_memory.hpp's LayerActsFloats).
struct LayerView {
  float *h1, *q, *k, *v, *att, *lse, *x_mid, *h2, *g, *u, *a;
};

// The attention half of a layer's intermediates, kept for its backward (activation_memory_budget):
// the recompute then skips the q/k/v/o projections and the attention.
struct AttentionActs {
  ActBuf q, k, v, att, lse, x_mid;
  AttentionActs(Backend& be, MemCounter& mc, const LayerActsFloats& n)
      : q(be, mc, n.q), k(be, mc, n.k), v(be, mc, n.v), att(be, mc, n.att), lse(be, mc, n.lse), x_mid(be, mc, n.x_mid) {}
};

// One layer's intermediates, kept for its backward (sizes and shapes: train_memory.hpp's plan).
struct LayerActs {
  ActBuf h1, q, k, v, att, lse, x_mid, h2, g, u, a;
  LayerActs(Backend& be, MemCounter& mc, const LayerActsFloats& n)
      : h1(be, mc, n.h1), q(be, mc, n.q), k(be, mc, n.k), v(be, mc, n.v), att(be, mc, n.att), lse(be, mc, n.lse),
        x_mid(be, mc, n.x_mid), h2(be, mc, n.h2), g(be, mc, n.g), u(be, mc, n.u), a(be, mc, n.a) {}
  // This set, its attention half replaced by H's when given.
  LayerView view(const AttentionActs* H = nullptr) const {
    if (H) return {h1.f(), H->q.f(), H->k.f(), H->v.f(), H->att.f(), H->lse.f(), H->x_mid.f(), h2.f(), g.f(), u.f(), a.f()};
    return {h1.f(), q.f(), k.f(), v.f(), att.f(), lse.f(), x_mid.f(), h2.f(), g.f(), u.f(), a.f()};
  }
};

constexpr int kQkv[3] = {0, 1, 2}, kGateUp[2] = {4, 5};  // the projections sharing an input

// QLORA_LORA_GROUP=0 turns the grouped LoRA calls off (A/B runs); on otherwise.
bool lora_grouping_enabled() {
  const char* e = std::getenv("QLORA_LORA_GROUP");
  return !(e && std::string(e) == "0");
}

// QLORA_SKIP_LAST_RECOMPUTE=0 recomputes the last layer in the checkpointed backward too (A/B
// runs); skipped otherwise.
bool skip_last_recompute_enabled() {
  const char* e = std::getenv("QLORA_SKIP_LAST_RECOMPUTE");
  return !(e && std::string(e) == "0");
}

struct Pass {
  Backend& be;
  LlamaWeights& w;
  const float* inv_freq;  // [hd / 2]
  Dims d;
  const int32_t* pos;       // device [M]
  const int32_t* key_mask;  // device [B, T]
  LoraAdapter* ad;          // null: base model only
  float ad_scale;           // the adapter's runtime scale (set_adapter_scale)
  bool dropout;
  bool bf16;                // compute_dtype="bfloat16": base GEMMs, lm_head and attention in bf16 compute
  bool group;               // the LoRA of q/k/v and of gate/up through the grouped calls (lora_group)
  LoraBf16 lora_bf16 = bf16 ? lora_bf16_ops() : LoraBf16{};  // which LoRA GEMMs run bf16 (model/lora.hpp)
  float* t = nullptr;       // [M, r_max] LoRA scratch
  float* dt = nullptr;      // [M, r_max]
  float* xdrop = nullptr;   // [M, max(D, I, QD)] dropped-out LoRA input (dropout only)
  float* dtmp = nullptr;    // [M, max(D, I, QD)] LoRA input gradient before the mask (dropout only)
  // The checkpointed recompute's LoRA t, kept for the backward (lora_keep_t_enabled): keep is keep_cap
  // floats free while layer l recomputes and runs backward; kept[site] (0 q/k/v grouped, 1 o,
  // 2 gate/up grouped): the t written there and its [M, kept_r] width, null: the backward recomputes it.
  float* keep = nullptr;
  int64_t keep_cap = 0, keep_used = 0;
  float* kept[3] = {};
  int64_t kept_r[3] = {};
  // Where site's forward shrink writes t: a slot of keep when it may be kept, else dflt.
  float* keep_slot(int site, int64_t r, float* dflt) {
    // same bits only when the forward and backward shrinks are the same GEMM (QLORA_LORA_BF16)
    if (site < 0 || !keep || dropout || ad_scale == 0.0f || lora_bf16[kLoraShrink] != lora_bf16[kLoraBwdShrink] ||
        keep_used + d.M * r > keep_cap)
      return dflt;
    kept[site] = keep + keep_used, kept_r[site] = r, keep_used += d.M * r;
    return kept[site];
  }
  float* take_kept(int site, int64_t r) {  // the kept t of site when it has width r (used once)
    if (site < 0 || !kept[site] || kept_r[site] != r) return nullptr;
    float* k = kept[site];
    kept[site] = nullptr;
    return k;
  }

  DropoutKey key(int64_t l, int p) const { return {ad->seed, ad->micro_step, l, p, ad->dropout_row0 * d.T}; }

  LoraModule* lora(int64_t l, int p) const { return ad ? ad->at(l, p) : nullptr; }

  void lin_fwd(int64_t l, int p, const float* x, int64_t ldx, float* y, int64_t ldy, int site = -1) {
    const Linear& lin = proj(w.layers[l], p);
    LoraModule* lo = lora(l, p);
    float* t = lo ? keep_slot(site, lo->r, this->t) : this->t;
    if (lo && dropout) dropout_forward(be, key(l, p), ad->dropout, d.M, lin.in, x, ldx, xdrop);
    lin.forward(be, d.M, x, ldx, y, ldy, nullptr, nullptr, 0, nullptr, 1.0f, bf16);  // base (+ bias)
    if (lo && dropout) lora_forward(be, *lo, d.M, xdrop, lin.in, y, ldy, t, ad_scale, lora_bf16);
    else if (lo) lora_forward(be, *lo, d.M, x, ldx, y, ldy, t, ad_scale, lora_bf16);
  }

  // dx[M, in] = beta * dx + d(lin(x))/dx applied to dy; accumulates the LoRA factor gradients.
  void lin_bwd(int64_t l, int p, const float* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
               int64_t lddx, float beta, int site = -1) {
    const Linear& lin = proj(w.layers[l], p);
    lin.backward_input(be, d.M, dy, lddy, dx, lddx, beta, bf16);
    LoraModule* lo = lora(l, p);
    if (!lo) return;
    if (float* tk = dropout ? nullptr : take_kept(site, lo->r)) {
      lora_backward(be, *lo, d.M, x, ldx, dy, lddy, dx, lddx, 1.0f, tk, dt, ad_scale, lora_bf16, true);
      return;
    }
    if (dropout) {
      dropout_forward(be, key(l, p), ad->dropout, d.M, lin.in, x, ldx, xdrop);
      lora_backward(be, *lo, d.M, xdrop, lin.in, dy, lddy, dtmp, lin.in, 0.0f, t, dt, ad_scale, lora_bf16);
      dropout_backward_add(be, key(l, p), ad->dropout, d.M, lin.in, dtmp, dx, lddx);
    } else {
      lora_backward(be, *lo, d.M, x, ldx, dy, lddy, dx, lddx, 1.0f, t, dt, ad_scale, lora_bf16);
    }
  }

  // The adapted modules g[0..n) of projections ps[0..np) of layer l (gi: their index in ps) when
  // their LoRA runs grouped (lora_forward_group / lora_backward_group): at least two, A factors (and
  // with grads their dA) adjacent in the arena, and the [M, R] scratch within cap floats; else 0.
  // Grouping needs no dropout (each module would see its own dropped-out input).
  int lora_group(int64_t l, const int* ps, int np, bool grads, int64_t cap, LoraModule** g, int* gi) const {
    if (!group) return 0;
    int n = 0;
    for (int i = 0; i < np; ++i)
      if (LoraModule* m = lora(l, ps[i])) g[n] = m, gi[n++] = i;
    if (n < 2 || d.M * lora_rank_sum(g, n) > cap || !lora_group_adjacent(g, n, grads)) return 0;
    return n;
  }

  // lin_fwd of projections ps[0..n) sharing the input x, their LoRA grouped when lora_group allows:
  // the bases, then one shrink for all. scratch: cap floats free until the call returns.
  void lins_fwd(int64_t l, int n, const int* ps, const float* x, int64_t ldx, float* const* y, const int64_t* ldy,
                float* scratch, int64_t cap, int site = -1) {
    LoraModule* g[kMaxLoraGroup];
    int gi[kMaxLoraGroup];
    const int ng = lora_group(l, ps, n, false, cap, g, gi);
    if (ng != 0) scratch = keep_slot(site, lora_rank_sum(g, ng), scratch);
    // Grouped bf16 NF4 bases without bias: one call (the backend may round x once for all).
    bool many = ng != 0 && bf16 && n <= kMaxLoraGroup;
    const Nf4Ref* nw[kMaxLoraGroup];
    for (int i = 0; many && i < n; ++i) {
      const Linear& p = proj(w.layers[l], ps[i]);
      many = p.is_nf4 && p.bias.empty();
      nw[i] = &p.nf4;
    }
    if (many) be.nf4_gemm_nt_many_bf16(d.M, x, ldx, n, nw, y, ldy);
    for (int i = 0; i < n && !many; ++i) {
      if (ng == 0) {
        lin_fwd(l, ps[i], x, ldx, y[i], ldy[i]);
        continue;
      }
      proj(w.layers[l], ps[i]).forward(be, d.M, x, ldx, y[i], ldy[i], nullptr, nullptr, 0, nullptr, 1.0f, bf16);
    }
    if (ng == 0) return;
    float* gy[kMaxLoraGroup];
    int64_t gld[kMaxLoraGroup];
    for (int k = 0; k < ng; ++k) gy[k] = y[gi[k]], gld[k] = ldy[gi[k]];
    lora_forward_group(be, ng, g, d.M, x, ldx, gy, gld, scratch, ad_scale, lora_bf16);
  }

  // dx = beta * dx + the input gradients of projections ps[0..n) sharing the input x for dy[i],
  // accumulating their LoRA gradients; grouped as in lins_fwd. t, dt: cap floats each, free.
  void lins_bwd(int64_t l, int n, const int* ps, const float* x, int64_t ldx, float* const* dy, const int64_t* lddy,
                float* dx, int64_t lddx, float beta, float* t, float* dt, int64_t cap, int site = -1) {
    LoraModule* g[kMaxLoraGroup];
    int gi[kMaxLoraGroup];
    const int ng = lora_group(l, ps, n, true, cap, g, gi);
    float* tk = ng != 0 ? take_kept(site, lora_rank_sum(g, ng)) : nullptr;
    for (int i = 0; i < n; ++i) {
      if (ng == 0) {
        lin_bwd(l, ps[i], x, ldx, dy[i], lddy[i], dx, lddx, i == 0 ? beta : 1.0f);
        continue;
      }
      proj(w.layers[l], ps[i]).backward_input(be, d.M, dy[i], lddy[i], dx, lddx, i == 0 ? beta : 1.0f, bf16);
    }
    if (ng == 0) return;
    const float* gdy[kMaxLoraGroup];
    int64_t gld[kMaxLoraGroup];
    for (int k = 0; k < ng; ++k) gdy[k] = dy[gi[k]], gld[k] = lddy[gi[k]];
    lora_backward_group(be, ng, g, d.M, x, ldx, gdy, gld, dx, lddx, 1.0f, tk ? tk : t, dt, ad_scale, lora_bf16,
                        tk != nullptr);
  }

  float scale() const { return 1.0f / std::sqrt(static_cast<float>(d.hd)); }

  // The attention half of layer l's forward: q, k, v (RoPE'd), att, lse and x_mid = x_in + o(att)
  // into A, from A.h1 = input_norm(x_in).
  void attention_half(int64_t l, const float* x_in, const LayerView& A) {
    const int64_t M = d.M, D = d.D, QD = d.QD, KD = d.KD;
    {  // q, k, v; LoRA scratch: A.att, written only by the attention below
      float* y[3] = {A.q, A.k, A.v};
      const int64_t ldy[3] = {QD, KD, KD};
      lins_fwd(l, 3, kQkv, A.h1, D, y, ldy, A.att, M * QD, 0);
    }
    be.rope(M, d.Hq, d.hd, A.q, QD, pos, inv_freq);
    be.rope(M, d.Hkv, d.hd, A.k, KD, pos, inv_freq);
    if (bf16) {
      be.attention_train_bf16(d.B, d.T, d.Hq, d.Hkv, d.hd, A.q, QD, A.k, KD, A.v, KD, key_mask, scale(),
                              A.att, QD, A.lse);
    } else {
      be.attention_train(d.B, d.T, d.Hq, d.Hkv, d.hd, A.q, QD, A.k, KD, A.v, KD, key_mask, scale(),
                         A.att, QD, A.lse);
    }
    lin_fwd(l, 3, A.att, QD, A.x_mid, D, 1);
    be.add_inplace(M * D, x_in, A.x_mid);
  }

  // x_out[M, D] = layer l applied to x_in[M, D]; intermediates into A. recompute (the checkpointed
  // backward): the backward reads only A, so stop after the SwiGLU; the down projection (a quarter
  // of the base FLOPs) would only rewrite x_out, the next layer's input, which is already held.
  // attention_kept (with recompute): A's attention half (q, k, v, att, lse, x_mid) still holds this
  // layer's forward, so only input_norm (h1, for the q/k/v LoRA gradients) and the MLP half run; the
  // backward recomputes the q/k/v and o LoRA t that the skipped part would have kept.
  void layer_forward(int64_t l, const float* x_in, const LayerView& A, float* x_out, bool recompute = false,
                     bool attention_kept = false) {
    const LayerWeights& L = w.layers[l];
    const float eps = w.cfg.rms_norm_eps;
    const int64_t M = d.M, D = d.D, I = d.I;
    kept[0] = kept[1] = kept[2] = nullptr, keep_used = 0;  // nothing stale reaches a backward
    if (!recompute) keep = nullptr;                         // only the recompute's t is kept
    be.rmsnorm(M, D, x_in, L.input_norm.f32(), eps, A.h1);
    if (!(recompute && attention_kept)) attention_half(l, x_in, A);
    be.rmsnorm(M, D, A.x_mid, L.post_norm.f32(), eps, A.h2);
    {  // gate, up; LoRA scratch: A.a, written only by the SwiGLU below
      float* y[2] = {A.g, A.u};
      const int64_t ldy[2] = {I, I};
      lins_fwd(l, 2, kGateUp, A.h2, D, y, ldy, A.a, M * I, 2);
    }
    be.swiglu(M, I, A.g, I, A.u, I, A.a, I);
    if (recompute) return;
    lin_fwd(l, 6, A.a, I, x_out, D);
    be.add_inplace(M * D, A.x_mid, x_out);
  }

  // dres[M, D]: dL/d(layer output) in, dL/d(x_in) out. A is consumed (g, u overwritten).
  // Scratch: da[M, I], dh[M, D], datt/dq[M, QD], dk/dv[M, KD].
  void layer_backward(int64_t l, const float* x_in, const LayerView& A, float* dres, float* da, float* dh, float* datt,
                      float* dq, float* dk, float* dv) {
    const LayerWeights& L = w.layers[l];
    const float eps = w.cfg.rms_norm_eps;
    const int64_t M = d.M, D = d.D, I = d.I, QD = d.QD, KD = d.KD;
    // MLP block: x_out = x_mid + down(silu(gate(h2)) * up(h2)), h2 = post_norm(x_mid).
    lin_bwd(l, 6, A.a, I, dres, D, da, I, 0.0f);
    be.swiglu_backward(M, I, A.g, I, A.u, I, da, I, A.g, I, A.u, I);  // dg -> g, du -> u
    {  // gate, up; LoRA scratch: da (read by the SwiGLU backward above) and datt (written below)
      float* dy[2] = {A.g, A.u};
      const int64_t lddy[2] = {I, I};
      lins_bwd(l, 2, kGateUp, A.h2, D, dy, lddy, dh, D, 0.0f, da, datt, M * std::min(I, QD), 2);
    }
    be.rmsnorm_backward(M, D, A.x_mid, L.post_norm.f32(), eps, dh, dh);
    be.add_inplace(M * D, dh, dres);
    // Attention block: x_mid = x_in + o(attn(rope(q(h1)), rope(k(h1)), v(h1))), h1 = input_norm(x_in).
    lin_bwd(l, 3, A.att, QD, dres, D, datt, QD, 0.0f, 1);
    if (bf16)
      be.attention_train_backward_bf16(d.B, d.T, d.Hq, d.Hkv, d.hd, A.q, QD, A.k, KD, A.v, KD, key_mask,
                                       scale(), A.att, QD, A.lse, datt, QD, dq, QD, dk, KD, dv, KD);
    else
      be.attention_train_backward(d.B, d.T, d.Hq, d.Hkv, d.hd, A.q, QD, A.k, KD, A.v, KD, key_mask,
                                  scale(), A.att, QD, A.lse, datt, QD, dq, QD, dk, KD, dv, KD);
    be.rope_backward(M, d.Hq, d.hd, dq, QD, pos, inv_freq);
    be.rope_backward(M, d.Hkv, d.hd, dk, KD, pos, inv_freq);
    {  // q, k, v; LoRA scratch: da and datt (read by the attention backward above)
      float* dy[3] = {dq, dk, dv};
      const int64_t lddy[3] = {QD, KD, KD};
      lins_bwd(l, 3, kQkv, A.h1, D, dy, lddy, dh, D, 0.0f, da, datt, M * std::min(I, QD), 0);
    }
    be.rmsnorm_backward(M, D, x_in, L.input_norm.f32(), eps, dh, dh);
    be.add_inplace(M * D, dh, dres);
  }
};

}  // namespace

LlamaModel::LossResult LlamaModel::forward_backward(const int32_t* ids, const int32_t* mask, const int32_t* labels,
                                                    int64_t B, int64_t T, float grad_scale, bool training,
                                                    bool checkpointing, double activation_budget) {
  const AdapterUse use = active_use();  // adapter and scale held to the end of the pass
  check_arg(use.ad != nullptr, "forward_backward: no active adapter (add_adapter / set_active_adapter first)");
  check_arg(std::isfinite(grad_scale), "forward_backward: grad_scale must be finite");
  check_activation_budget(activation_budget);
  ensure_lora_grads(be_, *use.ad);  // first training use of the adapter: its gradients appear (zero) now
  return train_pass(use.ad.get(), use.scale, ids, mask, labels, B, T, grad_scale, training, checkpointing,
                    /*backward=*/true, activation_budget);
}

LlamaModel::LossResult LlamaModel::eval_loss(const int32_t* ids, const int32_t* mask, const int32_t* labels,
                                             int64_t B, int64_t T) {
  const AdapterUse use = active_use();
  return train_pass(use.ad.get(), use.scale, ids, mask, labels, B, T, 1.0f, false, true, /*backward=*/false);
}

LlamaModel::LossResult LlamaModel::train_pass(LoraAdapter* ad, float ad_scale, const int32_t* ids, const int32_t* mask,
                                              const int32_t* labels, int64_t B, int64_t T, float grad_scale,
                                              bool training, bool checkpointing, bool backward,
                                              double activation_budget) {
  std::shared_lock<std::shared_mutex> wl(weights_mu_);  // no merge while the pass reads the weights
  check_complete();
  const LlamaConfig& c = w_->cfg;
  check_arg(B >= 1 && T >= 1, "input_ids must be a non-empty [batch, seq] array");
  const Dims d{B, T, B * T, c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads, c.num_kv_heads,
               c.head_dim, c.q_dim(), c.kv_dim()};
  const int64_t M = d.M, D = d.D, V = d.V, nL = c.num_layers;
  for (int64_t i = 0; i < M; ++i) {
    check_arg(ids[i] >= 0 && ids[i] < V, "token id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
                                             " is out of range [0, " + std::to_string(V) + ")");
    check_arg(labels[i] == -100 || (labels[i] >= 0 && labels[i] < V),
              "label " + std::to_string(labels[i]) + " at index " + std::to_string(i) + " is out of range [0, " +
                  std::to_string(V) + ") and not -100");
  }
  if (c.sliding_window > 0)
    check_arg(T <= c.sliding_window, "sequence length " + std::to_string(T) + " exceeds sliding_window " +
                                         std::to_string(c.sliding_window) + " (not implemented)");
  // Positions as in forward(): cumsum(mask) - 1 for real tokens, 1 for padding.
  std::vector<int32_t> km(M, 1), pos(M);  // [B, T]
  for (int64_t b = 0; b < B; ++b) {
    int32_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      if (mask) km[i] = mask[i] != 0;
      pos[i] = km[i] ? n++ : 1;
    }
  }
  const bool dropout = training && ad && ad->dropout > 0.0f;
  require_training_ops(be_, c, backward, dropout);  // before any upload: names every op the backend lacks

  MemCounter mc;
  DeviceBuffer ids_d(be_, sizeof(int32_t) * M), pos_d(be_, sizeof(int32_t) * M), km_d(be_, sizeof(int32_t) * M);
  be_.upload(ids_d.data(), ids, sizeof(int32_t) * M);
  be_.upload(pos_d.data(), pos.data(), sizeof(int32_t) * M);
  be_.upload(km_d.data(), km.data(), sizeof(int32_t) * M);

  const bool bf16 = compute_bf16();
  Pass P{be_, *w_, inv_freq_.f32(), d, pos_d.data<int32_t>(), km_d.data<int32_t>(), ad, ad_scale, dropout, bf16,
         !dropout && lora_grouping_enabled()};
  // head_format q8_0: the embedding and lm_head are read as Q8_0 (never an fp32 copy on the device).
  // head_format f16 / bf16 likewise as 16-bit rows.
  const bool head_q8 = w_->head_q8_0(), head_h = w_->head_half();
  const bool keep_all = backward && !checkpointing;
  const bool offload = backward && checkpointing && offload_checkpoints();
  // Every buffer below is sized by the plan memory_model.py reports (one rule: train_memory.cpp).
  TrainShape shape{B, T, D, d.I, V, d.Hq, d.Hkv, d.hd, nL, ad ? std::max<int64_t>(ad->max_rank(), 1) : 1,
                   backward, checkpointing, offload, dropout, bf16, !be_.host_memory(),
                   head_h ? HeadRows::Half : head_q8 ? HeadRows::Q8_0 : HeadRows::F32, w_->tied_q8_0_unwidened(), {}};
  shape.activation_budget = activation_budget;
  shape.lm_head = be_.lm_head_extras(lm_head_call(shape));
  // A GGUF's tied Q8_0 token_embd whose fp32 table was never made: where the backend can
  // (Backend::lm_head_extras), the loss reads the Q8_0 rows, the same values and bits
  // (model/lm_loss.hpp), no 4-byte table (V x D x 4), whatever the number of loss chunks (CPU: bf16
  // packs the lm_head panels from them, fp32 decodes them into each GEMM's B panels; QLORA_F32_HEAD_Q8=0
  // widens); else lm_head_f32() makes the table.
  const bool q8_as_f32 = shape.loss_reads_q8_0_rows();
  const TrainMemoryPlan plan = train_memory_plan(shape);
  ActBuf t_buf(be_, mc, plan.lora_t), dt_buf(be_, mc, plan.lora_t);  // [M, r_max]
  ActBuf xdrop, dtmp;                                                 // [M, wide] (dropout only)
  P.t = t_buf.f(), P.dt = dt_buf.f();
  if (dropout) {
    xdrop = ActBuf(be_, mc, plan.dropout_buf), dtmp = ActBuf(be_, mc, plan.dropout_buf);
    P.xdrop = xdrop.f(), P.dtmp = dtmp.f();
  }

  // Forward. xs[l]: input of layer l [M, D] (xs[nL]: the last layer's output); without a
  // backward, or with the checkpoints offloaded (host[l] = input of layer l), only two alternate.
  const bool all_x = plan.num_x == nL + 1;
  const size_t xbytes = sizeof(float) * static_cast<size_t>(plan.x);
  OffloadStage host(*this, plan.offload_host);
  std::vector<ActBuf> xs(plan.num_x);
  for (auto& x : xs) x = ActBuf(be_, mc, plan.x);
  auto X = [&](int64_t l) { return xs[all_x ? l : l % 2].f(); };
  // Layers [first_kept, nL) keep their forward's intermediates in acts[l - first_kept] (all of them
  // without checkpointing; activation_memory_budget extends the checkpointed backward's kept last
  // layer downwards). The layers below share acts[0], the lowest kept layer's set: that layer's
  // forward writes it last, and after its backward it holds their recomputes, so k kept layers cost
  // k sets, not k + 1. Which layers are kept does not change the peak (every kept set is live when
  // the backward starts); the last ones make the shared set free, are freed first in the backward and
  // were written last (still in cache when the backward starts).
  const int64_t n_acts = plan.num_layer_acts, first_kept = backward ? nL - n_acts : nL;
  auto slot = [&](int64_t l) { return l > first_kept ? l - first_kept : 0; };
  std::vector<std::unique_ptr<LayerActs>> acts(n_acts);
  acts[0] = std::make_unique<LayerActs>(be_, mc, plan.layer);
  // Layers [first_att, first_kept) keep their attention half in atts[l - first_att] (allocated by
  // their forward, freed after their backward); the rest of their intermediates use acts[0], as the
  // recomputed layers do.
  const int64_t first_att = backward ? first_kept - plan.num_attention_kept : first_kept;
  std::vector<std::unique_ptr<AttentionActs>> atts(static_cast<size_t>(first_kept - first_att));
  auto att_of = [&](int64_t l) { return l >= first_att && l < first_kept ? atts[l - first_att].get() : nullptr; };
  // The gather reads a Q8_0 embedding's rows wherever the weights keep them (as forward() does: the
  // values of the fp32 table, which is never made for it, tied or not).
  if (head_h)
    be_.half_rows(w_->half_type(), M, D, w_->embed_h.data(), ids_d.data<int32_t>(), X(0));
  else if (w_->embed_is_q8_0())
    be_.q8_0_rows(M, D, w_->embed_q8.data(), ids_d.data<int32_t>(), X(0));
  else
    be_.embedding(M, D, w_->embed_f32(), ids_d.data<int32_t>(), X(0));
  // The checkpointed backward's kept layers run on the forward's intermediates (no recompute);
  // QLORA_SKIP_LAST_RECOMPUTE=0 recomputes the lowest of them too (acts[0]: at budget 0 the last layer).
  const bool recompute_first_kept = !keep_all && !skip_last_recompute_enabled();
  for (int64_t l = 0; l < nL; ++l) {
    if (slot(l) != 0) acts[slot(l)] = std::make_unique<LayerActs>(be_, mc, plan.layer);
    if (l >= first_att && l < first_kept) atts[l - first_att] = std::make_unique<AttentionActs>(be_, mc, plan.layer);
    if (offload) be_.offload(host.at(l, xbytes), X(l), xbytes);  // queued before X(l) is overwritten
    P.layer_forward(l, X(l), acts[slot(l)]->view(att_of(l)), X(l + 1));
  }
  if (!backward) acts[0].reset();
  ActBuf hF(be_, mc, plan.final_norm);  // [M, D] final-norm output, then its gradient
  be_.rmsnorm(M, D, X(nL), w_->norm.f32(), c.rms_norm_eps, hF.f());
  const CrossEntropyResult ce =
      head_h    ? lm_cross_entropy_half(be_, M, D, V, hF.f(), D, w_->half_type() == Backend::HalfType::BF16,
                                      w_->lm_head_half(), labels, grad_scale, backward ? hF.f() : nullptr, D,
                                      kCrossEntropyChunkRows, bf16)
      : head_q8 ? lm_cross_entropy_q8_0(be_, M, D, V, hF.f(), D, w_->lm_head_q8_0(), labels, grad_scale,
                                      backward ? hF.f() : nullptr, D, kCrossEntropyChunkRows, bf16)
      : q8_as_f32 ? lm_cross_entropy_q8_0_as_f32(be_, M, D, V, hF.f(), D, w_->embed_q8.data(), labels, grad_scale,
                                                 backward ? hF.f() : nullptr, D, kCrossEntropyChunkRows, bf16)
              : lm_cross_entropy(be_, M, D, V, hF.f(), D, w_->lm_head_f32(), labels, grad_scale,
                                 backward ? hF.f() : nullptr, D, kCrossEntropyChunkRows, bf16);
  mc.peak = std::max(mc.peak, mc.cur + ce.workspace_bytes);
  LossResult res{ce.loss_sum, ce.count, 0};
  if (backward) {
    float* dres = hF.f();  // [M, D] dL/d(residual stream)
    be_.rmsnorm_backward(M, D, X(nL), w_->norm.f32(), c.rms_norm_eps, dres, dres);
    ActBuf da(be_, mc, plan.bwd.da), dh(be_, mc, plan.bwd.dh), datt(be_, mc, plan.bwd.datt), dq(be_, mc, plan.bwd.dq),
        dk(be_, mc, plan.bwd.dk), dv(be_, mc, plan.bwd.dv);
    for (int64_t l = nL - 1; l >= 0; --l) {
      const AttentionActs* H = att_of(l);
      const LayerView A = acts[slot(l)]->view(H);
      float* x_in = X(l);
      float* x_out = offload ? xs[1].f() : X(l + 1);  // offload: X(nL) is no longer needed
      if (offload) be_.reload(x_in = xs[0].f(), host.at(l, xbytes), xbytes);
      // Recompute (bit-identical: same inputs, same ops) the layers below the kept ones: a kept
      // layer's forward was the last writer of its set (the down projection's LoRA and dropout
      // scratch, the final norm and the loss use their own buffers), so it still holds exactly what
      // the recompute would write.
      if (l < first_kept || (l == first_kept && recompute_first_kept)) {
        // x_out is dead here (layer l+1's backward is done; the recompute stops before the down
        // projection): it holds the recompute's LoRA t for this layer's backward.
        P.keep = ad && lora_keep_t_enabled() ? x_out : nullptr, P.keep_cap = plan.x;
        P.layer_forward(l, x_in, A, x_out, true, H != nullptr);
      }
      P.layer_backward(l, x_in, A, dres, da.f(), dh.f(), datt.f(), dq.f(), dk.f(), dv.f());
      if (slot(l) != 0) acts[slot(l)].reset();  // acts[0] stays: the recompute's set below
      if (H) atts[l - first_att].reset();
    }
    ++ad->micro_step;
  }
  be_.synchronize();
  res.peak_train_bytes = mc.peak;
  return res;
}

}  // namespace qlora::model
