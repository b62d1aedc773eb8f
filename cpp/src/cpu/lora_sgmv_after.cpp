// The fused job's after form (lora_sgmv.hpp, SgmvFused; planned in SgmvFused::prepare): the
// shrink and piece tasks after the GEMV's, the expand pieces, the factors' prefetch stream.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/lora_sgmv.hpp"
#include "cpu/lora_sgmv_plan.hpp"

namespace qlora::cpu {

using namespace sgmv_plan;

namespace {

// After form: `done` more of expand piece k's dependencies are met (base rows of its columns, or
// one shrink of its problem); the call that meets the last one adds the piece's terms, so no task
// ever waits for another.
void piece_progress(const SgmvBuffers& jb, const Backend::LoraProblem* P, size_t k, int64_t done) {
  const Piece& pc = jb.pieces[k];
  if (jb.dep[k].fetch_sub(done, std::memory_order_acq_rel) == done && !jb.taken[k].exchange(1, std::memory_order_acq_rel))
    expand_cols(jb, &P[pc.prob], pc.n0, pc.n1);
}

}  // namespace

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

}  // namespace qlora::cpu
