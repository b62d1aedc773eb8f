#include "cpu/lora_sgmv.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "common/error.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemv_f32.hpp"
#include "cpu/lora_sgmv_bf16_kernels.hpp"
#include "cpu/lora_sgmv_kernels.hpp"
#include "cpu/lora_sgmv_plan.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

using namespace sgmv_plan;

namespace {

Kernels kernels_for(SimdLevel level) {
#if defined(QLORA_X86)
  if (level == SimdLevel::AVX512) return {gemv_nt_f32_avx512, 8, sgmv_detail::expand_avx512};
  if (level == SimdLevel::AVX2) return {gemv_nt_f32_avx2, 8, sgmv_detail::expand_avx2};
#endif
  (void)level;
  return {gemv_nt_f32_generic, 4, sgmv_detail::expand_generic};
}

thread_local SgmvBuffers t_job;

}  // namespace

namespace sgmv_plan {

bool env_off(const char* name) {
  const char* e = std::getenv(name);
  return e && e[0] == '0' && e[1] == '\0';
}

}  // namespace sgmv_plan

namespace {

// QLORA_SGMV=0 sends every segment through the gemm_nt reference path (A/B benchmarks).
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

}  // namespace

namespace sgmv_plan {

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

}  // namespace sgmv_plan

namespace {

// QLORA_SGMV_PIECE_TASKS=0: the after form without its piece tasks (A/B runs; see SgmvFused::after).
bool piece_tasks_enabled() {
  static const bool on = !env_off("QLORA_SGMV_PIECE_TASKS");
  return on;
}

}  // namespace

namespace sgmv_plan {

void check_problem(const Backend::LoraProblem& p) {
  check_arg(p.in >= 1 && p.out >= 1 && p.n >= 0 && p.ldx >= p.in && p.ldy >= p.out,
            "lora_segments: bad dimensions or leading dimensions");
  for (int64_t s = 0; s < p.n; ++s)
    check_arg(p.seg[s].rows >= 0 && p.seg[s].row0 >= 0 && p.seg[s].r >= 1, "lora_segments: bad segment");
}

}  // namespace sgmv_plan

namespace {

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

}  // namespace

namespace sgmv_plan {

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

}  // namespace sgmv_plan

namespace {

void run_expand(const SgmvBuffers& jb, const Backend::LoraProblem* p, int64_t prob, int64_t n0, int64_t n1) {
  for (int spins = 0; jb.left[prob].load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 4000) QLORA_SGMV_PAUSE();
    else std::this_thread::yield();
  }
  expand_cols(jb, p, n0, n1);
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

GemvTail SgmvFused::tail() const {
  GemvTail tl;
  tl.ctx = this;
  if (local_) {  // each GEMV task adds the LoRA terms of its own columns
    tl.post = [](const void* c, int64_t w, int64_t r0, int64_t r1) {
      static_cast<const SgmvFused*>(c)->local_done(w, r0, r1);
    };
    tl.prefetch = [](const void* c, double f0, double f1, const char** lo, const char** hi, int max) {
      return static_cast<const SgmvFused*>(c)->local_prefetch(f0, f1, lo, hi, max);
    };
  } else if (after_) {  // factors prefetched during the GEMV, LoRA tasks after it
    tl.post = [](const void* c, int64_t w, int64_t r0, int64_t r1) {
      static_cast<const SgmvFused*>(c)->gemv_done(w, r0, r1);
    };
    tl.n_after = after_tasks();
    tl.after = [](const void* c, int64_t i) { static_cast<const SgmvFused*>(c)->after(i); };
    tl.prefetch = [](const void* c, double f0, double f1, const char** lo, const char** hi, int max) {
      return static_cast<const SgmvFused*>(c)->prefetch(f0, f1, lo, hi, max);
    };
  } else {  // first form: shrinks first, each GEMV task adds the expand of its columns
    tl.n_pre = shrink_tasks();
    tl.pre = [](const void* c, int64_t i) { static_cast<const SgmvFused*>(c)->shrink(i); };
    tl.post = [](const void* c, int64_t w, int64_t r0, int64_t r1) {
      static_cast<const SgmvFused*>(c)->expand(w, r0, r1);
    };
  }
  return tl;
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

}  // namespace qlora::cpu
