#include "model/lora.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cpu/profile.hpp"
#include "model/lora_check.hpp"
#include "model/weights.hpp"

namespace qlora::model {

namespace {
const char* const kNames[kNumProj] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

uint64_t splitmix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The Philox stream of one (adapter seed, micro step, layer, projection): Backend::lora_dropout's
// seed. The pass's element (token i, feature j) takes stream position (token0 + i) * in + j.
uint64_t dropout_seed(const DropoutKey& k) {
  return splitmix(splitmix(splitmix(k.seed) ^ static_cast<uint64_t>(k.step)) ^
                  static_cast<uint64_t>(k.layer * kNumProj + k.proj));
}
uint64_t dropout_offset(const DropoutKey& k, int64_t in) {
  return static_cast<uint64_t>(k.token0) * static_cast<uint64_t>(in);
}
}  // namespace

const char* proj_name(int p) { return kNames[p]; }

int proj_index(const std::string& name) {
  for (int p = 0; p < kNumProj; ++p)
    if (name == kNames[p]) return p;
  return -1;
}

Linear& proj(LayerWeights& L, int p) {
  Linear* all[kNumProj] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
  return *all[p];
}

int64_t LoraAdapter::max_rank() const {
  int64_t r = 0;
  for (const auto& m : modules)
    if (m && m->r > r) r = m->r;
  return r;
}

std::vector<ArenaTensor> arena_tensors(const LoraAdapter& a) {
  // Projections grouped by their shared input: q/k/v read input_norm(x), gate/up post_norm(x).
  static const int kGroups[][3] = {{0, 1, 2}, {3, -1, -1}, {4, 5, -1}, {6, -1, -1}};
  std::vector<ArenaTensor> out;
  const size_t L = a.modules.size() / kNumProj;
  check_arg(L * kNumProj == a.modules.size(), "adapter: module table size is not a multiple of 7");
  for (size_t l = 0; l < L; ++l)
    for (const auto& g : kGroups)
      for (bool b : {false, true})
        for (int p : g)
          if (p >= 0)
            if (LoraModule* m = a.modules[l * kNumProj + p].get()) out.push_back({m, b});
  return out;
}

std::vector<train::ParamRef> LoraAdapter::params() const {
  std::vector<train::ParamRef> out;
  for (const ArenaTensor& t : arena_tensors(*this)) out.push_back({(t.is_b ? t.m->B : t.m->A).f32(), t.numel()});
  return out;
}

std::vector<train::ParamRef> LoraAdapter::grads(Backend& be) {
  ensure_lora_grads(be, *this);
  std::vector<train::ParamRef> out;
  for (const ArenaTensor& t : arena_tensors(*this)) out.push_back({t.is_b ? t.m->dB : t.m->dA, t.numel()});
  return out;
}

std::vector<size_t> LoraAdapter::peft_order() const {
  const std::vector<ArenaTensor> at = arena_tensors(*this);
  std::vector<size_t> out;
  for (const auto& m : modules)
    if (m)
      for (bool b : {false, true})
        for (size_t i = 0; i < at.size(); ++i)
          if (at[i].m == m.get() && at[i].is_b == b) out.push_back(i);
  return out;
}

int64_t LoraAdapter::num_params() const {
  int64_t n = 0;
  for (const auto& m : modules)
    if (m) n += m->r * m->in + m->out * m->r;
  return n;
}

std::unique_ptr<LoraModule> make_lora_module(Backend& be, int64_t r, int64_t in, int64_t out, float scaling,
                                             const float* A_host, const float* B_host) {
  check_arg(r >= 1 && in >= 1 && out >= 1, "LoRA module: r, in and out must be >= 1");
  auto m = std::make_unique<LoraModule>();
  m->r = r, m->in = in, m->out = out, m->scaling = scaling;
  m->A = DeviceBuffer(be, sizeof(float) * r * in);   // [r, in]
  m->B = DeviceBuffer(be, sizeof(float) * out * r);  // [out, r]
  set_lora_factors(be, *m, A_host, B_host);
  return m;
}

void set_lora_factors(Backend& be, LoraModule& m, const float* A_host, const float* B_host) {
  const int64_t na = m.r * m.in, nb = m.out * m.r;
  check_lora_factors(m.r, m.in, m.out, m.scaling, A_host, B_host, "LoRA");  // finite, not too large
  be.upload(m.A.data(), A_host, sizeof(float) * na);
  be.upload(m.B.data(), B_host, sizeof(float) * nb);
}

void pack_lora_params(Backend& be, LoraAdapter& a) {
  if (!a.param_arena.empty()) return;
  const int64_t n = a.num_params();
  if (n == 0) return;
  DeviceBuffer arena(be, sizeof(float) * n);
  float* p = arena.f32();
  for (const ArenaTensor& t : arena_tensors(a)) {
    DeviceBuffer* f = t.is_b ? &t.m->B : &t.m->A;
    be.copy(p, f->data(), f->bytes());  // device to device
    be.synchronize();  // before the old buffer is freed
    const size_t bytes = f->bytes();
    *f = DeviceBuffer::view(p, bytes);
    p += bytes / sizeof(float);
  }
  a.param_arena = std::move(arena);
}

void ensure_lora_grads(Backend& be, LoraAdapter& a) {
  if (a.grads_ready.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lk(a.grads_mu);
  if (a.grads_ready.load(std::memory_order_relaxed)) return;
  const int64_t n = a.num_params();
  DeviceBuffer arena(be, sizeof(float) * n);
  be.fill_zero(arena.data(), arena.bytes());
  float* p = arena.f32();
  for (const ArenaTensor& t : arena_tensors(a)) {
    (t.is_b ? t.m->dB : t.m->dA) = p;
    p += t.numel();
  }
  a.grad_arena = std::move(arena);
  a.grads_ready.store(true, std::memory_order_release);
}

void zero_lora_grads(Backend& be, LoraAdapter& a) {
  if (!a.grads_ready.load(std::memory_order_acquire)) return ensure_lora_grads(be, a);  // allocated as zeros
  be.fill_zero(a.grad_arena.data(), a.grad_arena.bytes());  // on the device: no host zeros uploaded
}

LoraBf16 lora_bf16_ops() {
  // Read per pass (cheap), so tests and A/B benches can flip it.
  const char* e = std::getenv("QLORA_LORA_BF16");
  const std::string v = e ? e : "";
  if (v.empty() || v == "0") return LoraBf16::mask(0);
  if (v == "1" || v == "all") return LoraBf16::mask(kLoraBf16All);
  if (v == "forward") return LoraBf16::mask(kLoraBf16Forward);
  if (v == "backward") return LoraBf16::mask(kLoraBf16Backward);
  static const struct {
    const char* name;
    unsigned op;
  } kOps[] = {{"shrink", kLoraShrink}, {"expand", kLoraExpand}, {"bwd_shrink", kLoraBwdShrink}, {"dt", kLoraDt},
              {"db", kLoraDB},         {"da", kLoraDA},         {"dx", kLoraDx}};
  unsigned ops = 0;
  size_t i = 0;
  while (i <= v.size()) {
    const size_t j = std::min(v.find(',', i), v.size());
    const std::string w = v.substr(i, j - i);
    bool found = false;
    for (const auto& o : kOps)
      if (w == o.name) ops |= o.op, found = true;
    check_arg(found, "QLORA_LORA_BF16='" + v +
                         "': expected 0, 1, all, forward, backward, or a comma list of shrink, expand, "
                         "bwd_shrink, dt, db, da, dx");
    i = j + 1;
  }
  return LoraBf16::mask(ops);
}

namespace {
// The LoRA GEMMs of one call: each the fp32 GEMM, or (its bit set) the backend's bf16-compute GEMM,
// which rounds both operands to bf16 (RNE) and accumulates in fp32. Factors, gradients and outputs
// stay fp32.
struct LoraGemm {
  Backend& be;
  LoraBf16 bf16;
  void nt(unsigned op, int64_t M, int64_t N, int64_t K, float al, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) const {
    if (bf16[op]) be.gemm_nt_bf16(M, N, K, al, A, lda, B, ldb, beta, C, ldc);
    else be.gemm_nt(M, N, K, al, A, lda, B, ldb, beta, C, ldc);
  }
  void nn(unsigned op, int64_t M, int64_t N, int64_t K, float al, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) const {
    if (bf16[op]) be.gemm_nn_bf16(M, N, K, al, A, lda, B, ldb, beta, C, ldc);
    else be.gemm_nn(M, N, K, al, A, lda, B, ldb, beta, C, ldc);
  }
  void tn(unsigned op, int64_t M, int64_t N, int64_t K, float al, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) const {
    if (bf16[op]) be.gemm_tn_bf16(M, N, K, al, A, lda, B, ldb, beta, C, ldc);
    else be.gemm_tn(M, N, K, al, A, lda, B, ldb, beta, C, ldc);
  }
};
}  // namespace

bool lora_keep_t_enabled() {
  const char* e = std::getenv("QLORA_LORA_KEEP_T");  // read per pass: A/B runs and tests flip it
  return !(e && std::string(e) == "0");
}

void lora_forward(Backend& be, const LoraModule& m, int64_t M, const float* x, int64_t ldx, float* y, int64_t ldy,
                  float* t, float scale, LoraBf16 bf16) {
  if (scale == 0.0f) return;  // scale 0: the adapter contributes nothing (exactly the base output)
  const prof::PartContext pc(prof::Part::LoraFwd);
  const LoraGemm g{be, bf16};  // its GEMMs are booked to LoRA (bench_train --breakdown)
  DeviceBuffer own;
  if (!t) {
    own = DeviceBuffer(be, sizeof(float) * M * m.r);  // [M, r]
    t = own.f32();
  }
  g.nt(kLoraShrink, M, m.r, m.in, 1.0f, x, ldx, m.A.f32(), m.in, 0.0f, t, m.r);  // t = x·Aᵀ
  g.nt(kLoraExpand, M, m.out, m.r, scale * m.scaling, t, m.r, m.B.f32(), m.r, 1.0f, y, ldy);  // y += s * t·Bᵀ
}

void lora_backward(Backend& be, LoraModule& m, int64_t M, const float* x, int64_t ldx, const float* dy, int64_t lddy,
                   float* dx, int64_t lddx, float beta, float* t, float* dt, float scale, LoraBf16 bf16,
                   bool t_ready) {
  const float s = scale * m.scaling;
  const prof::PartContext pc(prof::Part::LoraBwd);
  const LoraGemm g{be, bf16};
  if (!t_ready) g.nt(kLoraBwdShrink, M, m.r, m.in, 1.0f, x, ldx, m.A.f32(), m.in, 0.0f, t, m.r);  // t[M, r] = x·Aᵀ
  g.nn(kLoraDt, M, m.r, m.out, s, dy, lddy, m.B.f32(), m.r, 0.0f, dt, m.r);  // dt[M, r] = s * dy·B
  g.tn(kLoraDB, m.out, m.r, M, s, dy, lddy, t, m.r, 1.0f, m.dB, m.r);  // dB += s * dyᵀ·t
  g.tn(kLoraDA, m.r, m.in, M, 1.0f, dt, m.r, x, ldx, 1.0f, m.dA, m.in);  // dA += dtᵀ·x
  if (dx) g.nn(kLoraDx, M, m.in, m.r, 1.0f, dt, m.r, m.A.f32(), m.in, beta, dx, lddx);  // dx = beta*dx + dt·A
}

bool lora_group_adjacent(const LoraModule* const* m, int n, bool grads) {
  if (n < 1 || n > kMaxLoraGroup) return false;
  for (int i = 1; i < n; ++i) {
    const LoraModule& a = *m[i - 1];
    const LoraModule& b = *m[i];
    if (b.in != a.in || b.A.f32() != a.A.f32() + a.r * a.in) return false;
    if (grads && (!a.dA || b.dA != a.dA + a.r * a.in)) return false;
  }
  return true;
}

int64_t lora_rank_sum(const LoraModule* const* m, int n) {
  int64_t R = 0;
  for (int i = 0; i < n; ++i) R += m[i]->r;
  return R;
}

void lora_forward_group(Backend& be, int n, const LoraModule* const* m, int64_t M, const float* x, int64_t ldx,
                        float* const* y, const int64_t* ldy, float* t, float scale, LoraBf16 bf16) {
  if (scale == 0.0f) return;  // as lora_forward: the base output left bit-identical
  check_arg(lora_group_adjacent(m, n, false), "lora_forward_group: the A factors are not adjacent");
  const prof::PartContext pc(prof::Part::LoraFwd);
  const LoraGemm g{be, bf16};
  const int64_t R = lora_rank_sum(m, n), in = m[0]->in;
  g.nt(kLoraShrink, M, R, in, 1.0f, x, ldx, m[0]->A.f32(), in, 0.0f, t, R);  // t[M, R] = x·[A_0; ...]ᵀ: x read once
  for (int64_t i = 0, off = 0; i < n; off += m[i]->r, ++i)  // y_i += s_i * t_i·B_iᵀ
    g.nt(kLoraExpand, M, m[i]->out, m[i]->r, scale * m[i]->scaling, t + off, R, m[i]->B.f32(), m[i]->r, 1.0f, y[i],
         ldy[i]);
}

void lora_backward_group(Backend& be, int n, LoraModule* const* m, int64_t M, const float* x, int64_t ldx,
                         const float* const* dy, const int64_t* lddy, float* dx, int64_t lddx, float beta, float* t,
                         float* dt, float scale, LoraBf16 bf16, bool t_ready) {
  check_arg(lora_group_adjacent(m, n, true), "lora_backward_group: the A factors or their gradients are not adjacent");
  const prof::PartContext pc(prof::Part::LoraBwd);
  const LoraGemm g{be, bf16};
  const int64_t R = lora_rank_sum(m, n), in = m[0]->in;
  if (!t_ready) g.nt(kLoraBwdShrink, M, R, in, 1.0f, x, ldx, m[0]->A.f32(), in, 0.0f, t, R);  // t[M, R] = x·[A_0; ...]ᵀ
  for (int64_t i = 0, off = 0; i < n; off += m[i]->r, ++i) {
    const LoraModule& mi = *m[i];
    const float s = scale * mi.scaling;
    g.nn(kLoraDt, M, mi.r, mi.out, s, dy[i], lddy[i], mi.B.f32(), mi.r, 0.0f, dt + off, R);  // dt_i = s_i * dy_i·B_i
    g.tn(kLoraDB, mi.out, mi.r, M, s, dy[i], lddy[i], t + off, R, 1.0f, mi.dB, mi.r);  // dB_i += s_i * dy_iᵀ·t_i
  }
  g.tn(kLoraDA, R, in, M, 1.0f, dt, R, x, ldx, 1.0f, m[0]->dA, in);  // [dA_0; ...] += dtᵀ·x: x read once
  if (dx) g.nn(kLoraDx, M, in, R, 1.0f, dt, R, m[0]->A.f32(), in, beta, dx, lddx);  // dx = beta*dx + sum_i dt_i·A_i
}

void dropout_forward(Backend& be, const DropoutKey& k, float p, int64_t M, int64_t in, const float* x, int64_t ldx,
                     float* out) {
  be.lora_dropout(dropout_seed(k), dropout_offset(k, in), p, M, in, x, ldx, out);
}

void dropout_backward_add(Backend& be, const DropoutKey& k, float p, int64_t M, int64_t in, const float* g,
                          float* dx, int64_t lddx) {
  be.lora_dropout_backward(dropout_seed(k), dropout_offset(k, in), p, M, in, g, dx, lddx);
}

}  // namespace qlora::model
