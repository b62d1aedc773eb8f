// The chunked causal-LM loss through the lm_head (lm_loss.hpp): Backend ops only. A backend's own
// lm_head layout (Backend::lm_head_begin: CPU bf16 panels, Q8_0 rows decoded in its GEMMs) comes in
// through that op, so nothing here branches on the backend.
#include "model/lm_loss.hpp"

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cpu/profile.hpp"

namespace qlora {

size_t cross_entropy_workspace_bytes(int64_t rows_in_chunk, int64_t V, int64_t D, bool device) {
  const size_t r = static_cast<size_t>(rows_in_chunk);
  return r * static_cast<size_t>(V) * sizeof(float) + r * sizeof(float) + (r + 1) * static_cast<size_t>(D) * sizeof(float) +
         r * sizeof(int32_t) + (device ? r * sizeof(int32_t) : 0);
}

namespace {

// Backend buffers freed on scope exit; counts what it allocated.
struct Scratch {
  Backend& be;
  std::vector<void*> ptrs;
  size_t bytes = 0;
  explicit Scratch(Backend& b) : be(b) {}
  ~Scratch() {
    for (void* p : ptrs) be.free(p);
  }
  void* get(size_t n) {
    ptrs.push_back(nullptr);
    ptrs.back() = be.alloc(n);
    bytes += n;
    return ptrs.back();
  }
};

// Exactly one of E (fp32 [V, D]), E_q8 (Q8_0 rows; q8_as_f32: standing for their fp32 table) and
// E16 (16-bit rows of type ht) is set.
CrossEntropyResult lm_cross_entropy_any(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                        const float* E, const void* E_q8, const int32_t* labels, float grad_scale,
                                        float* dh, int64_t lddh, int64_t chunk_rows, bool bf16,
                                        const void* E16 = nullptr, Backend::HalfType ht = Backend::HalfType::F16,
                                        bool q8_as_f32 = false) {
  check_arg(N >= 0 && D > 0 && V > 0, "lm_cross_entropy: need N >= 0, D > 0, V > 0");
  check_arg(chunk_rows >= 1, "lm_cross_entropy: chunk_rows must be >= 1, got " + std::to_string(chunk_rows));
  check_arg(V <= std::numeric_limits<int32_t>::max(), "lm_cross_entropy: V does not fit int32 labels");
  CrossEntropyResult res;
  for (int64_t n = 0; n < N; ++n) {
    const int32_t y = labels[n];
    if (y == -100) continue;
    check_arg(y >= 0 && y < V, "labels[" + std::to_string(n) + "] = " + std::to_string(y) + " is outside [0, " +
                                   std::to_string(V) + ") and not the ignore index -100");
    ++res.count;
  }
  if (N == 0) return res;

  const bool device = !be.host_memory();
  const prof::PartContext pc(prof::Part::LmHead);  // its GEMMs are booked to the lm_head (bench_train --breakdown)
  const int64_t rows = std::min(N, chunk_rows);
  Scratch scratch(be);
  float* logits = static_cast<float*>(scratch.get(static_cast<size_t>(rows) * V * sizeof(float)));  // [rows, V]
  float* loss = static_cast<float*>(scratch.get(static_cast<size_t>(rows) * sizeof(float)));        // [rows]
  int32_t* dlab = device ? static_cast<int32_t*>(scratch.get(static_cast<size_t>(rows) * sizeof(int32_t)))
                         : nullptr;                                                                 // [rows]
  std::vector<float> loss_host(device ? rows : 0);                                                  // [rows]
  // An fp32 table (or the Q8_0 rows standing for it) through the backend's own layout where it has
  // one for this call; the Q8_0 rows only that way (the callers checked lm_head_extras).
  std::unique_ptr<Backend::LmHead> head;
  if (E || q8_as_f32)
    head = be.lm_head_begin({N, D, V, chunk_rows, bf16, dh != nullptr}, E ? static_cast<const void*>(E) : E_q8,
                            q8_as_f32);
  check_arg(!q8_as_f32 || head, "lm_cross_entropy_q8_0_as_f32: the backend cannot read the Q8_0 rows as the table");

  // One chunk: logits of m rows of h (row stride ld), their losses, and (dh_out) their dh (stride ld_out).
  auto chunk = [&](int64_t m, const float* hm, int64_t ld, const int32_t* lab_host, float* dh_out, int64_t ld_out) {
    if (head) head->logits(m, hm, ld, logits, V);
    else if (E16 && bf16) be.half_gemm_nt_bf16(ht, m, V, D, hm, ld, E16, logits, V);
    else if (E16) be.half_gemm_nt(ht, m, V, D, hm, ld, E16, logits, V);
    else if (E_q8 && bf16) be.q8_0_gemm_nt_bf16(m, V, D, hm, ld, E_q8, logits, V);
    else if (E_q8) be.q8_0_gemm_nt(m, V, D, hm, ld, E_q8, logits, V);
    else if (bf16) be.gemm_nt_bf16(m, V, D, 1.0f, hm, ld, E, D, 0.0f, logits, V);
    else be.gemm_nt(m, V, D, 1.0f, hm, ld, E, D, 0.0f, logits, V);
    const int32_t* lab = lab_host;
    if (device) {
      be.upload(dlab, lab_host, static_cast<size_t>(m) * sizeof(int32_t));
      lab = dlab;
    }
    be.cross_entropy_rows(m, V, logits, V, lab, grad_scale, dh_out != nullptr, loss);
    const float* lh = loss;
    if (device) {
      be.download(loss_host.data(), loss, static_cast<size_t>(m) * sizeof(float));
      lh = loss_host.data();
    }
    for (int64_t i = 0; i < m; ++i) res.loss_sum += lh[i];
    if (!dh_out) return;
    if (head) head->dh(m, logits, V, dh_out, ld_out);
    else if (E16) be.half_gemm_nn(ht, m, V, D, 1.0f, logits, V, E16, 0.0f, dh_out, ld_out, bf16);
    else if (E_q8) be.q8_0_gemm_nn(m, V, D, 1.0f, logits, V, E_q8, 0.0f, dh_out, ld_out, bf16);
    else if (bf16) be.gemm_nn_bf16(m, D, V, 1.0f, logits, V, E, D, 0.0f, dh_out, ld_out);
    else be.gemm_nn(m, D, V, 1.0f, logits, V, E, D, 0.0f, dh_out, ld_out);
  };

  // Rows with a label, gathered: where some rows are ignored (-100: an SFT prompt, padding) the
  // lm_head GEMMs run on the labelled rows only, chunk_rows of them at a time (Backend::embedding
  // gathers them into hc), and dh comes back through a gather from hc's rows plus a zero row (each
  // ignored row's dh is 0, as before). hc [rows + 1, D]: the gathered h, then their dh; row `rows`
  // stays zero. ids [rows]: the gather's row indices. Every row still gets the loss and dh it had;
  // a labelled row's values do not depend on which rows share its GEMM (same route: M > 16 rows, the
  // blocked GEMM; 16 or fewer take the GEMV route, whose per-row sums may round differently).
  float* hc = static_cast<float*>(scratch.get(static_cast<size_t>(rows + 1) * D * sizeof(float)));  // [rows + 1, D]
  int32_t* ids = static_cast<int32_t*>(scratch.get(static_cast<size_t>(rows) * sizeof(int32_t)));  // [rows]
  const bool gather = res.count < N && ldh == D && (!dh || lddh == D);
  if (!gather) {
    for (int64_t n0 = 0; n0 < N; n0 += rows)
      chunk(std::min(rows, N - n0), h + n0 * ldh, ldh, labels + n0, dh ? dh + n0 * lddh : nullptr, lddh);
  } else {
    std::vector<int32_t> rows_c(static_cast<size_t>(res.count)), lab_c(static_cast<size_t>(rows)),
        inv(static_cast<size_t>(rows));
    for (int64_t n = 0, i = 0; n < N; ++n)
      if (labels[n] != -100) rows_c[static_cast<size_t>(i++)] = static_cast<int32_t>(n);
    if (dh) be.fill_zero(hc + rows * D, static_cast<size_t>(D) * sizeof(float));
    int64_t done = 0;  // dh rows [0, done) written
    for (int64_t c0 = 0; c0 < res.count; c0 += rows) {
      const int64_t m = std::min(rows, res.count - c0);
      const int32_t* rc = rows_c.data() + c0;  // [m] rows of h in this chunk
      be.upload(ids, rc, static_cast<size_t>(m) * sizeof(int32_t));
      be.embedding(m, D, h, ids, hc);
      for (int64_t i = 0; i < m; ++i) lab_c[static_cast<size_t>(i)] = labels[rc[i]];
      chunk(m, hc, D, lab_c.data(), dh ? hc : nullptr, D);
      if (!dh) continue;
      // dh rows [done, end): this chunk's rows from hc, the ignored ones among them from the zero row
      // (h's rows of this chunk were gathered above, so dh may alias h)
      const int64_t end = c0 + m == res.count ? N : rc[m - 1] + 1;
      for (int64_t s0 = done, j = 0; s0 < end; s0 += rows) {
        const int64_t k = std::min(rows, end - s0);
        for (int64_t r = 0; r < k; ++r) {
          const bool hit = j < m && rc[j] == s0 + r;
          inv[static_cast<size_t>(r)] = static_cast<int32_t>(hit ? j++ : rows);
        }
        be.upload(ids, inv.data(), static_cast<size_t>(k) * sizeof(int32_t));
        be.embedding(k, D, hc, ids, dh + s0 * D);
      }
      done = end;
    }
    if (dh && res.count == 0) be.fill_zero(dh, static_cast<size_t>(N) * D * sizeof(float));
  }
  be.synchronize();
  // + the head's layout, or the Q8_0 / 16-bit defaults' dequantized chunk (one at a time: the
  // forward's in bf16, the backward's)
  const bool q8_chunk = E_q8 && !q8_as_f32 && (dh || bf16);
  res.workspace_bytes = scratch.bytes + (head ? head->bytes : 0) +
                        (q8_chunk ? Backend::q8_0_gemm_nn_scratch_bytes(V, D) : 0) +
                        (E16 && (dh || bf16) ? Backend::half_chunk_scratch_bytes(V, D) : 0);
  return res;
}

}  // namespace

CrossEntropyResult lm_cross_entropy(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                    const float* E, const int32_t* labels, float grad_scale, float* dh,
                                    int64_t lddh, int64_t chunk_rows, bool bf16) {
  return lm_cross_entropy_any(be, N, D, V, h, ldh, E, nullptr, labels, grad_scale, dh, lddh, chunk_rows, bf16);
}

CrossEntropyResult lm_cross_entropy_q8_0(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                         const void* E_q8, const int32_t* labels, float grad_scale, float* dh,
                                         int64_t lddh, int64_t chunk_rows, bool bf16) {
  check_arg(E_q8 != nullptr && D % 32 == 0, "lm_cross_entropy_q8_0: need Q8_0 rows and D a multiple of 32");
  return lm_cross_entropy_any(be, N, D, V, h, ldh, nullptr, E_q8, labels, grad_scale, dh, lddh, chunk_rows, bf16);
}

CrossEntropyResult lm_cross_entropy_half(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                         bool rows_bf16, const void* E16, const int32_t* labels, float grad_scale,
                                         float* dh, int64_t lddh, int64_t chunk_rows, bool bf16) {
  check_arg(E16 != nullptr, "lm_cross_entropy_half: need the 16-bit rows");
  return lm_cross_entropy_any(be, N, D, V, h, ldh, nullptr, nullptr, labels, grad_scale, dh, lddh, chunk_rows, bf16,
                              E16, rows_bf16 ? Backend::HalfType::BF16 : Backend::HalfType::F16);
}

bool lm_cross_entropy_q8_0_as_f32_applies(const Backend& be, int64_t N, int64_t D, int64_t V, int64_t chunk_rows,
                                          bool bf16, bool want_grad) {
  return be.lm_head_extras({N, D, V, chunk_rows, bf16, want_grad}).q8_0_rows;
}

CrossEntropyResult lm_cross_entropy_q8_0_as_f32(Backend& be, int64_t N, int64_t D, int64_t V, const float* h,
                                                int64_t ldh, const void* E_q8, const int32_t* labels, float grad_scale,
                                                float* dh, int64_t lddh, int64_t chunk_rows, bool bf16) {
  check_arg(E_q8 != nullptr, "lm_cross_entropy_q8_0_as_f32: need the Q8_0 rows");
  check_arg(!bf16 || lm_cross_entropy_q8_0_as_f32_applies(be, N, D, V, chunk_rows, true, dh != nullptr),
            "lm_cross_entropy_q8_0_as_f32: needs bf16 panels for both lm_head GEMMs (AVX512-BF16 CPU backend, "
            "D a multiple of 32 and > 64, QLORA_BF16_HEAD_PANELS / _NN not 0)");
  check_arg(bf16 || lm_cross_entropy_q8_0_as_f32_applies(be, N, D, V, chunk_rows, false, dh != nullptr),
            "lm_cross_entropy_q8_0_as_f32: fp32 needs the CPU backend at a SIMD level (not scalar), D a multiple "
            "of 32, QLORA_F32_HEAD_Q8 not 0");
  return lm_cross_entropy_any(be, N, D, V, h, ldh, nullptr, E_q8, labels, grad_scale, dh, lddh, chunk_rows, bf16,
                              nullptr, Backend::HalfType::F16, true);
}

}  // namespace qlora
