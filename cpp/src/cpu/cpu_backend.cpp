// The CPU backend: host memory, kernels at one SIMD level.
#include "cpu/cpu_backend.hpp"

#include <cstdlib>
#include <cstring>
#include <new>

#include "cpu/gemm.hpp"
#include "cpu/lora_sgmv.hpp"
#include "cpu/nf4_gemv.hpp"
#include "cpu/ops_backward.hpp"
#include "cpu/ops_model.hpp"
#include "cpu/profile.hpp"
#include "cpu/q8_0.hpp"
#include "nf4/nf4_codec.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace qlora::cpu {

namespace {
constexpr size_t kAlign = 64;
// Buffers of at least this size (weights such as a [49152, 576] embedding / lm_head, KV caches)
// are 2 MiB aligned and advised for transparent huge pages: streaming 113 MB through 4 KiB pages
// each decode step cost ~0.8 ms of TLB misses (THP is often "madvise" only, as numpy knows).
constexpr size_t kHugeMin = size_t{4} << 20;
constexpr size_t kHuge = size_t{2} << 20;

using prof::Part;
using prof::Scope;
double d(int64_t v) { return static_cast<double>(v); }
double gemm_bytes(int64_t M, int64_t N, int64_t K) { return 4.0 * (d(M) * d(K) + d(N) * d(K) + d(M) * d(N)); }
double nf4_bytes(int64_t M, const Nf4Ref& W) { return d(W.rows) * d(W.cols) / 2 + 4.0 * d(M) * (d(W.rows) + d(W.cols)); }
}

CpuBackend::CpuBackend(SimdLevel level, bool follow_active) : level_(level), follow_active_(follow_active) {}

SimdLevel CpuBackend::level() const { return follow_active_ ? active_simd_level() : level_; }

std::string CpuBackend::name() const {
  return follow_active_ ? std::string("cpu") : std::string("cpu:") + simd_level_name(level_);
}

void* CpuBackend::alloc(size_t bytes) {
  if (bytes >= kHugeMin) {
    const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, size);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // advisory: failure (no THP) just keeps 4 KiB pages
#endif
    return p;
  }
  void* p = std::aligned_alloc(kAlign, ((bytes + kAlign - 1) / kAlign) * kAlign);
  if (!p && bytes) throw std::bad_alloc();
  return p;
}
void CpuBackend::free(void* p) { std::free(p); }
void CpuBackend::upload(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void CpuBackend::download(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }

void CpuBackend::gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  Scope sc(Part::GemmOther, "gemm_nt", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  cpu::gemm_nt(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  Scope sc(Part::GemmOther, "gemm_nn", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  cpu::gemm_nn(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                         const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  Scope sc(Part::GemmOther, "gemm_tn", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  cpu::gemm_tn(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::lora_segments(int64_t in, int64_t out, const float* x, int64_t ldx, int64_t n,
                               const LoraSegment* seg, float* y, int64_t ldy, float* t) {
  const LoraProblem p{in, out, x, ldx, n, seg, y, ldy};  // the scalar level too (bf16 copies' oracle)
  lora_segments_many(1, &p, t);
}
void CpuBackend::lora_segments_many(int64_t np, const LoraProblem* p, float* t) {
  const SimdLevel lv = level();
  if (lv == SimdLevel::Scalar) return cpu::lora_segments_scalar(np, p, t);  // the reference / bf16 oracle
  double flops = 0, bytes = 0;
  if (prof::enabled())
    for (int64_t i = 0; i < np; ++i)
      for (int64_t s = 0; s < p[i].n; ++s) {
        const LoraSegment& g = p[i].seg[s];
        flops += 2 * d(g.rows) * d(g.r) * d(p[i].in + p[i].out);
        bytes += 4 * d(g.r) * d(p[i].in + p[i].out);
      }
  Scope sc(Part::LoraFwd, "lora_segments", flops, bytes, np);
  cpu::lora_segments_many(lv, np, p, t);
}
void CpuBackend::nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                             float* Y, int64_t ldy) {
  Scope sc(Part::Nf4Fwd, "nf4_gemm_nt", 2 * d(M) * d(W.rows) * d(W.cols), nf4_bytes(M, W), M, W.rows, W.cols);
  cpu::nf4_gemm_nt(level(), M, alpha, X, ldx, W, beta, Y, ldy);
}
void CpuBackend::nf4_gemm_nt_many(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                                  float* const* Y, const int64_t* ldy) {
  double fl = 0, by = 0;
  for (int64_t i = 0; prof::enabled() && i < n; ++i) fl += 2 * d(M) * d(W[i]->rows) * d(W[i]->cols), by += nf4_bytes(M, *W[i]);
  Scope sc(Part::Nf4Fwd, "nf4_gemm_nt_many", fl, by, M, n, n ? W[0]->cols : 0);
  cpu::nf4_gemm_nt_many(level(), M, X, ldx, n, W, Y, ldy);
}
void CpuBackend::nf4_gemm_nt_many_lora(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                                       float* const* Y, const int64_t* ldy, const LoraProblem* lora, float* t) {
  // Decode shapes: the LoRA terms as tasks of the NF4 GEMV's job (one wake-up and join for both).
  bool fits = n >= 1 && M >= 1 && M <= cpu::kNf4GemvMaxM;
  for (int64_t i = 0; fits && i < n; ++i)
    fits = W[i]->cols == W[0]->cols && lora[i].x == X && lora[i].y == Y[i] && lora[i].out == W[i]->rows;
  cpu::SgmvFused plan;
  if (!fits || !plan.prepare(level(), n, lora)) return Backend::nf4_gemm_nt_many_lora(M, X, ldx, n, W, Y, ldy, lora, t);
  double fl = 0, by = 0;
  for (int64_t i = 0; prof::enabled() && i < n; ++i) {
    fl += 2 * d(M) * d(W[i]->rows) * d(W[i]->cols), by += nf4_bytes(M, *W[i]);
    for (int64_t s = 0; s < lora[i].n; ++s) {
      const LoraSegment& g = lora[i].seg[s];
      fl += 2 * d(g.rows) * d(g.r) * d(lora[i].in + lora[i].out);
      by += 4 * d(g.r) * d(lora[i].in + lora[i].out);
    }
  }
  Scope sc(Part::Nf4Fwd, "nf4_gemm_nt_many_lora", fl, by, M, n, W[0]->cols);
  cpu::GemvTail tail;
  tail.n_pre = plan.shrink_tasks();
  tail.pre = [](const void* c, int64_t i) { static_cast<const cpu::SgmvFused*>(c)->shrink(i); };
  tail.post = [](const void* c, int64_t w, int64_t r0, int64_t r1) {
    static_cast<const cpu::SgmvFused*>(c)->expand(w, r0, r1);
  };
  if (plan.after_form()) {  // cpu/lora_sgmv.hpp: factors prefetched during the GEMV, LoRA tasks after it
    tail.post = [](const void* c, int64_t w, int64_t r0, int64_t r1) {
      static_cast<const cpu::SgmvFused*>(c)->gemv_done(w, r0, r1);
    };
    tail.n_after = plan.after_tasks();
    tail.after = [](const void* c, int64_t i) { static_cast<const cpu::SgmvFused*>(c)->after(i); };
    tail.prefetch = [](const void* c, double f0, double f1, const char** lo, const char** hi, int max) {
      return static_cast<const cpu::SgmvFused*>(c)->prefetch(f0, f1, lo, hi, max);
    };
  }
  if (plan.local_form()) {  // cpu/lora_sgmv.hpp: each GEMV task adds the LoRA terms of its own columns
    tail.post = [](const void* c, int64_t w, int64_t r0, int64_t r1) {
      static_cast<const cpu::SgmvFused*>(c)->local_done(w, r0, r1);
    };
    tail.prefetch = [](const void* c, double f0, double f1, const char** lo, const char** hi, int max) {
      return static_cast<const cpu::SgmvFused*>(c)->local_prefetch(f0, f1, lo, hi, max);
    };
  }
  tail.ctx = &plan;
  cpu::nf4_gemv_nt_many_tail(level(), M, X, ldx, n, W, Y, ldy, tail);
}
void CpuBackend::nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta,
                             float* dX, int64_t lddx) {
  Scope sc(Part::Nf4Bwd, "nf4_gemm_nn", 2 * d(M) * d(W.rows) * d(W.cols), nf4_bytes(M, W), M, W.cols, W.rows);
  cpu::nf4_gemm_nn(level(), M, alpha, dY, lddy, W, beta, dX, lddx);
}
void CpuBackend::nf4_dequantize(const Nf4Ref& W, float* out) {
  Scope sc(Part::Other, "nf4_dequantize", 0, 4.5 * d(W.rows) * d(W.cols), W.rows, W.cols);
  nf4::dequantize(level(), W, out);
}
void CpuBackend::q8_0_gemm_nt(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W,
                              float* Y, int64_t ldy) {
  Scope sc(Part::Other, "q8_0_gemm_nt", 2 * d(M) * d(N) * d(K), d(N) * d(K) * 34 / 32 + 4 * d(M) * (d(N) + d(K)), M, N, K);
  cpu::q8_0_gemm_nt(level(), M, N, K, X, ldx, W, Y, ldy);
}
void CpuBackend::q8_0_rows(int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) {
  Scope sc(Part::Other, "q8_0_rows", 0, 5.0 * d(M) * d(K), M, K);
  cpu::q8_0_rows(level(), M, K, W, ids, out);
}

void CpuBackend::embedding(int64_t M, int64_t D, const float* table, const int32_t* ids, float* out) {
  Scope sc(Part::Elementwise, "embedding", 0, 8 * d(M) * d(D), M, D);
  ops::embedding(M, D, table, ids, out);
}
void CpuBackend::rmsnorm(int64_t M, int64_t D, const float* x, const float* w, float eps, float* out) {
  Scope sc(Part::Norm, "rmsnorm", 4 * d(M) * d(D), 8 * d(M) * d(D), M, D);
  ops::rmsnorm(level(), M, D, x, w, eps, out);
}
void CpuBackend::add_inplace(int64_t n, const float* x, float* y) {
  Scope sc(Part::Elementwise, "add_inplace", d(n), 12 * d(n), n);
  ops::add_inplace(n, x, y);
}
void CpuBackend::add_bias(int64_t M, int64_t N, const float* bias, float* y, int64_t ldy) {
  Scope sc(Part::Elementwise, "add_bias", d(M) * d(N), 8 * d(M) * d(N), M, N);
  ops::add_bias(M, N, bias, y, ldy);
}
void CpuBackend::rope(int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
                      const float* inv_freq) {
  Scope sc(Part::Rope, "rope", 3 * d(M) * d(n_heads) * d(head_dim), 8 * d(M) * d(n_heads) * d(head_dim), M, n_heads, head_dim);
  ops::rope(M, n_heads, head_dim, x, ldx, pos, inv_freq);
}
void CpuBackend::swiglu(int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out,
                        int64_t ldo) {
  Scope sc(Part::Swiglu, "swiglu", 5 * d(M) * d(N), 12 * d(M) * d(N), M, N);
  ops::swiglu(level(), M, N, gate, ldg, up, ldu, out, ldo);
}
void CpuBackend::kv_write(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache,
                          int64_t S_cap, int64_t start) {
  Scope sc(Part::Other, "kv_write", 0, 8 * d(B) * d(T) * d(H) * d(hd), B * T, H, hd);
  ops::kv_write(B, T, H, hd, x, ldx, cache, S_cap, start);
}
void CpuBackend::attention(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                           const float* k_cache, const float* v_cache, int64_t S_cap, int64_t start,
                           const int32_t* key_mask, float scale, float* out, int64_t ldo) {
  Scope sc(Part::AttnFwd, "attention", 4 * d(B) * d(Hq) * d(hd) * d(T) * (d(start) + (d(T) + 1) / 2), 8 * d(B) * d(Hkv) * d(hd) * (d(start) + d(T)), B, T, start);
  ops::attention(level(), B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
}

void CpuBackend::rmsnorm_backward(int64_t M, int64_t D, const float* x, const float* w, float eps, const float* dy,
                                  float* dx) {
  Scope sc(Part::Norm, "rmsnorm_backward", 8 * d(M) * d(D), 12 * d(M) * d(D), M, D);
  ops::rmsnorm_backward(level(), M, D, x, w, eps, dy, dx);
}
void CpuBackend::rope_backward(int64_t M, int64_t n_heads, int64_t head_dim, float* dx, int64_t ldx,
                               const int32_t* pos, const float* inv_freq) {
  Scope sc(Part::Rope, "rope_backward", 3 * d(M) * d(n_heads) * d(head_dim), 8 * d(M) * d(n_heads) * d(head_dim), M, n_heads, head_dim);
  ops::rope_backward(M, n_heads, head_dim, dx, ldx, pos, inv_freq);
}
void CpuBackend::swiglu_backward(int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
                                 const float* dout, int64_t ldd, float* dgate, int64_t lddg, float* dup,
                                 int64_t lddu) {
  Scope sc(Part::Swiglu, "swiglu_backward", 10 * d(M) * d(N), 20 * d(M) * d(N), M, N);
  ops::swiglu_backward(level(), M, N, gate, ldg, up, ldu, dout, ldd, dgate, lddg, dup, lddu);
}
void CpuBackend::attention_train(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                 int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                 const int32_t* key_mask, float scale, float* out, int64_t ldo, float* lse) {
  Scope sc(Part::AttnFwd, "attention_train", 2 * d(B) * d(Hq) * d(hd) * d(T) * (d(T) + 1), 4 * d(B) * d(T) * d(hd) * (2 * d(Hq) + 2 * d(Hkv)), B, T, Hq);
  ops::attention_train(level(), B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse);
}
void CpuBackend::attention_train_backward(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                          int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                          const int32_t* key_mask, float scale, const float* out, int64_t ldo,
                                          const float* lse, const float* dout, int64_t lddo, float* dq, int64_t lddq,
                                          float* dk, int64_t lddk, float* dv, int64_t lddv) {
  Scope sc(Part::AttnBwd, "attention_train_backward", 5 * d(B) * d(Hq) * d(hd) * d(T) * (d(T) + 1), 4 * d(B) * d(T) * d(hd) * (4 * d(Hq) + 4 * d(Hkv)), B, T, Hq);
  ops::attention_train_backward(level(), B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse, dout,
                                lddo, dq, lddq, dk, lddk, dv, lddv);
}
void CpuBackend::cross_entropy_rows(int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels,
                                    float grad_scale, bool want_grad, float* loss) {
  Scope sc(Part::CrossEntropy, "cross_entropy_rows", 4 * d(M) * d(V), (want_grad ? 8.0 : 4.0) * d(M) * d(V), M, V);
  ops::cross_entropy_rows(level(), M, V, logits, ldl, labels, grad_scale, want_grad, loss);
}

}  // namespace qlora::cpu
