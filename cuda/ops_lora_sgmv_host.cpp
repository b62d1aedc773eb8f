// Host side of the device SGMV (ops_lora_sgmv.cu): splits the problems' segments into short ones
// (SGMV launches, up to kSgmvMaxEntries segments each, their descriptors passed as the launch's
// parameter block: nothing is uploaded) and long ones (two fp32 GEMMs each, as Backend's default).
#include <string>
#include <vector>

#include "common/error.hpp"
#include "ops_lora_sgmv.cuh"

namespace qlora::cuda {

namespace {
constexpr int64_t kI32 = 0x7fffffff;
}

void lora_segments_many_op(Backend& be, cudaStream_t stream, int64_t np, const Backend::LoraProblem* p, float* t) {
  const std::string pre = "cuda backend: lora_segments_many: ";
  check_arg(np >= 0, pre + "negative problem count");
  std::vector<SgmvEntry> shorts;
  std::vector<const Backend::LoraSegment*> longs;
  std::vector<const Backend::LoraProblem*> long_prob;
  int64_t t_total = 0;  // floats of t for the short segments
  for (int64_t i = 0; i < np; ++i) {
    const Backend::LoraProblem& q = p[i];
    check_arg(q.in >= 0 && q.out >= 0 && q.n >= 0, pre + "negative dimension");
    check_arg(q.ldx >= q.in && q.ldy >= q.out, pre + "leading dimension smaller than a row");
    check_arg(q.in <= kI32 && q.out <= kI32 && q.ldx <= kI32 && q.ldy <= kI32, pre + "dimension too large");
    for (int64_t s = 0; s < q.n; ++s) {
      const Backend::LoraSegment& g = q.seg[s];
      check_arg(g.row0 >= 0 && g.rows >= 0 && g.r >= 0, pre + "negative segment row, size or rank");
      if (g.rows == 0 || g.r == 0 || g.alpha == 0.0f || q.out == 0) continue;
      if (g.rows <= kSgmvMaxRows && g.rows * g.r <= kSgmvMaxTile && q.in > 0) {
        SgmvEntry e{};
        e.x = q.x + g.row0 * q.ldx;
        e.y = q.y + g.row0 * q.ldy;
        e.A = g.A;
        e.B = g.B;
        e.t = nullptr;  // set below, once the scratch exists
        e.ldx = static_cast<int32_t>(q.ldx);
        e.ldy = static_cast<int32_t>(q.ldy);
        e.in = static_cast<int32_t>(q.in);
        e.out = static_cast<int32_t>(q.out);
        e.rows = static_cast<int32_t>(g.rows);
        e.r = static_cast<int32_t>(g.r);
        e.alpha = g.alpha;
        e.shrink0 = static_cast<int32_t>(t_total);  // the entry's t offset until the batches are built
        t_total += g.rows * g.r;
        shorts.push_back(e);
      } else {
        longs.push_back(&g);
        long_prob.push_back(&q);
      }
    }
  }
  // Long segments (prefill): t = x·Aᵀ, y += alpha t·Bᵀ through the tiled GEMM, scratch t.
  for (size_t k = 0; k < longs.size(); ++k) {
    const Backend::LoraSegment& g = *longs[k];
    const Backend::LoraProblem& q = *long_prob[k];
    be.gemm_nt(g.rows, g.r, q.in, 1.0f, q.x + g.row0 * q.ldx, q.ldx, g.A, q.in, 0.0f, t, g.r);
    be.gemm_nt(g.rows, q.out, g.r, g.alpha, t, g.r, g.B, g.r, 1.0f, q.y + g.row0 * q.ldy, q.ldy);
  }
  if (shorts.empty()) return;
  struct Scratch {
    Backend& be;
    float* p;
    ~Scratch() {
      try {
        be.free(p);
      } catch (...) {  // already unwinding
      }
    }
  } ts{be, static_cast<float*>(be.alloc(sizeof(float) * static_cast<size_t>(t_total)))};
  for (size_t b0 = 0; b0 < shorts.size(); b0 += kSgmvMaxEntries) {
    SgmvBatch batch{};
    int32_t shrink = 0, expand = 0;
    for (size_t k = b0; k < shorts.size() && k < b0 + kSgmvMaxEntries; ++k) {
      SgmvEntry e = shorts[k];
      e.t = ts.p + e.shrink0;
      e.shrink0 = shrink;
      e.expand0 = expand;
      shrink += e.r;
      expand += (e.out + 255) / 256;  // kExpandThreads columns per block
      batch.e[batch.n++] = e;
    }
    batch.shrink_items = shrink;
    batch.expand_items = expand;
    lora_sgmv(stream, batch);
  }
}

}  // namespace qlora::cuda
