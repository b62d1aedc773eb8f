// fp32 lm_head GEMMs over Q8_0 rows without the fp32 table (see q8_0_head.hpp for why the bits are
// those of gemm_nt / gemm_nn over the table).
#include "cpu/q8_0_head.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/aligned_scratch.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemv_f32.hpp"
#include "cpu/q8_0_kernels.hpp"

namespace qlora::cpu {

namespace {

Q8DecodeTileFn decode_for(SimdLevel level) {
#ifdef QLORA_X86  // the AVX files are compiled on x86 only
  if (level == SimdLevel::AVX512) return q8_0_decode_tile_avx512;
  if (level == SimdLevel::AVX2) return q8_0_decode_tile_avx2;
#else
  (void)level;
#endif
  return q8_0_decode_tile_generic;
}

struct Head {
  const uint8_t* E;
  int64_t D;
  Q8DecodeTileFn decode;
  const GemmPanels* gp;
};

thread_local AlignedScratch t_rows;  // the decoded rows of a logits B panel [nr, kc], or a GEMV block [rows, D]

// logits' B = deq(E)ᵀ: panel columns j0.. are rows of E, decoded [nr, kc] then transposed as
// gemm_nt transposes rows of its table (the same panel).
void pack_logits(const void* ctx, int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) {
  const Head& c = *static_cast<const Head*>(ctx);
  float* rows = t_rows.get<float>(static_cast<size_t>(nr * kc));
  c.decode(c.E, c.D, j0, nr, p0, kc, kc, rows, kc);
  c.gp->pack_b_t(rows, kc, nr, kc, Bp);
}

// dh's B = deq(E): panel row k is columns [j0, j0 + nr) of row p0 + k of E, decoded in place.
void pack_dh(const void* ctx, int64_t j0, int nr, int64_t p0, int64_t kc, float* Bp) {
  const Head& c = *static_cast<const Head*>(ctx);
  c.decode(c.E, c.D, p0, kc, j0, nr, c.gp->nr, Bp, c.gp->nr);
}

}  // namespace

bool q8_0_head_f32_applies(SimdLevel level, int64_t D) {
  const char* e = std::getenv("QLORA_F32_HEAD_Q8");  // "0": the caller widens the table (A/B, tests)
  return !(e && std::strcmp(e, "0") == 0) && level != SimdLevel::Scalar && D >= 32 && D % 32 == 0;
}

void q8_0_head_logits_f32(SimdLevel level, int64_t M, int64_t V, int64_t D, const float* h, int64_t ldh,
                          const void* E, float* logits, int64_t ldl) {
  const Head c{static_cast<const uint8_t*>(E), D, decode_for(level), &gemm_panels(level)};
  if (M > kGemvF32MaxM) return gemm_packed_b(level, M, V, D, 1.0f, h, ldh, {pack_logits, &c}, 0.0f, logits, ldl);
  // gemm_nt's GEMV route (a pass's last few rows, eval_loss of a short batch): ~256 KiB of rows at a time
  const int64_t nb = std::min(V, std::max<int64_t>(16, (int64_t{1} << 16) / D));
  for (int64_t v0 = 0; v0 < V; v0 += nb) {
    const int64_t n = std::min(nb, V - v0);
    float* rows = t_rows.get<float>(static_cast<size_t>(n * D));  // [n, D]
    c.decode(c.E, D, v0, n, 0, D, D, rows, D);
    gemm_nt(level, M, n, D, 1.0f, h, ldh, rows, D, 0.0f, logits + v0, ldl);
  }
}

void q8_0_head_dh_f32(SimdLevel level, int64_t M, int64_t V, int64_t D, const float* dlogits, int64_t ldl,
                      const void* E, float* dh, int64_t lddh) {
  const Head c{static_cast<const uint8_t*>(E), D, decode_for(level), &gemm_panels(level)};
  gemm_packed_b(level, M, D, V, 1.0f, dlogits, ldl, {pack_dh, &c}, 0.0f, dh, lddh);
}

}  // namespace qlora::cpu
