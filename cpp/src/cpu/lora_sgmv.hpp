// Multi-adapter LoRA terms on the CPU (Backend::lora_segments / lora_segments_many): the SGMV idea
// of Punica / S-LoRA. Segments of few rows (decode) run as ONE thread-pool job for all the
// problems of a call (q/k/v, gate/up): first every shrink t_s = x_s·A_sᵀ (tasks over rank rows,
// the fp32 GEMV kernels), then every expand y_s += alpha_s t_s·B_sᵀ (tasks over output columns,
// each reading its block of B_s once for all the segment's rows). An expand task waits for its
// problem's shrinks only; tasks are claimed in order, so every shrink it waits on is already
// running on another thread (or done): no barrier, no deadlock. Segments of many rows (prefill)
// take the blocked GEMM path (two gemm_nt, as the reference).
#pragma once
#include <cstddef>
#include <cstdint>

#include "backend.hpp"
#include "cpu/features.hpp"
#include "cpu/nf4_gemv.hpp"

namespace qlora::cpu {

// Segments with more rows than this take the gemm_nt path (fp32 segments; bf16 ones never do).
constexpr int64_t kSgmvMaxRows = 64;

// bf16 inference copies (Backend::LoraSegment::AB16, layout in lora_sgmv_bf16_kernels.hpp): a
// segment with one runs the vdpbf16ps kernels at the AVX512 level on a CPU with AVX512-BF16 (x
// and t rounded to bf16 once, fp32 accumulation), the emulating oracle at the Scalar level, and its
// fp32 A/B at any other level.
namespace sgmv_bf16 {
constexpr int64_t pairs(int64_t k) { return (k + 1) / 2; }
constexpr int64_t blocks(int64_t n) { return (n + 15) / 16; }
constexpr int64_t a_words(int64_t r, int64_t in) { return blocks(r) * pairs(in) * 16; }
constexpr int64_t module_words(int64_t r, int64_t in, int64_t out) { return a_words(r, in) + blocks(out) * pairs(r) * 16; }
constexpr int64_t t_stride(int64_t r) { return blocks(r) * 8; }  // words of a rounded t row
}  // namespace sgmv_bf16
// Whether bf16 copies are used (not just stored) at `level`: Scalar (the oracle) or AVX512 with
// AVX512-BF16 units (cpu/gemm_bf16.hpp's bf16_compute_available).
bool lora_bf16_available(SimdLevel level);
// Bytes of one module's copy, and the copy made from fp32 A[r, in], B[out, r] (host memory).
size_t lora_bf16_bytes(int64_t r, int64_t in, int64_t out);
// level: AVX512 packs with the AVX512-BF16 converter, others in scalar code (the same bits).
void lora_pack_bf16(SimdLevel level, int64_t r, int64_t in, int64_t out, const float* A, const float* B, void* dst);
// The Scalar level: the reference of Backend::lora_segments for fp32 segments; segments with a
// bf16 copy take the oracle (x, A, t, B rounded as the kernels round them, products summed in
// double, t stored as fp32 before its rounding). t: the reference's scratch.
void lora_segments_scalar(int64_t np, const Backend::LoraProblem* p, float* t);

// level != Scalar (the scalar level is Backend's reference). t: the caller's scratch (max over
// segments of rows * r floats), used by the gemm_nt path only; the fused job has its own.
void lora_segments_many(SimdLevel level, int64_t np, const Backend::LoraProblem* p, float* t);

// The LoRA terms of a call as tasks of ANOTHER thread-pool job (the NF4 GEMV's of the same
// projections: one wake-up and join per projection group instead of two). Each output is computed
// exactly as lora_segments_many computes it (same kernels, same order), so fused and unfused
// results are bit-identical. One plan per thread at a time (it uses the calling thread's buffers);
// the plan must outlive the host job. Two forms:
// - after (the default at the AVX512 level): the host job's GEMV tasks prefetch the factors (A and
//   B, bf16 copies or fp32) into the running core's L2 as they go (prefetch(): their share of the
//   bytes), while the GEMV, bound by decoding, leaves memory idle; each GEMV task ends with
//   gemv_done(prob, r0, r1); the job's last tasks are the shrinks (after(i), i < after_tasks()).
//   The expands go in pieces (output columns of a problem), each run by whichever call meets its
//   last dependency (its columns' base rows, its problem's shrinks): no task waits for another,
//   so a thread the OS has descheduled mid-GEMV never holds the others up. On several threads a piece
//   task per piece follows the shrinks (bounded wait for the piece's dependencies, then takes it if
//   no call has), so a problem's pieces, which all become ready at its last shrink, do not all run
//   on the thread that finished that shrink (QLORA_SGMV_PIECE_TASKS=0: none, for A/B runs). (Read by the shrinks
//   from memory, the factors had streamed at latency-bound rates, 5-6 GB/s on one Zen 4 core,
//   which cost more than the FMAs.)
// - local (opt-in, QLORA_SGMV_LOCAL=1, at the AVX512 level where every problem has at most 2
//   segments, all with bf16 copies, e.g. one shared adapter; slower than the after form at 2 threads
//   on the quiet Zen 4, see local_enabled()):
//   no LoRA tasks and no dependency between tasks. Each GEMV task prefetches its problem's A and
//   the B columns of its rows while it streams the base weight, then (local_done(prob, r0, r1))
//   adds the LoRA terms of its own columns [r0, r1) while they are hot in its core's L1. t (a few
//   hundred bytes) and the bf16-rounded x are computed once, in the tasks, in two parts (the rows
//   of the input's two halves: two threads that need one t together each compute half of it, else
//   the shrinks, half the LoRA work, ran on one thread at a time) by the first task to
//   need them and shared; a task that finds one still being computed by another thread computes
//   its own copy (same kernels, same bits) after a bounded wait (QLORA_SGMV_LOCAL_SPIN pauses;
//   QLORA_SGMV_LOCAL=own: always its own, for tests). So x is no longer rounded on the calling thread while the others wait, and a decode
//   step drops the after form's cross-core traffic (y written on one core, expanded on the
//   other), its per-piece atomics and its plan (shrink and expand pieces, prefetch stream).
// - first (other levels, or QLORA_SGMV_AFTER=0 for A/B runs): shrink(i) for i < shrink_tasks()
//   as the host job's first tasks, and expand(prob, n0, n1) after the GEMV task that computed
//   columns [n0, n1) of problem prob (waits for the problem's shrinks).
struct SgmvBuffers;
class SgmvFused {
 public:
  // False (nothing planned) when the fused form does not apply: level Scalar, QLORA_SGMV=0 or
  // QLORA_SGMV_FUSE=0, or a segment of more than kSgmvMaxRows rows.
  bool prepare(SimdLevel level, int64_t np, const Backend::LoraProblem* p);
  bool after_form() const { return after_; }
  // The hooks that run this plan inside a host GEMV job (GemvTail, cpu/nf4_gemv.hpp; ctx = this):
  // the fp32 NF4 GEMV (nf4_gemv_nt_many_tail) and the bf16 one (nf4_gemv_bf16_many) take the same.
  GemvTail tail() const;
  bool local_form() const { return local_; }
  // first form
  int64_t shrink_tasks() const { return after_ ? 0 : n_shrink_; }
  void shrink(int64_t i) const;
  void expand(int64_t prob, int64_t n0, int64_t n1) const;
  // after form
  int64_t after_tasks() const;
  void after(int64_t i) const;
  void gemv_done(int64_t prob, int64_t r0, int64_t r1) const;
  // The factor bytes (at most max ranges; returns how many) that go with the fraction [f0, f1) of
  // the host GEMV's rows (GemvTail::prefetch).
  int prefetch(double f0, double f1, const char** lo, const char** hi, int max) const;
  // local form
  void local_done(int64_t prob, int64_t r0, int64_t r1) const;
  int local_prefetch(double f0, double f1, const char** lo, const char** hi, int max) const;

 private:
  const Backend::LoraProblem* p_ = nullptr;
  SgmvBuffers* jb_ = nullptr;
  int64_t np_ = 0, n_shrink_ = 0;
  bool after_ = false, local_ = false;
};

}  // namespace qlora::cpu
