// The fused job's opt-in local form (lora_sgmv.hpp, SgmvFused; QLORA_SGMV_LOCAL=1): its plan
// (plan_local, called by SgmvFused::prepare), the GEMV tasks' own LoRA terms (local_done) and their
// prefetch.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/lora_sgmv.hpp"
#include "cpu/lora_sgmv_bf16_kernels.hpp"
#include "cpu/lora_sgmv_plan.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu {

using namespace sgmv_plan;

namespace {

// QLORA_SGMV_LOCAL=own (tests): no task shares its t or rounded x, each computes its own.
bool share_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("QLORA_SGMV_LOCAL");
    return !(e && std::strcmp(e, "own") == 0);
  }();
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

}  // namespace

namespace sgmv_plan {

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

}  // namespace sgmv_plan

namespace {

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

}  // namespace qlora::cpu
