// cpu/lm_head_bf16.hpp: the lm_head logits from bf16 panels packed once per call.
#include "cpu/lm_head_bf16.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "common/error.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/gemm_bf16_amx.hpp"
#include "cpu/aligned_scratch.hpp"
#include "cpu/gemm_bf16_kernels.hpp"
#include "cpu/gemm_bf16_skinny.hpp"
#include "cpu/lm_head_bf16_kernels.hpp"
#include "cpu/q8_0.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

namespace {
constexpr int MR = bf16_k::kMR, NR = bf16_k::kNR;
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The bf16 GEMM driver's depth block (cpu/gemm_bf16.cpp blocking(): twice the fp32 AVX-512 KC,
// a multiple of 32, at most RunScales::kMaxLen = 4096, cpu/gemm_checks.hpp, whose unused
// anonymous-namespace checks would warn here). D within one block: gemm_nt_bf16 runs the whole
// dot product of every logit as one micro-kernel call over ceil(D / 2) pairs, as here.
int64_t gemm_bf16_mc() {  // blocking().mc of the bf16 driver
  static const int64_t mc = std::max<int64_t>(MR, gemm_blocking_in_use(SimdLevel::AVX512).mc / MR * MR);
  return mc;
}

int64_t depth_block() {
  static const int64_t kc = [] {
    const GemmBlocking f = gemm_blocking_in_use(SimdLevel::AVX512);
    return std::min<int64_t>(4096, std::max<int64_t>(64, (2 * f.kc) / 32 * 32));
  }();
  return kc;
}

// per-thread A panels (one chunk's rows: 256 x 576 -> 295 KB), B panels, fp32 rows
thread_local AlignedScratch t_ap, t_tmp, t_bp;

// The micro-kernel gemm_nt_bf16 / gemm_nn_bf16 run (cpu/gemm_bf16_amx.hpp), chosen once per call as
// the driver does per task. Its A panels: the bf16_k packers' values; for AMX 16-row panels straight
// in the tile layout (bf16_amx::pack_a_rows_amx), as the driver's. The B panels are the same for
// both kernels. Per element the AMX kernel's sum depends only on the depth block (16-pair chunks from
// 0, then the epilogue), not on how rows are grouped into calls: the driver's bits.
using bf16_amx::Kernel;
constexpr int R16 = bf16_amx::kMR16;
int rows_of(Kernel uk) { return uk == Kernel::Avx512Bf16 ? MR : R16; }  // rows of an A panel
void pack_a_tiles(Kernel uk, int64_t M, const float* A, int64_t lda, int64_t k, uint32_t* Ap) {
  const int64_t kp = ceil_div(k, 2), R = rows_of(uk), m_tiles = ceil_div(M, R);
  parallel_for(ceil_div(m_tiles, 4), [&](int64_t t) {
    for (int64_t i = t * 4; i < std::min(m_tiles, (t + 1) * 4); ++i) {
      const int mr = static_cast<int>(std::min<int64_t>(R, M - i * R));
      if (uk == Kernel::Avx512Bf16) bf16_k::pack_a_panel_avx512bf16(A + i * R * lda, lda, mr, k, Ap + i * R * kp);
      else bf16_amx::pack_a_rows_amx(A + i * R * lda, lda, mr, k, R16, Ap + i * R * kp);
    }
  });
}
// AMX: rows [r0, r1) of the packed A (r0 a multiple of 16) against one B panel, 32 rows a call:
// C rows from row r0 (alpha 1).
void amx_rows(Kernel uk, int64_t kp, const uint32_t* Ap, int64_t r0, int64_t r1, const uint32_t* bp, float* C,
              int64_t ldc, float beta, int nr) {
  for (int64_t r = r0; r < r1; r += 2 * R16)
    bf16_amx::ukernel16(uk, kp, Ap + r * kp, bp, C + (r - r0) * ldc, ldc, 1.0f, beta,
                        static_cast<int>(std::min<int64_t>(2 * R16, r1 - r)), nr);
}
}  // namespace

bool lm_head_panels_apply(SimdLevel level, int64_t V, int64_t D) {
#ifdef QLORA_X86
  // (any bf16 micro-kernel: the B panels are the ones both the AVX512-BF16 and the AMX kernel read)
  if (level != SimdLevel::AVX512 || !bf16_compute_available(level)) return false;
  // V <= kSkinnyMaxN: gemm_nt_bf16 takes its skinny kernel (another summation order), so does this
  if (V <= kSkinnyMaxN || D < 1 || round_up(D, 32) > depth_block()) return false;
  const char* e = std::getenv("QLORA_BF16_HEAD_PANELS");
  return !(e && std::strcmp(e, "0") == 0);
#else
  (void)level, (void)V, (void)D;
  return false;
#endif
}

size_t lm_head_panels_bytes(int64_t V, int64_t D) {
  return static_cast<size_t>(ceil_div(V, NR)) * NR * static_cast<size_t>(ceil_div(D, 2)) * sizeof(uint32_t);
}

size_t lm_head_panels_workspace_bytes(SimdLevel level, int64_t N, int64_t D, int64_t V, int64_t chunk_rows,
                                      bool bf16, bool device) {
  if (!bf16 || device || N <= chunk_rows || !lm_head_panels_apply(level, V, D)) return 0;
  return lm_head_panels_bytes(V, D);
}

bool lm_head_q8_0_panels_apply(SimdLevel level, int64_t D, int64_t V, bool bf16, bool device, bool want_grad) {
  const char* e = std::getenv("QLORA_BF16_HEAD_Q8");  // "0": the caller widens the table (A/B, tests)
  if ((e && std::strcmp(e, "0") == 0) || !bf16 || device || D < 32 || D % 32 != 0) return false;
  return lm_head_panels_apply(level, V, D) && (!want_grad || lm_head_dh_from_panels(D));
}

namespace {
// Panels of E's rows, 32-row group q's fp32 rows written into tmp[nr, D] by rows(q, nr, tmp) first.
template <class Rows>
void pack_panels(int64_t V, int64_t D, uint32_t* P, const Rows& rows) {
#ifdef QLORA_X86
  const int64_t kp = ceil_div(D, 2), n_pan = ceil_div(V, NR);
  constexpr int64_t kGroup = 16;  // panels per task
  parallel_for(ceil_div(n_pan, kGroup), [&](int64_t t) {
    float* tmp = t_tmp.get<float>(static_cast<size_t>(NR * D));
    for (int64_t q = t * kGroup; q < std::min(n_pan, (t + 1) * kGroup); ++q) {
      const int nr = static_cast<int>(std::min<int64_t>(NR, V - q * NR));
      rows(q, nr, tmp);
      bf16_k::pack_rows_avx512bf16(tmp, D, nr, D, NR, P + q * NR * kp);  // rounded + transposed
    }
  });
#else
  (void)V, (void)D, (void)P, (void)rows;
  throw std::runtime_error("lm_head_pack_panels: no AVX512-BF16 kernels in this build");
#endif
}
}  // namespace

void lm_head_pack_panels(int64_t V, int64_t D, const float* E, int64_t lde, uint32_t* P) {
  // the rows copied one run at a time first (gemm_nt_bf16's streaming B packer: a transposing read
  // of 32 rows at once defeats the hardware prefetcher)
  pack_panels(V, D, P, [&](int64_t q, int nr, float* tmp) {
    for (int r = 0; r < nr; ++r) std::memcpy(tmp + r * D, E + (q * NR + r) * lde, sizeof(float) * D);
  });
}

void lm_head_pack_panels_q8_0(int64_t V, int64_t D, const void* E_q8, uint32_t* P) {
  check_arg(D >= kQ8_0Block && D % kQ8_0Block == 0, "lm_head_pack_panels_q8_0: D must be a positive multiple of 32");
  pack_panels(V, D, P, [&](int64_t q, int nr, float* tmp) {
    int32_t ids[NR];  // [nr] the group's rows
    for (int r = 0; r < nr; ++r) ids[r] = static_cast<int32_t>(q * NR + r);
    q8_0_rows(SimdLevel::AVX512, nr, D, E_q8, ids, tmp);
  });
}

void lm_head_logits_bf16(int64_t M, int64_t V, int64_t D, const float* h, int64_t ldh, const uint32_t* P, float* C,
                         int64_t ldc) {
#ifdef QLORA_X86
  if (M <= 0) return;
  const int64_t kp = ceil_div(D, 2), n_pan = ceil_div(V, NR);
  // A panels (h rounded to bf16 pairs) once, shared by all tasks: the same values as the bf16
  // driver's pack_a_rows.
  const Kernel uk = bf16_amx::kernel_choice();
  const int64_t m_tiles = ceil_div(M, rows_of(uk));
  uint32_t* Ap = t_ap.get<uint32_t>(static_cast<size_t>(m_tiles * rows_of(uk) * kp));
  pack_a_tiles(uk, M, h, ldh, D, Ap);
  const char* se = std::getenv("QLORA_BF16_HEAD_STREAM");
  const bool stream = !(se && std::strcmp(se, "0") == 0);
  constexpr int64_t kGroup = 8;
  if (uk != Kernel::Avx512Bf16) {  // AMX: every panel against 32 rows a call
    parallel_for(ceil_div(n_pan, kGroup), [&](int64_t t) {
      const bf16_amx::TileScope tiles(uk);  // configured once per task
      // streamed: each 32 x 32 tile into L1 first (the kernel's tile stores), then out by streaming stores
      alignas(64) float tile[2 * R16 * NR];
      for (int64_t q = t * kGroup; q < std::min(n_pan, (t + 1) * kGroup); ++q) {
        const uint32_t* bp = P + q * NR * kp;
        const int nr = static_cast<int>(std::min<int64_t>(NR, V - q * NR));
        if (!stream) {
          amx_rows(uk, kp, Ap, 0, M, bp, C + q * NR, ldc, 0.0f, nr);
          continue;
        }
        for (int64_t r = 0; r < M; r += 2 * R16) {
          const int mr = static_cast<int>(std::min<int64_t>(2 * R16, M - r));
          bf16_amx::ukernel16(uk, kp, Ap + r * kp, bp, tile, NR, 1.0f, 0.0f, mr, NR);
          lm_head_k::stream_tile_avx512(tile, NR, C + r * ldc + q * NR, ldc, mr, nr);
        }
      }
      if (stream) lm_head_k::store_fence();
    });
    return;
  }
  // Each task: a run of B panels, every row tile against each panel while the panel is in L1/L2.
  // Logits tiles by streaming stores (QLORA_BF16_HEAD_STREAM=0: the ordinary kernel, A/B; same bits).
  parallel_for(ceil_div(n_pan, kGroup), [&](int64_t t) {
    for (int64_t q = t * kGroup; q < std::min(n_pan, (t + 1) * kGroup); ++q) {
      const uint32_t* bp = P + q * NR * kp;
      const int nr = static_cast<int>(std::min<int64_t>(NR, V - q * NR));
      for (int64_t i = 0; i < m_tiles; ++i) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, M - i * MR));
        if (stream) lm_head_k::ukernel_stream_avx512bf16(kp, Ap + i * MR * kp, bp, C + i * MR * ldc + q * NR, ldc, mr, nr);
        else bf16_k::ukernel_avx512bf16(kp, Ap + i * MR * kp, bp, C + i * MR * ldc + q * NR, ldc, 1.0f, 0.0f, mr, nr);
      }
    }
    if (stream) lm_head_k::store_fence();  // the streamed lines visible before the task counts as done
  });
#else
  (void)M, (void)V, (void)D, (void)h, (void)ldh, (void)P, (void)C, (void)ldc;
  throw std::runtime_error("lm_head_logits_bf16: no AVX512-BF16 kernels in this build");
#endif
}

bool lm_head_dh_from_panels(int64_t D) {
  if (D <= kSkinnyMaxN) return false;  // gemm_nn_bf16's skinny kernel: keep its bits
  const char* e = std::getenv("QLORA_BF16_HEAD_NN");
  return !(e && std::strcmp(e, "0") == 0);
}

void lm_head_dh_bf16(int64_t M, int64_t V, int64_t D, const float* G, int64_t ldg, const uint32_t* P, float* dh,
                     int64_t lddh) {
#ifdef QLORA_X86
  if (M <= 0) return;
  // The bf16 driver's depth split over K = V (cpu/gemm_bf16.cpp blocked() / shared()): balanced
  // blocks of at most depth_block(), multiples of 32, so each block starts on an NT panel.
  const int64_t kcb = depth_block();
  const int64_t kc = std::min(round_up(V, 32), round_up(ceil_div(V, ceil_div(V, kcb)), 32));
  const Kernel uk = bf16_amx::kernel_choice();
  const int64_t kpd = ceil_div(D, 2), n_pan = ceil_div(D, NR), R = rows_of(uk), m_tiles = ceil_div(M, R);
  uint32_t* Ap = t_ap.get<uint32_t>(static_cast<size_t>(m_tiles * R * (kc / 2)));
  // Each task builds its column panel right before using it (into its own L2-sized buffer: the
  // block's A panels stay in L2); QLORA_BF16_HEAD_NN_BUILD=all (read per call): every panel of the
  // block first, into one buffer (A/B runs; same panels, same calls).
  const char* be = std::getenv("QLORA_BF16_HEAD_NN_BUILD");
  const bool all = be && std::strcmp(be, "all") == 0;
  uint32_t* Bp = all ? t_bp.get<uint32_t>(static_cast<size_t>(n_pan * NR * (kc / 2))) : nullptr;
  for (int64_t pc = 0; pc < V; pc += kc) {
    const int64_t kcur = std::min(kc, V - pc), kp = ceil_div(kcur, 2);
    const float beta = pc == 0 ? 0.0f : 1.0f;
    pack_a_tiles(uk, M, G + pc, ldg, kcur, Ap);  // G's rows rounded to pairs (pack_a_rows' values)
    // Column panel j = columns 32j.. (pairs 16j..) of rows pc.., from the NT panels of those rows.
    const auto build = [&](int64_t j, uint32_t* bj) {
      for (int64_t q0 = 0; 16 * q0 < kp; ++q0)
        lm_head_k::nt_to_nn_panel_avx512(P + (pc / NR + q0) * NR * kpd, kpd, 16 * j,
                                         static_cast<int>(std::min<int64_t>(16, kp - 16 * q0)), bj + 16 * q0 * NR);
    };
    if (all) parallel_for(n_pan, [&](int64_t j) { build(j, Bp + j * NR * kp); });
    // Row blocks of the driver's MC (the A block and one B panel in L2), every panel, every tile.
    const int64_t mc = round_up(ceil_div(M, ceil_div(M, gemm_bf16_mc())), uk == Kernel::Avx512Bf16 ? MR : 2 * R16);
    parallel_for(n_pan, [&](int64_t j) {
      uint32_t* bj = all ? Bp + j * NR * kp : t_bp.get<uint32_t>(static_cast<size_t>(NR * (kc / 2)));
      if (!all) build(j, bj);
      const bf16_amx::TileScope tiles(uk);  // AMX: tiles configured once per task
      const int nr = static_cast<int>(std::min<int64_t>(NR, D - j * NR));
      for (int64_t ic = 0; ic < M; ic += mc) {
        if (uk != Kernel::Avx512Bf16) {
          amx_rows(uk, kp, Ap, ic, std::min(M, ic + mc), bj, dh + ic * lddh + j * NR, lddh, beta, nr);
          continue;
        }
        for (int64_t i = ic / MR; i < std::min(m_tiles, (ic + mc) / MR); ++i)
          bf16_k::ukernel_avx512bf16(kp, Ap + i * MR * kp, bj, dh + i * MR * lddh + j * NR, lddh, 1.0f,
                                     beta, static_cast<int>(std::min<int64_t>(MR, M - i * MR)), nr);
      }
    });
  }
#else
  (void)M, (void)V, (void)D, (void)G, (void)ldg, (void)P, (void)dh, (void)lddh;
  throw std::runtime_error("lm_head_dh_bf16: no AVX512-BF16 kernels in this build");
#endif
}

}  // namespace qlora::cpu
