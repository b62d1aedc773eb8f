// Internal to the multi-adapter LoRA op (lora_sgmv.hpp): what its files share. lora_sgmv.cpp holds
// the entry points, the plan (SgmvFused::prepare), the first form and the unfused job;
// lora_sgmv_after.cpp the after form; lora_sgmv_local.cpp the local form; lora_sgmv_bf16_copy.cpp
// the bf16 inference copies and the Scalar level. Include only from those files.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/lora_sgmv.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLORA_SGMV_PAUSE() _mm_pause()
#else
#define QLORA_SGMV_PAUSE() ((void)0)
#endif

namespace qlora::cpu {

namespace sgmv_plan {

using ShrinkFn = void (*)(int64_t, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
using ExpandFn = void (*)(int64_t, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float*, int64_t);

struct Kernels {
  ShrinkFn shrink;  // gemv_nt_f32_*: C[M, n0:n1] = alpha A[M, K]·B[n0:n1, K]ᵀ (+ beta C), M <= group
  int64_t group;    // rows per shrink call
  ExpandFn expand;
};

struct Seg {  // a segment of the fused job, with its slice of the job's t scratch
  const Backend::LoraProblem* p;
  const Backend::LoraSegment* s;
  float* t;  // [rows, r]
  // bf16 copy in use (AB16): x rounded to pairs (the job's xp scratch, row stride ldxp, from the
  // segment's first row) and the rounded t (tp, [rows, t_stride(r)] words)
  bool b16 = false;
  const uint32_t* xp = nullptr;
  int64_t ldxp = 0;
  uint32_t* tp = nullptr;
  int64_t in_idx = -1;  // its input in SgmvBuffers::ins (bf16 segments)
};
struct Task {
  // 0: shrink rank rows [a, b) (bf16: rank blocks) of rows [m0, m1) of segment seg;
  // 1: expand columns [a, b) of problem prob
  int kind;
  int64_t seg, prob, a, b, m0 = 0, m1 = 0;
};
struct PfRange {  // factor bytes [off, off + bytes) of the job's prefetch stream at p
  const char* p;
  int64_t off, bytes;
};
struct Piece {  // after form: output columns [n0, n1) of problem prob, expanded once their deps are met
  int64_t prob, n0, n1;
};
struct In {  // a distinct input of the bf16 segments: rows [0, end) rounded to jb.xp + off
  const float* x;
  int64_t ldx, in, end;
  size_t off;
  int64_t half = 0;  // local form: rows [0, half) and [half, end) are its two parts (local_done)
};

}  // namespace sgmv_plan

// The calling thread's buffers of a job (grow-only: no allocation per decode-step call).
struct SgmvBuffers {
  std::vector<float> t;  // every fused segment's t
  std::vector<uint32_t> xp, tp;  // bf16 segments: the rounded inputs and t's
  std::vector<sgmv_plan::In> ins;  // the distinct inputs of the bf16 segments (xp's layout)
  std::vector<sgmv_plan::Seg> segs;
  std::vector<int64_t> prob_of_seg, pending;
  std::vector<sgmv_plan::Task> tasks;
  std::unique_ptr<std::atomic<int64_t>[]> left;  // shrink tasks not finished, per problem
  size_t n_left = 0;
  std::vector<sgmv_plan::Piece> pieces;  // after form: the expand pieces, by problem
  std::vector<int64_t> piece0;  // [np + 1]: problem i's pieces are [piece0[i], piece0[i + 1])
  std::unique_ptr<std::atomic<int64_t>[]> dep;  // per piece: base rows + shrinks still to come
  // per piece: 1 once a thread has taken it (the call that meets its last dependency, or its piece
  // task); piece_tasks: how many piece tasks follow the shrinks (0 on one thread)
  std::unique_ptr<std::atomic<int>[]> taken;
  size_t n_dep = 0;
  int64_t piece_tasks = 0;
  mutable std::atomic<bool> no_wait{false};  // a piece task of this job timed out (SgmvFused::after)
  std::vector<sgmv_plan::PfRange> pf;  // after form: the factors, in the order the shrinks and expands read them
  int64_t pf_bytes = 0;
  bool after = false;
  // local form: problem i's segments are segs[seg0[i], seg0[i + 1]), its base rows (the GEMV's)
  // rows [row0[i], row0[i + 1]) of the job; tstate[i]: 0 no t yet, 1 a thread computes the
  // shared t, 2 the shared t is ready. call: this plan's number (the threads' own t copies).
  std::vector<int64_t> seg0, row0;
  // xstate[j]: the same for the rounding of input ins[j] (the local form rounds lazily, in the
  // tasks, not on the calling thread while the others wait). share: false only for the test mode
  // QLORA_SGMV_LOCAL=own (every task computes its own t and rounded x: that path's bits).
  // Both come in 2 parts (index 2 i + h): part h holds the rows of the input's part h (In::half),
  // so two threads that need one t at once each compute half of it (local_done); a part with no
  // rows (or part 1 with QLORA_SGMV_LOCAL_SPLIT=0) starts in state 2.
  std::unique_ptr<std::atomic<int>[]> tstate, xstate;
  size_t n_tstate = 0, n_xstate = 0;
  uint64_t call = 0;
  bool local = false, share = true;
  uint32_t* xbase = nullptr;  // xp.data(), writable from the tasks (local form)
  sgmv_plan::Kernels kn{};
};

namespace sgmv_plan {

// Defined in lora_sgmv.cpp.
bool env_off(const char* name);  // the variable is exactly "0"
int local_spins();
void check_problem(const Backend::LoraProblem& p);
void run_shrink(const SgmvBuffers& jb, const Task& tk);
void expand_cols(const SgmvBuffers& jb, const Backend::LoraProblem* p, int64_t n0, int64_t n1);
// Defined in lora_sgmv_local.cpp.
bool plan_local(SgmvBuffers& jb, int64_t np, const Backend::LoraProblem* P);

}  // namespace sgmv_plan

}  // namespace qlora::cpu
