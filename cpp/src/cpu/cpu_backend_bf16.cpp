// CpuBackend's bf16-compute GEMMs (backend.hpp, cpu/gemm_bf16.hpp), kept apart from
// cpu_backend.cpp. Times go to the same profile parts as the fp32 ops, under op names with "_bf16".
#include <cstdint>

#include "cpu/cpu_backend.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/gemm_bf16_skinny.hpp"
#include "cpu/ops_backward.hpp"
#include "cpu/ops_model.hpp"

#if __has_include("cpu/profile.hpp")
#include "cpu/profile.hpp"
#define QLORA_BF16_SCOPE(part, op, flops, bytes, a, b, c) \
  prof::Scope bf16_scope_(prof::Part::part, op, flops, bytes, a, b, c)
#else
#define QLORA_BF16_SCOPE(part, op, flops, bytes, a, b, c) (void)0
#endif

namespace qlora::cpu {

namespace {
double d(int64_t v) { return static_cast<double>(v); }
double gemm_bytes(int64_t M, int64_t N, int64_t K) { return 2.0 * (d(M) * d(K) + d(N) * d(K)) + 4.0 * d(M) * d(N); }
double nf4_bytes(int64_t M, const Nf4Ref& W) { return d(W.rows) * d(W.cols) / 2 + 4.0 * d(M) * (d(W.rows) + d(W.cols)); }
// N <= 16 (LoRA's rank in training) on the AVX512-BF16 path: the 28x16 kernel
// (cpu/gemm_bf16_skinny.hpp), same rounding; the scalar oracle, fp32 fallbacks and bad arguments
// (the check in cpu::gemm_*_bf16 raises) as before.
bool skinny(SimdLevel lv, SkinnyLayout l, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (N > kSkinnyMaxN || lv == SimdLevel::Scalar || !bf16_compute_available(lv)) return false;
  return gemm_bf16_skinny(l, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
}  // namespace

bool CpuBackend::has_bf16_compute() const { return bf16_compute_available(level()); }

void CpuBackend::gemm_nt_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  QLORA_BF16_SCOPE(GemmOther, "gemm_nt_bf16", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  if (skinny(level(), SkinnyLayout::NT, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  cpu::gemm_nt_bf16(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::gemm_nn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  QLORA_BF16_SCOPE(GemmOther, "gemm_nn_bf16", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  if (skinny(level(), SkinnyLayout::NN, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  cpu::gemm_nn_bf16(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::gemm_tn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  QLORA_BF16_SCOPE(GemmOther, "gemm_tn_bf16", 2 * d(M) * d(N) * d(K), gemm_bytes(M, N, K), M, N, K);
  if (skinny(level(), SkinnyLayout::TN, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  cpu::gemm_tn_bf16(level(), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void CpuBackend::nf4_gemm_nt_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                                  float* Y, int64_t ldy) {
  QLORA_BF16_SCOPE(Nf4Fwd, "nf4_gemm_nt_bf16", 2 * d(M) * d(W.rows) * d(W.cols), nf4_bytes(M, W), M, W.rows, W.cols);
  cpu::nf4_gemm_nt_bf16(level(), M, alpha, X, ldx, W, beta, Y, ldy);
}
void CpuBackend::nf4_gemm_nt_many_bf16(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                                       float* const* Y, const int64_t* ldy) {
  double fl = 0.0, by = 0.0;
  for (int64_t i = 0; i < n; ++i) fl += 2 * d(M) * d(W[i]->rows) * d(W[i]->cols), by += nf4_bytes(M, *W[i]);
  QLORA_BF16_SCOPE(Nf4Fwd, "nf4_gemm_nt_many_bf16", fl, by, M, n, n ? W[0]->cols : 0);
  (void)fl, (void)by;
  cpu::nf4_gemm_nt_many_bf16(level(), M, X, ldx, n, W, Y, ldy);
}
void CpuBackend::nf4_gemm_nn_bf16(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta,
                                  float* dX, int64_t lddx) {
  QLORA_BF16_SCOPE(Nf4Bwd, "nf4_gemm_nn_bf16", 2 * d(M) * d(W.rows) * d(W.cols), nf4_bytes(M, W), M, W.cols, W.rows);
  cpu::nf4_gemm_nn_bf16(level(), M, alpha, dY, lddy, W, beta, dX, lddx);
}

void CpuBackend::kv_write_bf16(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx,
                               uint16_t* cache, int64_t S_cap, int64_t start) {
  QLORA_BF16_SCOPE(Other, "kv_write_bf16", 0, 6 * d(B) * d(T) * d(H) * d(hd), B * T, H, hd);
  ops::kv_write_bf16(B, T, H, hd, x, ldx, cache, S_cap, start);
}
void CpuBackend::attention_kv_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                   int64_t ldq, const uint16_t* k_cache, const uint16_t* v_cache, int64_t S_cap,
                                   int64_t start, const int32_t* key_mask, float scale, float* out, int64_t ldo) {
  QLORA_BF16_SCOPE(AttnFwd, "attention_kv_bf16", 4 * d(B) * d(Hq) * d(hd) * d(T) * (d(start) + (d(T) + 1) / 2),
                   4 * d(B) * d(Hkv) * d(hd) * (d(start) + d(T)), B, T, start);
  ops::attention_bf16(level(), B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
}

void CpuBackend::attention_train_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                      int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                      const int32_t* key_mask, float scale, float* out, int64_t ldo, float* lse) {
  QLORA_BF16_SCOPE(AttnFwd, "attention_train_bf16", 2 * d(B) * d(Hq) * d(hd) * d(T) * (d(T) + 1),
                   4 * d(B) * d(T) * d(hd) * (2 * d(Hq) + 2 * d(Hkv)), B, T, Hq);
  ops::attention_train(level(), B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse, true);
}
void CpuBackend::attention_train_backward_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                                               const float* q, int64_t ldq, const float* k, int64_t ldk,
                                               const float* v, int64_t ldv, const int32_t* key_mask, float scale,
                                               const float* out, int64_t ldo, const float* lse, const float* dout,
                                               int64_t lddo, float* dq, int64_t lddq, float* dk, int64_t lddk,
                                               float* dv, int64_t lddv) {
  QLORA_BF16_SCOPE(AttnBwd, "attention_train_backward_bf16", 5 * d(B) * d(Hq) * d(hd) * d(T) * (d(T) + 1),
                   4 * d(B) * d(T) * d(hd) * (4 * d(Hq) + 4 * d(Hkv)), B, T, Hq);
  ops::attention_train_backward(level(), B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse,
                                dout, lddo, dq, lddq, dk, lddk, dv, lddv, true);
}

}  // namespace qlora::cpu
