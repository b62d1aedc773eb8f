#include "cpu/lora_sgmv.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "common/error.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/gemv_f32.hpp"
#include "cpu/lora_sgmv_bf16_kernels.hpp"
#include "cpu/lora_sgmv_kernels.hpp"
#include "cpu/threads.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLORA_SGMV_PAUSE() _mm_pause()
#else
#define QLORA_SGMV_PAUSE() ((void)0)
#endif

namespace qlora::cpu {

namespace {

using ShrinkFn = void (*)(int64_t, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
using ExpandFn = void (*)(int64_t, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float*, int64_t);

struct Kernels {
  ShrinkFn shrink;  // gemv_nt_f32_*: C[M, n0:n1] = alpha A[M, K]·B[n0:n1, K]ᵀ (+ beta C), M <= group
  int64_t group;    // rows per shrink call
  ExpandFn expand;
};

Kernels kernels_for(SimdLevel level) {
#if defined(QLORA_X86)
  if (level == SimdLevel::AVX512) return {gemv_nt_f32_avx512, 8, sgmv_detail::expand_avx512};
  if (level == SimdLevel::AVX2) return {gemv_nt_f32_avx2, 8, sgmv_detail::expand_avx2};
#endif
  (void)level;
  return {gemv_nt_f32_generic, 4, sgmv_detail::expand_generic};
}

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

}  // namespace

// The calling thread's buffers of a job (grow-only: no allocation per decode-step call).
struct SgmvBuffers {
  std::vector<float> t;  // every fused segment's t
  std::vector<uint32_t> xp, tp;  // bf16 segments: the rounded inputs and t's
  std::vector<In> ins;            // the distinct inputs of the bf16 segments (xp's layout)
  std::vector<Seg> segs;
  std::vector<int64_t> prob_of_seg, pending;
  std::vector<Task> tasks;
  std::unique_ptr<std::atomic<int64_t>[]> left;  // shrink tasks not finished, per problem
  size_t n_left = 0;
  std::vector<Piece> pieces;  // after form: the expand pieces, by problem
  std::vector<int64_t> piece0;  // [np + 1]: problem i's pieces are [piece0[i], piece0[i + 1])
  std::unique_ptr<std::atomic<int64_t>[]> dep;  // per piece: base rows + shrinks still to come
  // per piece: 1 once a thread has taken it (the call that meets its last dependency, or its piece
  // task); piece_tasks: how many piece tasks follow the shrinks (0 on one thread)
  std::unique_ptr<std::atomic<int>[]> taken;
  size_t n_dep = 0;
  int64_t piece_tasks = 0;
  mutable std::atomic<bool> no_wait{false};  // a piece task of this job timed out (SgmvFused::after)
  std::vector<PfRange> pf;  // after form: the factors, in the order the shrinks and expands read them
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
  Kernels kn{};
};

namespace {

thread_local SgmvBuffers t_job;

// QLORA_SGMV=0 sends every segment through the gemm_nt reference path (A/B benchmarks).
bool env_off(const char* name) {
  const char* e = std::getenv(name);
  return e && e[0] == '0' && e[1] == '\0';
}
bool fused_enabled() {
  static const bool on = !env_off("QLORA_SGMV");
  return on;
}
// QLORA_SGMV_FUSE=0 keeps the LoRA terms out of the base projections' jobs (A/B benchmarks).
bool host_fused_enabled() {
  static const bool on = fused_enabled() && !env_off("QLORA_SGMV_FUSE");
  return on;
}
// QLORA_SGMV_AFTER=0: the fused job's earlier form (shrinks first, no prefetch; A/B benchmarks).
bool after_enabled() {
  static const bool on = !env_off("QLORA_SGMV_AFTER");
  return on;
}
// QLORA_SGMV_LOCAL=1 (or own): the local form where it applies. Opt-in: on the quiet 2-core Zen 4
// (bench_adapters, 2 threads, bf16 copies) (b) - (a) was 0.86-1.17 ms per step with it against
// 0.42-0.77 ms in the after form, although it was ahead at 1 thread (CPU time) on the loaded machine.
bool local_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("QLORA_SGMV_LOCAL");
    return e && *e && !env_off("QLORA_SGMV_LOCAL");
  }();
  return on;
}
// QLORA_SGMV_LOCAL=own (tests): no task shares its t or rounded x, each computes its own.
bool share_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("QLORA_SGMV_LOCAL");
    return !(e && std::strcmp(e, "own") == 0);
  }();
  return on;
}

// Local form: another thread is computing a shared t or rounded x (state 1). A decode call's
// shrink takes ~1-3 µs, so wait up to this many pauses (a few µs to ~15 µs, by the CPU) before computing
// an own copy: two threads that start a call together would otherwise both shrink every problem.
// Bounded, so a descheduled owner costs at most the bound; same kernels either way, same bits.
// QLORA_SGMV_LOCAL_SPIN=0: no wait (each such task computes its own copy at once; A/B runs).
int local_spins() {
  static const int n = [] {
    const char* e = std::getenv("QLORA_SGMV_LOCAL_SPIN");
    if (!e || !*e) return 800;
    char* end = nullptr;
    const long v = std::strtol(e, &end, 10);
    check_arg(*end == '\0' && v >= 0 && v <= 1000000, "QLORA_SGMV_LOCAL_SPIN must be an integer in [0, 1000000]");
    return static_cast<int>(v);
  }();
  return n;
}
// QLORA_SGMV_PIECE_TASKS=0: the after form without its piece tasks (A/B runs; see SgmvFused::after).
bool piece_tasks_enabled() {
  static const bool on = !env_off("QLORA_SGMV_PIECE_TASKS");
  return on;
}
// QLORA_SGMV_LOCAL_SPLIT=0: the local form's shared t and rounded x in one part each (A/B runs of
// the split, which lets two threads that need one t at once compute half of its rows each: as one
// part, the shrink of a projection ran on one thread while the other waited for it or computed the
// same t again, so at 2 threads the shrinks, half the LoRA work, did not run in parallel at all).
bool split_enabled() {
  static const bool on = !env_off("QLORA_SGMV_LOCAL_SPLIT");
  return on;
}
int wait_shared(const std::atomic<int>& st, int s) {
  for (int i = 0, n = local_spins(); s == 1 && i < n; ++i) {
    QLORA_SGMV_PAUSE();
    s = st.load(std::memory_order_acquire);
  }
  return s;
}

void check_problem(const Backend::LoraProblem& p) {
  check_arg(p.in >= 1 && p.out >= 1 && p.n >= 0 && p.ldx >= p.in && p.ldy >= p.out,
            "lora_segments: bad dimensions or leading dimensions");
  for (int64_t s = 0; s < p.n; ++s)
    check_arg(p.seg[s].rows >= 0 && p.seg[s].row0 >= 0 && p.seg[s].r >= 1, "lora_segments: bad segment");
}

// Work of a segment in bytes of A and B read, weighted by its rows (at 8 rows the FMAs take
// about as long as streaming the factors; below 4 rows the stream dominates).
double weight(int64_t rows) { return std::max(1.0, static_cast<double>(rows) / 4.0); }

// The distinct inputs of the bf16 segments (q/k/v and gate/up share theirs) into jb.ins, each
// rows [0, end) (end: the last row a bf16 segment reads) at its place in jb.xp; each bf16
// segment's xp points at its first row there. round_input fills one.
void plan_inputs(SgmvBuffers& jb) {
  jb.ins.clear();
  for (Seg& s : jb.segs) {
    if (!s.b16) continue;
    int64_t j = 0;
    while (j < static_cast<int64_t>(jb.ins.size()) &&
           !(jb.ins[j].x == s.p->x && jb.ins[j].ldx == s.p->ldx && jb.ins[j].in == s.p->in))
      ++j;
    if (j == static_cast<int64_t>(jb.ins.size())) jb.ins.push_back({s.p->x, s.p->ldx, s.p->in, 0, 0});
    jb.ins[j].end = std::max(jb.ins[j].end, s.s->row0 + s.s->rows);
    s.in_idx = j;
  }
  size_t words = 0;
  for (In& v : jb.ins) v.off = words, words += static_cast<size_t>(v.end * sgmv_bf16::pairs(v.in));
  if (jb.xp.size() < words) jb.xp.resize(words);
  for (Seg& s : jb.segs) {
    if (!s.b16) continue;
    const In& v = jb.ins[static_cast<size_t>(s.in_idx)];
    s.ldxp = sgmv_bf16::pairs(v.in);
    s.xp = jb.xp.data() + v.off + s.s->row0 * s.ldxp;
  }
}
void round_input(const In& v, uint32_t* dst) {  // rows [0, v.end) of input v to bf16 pairs
#if defined(QLORA_X86)
  sgmv_bf16::round_pairs_avx512bf16(v.end, v.in, v.x, v.ldx, dst, sgmv_bf16::pairs(v.in));
#else
  (void)v, (void)dst;  // no bf16 segments without the AVX512-BF16 kernels
#endif
}
void round_all(SgmvBuffers& jb) {
  for (const In& v : jb.ins) round_input(v, jb.xp.data() + v.off);
}

// Collects the segments of few rows into jb.segs with their t slices; segments of many rows (or
// every segment when !fused) run at once through the gemm_nt path when t_ref is given, else
// make the plan fail (returns false).
bool collect(SimdLevel level, SgmvBuffers& jb, int64_t np, const Backend::LoraProblem* P, bool fused, float* t_ref) {
  jb.kn = kernels_for(level);
  jb.segs.clear(), jb.prob_of_seg.clear();
#if defined(QLORA_X86)
  const bool b16ok = level == SimdLevel::AVX512 && lora_bf16_available(level);
#else
  const bool b16ok = false;  // no AVX512-BF16 kernels in this build
#endif
  int64_t t_need = 0, tp_need = 0;
  for (int64_t i = 0; i < np; ++i) {
    const Backend::LoraProblem& p = P[i];
    check_problem(p);
    for (int64_t s = 0; s < p.n; ++s) {
      const Backend::LoraSegment& g = p.seg[s];
      if (g.rows <= 0 || g.alpha == 0.0f) continue;
      const bool b16 = b16ok && g.AB16;  // no other bf16 path: never the gemm_nt one
      if (!b16 && (g.rows > kSgmvMaxRows || !fused)) {  // many rows: the blocked GEMMs (their own parallel jobs)
        if (!t_ref) return false;
        gemm_nt(level, g.rows, g.r, p.in, 1.0f, p.x + g.row0 * p.ldx, p.ldx, g.A, p.in, 0.0f, t_ref, g.r);
        gemm_nt(level, g.rows, p.out, g.r, g.alpha, t_ref, g.r, g.B, g.r, 1.0f, p.y + g.row0 * p.ldy, p.ldy);
        continue;
      }
      Seg sg{&p, &g, nullptr};
      sg.b16 = b16;
      jb.segs.push_back(sg);
      jb.prob_of_seg.push_back(i);
      if (b16) tp_need += g.rows * sgmv_bf16::t_stride(g.r);
      else t_need += g.rows * g.r;
    }
  }
  if (jb.t.size() < static_cast<size_t>(t_need)) jb.t.resize(static_cast<size_t>(t_need));
  if (jb.tp.size() < static_cast<size_t>(tp_need)) jb.tp.resize(static_cast<size_t>(tp_need));
  float* t = jb.t.data();
  uint32_t* tp = jb.tp.data();
  for (Seg& s : jb.segs) {
    if (s.b16) s.tp = tp, tp += s.s->rows * sgmv_bf16::t_stride(s.s->r);
    else s.t = t, t += s.s->rows * s.s->r;
  }
  if (tp_need) plan_inputs(jb);
  return true;
}

// Shrink tasks (rank rows of a segment, pieces of about `target` work) into jb.tasks, counted per
// problem in jb.left.
void plan_shrinks(SgmvBuffers& jb, int64_t np, double target) {
  jb.tasks.clear();
  jb.pending.assign(static_cast<size_t>(np), 0);
  for (size_t k = 0; k < jb.segs.size(); ++k) {
    const Seg& sg = jb.segs[k];
    const Backend::LoraSegment& g = *sg.s;
    // bf16: half the bytes; split over rank blocks of 16, then over rows (4-row tiles): a bf16
    // segment may be a long prefill one.
    const double a_work = (sg.b16 ? 2.0 : 4.0) * static_cast<double>(g.r * sg.p->in) * weight(g.rows);
    const int64_t units = sg.b16 ? sgmv_bf16::blocks(g.r) : g.r;
    const int64_t want = std::max<int64_t>(1, static_cast<int64_t>(a_work / target + 0.5));
    const int64_t pieces = std::min<int64_t>(units, want);
    const int64_t per = (units + pieces - 1) / pieces;
    const int64_t row_pieces = sg.b16 ? std::min<int64_t>((g.rows + 3) / 4, (want + pieces - 1) / pieces) : 1;
    const int64_t rows_per = ((g.rows + row_pieces - 1) / row_pieces + 3) / 4 * 4;
    for (int64_t j = 0; j < units; j += per)
      for (int64_t m = 0; m < g.rows; m += rows_per) {
        jb.tasks.push_back({0, static_cast<int64_t>(k), jb.prob_of_seg[k], j, std::min(units, j + per), m,
                            std::min(g.rows, m + rows_per)});
        ++jb.pending[static_cast<size_t>(jb.prob_of_seg[k])];
      }
  }
  if (jb.n_left < static_cast<size_t>(np)) {
    jb.left.reset(new std::atomic<int64_t>[static_cast<size_t>(np)]);
    jb.n_left = static_cast<size_t>(np);
  }
  for (int64_t i = 0; i < np; ++i) jb.left[i].store(jb.pending[static_cast<size_t>(i)], std::memory_order_relaxed);
}

void run_shrink(const SgmvBuffers& jb, const Task& tk) {
  const Seg& s = jb.segs[static_cast<size_t>(tk.seg)];
  const Backend::LoraSegment& g = *s.s;
  if (s.b16) {
#if defined(QLORA_X86)
    if (!jb.after && tk.a == 0 && tk.m0 == 0) {  // once per segment: B into L2 while the shrink runs (the expand reads it next)
      const char* b = static_cast<const char*>(g.AB16) + 4 * sgmv_bf16::a_words(g.r, s.p->in);
      const int64_t bytes = 4 * sgmv_bf16::blocks(s.p->out) * sgmv_bf16::pairs(g.r) * 16;
      for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(b + o, _MM_HINT_T1);
    }
    const int64_t ldtp = sgmv_bf16::t_stride(g.r);
    sgmv_bf16::shrink_avx512bf16(tk.m1 - tk.m0, tk.a, tk.b, sgmv_bf16::pairs(s.p->in), s.xp + tk.m0 * s.ldxp, s.ldxp,
                                 static_cast<const uint32_t*>(g.AB16), s.tp + tk.m0 * ldtp, ldtp);
#endif
  } else {
    const float* x = s.p->x + g.row0 * s.p->ldx;
    for (int64_t m0 = tk.m0; m0 < tk.m1; m0 += jb.kn.group)
      jb.kn.shrink(std::min(jb.kn.group, tk.m1 - m0), tk.a, tk.b, s.p->in, 1.0f, x + m0 * s.p->ldx, s.p->ldx, g.A,
                   s.p->in, 0.0f, s.t + m0 * g.r, g.r);
  }
  jb.left[tk.prob].fetch_sub(1, std::memory_order_release);
}

// Every shrink task of problem prob was claimed before the calling task (lower index): waits for
// the ones still running on other threads (spin briefly, then yield the core), then adds the
// expand of columns [n0, n1) of every segment of the problem.
void expand_cols(const SgmvBuffers& jb, const Backend::LoraProblem* p, int64_t n0, int64_t n1) {
  for (const Seg& s : jb.segs) {
    if (s.p != p) continue;
    const Backend::LoraSegment& g = *s.s;
    if (s.b16) {
#if defined(QLORA_X86)
      const uint32_t* Bp = static_cast<const uint32_t*>(g.AB16) + sgmv_bf16::a_words(g.r, p->in);
      sgmv_bf16::expand_avx512bf16(g.rows, n0, n1, sgmv_bf16::pairs(g.r), s.tp, sgmv_bf16::t_stride(g.r), Bp, g.alpha,
                                   p->y + g.row0 * p->ldy, p->ldy);
#endif
    } else {
      jb.kn.expand(g.rows, n0, n1, g.r, g.alpha, s.t, g.r, g.B, g.r, p->y + g.row0 * p->ldy, p->ldy);
    }
  }
}

void run_expand(const SgmvBuffers& jb, const Backend::LoraProblem* p, int64_t prob, int64_t n0, int64_t n1) {
  for (int spins = 0; jb.left[prob].load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 4000) QLORA_SGMV_PAUSE();
    else std::this_thread::yield();
  }
  expand_cols(jb, p, n0, n1);
}

// After form: `done` more of expand piece k's dependencies are met (base rows of its columns, or
// one shrink of its problem); the call that meets the last one adds the piece's terms, so no task
// ever waits for another.
void piece_progress(const SgmvBuffers& jb, const Backend::LoraProblem* P, size_t k, int64_t done) {
  const Piece& pc = jb.pieces[k];
  if (jb.dep[k].fetch_sub(done, std::memory_order_acq_rel) == done && !jb.taken[k].exchange(1, std::memory_order_acq_rel))
    expand_cols(jb, &P[pc.prob], pc.n0, pc.n1);
}

// Local form: the segments by problem and the GEMV's rows by problem; false (not local) when a
// problem has more than 2 segments (the factor ranges of one GEMV task's prefetch, A and its B
// columns per segment, are at most 4; the after form prefetches any number) or a segment has no
// bf16 copy (fp32 factors, twice the bytes to bring in within one task: on one Zen 4 thread their
// kernels ran ~10-20% slower in the local form than in the after form, which spreads the
// prefetch over the whole job).
bool plan_local(SgmvBuffers& jb, int64_t np, const Backend::LoraProblem* P) {
  jb.seg0.assign(static_cast<size_t>(np) + 1, 0);
  jb.row0.assign(static_cast<size_t>(np) + 1, 0);
  size_t k = 0;
  for (int64_t i = 0; i < np; ++i) {
    jb.seg0[static_cast<size_t>(i)] = static_cast<int64_t>(k);
    jb.row0[static_cast<size_t>(i) + 1] = jb.row0[static_cast<size_t>(i)] + P[i].out;
    const size_t k0 = k;
    while (k < jb.segs.size() && jb.segs[k].p == &P[i]) {
      if (!jb.segs[k].b16) return false;
      ++k;
    }
    if (k - k0 > 2) return false;
  }
  jb.seg0[static_cast<size_t>(np)] = static_cast<int64_t>(k);
  const bool split = split_enabled() && num_threads() > 1;  // one thread: one part (8-row tiles)
  for (In& v : jb.ins) v.half = split ? (v.end + 1) / 2 : v.end;
  if (jb.n_tstate < 2 * static_cast<size_t>(np)) {
    jb.tstate.reset(new std::atomic<int>[2 * static_cast<size_t>(np)]);
    jb.n_tstate = 2 * static_cast<size_t>(np);
  }
  for (int64_t i = 0; i < np; ++i) {
    const int64_t k0 = jb.seg0[static_cast<size_t>(i)], k1 = jb.seg0[static_cast<size_t>(i) + 1];
    const bool one = k0 == k1 || jb.ins[static_cast<size_t>(jb.segs[static_cast<size_t>(k0)].in_idx)].half ==
                                     jb.ins[static_cast<size_t>(jb.segs[static_cast<size_t>(k0)].in_idx)].end;
    jb.tstate[2 * i].store(0, std::memory_order_relaxed);
    jb.tstate[2 * i + 1].store(one ? 2 : 0, std::memory_order_relaxed);
  }
  if (jb.n_xstate < 2 * jb.ins.size()) {
    jb.xstate.reset(new std::atomic<int>[2 * jb.ins.size()]);
    jb.n_xstate = 2 * jb.ins.size();
  }
  for (size_t j = 0; j < jb.ins.size(); ++j) {
    jb.xstate[2 * j].store(0, std::memory_order_relaxed);
    jb.xstate[2 * j + 1].store(jb.ins[j].half == jb.ins[j].end ? 2 : 0, std::memory_order_relaxed);
  }
  jb.share = share_enabled();
  jb.xbase = jb.xp.data();
  static std::atomic<uint64_t> calls{0};
  jb.call = calls.fetch_add(1, std::memory_order_relaxed) + 1;
  return true;
}

// Words (bf16: uint32 pairs; fp32: floats) of segment s's t.
int64_t t_words(const Seg& s) { return s.s->rows * (s.b16 ? sgmv_bf16::t_stride(s.s->r) : s.s->r); }

// Local form (bf16 copies only): rows [m0, m1) of input v rounded into the buffer at base (its row 0).
void round_rows(const In& v, int64_t m0, int64_t m1, uint32_t* base) {
#if defined(QLORA_X86)
  const int64_t ldxp = sgmv_bf16::pairs(v.in);
  if (m1 > m0) sgmv_bf16::round_pairs_avx512bf16(m1 - m0, v.in, v.x + m0 * v.ldx, v.ldx, base + m0 * ldxp, ldxp);
#else
  (void)v, (void)m0, (void)m1, (void)base;
#endif
}
// Local form: the shrink of bf16 segment s's rows that lie in input rows [m0, m1), from the rounded
// input at xb (its row 0) into tp (the segment's rounded t, [rows, t_stride(r)] words). A row's chain
// is the same in any tile: the same bits as one call over all of the segment's rows.
void shrink_rows(const Seg& s, const uint32_t* xb, uint32_t* tp, int64_t m0, int64_t m1) {
  const Backend::LoraSegment& g = *s.s;
  const int64_t a = std::max<int64_t>(0, m0 - g.row0), b = std::min<int64_t>(g.rows, m1 - g.row0);
  if (a >= b) return;
#if defined(QLORA_X86)
  const int64_t ldtp = sgmv_bf16::t_stride(g.r);
  sgmv_bf16::shrink_avx512bf16(b - a, 0, sgmv_bf16::blocks(g.r), sgmv_bf16::pairs(s.p->in), xb + (g.row0 + a) * s.ldxp,
                               s.ldxp, static_cast<const uint32_t*>(g.AB16), tp + a * ldtp, ldtp);
#else
  (void)xb, (void)tp;
#endif
}

// Expand of columns [n0, n1) of segment s from t (as expand_cols).
void expand_whole(const SgmvBuffers& jb, const Seg& s, const void* t, int64_t n0, int64_t n1) {
  const Backend::LoraSegment& g = *s.s;
  const Backend::LoraProblem* p = s.p;
  if (s.b16) {
#if defined(QLORA_X86)
    const uint32_t* Bp = static_cast<const uint32_t*>(g.AB16) + sgmv_bf16::a_words(g.r, p->in);
    sgmv_bf16::expand_avx512bf16(g.rows, n0, n1, sgmv_bf16::pairs(g.r), static_cast<const uint32_t*>(t),
                                 sgmv_bf16::t_stride(g.r), Bp, g.alpha, p->y + g.row0 * p->ldy, p->ldy);
#endif
  } else {
    jb.kn.expand(g.rows, n0, n1, g.r, g.alpha, static_cast<const float*>(t), g.r, g.B, g.r, p->y + g.row0 * p->ldy,
                 p->ldy);
  }
}

// A thread's own copy of one problem's t (local form, when another thread is still computing the
// shared one): the plan and problem it holds, grow-only storage.
struct OwnT {
  uint64_t call = 0;
  int64_t prob = -1;
  std::vector<uint32_t> tp;  // its segments' rounded t's (bf16 copies: the local form has no others)
  uint64_t xcall = 0;        // and one rounded input (ins[xin] of plan xcall)
  int64_t xin = -1;
  std::vector<uint32_t> xp;
};
OwnT& own_t() {
  thread_local OwnT o;
  return o;
}

}  // namespace

bool SgmvFused::prepare(SimdLevel level, int64_t np, const Backend::LoraProblem* P) {
  n_shrink_ = 0;
  if (level == SimdLevel::Scalar || !host_fused_enabled()) return false;
  SgmvBuffers& jb = t_job;
  if (!collect(level, jb, np, P, true, nullptr)) return false;
  after_ = jb.after = level == SimdLevel::AVX512 && after_enabled();  // the AVX-512 GEMV prefetches
  local_ = jb.local = level == SimdLevel::AVX512 && local_enabled() && plan_local(jb, np, P);
  if (local_) (void)local_spins();  // a bad QLORA_SGMV_LOCAL_SPIN raises here, on the calling thread
  if (local_) {
    after_ = jb.after = false;
    jb_ = &jb, p_ = P, np_ = np;
    return true;
  }
  round_all(jb);
  const int nth = num_threads();
  // The host job gives the parallelism: one shrink task per segment up to 512 KiB of weighted
  // work (a few microseconds), so an expand rarely waits. After form on several threads: pieces
  // of ~16 KiB (a segment of 8 rows in halves of 4 rows, fp32 ones in rank-row ranges), so that
  // o / down (one segment) do not leave the other threads waiting; A comes from L2 by then.
  plan_shrinks(jb, np, after_ && nth > 1 ? 16 << 10 : 512 << 10);
  jb_ = &jb, p_ = P, np_ = np;
  n_shrink_ = static_cast<int64_t>(jb.tasks.size());
  if (!after_) return true;
  // After form: expand pieces (whole problems on one thread; else about two column ranges per
  // thread, whole 16-column blocks), each waiting for its base rows and its problem's shrinks, and
  // the prefetch stream: each segment's factors in the order the tasks read them (bf16 copy: A
  // then B, contiguous).
  jb.pieces.clear();
  jb.piece0.assign(static_cast<size_t>(np) + 1, 0);
  for (int64_t i = 0; i < np; ++i) {
    jb.piece0[static_cast<size_t>(i)] = static_cast<int64_t>(jb.pieces.size());
    if (!jb.pending[static_cast<size_t>(i)]) continue;
    const int64_t out = P[i].out;
    const int64_t pieces = nth <= 1 ? 1 : std::max<int64_t>(1, std::min<int64_t>(2 * nth, out / 64));
    const int64_t cols = ((out + pieces - 1) / pieces + 15) / 16 * 16;
    for (int64_t n = 0; n < out; n += cols) jb.pieces.push_back({i, n, std::min(out, n + cols)});
  }
  jb.piece0[static_cast<size_t>(np)] = static_cast<int64_t>(jb.pieces.size());
  if (jb.n_dep < jb.pieces.size()) {
    jb.dep.reset(new std::atomic<int64_t>[jb.pieces.size()]);
    jb.taken.reset(new std::atomic<int>[jb.pieces.size()]);
    jb.n_dep = jb.pieces.size();
  }
  for (size_t k = 0; k < jb.pieces.size(); ++k) {
    const Piece& pc = jb.pieces[k];
    jb.dep[k].store(pc.n1 - pc.n0 + jb.pending[static_cast<size_t>(pc.prob)], std::memory_order_relaxed);
    jb.taken[k].store(0, std::memory_order_relaxed);
  }
  jb.piece_tasks = nth > 1 && piece_tasks_enabled() ? static_cast<int64_t>(jb.pieces.size()) : 0;
  jb.no_wait.store(false, std::memory_order_relaxed);
  if (jb.piece_tasks) (void)local_spins();  // a bad QLORA_SGMV_LOCAL_SPIN raises here, on the calling thread
  jb.pf.clear();
  jb.pf_bytes = 0;
  auto add = [&](const void* p, int64_t bytes) {
    jb.pf.push_back({static_cast<const char*>(p), jb.pf_bytes, bytes});
    jb.pf_bytes += bytes;
  };
  for (const Seg& sg : jb.segs) {
    const Backend::LoraSegment& g = *sg.s;
    if (sg.b16) {
      add(g.AB16, static_cast<int64_t>(lora_bf16_bytes(g.r, sg.p->in, sg.p->out)));
    } else {
      add(g.A, 4 * g.r * sg.p->in);
      add(g.B, 4 * g.r * sg.p->out);
    }
  }
  return true;
}

int64_t SgmvFused::after_tasks() const {
  return after_ ? static_cast<int64_t>(jb_->tasks.size()) + jb_->piece_tasks : 0;
}

// After tasks: the shrinks, then (on several threads) one task per expand piece. A shrink that meets
// its problem's last dependency would otherwise run every piece of the problem itself (they all
// become ready then) while the other threads, out of tasks, leave: o / down's whole expand, about
// half their LoRA work, ran on one thread. A piece task waits for its piece's dependencies (bounded,
// wait_shared's bound) and takes the piece; the shrink side takes pieces from the last one down, the
// piece tasks from the first one up, so two threads meet in the middle. A piece task that times out
// leaves its piece to the call that meets the last dependency: no task waits longer than the bound.
void SgmvFused::after(int64_t i) const {
  const SgmvBuffers& jb = *jb_;
  const int64_t n_shrink = static_cast<int64_t>(jb.tasks.size());
  if (i >= n_shrink) {
    const size_t k = static_cast<size_t>(i - n_shrink);
    int64_t d = jb.dep[k].load(std::memory_order_acquire);
    // After one piece task of the job has timed out (a thread descheduled mid-task, e.g. on a loaded
    // machine), the others do not wait at all: at most one bound per job and thread is spent here.
    if (d != 0 && !jb.no_wait.load(std::memory_order_relaxed)) {
      for (int n = 0, lim = local_spins(); d != 0 && n < lim; ++n) {
        QLORA_SGMV_PAUSE();
        d = jb.dep[k].load(std::memory_order_acquire);
      }
      if (d != 0) jb.no_wait.store(true, std::memory_order_relaxed);
    }
    if (d == 0 && !jb.taken[k].exchange(1, std::memory_order_acq_rel)) {
      const Piece& pc = jb.pieces[k];
      expand_cols(jb, &p_[pc.prob], pc.n0, pc.n1);
    }
    return;
  }
  const Task& tk = jb.tasks[static_cast<size_t>(i)];  // shrink task i: its problem's pieces have one dependency less
  run_shrink(jb, tk);
  // Every piece's count first, so that the piece tasks see their pieces ready while this call runs
  // the last ones; then this call takes the ready pieces from the last one down.
  const int64_t k0 = jb.piece0[static_cast<size_t>(tk.prob)], k1 = jb.piece0[static_cast<size_t>(tk.prob) + 1];
  if (!jb.piece_tasks) {
    for (int64_t k = k0; k < k1; ++k) piece_progress(jb, p_, static_cast<size_t>(k), 1);
    return;
  }
  for (int64_t k = k0; k < k1; ++k) jb.dep[k].fetch_sub(1, std::memory_order_acq_rel);
  for (int64_t k = k1 - 1; k >= k0; --k) {
    if (jb.dep[k].load(std::memory_order_acquire) != 0 || jb.taken[k].exchange(1, std::memory_order_acq_rel)) continue;
    const Piece& pc = jb.pieces[static_cast<size_t>(k)];
    expand_cols(jb, &p_[pc.prob], pc.n0, pc.n1);
  }
}

void SgmvFused::gemv_done(int64_t prob, int64_t r0, int64_t r1) const {  // base rows [r0, r1) of problem prob
  if (!after_) return;
  const SgmvBuffers& jb = *jb_;
  for (int64_t k = jb.piece0[static_cast<size_t>(prob)]; k < jb.piece0[static_cast<size_t>(prob) + 1]; ++k) {
    const Piece& pc = jb.pieces[static_cast<size_t>(k)];
    const int64_t ov = std::min(r1, pc.n1) - std::max(r0, pc.n0);
    if (ov > 0) piece_progress(jb, p_, static_cast<size_t>(k), ov);
  }
}

// Local form: the GEMV task that computed base rows [r0, r1) of problem prob (columns of y, hot in
// this core's L1) adds their LoRA terms now. t: the shared one, in two parts (the rows of the
// input's two parts, In::half): the task claims each part no thread has started and computes it,
// so two threads that get here together compute half the rows each, then waits for the parts other
// threads compute (bounded, wait_shared). If one is still not ready, the task computes its own copy
// of the whole t (the same kernels, and each row's chain does not depend on the rows sharing its
// tile: the same bits), so no task waits for another longer than the bound.
void SgmvFused::local_done(int64_t prob, int64_t r0, int64_t r1) const {
  const SgmvBuffers& jb = *jb_;
  const int64_t k0 = jb.seg0[static_cast<size_t>(prob)], k1 = jb.seg0[static_cast<size_t>(prob) + 1];
  if (k0 == k1) return;
  const int64_t xi = jb.segs[static_cast<size_t>(k0)].in_idx;  // the problem's input (its segments share it)
  const In& v = jb.ins[static_cast<size_t>(xi)];
  std::atomic<int>* st = &jb.tstate[2 * prob];
  std::atomic<int>* xs = &jb.xstate[2 * xi];
  auto part_rows = [&](int h, int64_t& m0, int64_t& m1) { m0 = h ? v.half : 0, m1 = h ? v.end : v.half; };
  // This thread's own copy of the whole rounded input (row 0 of it).
  auto own_x = [&]() -> const uint32_t* {
    OwnT& o = own_t();
    if (o.xcall != jb.call || o.xin != xi) {
      const size_t words = static_cast<size_t>(v.end * sgmv_bf16::pairs(v.in));
      if (o.xp.size() < words) o.xp.resize(words);
      round_rows(v, 0, v.end, o.xp.data());
      o.xcall = jb.call, o.xin = xi;
    }
    return o.xp.data();
  };
  // A buffer (its row 0) that holds input part h rounded: the shared one (rounded here if no thread
  // has started it, else after a bounded wait for the thread rounding it) or this thread's own.
  auto x_part = [&](int h) -> const uint32_t* {
    int x = xs[h].load(std::memory_order_acquire);
    if (x == 0 && jb.share && xs[h].compare_exchange_strong(x, 1, std::memory_order_acq_rel)) {
      int64_t m0, m1;
      part_rows(h, m0, m1);
      round_rows(v, m0, m1, jb.xbase + v.off);
      xs[h].store(2, std::memory_order_release);
      return jb.xbase + v.off;
    }
    if (x == 1 && jb.share) x = wait_shared(xs[h], x);
    return x == 2 ? jb.xbase + v.off : own_x();
  };
  if (jb.share)
    for (int h = 0; h < 2; ++h) {
      int s = st[h].load(std::memory_order_acquire);
      if (s != 0 || !st[h].compare_exchange_strong(s, 1, std::memory_order_acq_rel)) continue;
      int64_t m0, m1;
      part_rows(h, m0, m1);
      const uint32_t* xb = x_part(h);
      for (int64_t k = k0; k < k1; ++k) {
        const Seg& sg = jb.segs[static_cast<size_t>(k)];
        shrink_rows(sg, xb, sg.tp, m0, m1);
      }
      st[h].store(2, std::memory_order_release);
    }
  bool ready = jb.share;
  for (int h = 0; h < 2 && ready; ++h) {
    int s = st[h].load(std::memory_order_acquire);
    if (s == 1) s = wait_shared(st[h], s);
    ready = s == 2;
  }
  const void* t[2];
  if (ready) {
    for (int64_t k = k0; k < k1; ++k) t[k - k0] = jb.segs[static_cast<size_t>(k)].tp;
  } else {
    OwnT& o = own_t();
    size_t words16 = 0;
    for (int64_t k = k0; k < k1; ++k) words16 += static_cast<size_t>(t_words(jb.segs[static_cast<size_t>(k)]));
    const bool have = o.call == jb.call && o.prob == prob;
    if (!have && o.tp.size() < words16) o.tp.resize(words16);
    const uint32_t* xb = nullptr;
    if (!have) {  // both parts shared and ready, else this thread's own rounded input
      const uint32_t* a = x_part(0);
      const uint32_t* b = x_part(1);
      xb = a == b ? a : own_x();
    }
    size_t off16 = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const Seg& sg = jb.segs[static_cast<size_t>(k)];
      uint32_t* dst = o.tp.data() + off16;
      if (!have) shrink_rows(sg, xb, dst, 0, v.end);
      t[k - k0] = dst;
      off16 += static_cast<size_t>(t_words(sg));
    }
    o.call = jb.call, o.prob = prob;
  }
  for (int64_t k = k0; k < k1; ++k) expand_whole(jb, jb.segs[static_cast<size_t>(k)], t[k - k0], r0, r1);
}

// Local form: the task with job rows [g0, g1) (one problem's rows [r0, r1)) prefetches its
// problem's A (unless the shared t is ready) and the B columns its expand reads.
int SgmvFused::local_prefetch(double f0, double f1, const char** lo, const char** hi, int max) const {
  const SgmvBuffers& jb = *jb_;
  const double total = static_cast<double>(jb.row0[static_cast<size_t>(np_)]);
  const int64_t g0 = std::llround(f0 * total), g1 = f1 >= 1.0 ? static_cast<int64_t>(total) : std::llround(f1 * total);
  const int64_t prob = std::upper_bound(jb.row0.begin(), jb.row0.end(), g0) - jb.row0.begin() - 1;
  if (prob < 0 || prob >= np_) return 0;
  const int64_t k0 = jb.seg0[static_cast<size_t>(prob)], k1 = jb.seg0[static_cast<size_t>(prob) + 1];
  const int64_t r0 = g0 - jb.row0[static_cast<size_t>(prob)];
  const int64_t r1 = std::min(g1, jb.row0[static_cast<size_t>(prob) + 1]) - jb.row0[static_cast<size_t>(prob)];
  int n = 0;
  auto add = [&](const void* p, int64_t off, int64_t bytes) {
    if (n == max || bytes <= 0) return;
    lo[n] = static_cast<const char*>(p) + off, hi[n] = lo[n] + bytes;
    ++n;
  };
  if (jb.tstate[2 * prob].load(std::memory_order_relaxed) != 2 ||
      jb.tstate[2 * prob + 1].load(std::memory_order_relaxed) != 2)
    for (int64_t k = k0; k < k1; ++k) {
      const Seg& sg = jb.segs[static_cast<size_t>(k)];
      if (sg.b16) add(sg.s->AB16, 0, 4 * sgmv_bf16::a_words(sg.s->r, sg.p->in));
      else add(sg.s->A, 0, 4 * sg.s->r * sg.p->in);
    }
  for (int64_t k = k0; k < k1 && r1 > r0; ++k) {
    const Seg& sg = jb.segs[static_cast<size_t>(k)];
    const int64_t r = sg.s->r;
    if (sg.b16) {
      const int64_t blk = sgmv_bf16::pairs(r) * 16 * 4;  // bytes of one 16-column block of B
      add(sg.s->AB16, 4 * sgmv_bf16::a_words(r, sg.p->in) + r0 / 16 * blk, ((r1 + 15) / 16 - r0 / 16) * blk);
    } else {
      add(sg.s->B, 4 * r0 * r, 4 * (r1 - r0) * r);
    }
  }
  return n;
}

// Bytes [S f0', S f1') of the factor stream (S its size), f' = (f - kStart) / (1 - kStart) clamped
// to [0, 1]: the last 3/4 of the GEMV's rows carry the stream, so that what comes in early is not
// pushed out of L2 by the weights streamed after it (1 MiB L2; a gate/up GEMV streams ~0.9 MB).
int SgmvFused::prefetch(double f0, double f1, const char** lo, const char** hi, int max) const {
  constexpr double kStart = 0.25;
  const SgmvBuffers& jb = *jb_;
  auto map = [&](double f) {
    const double g = (f - kStart) / (1.0 - kStart);
    return static_cast<int64_t>((g < 0 ? 0 : g > 1 ? 1 : g) * static_cast<double>(jb.pf_bytes));
  };
  const int64_t b0 = map(f0), b1 = f1 >= 1.0 ? jb.pf_bytes : map(f1);
  int n = 0;
  for (const PfRange& r : jb.pf) {
    const int64_t a = std::max(b0, r.off), b = std::min(b1, r.off + r.bytes);
    if (a >= b) continue;
    if (n == max) break;  // more pieces than room (many segments): the rest is not prefetched
    lo[n] = r.p + (a - r.off), hi[n] = r.p + (b - r.off);
    ++n;
  }
  return n;
}

void SgmvFused::shrink(int64_t i) const { run_shrink(*jb_, jb_->tasks[static_cast<size_t>(i)]); }

void SgmvFused::expand(int64_t prob, int64_t n0, int64_t n1) const {
  if (jb_->pending[static_cast<size_t>(prob)] == 0) return;  // no segment in this problem
  run_expand(*jb_, &p_[prob], prob, n0, n1);
}

void lora_segments_many(SimdLevel level, int64_t np, const Backend::LoraProblem* P, float* t_ref) {
  SgmvBuffers& jb = t_job;
  collect(level, jb, np, P, fused_enabled(), t_ref);
  round_all(jb);
  std::vector<Seg>& segs = jb.segs;
  if (segs.empty()) return;

  // A job under kSerialWork runs on the calling thread: like the NF4 GEMV's 128 KiB per task, a
  // few microseconds of work do not pay for the pool's wake-up and join (a decode step has ~120
  // of these jobs). Else about 4 tasks per thread, each at least kMinTaskWork.
  constexpr double kSerialWork = 256 << 10, kMinTaskWork = 64 << 10;
  double work = 0;
  for (const Seg& s : segs) work += 4.0 * static_cast<double>(s.s->r * (s.p->in + s.p->out)) * weight(s.s->rows);
  const int nth = num_threads();
  const bool serial = nth <= 1 || work < kSerialWork;
  const double target = serial ? 1e300 : std::max(kMinTaskWork, work / (4.0 * nth));
  plan_shrinks(jb, np, target);
  std::vector<Task>& tasks = jb.tasks;
  for (int64_t i = 0; i < np; ++i) {
    if (!jb.pending[static_cast<size_t>(i)]) continue;
    double col_work = 0;  // work of one output column, over the problem's segments
    for (const Seg& s : segs)
      if (s.p == &P[i]) col_work += 4.0 * static_cast<double>(s.s->r) * weight(s.s->rows);
    const int64_t out = P[i].out;
    int64_t cols = std::max<int64_t>(16, static_cast<int64_t>(std::min(1e15, target / std::max(1.0, col_work))));
    const int64_t pieces = (out + cols - 1) / cols;
    cols = ((out + pieces - 1) / pieces + 15) / 16 * 16;  // balanced, whole 16-column blocks
    for (int64_t n = 0; n < out; n += cols) tasks.push_back({1, -1, i, n, std::min(out, n + cols)});
  }

  auto task = [&](int64_t ti) {
    const Task& tk = tasks[static_cast<size_t>(ti)];
    if (tk.kind == 0) run_shrink(jb, tk);
    else run_expand(jb, &P[tk.prob], tk.prob, tk.a, tk.b);
  };
  if (serial) {
    for (int64_t ti = 0; ti < static_cast<int64_t>(tasks.size()); ++ti) task(ti);
  } else {
    parallel_for(static_cast<int64_t>(tasks.size()), task);
  }
}

// ------------------------------------------------------------------ bf16 inference copies
bool lora_bf16_available(SimdLevel level) { return bf16_compute_available(level); }

size_t lora_bf16_bytes(int64_t r, int64_t in, int64_t out) {
  return sizeof(uint32_t) * static_cast<size_t>(sgmv_bf16::module_words(r, in, out));
}

namespace {
uint32_t bf16_bits(float x) {  // RNE, denormals flushed, as vcvtne2ps2bf16 (cpu/gemm_bf16.hpp)
  const float r = bf16_round(x);
  uint32_t b;
  std::memcpy(&b, &r, 4);
  return b >> 16;
}
float bf16_value(uint32_t word, int half) {  // the bf16 in half 0 (low) or 1 (high) of a pair, as fp32
  const uint32_t b = half ? (word & 0xFFFF0000u) : (word << 16);
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
// Packs src[n, k] (row stride k) as 16-lane blocks of k pairs: word (nb * pairs(k) + p) * 16 + i.
void pack_lanes(int64_t n, int64_t k, const float* src, uint32_t* dst) {
  const int64_t kp = sgmv_bf16::pairs(k);
  for (int64_t nb = 0; nb < sgmv_bf16::blocks(n); ++nb)
    for (int64_t p = 0; p < kp; ++p)
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t row = nb * 16 + i;
        uint32_t w = 0;
        if (row < n) {
          w = bf16_bits(src[row * k + 2 * p]);
          if (2 * p + 1 < k) w |= bf16_bits(src[row * k + 2 * p + 1]) << 16;
        }
        dst[(nb * kp + p) * 16 + i] = w;
      }
}
// Element (row, c) of a packed [n, k] operand, as fp32.
double packed_at(const uint32_t* P, int64_t k, int64_t row, int64_t c) {
  const int64_t kp = sgmv_bf16::pairs(k);
  return bf16_value(P[((row / 16) * kp + c / 2) * 16 + row % 16], static_cast<int>(c & 1));
}
}  // namespace

void lora_pack_bf16(SimdLevel level, int64_t r, int64_t in, int64_t out, const float* A, const float* B, void* dst) {
  uint32_t* d = static_cast<uint32_t*>(dst);
#if defined(QLORA_X86)
  if (level == SimdLevel::AVX512 && lora_bf16_available(level)) {  // vcvtne2ps2bf16 + transposes: same bits
    sgmv_bf16::pack_lanes_avx512bf16(r, in, A, d);
    sgmv_bf16::pack_lanes_avx512bf16(out, r, B, d + sgmv_bf16::a_words(r, in));
    return;
  }
#endif
  (void)level;
  pack_lanes(r, in, A, d);
  pack_lanes(out, r, B, d + sgmv_bf16::a_words(r, in));
}

void lora_segments_scalar(int64_t np, const Backend::LoraProblem* P, float* t) {
  for (int64_t i = 0; i < np; ++i) {
    const Backend::LoraProblem& p = P[i];
    check_problem(p);
    for (int64_t s = 0; s < p.n; ++s) {
      const Backend::LoraSegment& g = p.seg[s];
      if (g.rows <= 0 || g.alpha == 0.0f) continue;
      const float* x = p.x + g.row0 * p.ldx;
      float* y = p.y + g.row0 * p.ldy;
      if (!g.AB16) {  // Backend::lora_segments' reference
        gemm_nt(SimdLevel::Scalar, g.rows, g.r, p.in, 1.0f, x, p.ldx, g.A, p.in, 0.0f, t, g.r);
        gemm_nt(SimdLevel::Scalar, g.rows, p.out, g.r, g.alpha, t, g.r, g.B, g.r, 1.0f, y, p.ldy);
        continue;
      }
      const uint32_t* Ap = static_cast<const uint32_t*>(g.AB16);
      const uint32_t* Bp = Ap + sgmv_bf16::a_words(g.r, p.in);
      std::vector<double> tr(static_cast<size_t>(g.r));
      for (int64_t m = 0; m < g.rows; ++m) {
        for (int64_t j = 0; j < g.r; ++j) {
          double acc = 0;
          for (int64_t k = 0; k < p.in; ++k)
            acc += static_cast<double>(bf16_round(x[m * p.ldx + k])) * packed_at(Ap, p.in, j, k);
          tr[static_cast<size_t>(j)] = bf16_round(static_cast<float>(acc));  // t stored fp32, then rounded
        }
        for (int64_t n = 0; n < p.out; ++n) {
          double acc = 0;
          for (int64_t j = 0; j < g.r; ++j) acc += tr[static_cast<size_t>(j)] * packed_at(Bp, g.r, n, j);
          y[m * p.ldy + n] = static_cast<float>(static_cast<double>(y[m * p.ldy + n]) + g.alpha * acc);
        }
      }
    }
  }
}

}  // namespace qlora::cpu
