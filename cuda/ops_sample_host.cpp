// Host side of the device sampler (ops_sample.cu): argument checks, one staged upload, the
// kernels, one download of the token ids.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "ops_sample.cuh"

namespace qlora::cuda {

namespace {
size_t align8(size_t x) { return (x + 7) & ~size_t{7}; }
}  // namespace

void sample_rows_op(Backend& be, cudaStream_t stream, int64_t n, int64_t V, const float* logits, int64_t ldl,
                    const int32_t* rows, const int32_t* const* histories, const int64_t* n_hists,
                    const SamplingParams& p, const double* u, int32_t* out) {
  p.validate();
  check_arg(n >= 0 && V >= 0 && ldl >= V, "cuda backend: sample_rows: bad shape (n, V >= 0, ldl >= V)");
  if (n == 0) return;
  check_arg(V >= 1, "sample: empty logits");
  check_arg(V < 0x7fffffff && n <= 0x7fffffff, "cuda backend: sample_rows: vocabulary or batch too large");
  const bool pen = p.repetition_penalty != 1.0f;
  std::vector<int64_t> off(n), src_off(n);  // kernel rows; the logits rows (penalty copies)
  std::vector<double> draws(n, 0.0);
  std::vector<int32_t> pen_off(n + 1, 0), pen_tok;
  for (int64_t i = 0; i < n; ++i) {
    check_arg(rows[i] >= 0, "cuda backend: sample_rows: negative row index");
    src_off[i] = static_cast<int64_t>(rows[i]) * ldl;
    off[i] = pen ? i * V : src_off[i];
    if (p.draws()) draws[i] = u[i];
    if (pen) {  // each distinct in-range token once, as the host rule
      const size_t b = pen_tok.size();
      for (int64_t j = 0; j < n_hists[i]; ++j)
        if (histories[i][j] >= 0 && histories[i][j] < V) pen_tok.push_back(histories[i][j]);
      std::sort(pen_tok.begin() + b, pen_tok.end());
      pen_tok.erase(std::unique(pen_tok.begin() + b, pen_tok.end()), pen_tok.end());
      check_arg(pen_tok.size() < 0x7fffffffu, "cuda backend: sample_rows: histories too long");
      pen_off[i + 1] = static_cast<int32_t>(pen_tok.size());
    }
  }
  // One device buffer: off | src_off | draws | out | pen_off | pen_tok | work [n, V] (penalty).
  const size_t o_off = 0, o_src = o_off + 8 * n, o_u = o_src + 8 * n, o_out = o_u + 8 * n,
               o_poff = align8(o_out + 4 * n), o_ptok = align8(o_poff + 4 * (n + 1)),
               o_work = (o_ptok + 4 * pen_tok.size() + 255) & ~size_t{255};
  const size_t head = o_work, total = head + (pen ? sizeof(float) * n * V : 0);
  std::vector<unsigned char> h(head, 0);
  std::memcpy(h.data() + o_off, off.data(), 8 * n);
  std::memcpy(h.data() + o_src, src_off.data(), 8 * n);
  std::memcpy(h.data() + o_u, draws.data(), 8 * n);
  std::memcpy(h.data() + o_poff, pen_off.data(), 4 * (n + 1));
  if (!pen_tok.empty()) std::memcpy(h.data() + o_ptok, pen_tok.data(), 4 * pen_tok.size());
  struct Buf {
    Backend& be;
    unsigned char* p;
    ~Buf() {
      try {
        be.free(p);
      } catch (...) {  // already unwinding
      }
    }
  } d{be, static_cast<unsigned char*>(be.alloc(total))};
  be.upload(d.p, h.data(), head);
  const float* base = logits;
  if (pen) {
    float* work = reinterpret_cast<float*>(d.p + o_work);
    sample_penalize(stream, n, V, logits, reinterpret_cast<const int64_t*>(d.p + o_src),
                    reinterpret_cast<const int32_t*>(d.p + o_poff), reinterpret_cast<const int32_t*>(d.p + o_ptok),
                    p.repetition_penalty, work);
    base = work;
  }
  sample_rows(stream, n, V, base, reinterpret_cast<const int64_t*>(d.p + o_off),
              reinterpret_cast<const double*>(d.p + o_u), p.temperature, p.top_k, p.top_p,
              reinterpret_cast<int32_t*>(d.p + o_out));
  be.download(out, d.p + o_out, 4 * n);
  be.synchronize();
  for (int64_t i = 0; i < n; ++i) check_arg(out[i] >= 0, "sample: logits contain NaN");
}

}  // namespace qlora::cuda
