// CpuBackend's lm_head for the chunked LM loss (model/lm_loss.cpp): lm_head_extras says what a call
// allocates beyond the logits chunk at this backend's level and whether a tied Q8_0 token_embd's
// rows can stand in for the fp32 table; lm_head_begin makes that layout. Both from route() (one rule
// for the loss, the model and the plan):
//   bf16 over an fp32 table, several chunks: its bf16 panels packed once (cpu/lm_head_bf16.hpp);
//   bf16 over Q8_0 rows: the same panels packed from the rows, even for one chunk;
//   fp32 over Q8_0 rows: each GEMM decodes the rows into its B panels (cpu/q8_0_head.hpp), no scratch.
#include <memory>

#include "common/error.hpp"
#include "cpu/cpu_backend.hpp"
#include "cpu/lm_head_bf16.hpp"
#include "cpu/profile.hpp"
#include "cpu/q8_0_head.hpp"

namespace qlora::cpu {

namespace {

enum class Route { None, Panels, Q8Decode };
struct RouteBytes {
  Route route = Route::None;
  size_t bytes = 0;  // the layout's scratch
};

RouteBytes route(SimdLevel lv, const Backend::LmHeadCall& c, bool q8_0_rows) {
  if (c.N <= 0 || c.chunk_rows < 1) return {};
  if (!q8_0_rows) {  // bf16 over an fp32 table: its panels, packed once when there are several chunks
    const size_t b = lm_head_panels_workspace_bytes(lv, c.N, c.D, c.V, c.chunk_rows, c.bf16, false);
    return b > 0 ? RouteBytes{Route::Panels, b} : RouteBytes{};
  }
  if (!c.bf16 && q8_0_head_f32_applies(lv, c.D)) return {Route::Q8Decode, 0};
  if (c.bf16 && lm_head_q8_0_panels_apply(lv, c.D, c.V, true, false, c.want_grad))
    return {Route::Panels, lm_head_panels_bytes(c.V, c.D)};
  return {};
}

double gemm_flops(int64_t m, int64_t V, int64_t D) {
  return 2.0 * static_cast<double>(m) * static_cast<double>(V) * static_cast<double>(D);
}
// Bytes a chunk's GEMM reads: the table at `per_weight` bytes a weight, and the [m, V] logits.
double gemm_bytes(int64_t m, int64_t V, int64_t D, double per_weight) {
  return per_weight * static_cast<double>(V) * static_cast<double>(D) + 4.0 * static_cast<double>(m) * V;
}

// bf16 compute from E's packed NT panels: logits from them, dh from them too where
// lm_head_dh_from_panels(D) (else gemm_nn_bf16 over the fp32 table, which Q8_0 rows never need:
// route() asked for the dh from the panels).
class PanelsHead final : public Backend::LmHead {
 public:
  PanelsHead(CpuBackend& be, const Backend::LmHeadCall& c, const void* E, bool q8_0_rows, size_t b)
      : be_(be), V_(c.V), D_(c.D), E_(q8_0_rows ? nullptr : static_cast<const float*>(E)) {
    bytes = b;
    P_ = static_cast<uint32_t*>(be.alloc(b));
    const prof::Scope sc(prof::Part::GemmOther, "lm_head_pack_bf16", 0.0,
                         static_cast<double>(V_) * static_cast<double>(D_) * (q8_0_rows ? 3.0625 : 6.0), V_, D_, 0);
    if (q8_0_rows) lm_head_pack_panels_q8_0(V_, D_, E, P_);
    else lm_head_pack_panels(V_, D_, E_, D_, P_);
  }
  ~PanelsHead() override { be_.free(P_); }
  void logits(int64_t m, const float* h, int64_t ldh, float* out, int64_t ldl) override {
    const prof::Scope sc(prof::Part::GemmOther, "lm_head_nt_bf16", gemm_flops(m, V_, D_), gemm_bytes(m, V_, D_, 2.0),
                         m, V_, D_);
    lm_head_logits_bf16(m, V_, D_, h, ldh, P_, out, ldl);
  }
  void dh(int64_t m, const float* G, int64_t ldg, float* dh, int64_t lddh) override {
    if (!lm_head_dh_from_panels(D_)) {
      check_arg(E_ != nullptr, "lm_cross_entropy_q8_0_as_f32: the dh cannot come from the panels");
      be_.gemm_nn_bf16(m, D_, V_, 1.0f, G, ldg, E_, D_, 0.0f, dh, lddh);
      return;
    }
    const prof::Scope sc(prof::Part::GemmOther, "lm_head_nn_bf16", gemm_flops(m, V_, D_), gemm_bytes(m, V_, D_, 2.0),
                         m, D_, V_);
    lm_head_dh_bf16(m, V_, D_, G, ldg, P_, dh, lddh);
  }

 private:
  CpuBackend& be_;
  int64_t V_, D_;
  const float* E_;  // the fp32 table (null: Q8_0 rows)
  uint32_t* P_ = nullptr;
};

// fp32 over Q8_0 rows: both GEMMs decode the rows into their B panels (the bits of gemm_nt / gemm_nn
// over the fp32 table).
class Q8DecodeHead final : public Backend::LmHead {
 public:
  Q8DecodeHead(SimdLevel lv, const Backend::LmHeadCall& c, const void* E) : lv_(lv), V_(c.V), D_(c.D), E_(E) {}
  void logits(int64_t m, const float* h, int64_t ldh, float* out, int64_t ldl) override {
    const prof::Scope sc(prof::Part::GemmOther, "q8_head_gemm_nt", gemm_flops(m, V_, D_),
                         gemm_bytes(m, V_, D_, 1.0625), m, V_, D_);
    q8_0_head_logits_f32(lv_, m, V_, D_, h, ldh, E_, out, ldl);
  }
  void dh(int64_t m, const float* G, int64_t ldg, float* dh, int64_t lddh) override {
    const prof::Scope sc(prof::Part::GemmOther, "q8_head_gemm_nn", gemm_flops(m, V_, D_),
                         gemm_bytes(m, V_, D_, 1.0625), m, D_, V_);
    q8_0_head_dh_f32(lv_, m, V_, D_, G, ldg, E_, dh, lddh);
  }

 private:
  SimdLevel lv_;
  int64_t V_, D_;
  const void* E_;  // V Q8_0 rows of D
};

}  // namespace

Backend::LmHeadExtras CpuBackend::lm_head_extras(const LmHeadCall& c) const {
  LmHeadExtras e;
  e.f32_table_bytes = route(level(), c, false).bytes;
  const RouteBytes q = route(level(), c, true);
  e.q8_0_rows = q.route != Route::None;
  e.q8_0_rows_bytes = q.bytes;
  return e;
}

std::unique_ptr<Backend::LmHead> CpuBackend::lm_head_begin(const LmHeadCall& c, const void* E, bool q8_0_rows) {
  const RouteBytes r = route(level(), c, q8_0_rows);
  if (r.route == Route::Panels) return std::make_unique<PanelsHead>(*this, c, E, q8_0_rows, r.bytes);
  if (r.route == Route::Q8Decode) return std::make_unique<Q8DecodeHead>(level(), c, E);
  return nullptr;
}

}  // namespace qlora::cpu
