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
};
struct Task {
  int kind;        // 0: shrink rank rows [a, b) of segment seg; 1: expand columns [a, b) of problem prob
  int64_t seg, prob, a, b;
};

}  // namespace

// The calling thread's buffers of a job (grow-only: no allocation per decode-step call).
struct SgmvBuffers {
  std::vector<float> t;  // every fused segment's t
  std::vector<Seg> segs;
  std::vector<int64_t> prob_of_seg, pending;
  std::vector<Task> tasks;
  std::unique_ptr<std::atomic<int64_t>[]> left;  // shrink tasks not finished, per problem
  size_t n_left = 0;
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

void check_problem(const Backend::LoraProblem& p) {
  check_arg(p.in >= 1 && p.out >= 1 && p.n >= 0 && p.ldx >= p.in && p.ldy >= p.out,
            "lora_segments: bad dimensions or leading dimensions");
  for (int64_t s = 0; s < p.n; ++s)
    check_arg(p.seg[s].rows >= 0 && p.seg[s].row0 >= 0 && p.seg[s].r >= 1, "lora_segments: bad segment");
}

// Work of a segment in bytes of A and B read, weighted by its rows (at 8 rows the FMAs take
// about as long as streaming the factors; below 4 rows the stream dominates).
double weight(int64_t rows) { return std::max(1.0, static_cast<double>(rows) / 4.0); }

// Collects the segments of few rows into jb.segs with their t slices; segments of many rows (or
// every segment when !fused) run at once through the gemm_nt path when t_ref is given, else
// make the plan fail (returns false).
bool collect(SimdLevel level, SgmvBuffers& jb, int64_t np, const Backend::LoraProblem* P, bool fused, float* t_ref) {
  jb.kn = kernels_for(level);
  jb.segs.clear(), jb.prob_of_seg.clear();
  int64_t t_need = 0;
  for (int64_t i = 0; i < np; ++i) {
    const Backend::LoraProblem& p = P[i];
    check_problem(p);
    for (int64_t s = 0; s < p.n; ++s) {
      const Backend::LoraSegment& g = p.seg[s];
      if (g.rows <= 0 || g.alpha == 0.0f) continue;
      if (g.rows > kSgmvMaxRows || !fused) {  // many rows: the blocked GEMMs (their own parallel jobs)
        if (!t_ref) return false;
        gemm_nt(level, g.rows, g.r, p.in, 1.0f, p.x + g.row0 * p.ldx, p.ldx, g.A, p.in, 0.0f, t_ref, g.r);
        gemm_nt(level, g.rows, p.out, g.r, g.alpha, t_ref, g.r, g.B, g.r, 1.0f, p.y + g.row0 * p.ldy, p.ldy);
        continue;
      }
      jb.segs.push_back({&p, &g, nullptr});
      jb.prob_of_seg.push_back(i);
      t_need += g.rows * g.r;
    }
  }
  if (jb.t.size() < static_cast<size_t>(t_need)) jb.t.resize(static_cast<size_t>(t_need));
  float* t = jb.t.data();
  for (Seg& s : jb.segs) s.t = t, t += s.s->rows * s.s->r;
  return true;
}

// Shrink tasks (rank rows of a segment, pieces of about `target` work) into jb.tasks, counted per
// problem in jb.left.
void plan_shrinks(SgmvBuffers& jb, int64_t np, double target) {
  jb.tasks.clear();
  jb.pending.assign(static_cast<size_t>(np), 0);
  for (size_t k = 0; k < jb.segs.size(); ++k) {
    const Backend::LoraSegment& g = *jb.segs[k].s;
    const double a_work = 4.0 * static_cast<double>(g.r * jb.segs[k].p->in) * weight(g.rows);
    const int64_t pieces = std::min<int64_t>(g.r, std::max<int64_t>(1, static_cast<int64_t>(a_work / target + 0.5)));
    const int64_t per = (g.r + pieces - 1) / pieces;
    for (int64_t j = 0; j < g.r; j += per) {
      jb.tasks.push_back({0, static_cast<int64_t>(k), jb.prob_of_seg[k], j, std::min(g.r, j + per)});
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
  const float* x = s.p->x + g.row0 * s.p->ldx;
  for (int64_t m0 = 0; m0 < g.rows; m0 += jb.kn.group)
    jb.kn.shrink(std::min(jb.kn.group, g.rows - m0), tk.a, tk.b, s.p->in, 1.0f, x + m0 * s.p->ldx, s.p->ldx, g.A,
                 s.p->in, 0.0f, s.t + m0 * g.r, g.r);
  jb.left[tk.prob].fetch_sub(1, std::memory_order_release);
}

// Every shrink task of problem prob was claimed before the calling task (lower index): waits for
// the ones still running on other threads (spin briefly, then yield the core), then adds the
// expand of columns [n0, n1) of every segment of the problem.
void run_expand(const SgmvBuffers& jb, const Backend::LoraProblem* p, int64_t prob, int64_t n0, int64_t n1) {
  for (int spins = 0; jb.left[prob].load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 4000) QLORA_SGMV_PAUSE();
    else std::this_thread::yield();
  }
  for (const Seg& s : jb.segs) {
    if (s.p != p) continue;
    const Backend::LoraSegment& g = *s.s;
    jb.kn.expand(g.rows, n0, n1, g.r, g.alpha, s.t, g.r, g.B, g.r, p->y + g.row0 * p->ldy, p->ldy);
  }
}

}  // namespace

bool SgmvFused::prepare(SimdLevel level, int64_t np, const Backend::LoraProblem* P) {
  n_shrink_ = 0;
  if (level == SimdLevel::Scalar || !host_fused_enabled()) return false;
  SgmvBuffers& jb = t_job;
  if (!collect(level, jb, np, P, true, nullptr)) return false;
  // The host job gives the parallelism: one shrink task per segment up to 512 KiB of weighted
  // work (a few microseconds), so an expand rarely waits.
  plan_shrinks(jb, np, 512 << 10);
  jb_ = &jb, p_ = P, np_ = np;
  n_shrink_ = static_cast<int64_t>(jb.tasks.size());
  return true;
}

void SgmvFused::shrink(int64_t i) const { run_shrink(*jb_, jb_->tasks[static_cast<size_t>(i)]); }

void SgmvFused::expand(int64_t prob, int64_t n0, int64_t n1) const {
  if (jb_->pending[static_cast<size_t>(prob)] == 0) return;  // no segment in this problem
  run_expand(*jb_, &p_[prob], prob, n0, n1);
}

void lora_segments_many(SimdLevel level, int64_t np, const Backend::LoraProblem* P, float* t_ref) {
  SgmvBuffers& jb = t_job;
  collect(level, jb, np, P, fused_enabled(), t_ref);
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
