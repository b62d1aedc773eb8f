// bf16-compute GEMM driver (cpu/gemm_bf16.hpp): the blocked GotoBLAS/BLIS loop of cpu/gemm.cpp
// with bf16-pair panels (half the bytes of fp32 panels, so KC doubles for the same cache use), the
// vdpbf16ps micro-kernel, and the scalar oracle. B "packing" is where NF4 weights are decoded:
// rows are decoded to fp32 with the AVX-512 NF4 decoder, then rounded to bf16 pairs.
#include "cpu/gemm_bf16.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "common/error.hpp"
#include "cpu/aligned_scratch.hpp"
#include "cpu/cache_info.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_checks.hpp"
#include "cpu/gemm_bf16_amx.hpp"
#include "cpu/gemm_bf16_drivers.hpp"
#include "cpu/gemm_bf16_kernels.hpp"
#include "cpu/gemm_kernels.hpp"
#include "cpu/gemm_scalar.hpp"
#include "cpu/gemv_f32.hpp"
#include "cpu/nf4_gemv_bf16.hpp"
#include "cpu/pack.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

namespace {

// ------------------------------------------------------------------ scalar oracle
// Products of bf16 values are exact in double; sums in double (the bound tests use is the
// rounding of the inputs plus fp32 accumulation in the kernels).
inline void store(float* c, double acc, float alpha, float beta) {
  *c = beta == 0.0f ? static_cast<float>(alpha * acc) : static_cast<float>(alpha * acc + beta * static_cast<double>(*c));
}
double r(float x) { return static_cast<double>(bf16_round(x)); }


// pack_b of the drivers: (j0, n, p0, kc, Bp) packs ceil(n / NR) panels, panel q at Bp + q * NR * kp.
// per_panel adapts a one-panel packer (n <= NR).
template <class F>
auto per_panel(F f) {
  return [f](int64_t j0, int64_t n, int64_t p0, int64_t kc, uint32_t* Bp) {
    const int64_t kp = ceil_div(kc, 2);
    for (int64_t q = 0; q * NR < n; ++q)
      f(j0 + q * NR, static_cast<int>(std::min<int64_t>(NR, n - q * NR)), p0, kc, Bp + q * NR * kp);
  };
}

// QLORA_BF16_PACK=direct: the B packers read their source as before (A/B measurements; same bits).
[[maybe_unused]] bool stream_b() {  // (unused where the AVX512-BF16 kernels are not built)
  const char* e = std::getenv("QLORA_BF16_PACK");
  return !(e && std::strcmp(e, "direct") == 0);
}

// QLORA_BF16_NF4_PACK=tmp: the NT NF4 B panels decoded to fp32 tmp, then rounded + transposed by
// pack_rows (A/B runs); default: pack_nf4_nt straight from the codes where K % blocksize == 0. Same
// fp32 products, same rounding: same panels.
[[maybe_unused]] bool nf4_direct() {
  const char* e = std::getenv("QLORA_BF16_NF4_PACK");
  return !(e && std::strcmp(e, "tmp") == 0);
}

// QLORA_BF16_NF4_NN_PACK=tmp (read per call): the NN NF4 B panels through fp32 tmp rows as before
// (A/B runs); default: pack_nf4_nn_pair straight from the codes where n, j0, N are multiples of 16.
// Same fp32 products, same rounding: same panels.
[[maybe_unused]] bool nn_direct() {
  const char* e = std::getenv("QLORA_BF16_NF4_NN_PACK");
  return !(e && std::strcmp(e, "tmp") == 0) && stream_b();
}

enum class Mode { Oracle, Bf16, F32 };
Mode mode(SimdLevel level) {
  if (level == SimdLevel::Scalar) return Mode::Oracle;
  return bf16_compute_available(level) ? Mode::Bf16 : Mode::F32;
}

// Task-grid weight of an NF4 B element (decode to fp32, round, pack) vs an A element (round,
// pack): fewer row splits, so each weight panel is decoded fewer times. 1 -> 3 measured on Zen 4
// (2 threads, loaded machine, best of 7, six SmolLM2 training shapes): mean 154 -> 171 GFLOP/s.
constexpr double kNf4BCost = 3.0;

#ifdef QLORA_X86  // the AVX512-BF16 kernel files are x86-only (CMakeLists.txt)
// QLORA_BF16_PACK_A=rows: A panels through the general pack_rows (A/B runs; same values).
bool join_a() {
  const char* e = std::getenv("QLORA_BF16_PACK_A");
  return !(e && std::strcmp(e, "rows") == 0);
}
auto pack_a_rows(const float* A, int64_t lda) {
  return [=, join = join_a()](int64_t i0, int mr, int64_t p0, int64_t kc, uint32_t* Ap, int W, bool amx) {
    if (join && amx) return bf16_amx::pack_a_rows_amx(A + i0 * lda + p0, lda, mr, kc, W, Ap), true;
    if (join && W == MR) return bf16_k::pack_a_panel_avx512bf16(A + i0 * lda + p0, lda, mr, kc, Ap), false;
    bf16_k::pack_rows_avx512bf16(A + i0 * lda + p0, lda, mr, kc, W, Ap);
    return false;
  };
}
// B [K, N] row-major (nn / tn): all panels of a call in one sweep over each row pair.
auto pack_b_cols(const float* B, int64_t ldb) {
  return [=](int64_t j0, int64_t n, int64_t p0, int64_t kc, uint32_t* Bp) {
    const int64_t kp = ceil_div(kc, 2);
    if (stream_b()) return bf16_k::pack_cols_panels_avx512bf16(B + p0 * ldb + j0, ldb, n, kc, Bp, NR * kp);
    for (int64_t q = 0; q * NR < n; ++q)
      bf16_k::pack_cols_avx512bf16(B + p0 * ldb + j0 + q * NR, ldb, static_cast<int>(std::min<int64_t>(NR, n - q * NR)),
                                   kc, NR, Bp + q * NR * kp);
  };
}
#endif
#ifdef QLORA_X86
// pack_b of nf4_gemm_nt_bf16 for W (s = log2 blocksize).
auto nf4_nt_pack_b(const Nf4Ref& W, int s) {
  const int64_t K = W.cols;
  const bool direct = nf4_direct() && K % W.blocksize == 0;
  return per_panel([W, s, K, direct](int64_t j0, int nr, int64_t p0, int64_t kc, uint32_t* Bp) {
    RunScales sc;
    int64_t k32 = 0;
    if (direct) {
      // Whole 32-k steps straight from the codes (every row meets its block boundaries
      // at the same k since K % blocksize == 0): the rows' absmax as scl[block][NR].
      k32 = kc / 32 * 32;
      const int64_t f0 = j0 * K + p0, nb = ((f0 + kc - 1) >> s) - (f0 >> s) + 1;
      float* scl = t_tmp.get<float>(static_cast<size_t>(nb * NR));
      for (int rr = 0; rr < NR; ++rr) {
        const float* v = rr < nr ? sc.fill(W, f0 + rr * K, kc, s) : nullptr;
        for (int64_t b = 0; b < nb; ++b) scl[b * NR + rr] = v ? v[b] : 0.0f;
      }
      if (k32 > 0) bf16_k::pack_nf4_nt_avx512bf16(W.packed, f0, K, nr, k32, scl, s, kNf4Codes, Bp);
      if (k32 == kc) return;
    }
    // Decode nr weight rows [j0, j0+nr) x columns [p0 + k32, p0+kc) to fp32 tmp, then round + pack.
    const int64_t kt = kc - k32;
    float* tmp = t_tmp.get<float>(static_cast<size_t>(NR * kt));
    for (int rr = 0; rr < nr; ++rr) {
      const int64_t f0 = (j0 + rr) * K + p0 + k32;
      gemm_k::nf4_decode_avx512(W.packed, f0, kt, sc.fill(W, f0, kt, s), s, kNf4Codes, tmp + rr * kt);
    }
    bf16_k::pack_rows_avx512bf16(tmp, kt, nr, kt, NR, Bp + (k32 / 2) * NR);
  });
}
#endif

}  // namespace

bool bf16_compute_available(SimdLevel level) {
#ifdef QLORA_X86
  return level == SimdLevel::Scalar || (level == SimdLevel::AVX512 && cpu_has_avx512_bf16());
#else
  return level == SimdLevel::Scalar;
#endif
}

float bf16_round(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7F800000u) == 0) {
    b &= 0x80000000u;  // zero or denormal: signed zero
  } else if ((b & 0x7FFFFFFFu) > 0x7F800000u) {
    b = (b | 0x00400000u) & 0xFFFF0000u;  // NaN: quiet, payload truncated
  } else {
    b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;  // RNE (overflow rounds to inf)
  }
  float y;
  std::memcpy(&y, &b, 4);
  return y;
}

void gemm_nt_bf16(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_dims(M, N, K, lda, K, ldb, K, ldc);
  switch (mode(level)) {
    case Mode::F32: return gemm_nt(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case Mode::Oracle:
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double acc = 0.0;
          for (int64_t k = 0; k < K; ++k) acc += r(A[i * lda + k]) * r(B[j * ldb + k]);
          store(&C[i * ldc + j], acc, alpha, beta);
        }
      return;
    case Mode::Bf16:
#ifdef QLORA_X86
      drive(M, N, K, alpha, beta, C, ldc, pack_a_rows(A, lda),
              per_panel([&](int64_t j0, int nr, int64_t p0, int64_t kc, uint32_t* Bp) {
                if (!stream_b()) return bf16_k::pack_rows_avx512bf16(B + j0 * ldb + p0, ldb, nr, kc, NR, Bp);
                // Stream the nr row runs one at a time (a transposing read of 32 rows at once defeats
                // the hardware prefetcher when B comes from DRAM, as the lm_head table does), then pack.
                float* tmp = t_tmp.get<float>(static_cast<size_t>(NR * kc));
                for (int r = 0; r < nr; ++r) std::memcpy(tmp + r * kc, B + (j0 + r) * ldb + p0, sizeof(float) * kc);
                bf16_k::pack_rows_avx512bf16(tmp, kc, nr, kc, NR, Bp);
              }));
#endif
      return;
  }
}

void gemm_nn_bf16(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_dims(M, N, K, lda, K, ldb, N, ldc);
  switch (mode(level)) {
    case Mode::F32: return gemm_nn(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case Mode::Oracle:
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double acc = 0.0;
          for (int64_t k = 0; k < K; ++k) acc += r(A[i * lda + k]) * r(B[k * ldb + j]);
          store(&C[i * ldc + j], acc, alpha, beta);
        }
      return;
    case Mode::Bf16:
#ifdef QLORA_X86
      drive(M, N, K, alpha, beta, C, ldc, pack_a_rows(A, lda), pack_b_cols(B, ldb));
#endif
      return;
  }
}

void gemm_tn_bf16(SimdLevel level, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  check_dims(M, N, K, lda, M, ldb, N, ldc);
  switch (mode(level)) {
    case Mode::F32: return gemm_tn(level, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    case Mode::Oracle:
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double acc = 0.0;
          for (int64_t k = 0; k < K; ++k) acc += r(A[k * lda + i]) * r(B[k * ldb + j]);
          store(&C[i * ldc + j], acc, alpha, beta);
        }
      return;
    case Mode::Bf16:
#ifdef QLORA_X86
      drive(
          M, N, K, alpha, beta, C, ldc,
          [&](int64_t i0, int mr, int64_t p0, int64_t kc, uint32_t* Ap, int W, bool) {
            bf16_k::pack_cols_avx512bf16(A + p0 * lda + i0, lda, mr, kc, W, Ap);
            return false;
          },
          pack_b_cols(B, ldb));
#endif
      return;
  }
}

void nf4_gemm_nt_bf16(SimdLevel level, int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W,
                      float beta, float* Y, int64_t ldy) {
  [[maybe_unused]] const int s = check_nf4(W);  // blocksize log2 (x86 kernels)
  const int64_t N = W.rows, K = W.cols;  // Y[M, N] = X[M, K] · W[N, K]ᵀ
  check_dims(M, N, K, ldx, K, K, K, ldy);
  switch (mode(level)) {
    case Mode::F32: return nf4_gemm_nt(level, M, alpha, X, ldx, W, beta, Y, ldy);
    case Mode::Oracle:
      for (int64_t i = 0; i < M; ++i)
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0.0;
          for (int64_t k = 0; k < K; ++k) acc += r(X[i * ldx + k]) * r(scalar::nf4_element(W, n * K + k));
          store(&Y[i * ldy + n], acc, alpha, beta);
        }
      return;
    case Mode::Bf16:
#ifdef QLORA_X86
      if (nf4_gemv_bf16_applies(level, M, W)) return nf4_gemv_bf16(M, alpha, X, ldx, W, beta, Y, ldy);  // decode
      drive(M, N, K, alpha, beta, Y, ldy, pack_a_rows(X, ldx), nf4_nt_pack_b(W, s), kNf4BCost);
#endif
      return;
  }
}

void nf4_gemm_nt_many_bf16(SimdLevel level, int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                           float* const* Y, const int64_t* ldy) {
  check_arg(n >= 0, "nf4 gemm many: negative weight count");
  for (int64_t i = 0; i < n; ++i) {
    check_nf4(*W[i]);
    check_dims(M, W[i]->rows, W[i]->cols, ldx, W[i]->cols, W[i]->cols, W[i]->cols, ldy[i]);
  }
#ifdef QLORA_X86
  // One shared_many() call: X's bf16 panels packed once for all n (q/k/v: once, not 3 times).
  // Only where each call alone would take shared() (same bits); else (and with
  // QLORA_BF16_NF4_MANY=0, A/B runs) one call each.
  const char* e = std::getenv("QLORA_BF16_NF4_MANY");
  bool one = n > 1 && n <= kNf4ManyMax && mode(level) == Mode::Bf16 && !(e && std::strcmp(e, "0") == 0);
  const Driver d = driver_choice();
  for (int64_t i = 0; one && i < n; ++i)
    one = W[i]->cols == W[0]->cols && !nf4_gemv_bf16_applies(level, M, *W[i]) &&
          (d == Driver::Shared || (d == Driver::Auto && 2.0 * M * W[i]->rows * W[i]->cols >= 4e6));
  if (one) {
    std::vector<decltype(nf4_nt_pack_b(*W[0], 0))> pb;
    pb.reserve(static_cast<size_t>(n));
    int64_t N[kNf4ManyMax];
    for (int64_t i = 0; i < n; ++i) pb.push_back(nf4_nt_pack_b(*W[i], check_nf4(*W[i]))), N[i] = W[i]->rows;
    shared_many(M, W[0]->cols, 1.0f, 0.0f, static_cast<int>(n), N, Y, ldy, pack_a_rows(X, ldx), pb.data());
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) nf4_gemm_nt_bf16(level, M, 1.0f, X, ldx, *W[i], 0.0f, Y[i], ldy[i]);
}

void nf4_gemm_nn_bf16(SimdLevel level, int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W,
                      float beta, float* dX, int64_t lddx) {
  [[maybe_unused]] const int s = check_nf4(W);  // blocksize log2 (x86 kernels)
  const int64_t N = W.cols, K = W.rows;  // dX[M, N] = dY[M, K] · W[K, N]
  check_dims(M, N, K, lddy, K, N, N, lddx);
  switch (mode(level)) {
    case Mode::F32: return nf4_gemm_nn(level, M, alpha, dY, lddy, W, beta, dX, lddx);
    case Mode::Oracle:
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double acc = 0.0;
          for (int64_t k = 0; k < K; ++k) acc += r(dY[i * lddy + k]) * r(scalar::nf4_element(W, k * N + j));
          store(&dX[i * lddx + j], acc, alpha, beta);
        }
      return;
    case Mode::Bf16:
#ifdef QLORA_X86
      drive(M, N, K, alpha, beta, dX, lddx, pack_a_rows(dY, lddy),
              [&](int64_t j0, int64_t n, int64_t p0, int64_t kc, uint32_t* Bp) {
                if (nn_direct() && n <= RunScales::kMaxLen && n % 16 == 0 && j0 % 16 == 0 && N % 16 == 0 &&
                    W.blocksize >= 32) {
                  // Row pairs straight from the codes (no fp32 tmp rows): the same values.
                  const int64_t kp = ceil_div(kc, 2);
                  RunScales sc0, sc1;
                  for (int64_t p = 0; p < kp; ++p) {
                    const int64_t fa = (p0 + 2 * p) * N + j0, fb = fa + N;
                    const bool two = 2 * p + 1 < kc;
                    bf16_k::pack_nf4_nn_pair_avx512bf16(W.packed, fa, fb, n, sc0.fill(W, fa, n, s),
                                                        two ? sc1.fill(W, fb, n, s) : nullptr, s, kNf4Codes,
                                                        Bp + p * NR, NR * kp);
                  }
                  return;
                }
                if (stream_b() && n <= RunScales::kMaxLen) {
                  // All n columns of a row pair at once: one decode call per row of the task's
                  // columns (not per 32), then round + interleave into the panels.
                  const int64_t kp = ceil_div(kc, 2);
                  float* tmp = t_tmp.get<float>(static_cast<size_t>(2 * n));  // rows 2p, 2p + 1
                  RunScales sc;
                  for (int64_t p = 0; p < kp; ++p) {
                    const int64_t rows = std::min<int64_t>(2, kc - 2 * p);
                    for (int64_t h = 0; h < rows; ++h) {
                      const int64_t f0 = (p0 + 2 * p + h) * N + j0;
                      gemm_k::nf4_decode_avx512(W.packed, f0, n, sc.fill(W, f0, n, s), s, kNf4Codes, tmp + h * n);
                    }
                    bf16_k::pack_cols_panels_avx512bf16(tmp, n, n, rows, Bp + p * NR, NR * kp);
                  }
                  return;
                }
                per_panel([&](int64_t j0, int nr, int64_t p0, int64_t kc, uint32_t* Bp) {
                // Rows p0..p0+kc of W, columns [j0, j0+nr): fp32 tmp [kc, NR], then round + interleave pairs.
                float* tmp = t_tmp.get<float>(static_cast<size_t>(NR * kc));
                RunScales sc;
                for (int64_t k = 0; k < kc; ++k) {
                  const int64_t f0 = (p0 + k) * N + j0;
                  gemm_k::nf4_decode_avx512(W.packed, f0, nr, sc.fill(W, f0, nr, s), s, kNf4Codes, tmp + k * NR);
                }
                bf16_k::pack_cols_avx512bf16(tmp, NR, nr, kc, NR, Bp);
                })(j0, n, p0, kc, Bp);
              },
              kNf4BCost);
#endif
      return;
  }
}

}  // namespace qlora::cpu
