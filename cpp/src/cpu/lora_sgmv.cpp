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

// The calling thread's buffers of a job (grow-only: no allocation per decode-step call).
struct JobBuffers {
  std::vector<float> t;  // every fused segment's t
  std::vector<Seg> segs;
  std::vector<int64_t> prob_of_seg, pending;
  std::vector<Task> tasks;
  std::unique_ptr<std::atomic<int64_t>[]> left;  // shrink tasks not finished, per problem
  size_t n_left = 0;
};
thread_local JobBuffers t_job;

// QLORA_SGMV=0 sends every segment through the gemm_nt reference path (A/B benchmarks).
bool fused_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("QLORA_SGMV");
    return !(e && e[0] == '0' && e[1] == '\0');
  }();
  return on;
}

void check_problem(const Backend::LoraProblem& p) {
  check_arg(p.in >= 1 && p.out >= 1 && p.n >= 0 && p.ldx >= p.in && p.ldy >= p.out,
            "lora_segments: bad dimensions or leading dimensions");
  for (int64_t s = 0; s < p.n; ++s)
    check_arg(p.seg[s].rows >= 0 && p.seg[s].row0 >= 0 && p.seg[s].r >= 1, "lora_segments: bad segment");
}

}  // namespace

void lora_segments_many(SimdLevel level, int64_t np, const Backend::LoraProblem* P, float* t_ref) {
  const Kernels kn = kernels_for(level);
  JobBuffers& jb = t_job;
  std::vector<Seg>& segs = jb.segs;
  std::vector<int64_t>& prob_of_seg = jb.prob_of_seg;
  segs.clear(), prob_of_seg.clear();
  const bool fused = fused_enabled();
  int64_t t_need = 0;
  for (int64_t i = 0; i < np; ++i) {
    const Backend::LoraProblem& p = P[i];
    check_problem(p);
    for (int64_t s = 0; s < p.n; ++s) {
      const Backend::LoraSegment& g = p.seg[s];
      if (g.rows <= 0 || g.alpha == 0.0f) continue;
      if (g.rows > kSgmvMaxRows || !fused) {  // many rows: the blocked GEMMs (their own parallel jobs)
        gemm_nt(level, g.rows, g.r, p.in, 1.0f, p.x + g.row0 * p.ldx, p.ldx, g.A, p.in, 0.0f, t_ref, g.r);
        gemm_nt(level, g.rows, p.out, g.r, g.alpha, t_ref, g.r, g.B, g.r, 1.0f, p.y + g.row0 * p.ldy, p.ldy);
        continue;
      }
      segs.push_back({&p, &g, nullptr});
      prob_of_seg.push_back(i);
      t_need += g.rows * g.r;
    }
  }
  if (segs.empty()) return;
  if (jb.t.size() < static_cast<size_t>(t_need)) jb.t.resize(static_cast<size_t>(t_need));
  {
    float* t = jb.t.data();
    for (Seg& s : segs) s.t = t, t += s.s->rows * s.s->r;
  }

  // Work of a segment in bytes of A and B read, weighted by its rows (at 8 rows the FMAs take
  // about as long as streaming the factors; below 4 rows the stream dominates). A job under
  // kSerialWork runs on the calling thread: like the NF4 GEMV's 128 KiB per task, a few
  // microseconds of work do not pay for the pool's wake-up and join (a decode step has ~120 of
  // these jobs). Else about 4 tasks per thread, each at least kMinTaskWork.
  constexpr double kSerialWork = 256 << 10, kMinTaskWork = 64 << 10;
  auto weight = [](int64_t rows) { return std::max(1.0, static_cast<double>(rows) / 4.0); };
  double work = 0;
  for (const Seg& s : segs) work += 4.0 * static_cast<double>(s.s->r * (s.p->in + s.p->out)) * weight(s.s->rows);
  const int nth = num_threads();
  const bool serial = nth <= 1 || work < kSerialWork;
  const double target = serial ? 1e300 : std::max(kMinTaskWork, work / (4.0 * nth));
  std::vector<Task>& tasks = jb.tasks;
  std::vector<int64_t>& pending = jb.pending;  // shrink tasks per problem
  tasks.clear();
  pending.assign(static_cast<size_t>(np), 0);
  for (size_t k = 0; k < segs.size(); ++k) {
    const Backend::LoraSegment& g = *segs[k].s;
    const double a_work = 4.0 * static_cast<double>(g.r * segs[k].p->in) * weight(g.rows);
    const int64_t pieces = std::min<int64_t>(g.r, std::max<int64_t>(1, static_cast<int64_t>(a_work / target + 0.5)));
    const int64_t per = (g.r + pieces - 1) / pieces;
    for (int64_t j = 0; j < g.r; j += per) {
      tasks.push_back({0, static_cast<int64_t>(k), prob_of_seg[k], j, std::min(g.r, j + per)});
      ++pending[static_cast<size_t>(prob_of_seg[k])];
    }
  }
  for (int64_t i = 0; i < np; ++i) {
    if (!pending[static_cast<size_t>(i)]) continue;
    double col_work = 0;  // work of one output column, over the problem's segments
    for (const Seg& s : segs)
      if (s.p == &P[i]) col_work += 4.0 * static_cast<double>(s.s->r) * weight(s.s->rows);
    const int64_t out = P[i].out;
    int64_t cols = std::max<int64_t>(16, static_cast<int64_t>(std::min(1e15, target / std::max(1.0, col_work))));
    const int64_t pieces = (out + cols - 1) / cols;
    cols = ((out + pieces - 1) / pieces + 15) / 16 * 16;  // balanced, whole 16-column blocks
    for (int64_t n = 0; n < out; n += cols) tasks.push_back({1, -1, i, n, std::min(out, n + cols)});
  }

  if (jb.n_left < static_cast<size_t>(np)) {
    jb.left.reset(new std::atomic<int64_t>[static_cast<size_t>(np)]);
    jb.n_left = static_cast<size_t>(np);
  }
  std::atomic<int64_t>* left = jb.left.get();
  for (int64_t i = 0; i < np; ++i) left[i].store(pending[static_cast<size_t>(i)], std::memory_order_relaxed);

  auto task = [&](int64_t ti) {
    const Task& tk = tasks[static_cast<size_t>(ti)];
    if (tk.kind == 0) {
      const Seg& s = segs[static_cast<size_t>(tk.seg)];
      const Backend::LoraSegment& g = *s.s;
      const float* x = s.p->x + g.row0 * s.p->ldx;
      for (int64_t m0 = 0; m0 < g.rows; m0 += kn.group)
        kn.shrink(std::min(kn.group, g.rows - m0), tk.a, tk.b, s.p->in, 1.0f, x + m0 * s.p->ldx, s.p->ldx, g.A,
                  s.p->in, 0.0f, s.t + m0 * g.r, g.r);
      left[tk.prob].fetch_sub(1, std::memory_order_release);
      return;
    }
    // Every shrink task of this problem was claimed before this task (lower index): wait for the
    // ones still running on other threads (spin briefly, then yield the core).
    for (int spins = 0; left[tk.prob].load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 4000) QLORA_SGMV_PAUSE();
      else std::this_thread::yield();
    }
    const Backend::LoraProblem& p = P[tk.prob];
    for (const Seg& s : segs) {
      if (s.p != &p) continue;
      const Backend::LoraSegment& g = *s.s;
      kn.expand(g.rows, tk.a, tk.b, g.r, g.alpha, s.t, g.r, g.B, g.r, p.y + g.row0 * p.ldy, p.ldy);
    }
  };
  if (serial) {
    for (int64_t ti = 0; ti < static_cast<int64_t>(tasks.size()); ++ti) task(ti);
  } else {
    parallel_for(static_cast<int64_t>(tasks.size()), task);
  }
}

}  // namespace qlora::cpu
