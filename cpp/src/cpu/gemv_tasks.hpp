// The NF4 GEMV drivers' shared job layout (nf4_gemv.cpp: fp32, nf4_gemv_bf16.cpp: bf16 compute):
// the row-task split over n weights, the tail's prefetch pieces per task and the dispatch with
// the tail's pre / post / after tasks. The per-rows work (kernel, scales, Args) stays with each
// driver, passed in as a callable.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cpu/nf4_gemv.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::gemv_tasks {

struct Task {
  int64_t w, r0, r1, g0;  // weight, rows [r0, r1); g0: rows of the job before this task's (the tail's prefetch fractions)
};

// The part of a's prefetch range (Args::pf_lo/pf_hi, spread over rows [r0, r1)) that goes with rows [q0, q1).
template <class Args>
Args pf_part(Args a, int64_t r0, int64_t r1, int64_t q0, int64_t q1) {
  if (!a.pf_lo) return a;
  const int64_t bytes = a.pf_hi - a.pf_lo, rows = r1 - r0;
  const char* lo = a.pf_lo;
  a.pf_lo = lo + bytes * (q0 - r0) / rows;
  a.pf_hi = lo + bytes * (q1 - r0) / rows;
  return a;
}

// The running thread's decoded block scales (grow-only: no allocation per task of a decode step).
// A function, not a thread_local named inside a lambda (GCC has bound such names to the thread
// that created the lambda).
inline std::vector<float>& thread_scales() {
  thread_local std::vector<float> s;
  return s;
}

// QLORA_GEMV_SCRATCH=0 (read per call, A/B runs): each driver takes a fresh buffer per call instead
// of its calling thread's grow-only scratch (regrouped X and task list).
inline bool scratch_enabled() {
  const char* e = std::getenv("QLORA_GEMV_SCRATCH");
  return !(e && e[0] == '0' && e[1] == '\0');
}

// Rows [r0, r1) of W through rows(a, q0, q1): with double quant, the block scales of a few rows at a
// time are decoded (decode(b0, b1, out): blocks [b0, b1)) into the running thread's buffer, which
// stays in L1/L2. Sub-ranges are even (r0 is: the task splits are), so the kernels' row pairs stay
// (2j, 2j + 1) of the weight whatever the split: an odd sub-range had sent one row through the
// single-row kernel, whose sums run in another order, at positions that moved with the thread count.
template <class Args, class Decode, class Rows>
void scaled_rows(Args a, const Nf4Ref& W, int64_t r0, int64_t r1, const Decode& decode, const Rows& rows) {
  if (!W.double_quant) {
    a.absmax = static_cast<const float*>(W.absmax);
    a.block0 = 0;
    rows(a, r0, r1);
    return;
  }
  const Args whole = a;
  const int64_t K = W.cols;
  const int s = a.bs_shift;
  std::vector<float>& scales = thread_scales();
  const int64_t rows_per_sub = std::max<int64_t>(2, ((int64_t{4096} << s) / K) & ~int64_t{1});
  for (int64_t q0 = r0; q0 < r1; q0 += rows_per_sub) {
    const int64_t q1 = std::min(r1, q0 + rows_per_sub);
    const int64_t b0 = (q0 * K) >> s, b1 = ((q1 * K - 1) >> s) + 1;  // blocks [b0, b1)
    scales.resize(static_cast<size_t>(b1 - b0));
    decode(b0, b1, scales.data());
    a = pf_part(whole, r0, r1, q0, q1);
    a.absmax = scales.data();
    a.block0 = b0;
    rows(a, q0, q1);
  }
}

// Tasks: each weight's rows in chunks of `per` (into `tasks`, cleared first); returns the rows of
// all weights. At least 128 KiB of packed weight per task at M <= 2 (about 8 us of streaming), so
// that small layers do not pay the thread pool's wake-up and join; less at larger M, where each
// weight costs M FMAs (at M = 8 a [192, 576] k/v projection is then split over two threads). Even
// chunk sizes keep the row pairs of the kernels at (2j, 2j + 1) of each weight whatever the split,
// so a row's result depends neither on the thread count nor on the other weights.
inline int64_t split(int64_t M, int64_t K, int64_t n, const Nf4Ref* const* W, std::vector<Task>& tasks) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / (K * std::max<int64_t>(1, M / 2)));
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += W[i]->rows;
  const int64_t n_tasks =
      std::max<int64_t>(1, std::min<int64_t>((total + grain - 1) / grain, 4 * static_cast<int64_t>(num_threads())));
  int64_t per = (total + n_tasks - 1) / n_tasks;
  per += per & 1;
  tasks.clear();
  for (int64_t i = 0, g = 0; i < n; ++i)
    for (int64_t r = 0; r < W[i]->rows; r += per) {
      const int64_t r1 = std::min(W[i]->rows, r + per);
      tasks.push_back({i, r, r1, g});
      g += r1 - r;
    }
  return total;
}

// Runs the tasks (plus the tail's) as one job. rows(t, r0, r1, pf_lo, pf_hi) runs rows [r0, r1)
// of weight t.w with the prefetch range [pf_lo, pf_hi) (null: none). With `pf`, the tail's bytes
// for each task's share of the job's rows come in pieces, and each piece's rows get an even share
// (even boundaries keep the row pairs (2j, 2j + 1) of each weight: results unchanged).
template <class Rows>
void run(const std::vector<Task>& tasks, int64_t total, const GemvTail* tail, bool pf, const Rows& rows) {
  const double inv_total = 1.0 / static_cast<double>(total);
  auto run_task = [&](const Task& t) {
    const char* lo[4];
    const char* hi[4];
    const int np = pf ? tail->prefetch(tail->ctx, static_cast<double>(t.g0) * inv_total,
                                       static_cast<double>(t.g0 + t.r1 - t.r0) * inv_total, lo, hi, 4)
                      : 0;
    if (np <= 1) {
      rows(t, t.r0, t.r1, np == 1 ? lo[0] : nullptr, np == 1 ? hi[0] : nullptr);
    } else {
      int64_t bytes = 0, done = 0;
      for (int i = 0; i < np; ++i) bytes += hi[i] - lo[i];
      int64_t r = t.r0;
      for (int i = 0; i < np && r < t.r1; ++i) {
        done += hi[i] - lo[i];
        int64_t r1 = i + 1 == np ? t.r1 : t.r0 + (t.r1 - t.r0) * done / std::max<int64_t>(1, bytes);
        r1 = std::min(t.r1, r1 + ((r1 - t.r0) & 1));
        if (r1 <= r) continue;
        rows(t, r, r1, lo[i], hi[i]);
        r = r1;
      }
    }
    if (tail && tail->post) tail->post(tail->ctx, t.w, t.r0, t.r1);
  };
  const int64_t n_pre = tail ? tail->n_pre : 0, n_gemv = static_cast<int64_t>(tasks.size());
  const int64_t n_after = tail ? tail->n_after : 0;
  if (n_gemv + n_pre + n_after == 1) return run_task(tasks[0]);
  // The tail's pre tasks first, its after tasks last: tasks are claimed in index order, so a task
  // that waits on earlier ones only waits for work already running.
  parallel_for(n_gemv + n_pre + n_after, [&](int64_t t) {
    if (t < n_pre) return tail->pre(tail->ctx, t);
    if (t >= n_pre + n_gemv) return tail->after(tail->ctx, t - n_pre - n_gemv);
    run_task(tasks[static_cast<size_t>(t - n_pre)]);
  });
}

}  // namespace qlora::cpu::gemv_tasks
