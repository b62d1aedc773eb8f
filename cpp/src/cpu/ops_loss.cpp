// Softmax cross-entropy: the CPU per-row kernel, and the chunked causal-LM loss through the
// lm_head that runs on any backend (its GEMMs and cross_entropy_rows), so the [N, V] logits are
// never materialized.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "backend.hpp"
#include "common/error.hpp"
#include "cpu/cpu_backend.hpp"
#include "cpu/lm_head_bf16.hpp"
#include "cpu/ops_backward.hpp"
#include "cpu/profile.hpp"
#include "cpu/q8_0_head.hpp"
#include "cpu/rowops_kernels.hpp"
#include "cpu/threads.hpp"

namespace qlora::cpu::ops {

void cross_entropy_rows(SimdLevel level, int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels,
                        float grad_scale, bool want_grad, float* loss) {
  // SIMD levels: vector max, exp within 2 ulp, the sum still in double (a float sum of V = 49152
  // terms could be off by ~V/64 eps, more than the test's log(V)-scaled bound allows).
  const rowk::Kernels* kr = rowk::for_level(level);
  parallel_range(M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* row = logits + m * ldl;  // [V]
      const int32_t y = labels[m];
      if (y == -100) {
        loss[m] = 0.0f;
        if (want_grad) std::fill(row, row + V, 0.0f);
        continue;
      }
      if (kr) {
        const float mx = kr->max(row, V);
        const double lse = static_cast<double>(mx) + std::log(kr->exp_sum_ro(row, V, mx));
        loss[m] = static_cast<float>(lse - static_cast<double>(row[y]));
        if (want_grad) {
          kr->exp_scale(row, V, static_cast<float>(lse), grad_scale);
          row[y] -= grad_scale;
        }
        continue;
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < V; ++i) mx = std::max(mx, row[i]);
      double sum = 0.0;
      for (int64_t i = 0; i < V; ++i) sum += std::exp(row[i] - mx);
      const double lse = static_cast<double>(mx) + std::log(sum);
      loss[m] = static_cast<float>(lse - static_cast<double>(row[y]));
      if (want_grad) {
        const float l = static_cast<float>(lse);
        for (int64_t i = 0; i < V; ++i) row[i] = grad_scale * std::exp(row[i] - l);
        row[y] -= grad_scale;
      }
    }
  });
}

}  // namespace qlora::cpu::ops

namespace qlora {

size_t cross_entropy_workspace_bytes(int64_t rows_in_chunk, int64_t V, bool device) {
  const size_t r = static_cast<size_t>(rows_in_chunk);
  return r * static_cast<size_t>(V) * sizeof(float) + r * sizeof(float) + (device ? r * sizeof(int32_t) : 0);
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
}  // namespace

namespace {
CrossEntropyResult lm_cross_entropy_any(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                        const float* E, const void* E_q8, const int32_t* labels, float grad_scale,
                                        float* dh, int64_t lddh, int64_t chunk_rows, bool bf16,
                                        const void* E16 = nullptr, Backend::HalfType ht = Backend::HalfType::F16,
                                        bool q8_as_f32 = false);
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
  return be.lm_head_extras({N, D, V, chunk_rows, bf16, want_grad}).q8_0_rows;  // (CpuBackend's: cpu_backend_lm_head.cpp)
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

namespace {
CrossEntropyResult lm_cross_entropy_any(Backend& be, int64_t N, int64_t D, int64_t V, const float* h, int64_t ldh,
                                        const float* E, const void* E_q8, const int32_t* labels, float grad_scale,
                                        float* dh, int64_t lddh, int64_t chunk_rows, bool bf16, const void* E16,
                                        Backend::HalfType ht, bool q8_as_f32) {
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
  // bf16 compute over an fp32 table on the CPU: E's bf16 B panels packed once for all chunks
  // (cpu/lm_head_bf16.hpp; the same logits bits as gemm_nt_bf16, which packs them per chunk);
  // q8_as_f32: from the Q8_0 rows that stand for the table (the same panels).
  const uint32_t* panels = nullptr;
  const auto* cpu_be = E || q8_as_f32 ? dynamic_cast<const cpu::CpuBackend*>(&be) : nullptr;
  // fp32 over the Q8_0 rows: both GEMMs decode them into their B panels, no scratch here
  // (cpu/q8_0_head.hpp: the bits of gemm_nt / gemm_nn over the table).
  const bool q8_f32 = q8_as_f32 && !bf16;
  if (cpu_be && !q8_f32) {
    // (q8_as_f32: one chunk packs them too, as there is no fp32 table for gemm_nt_bf16 to read)
    const size_t pb = q8_as_f32 ? cpu::lm_head_panels_bytes(V, D)
                                : cpu::lm_head_panels_workspace_bytes(cpu_be->level(), N, D, V, rows, bf16, device);
    if (pb > 0) {
      auto* P = static_cast<uint32_t*>(scratch.get(pb));
      const prof::Scope sc(prof::Part::GemmOther, "lm_head_pack_bf16", 0.0,
                           static_cast<double>(V) * static_cast<double>(D) * (q8_as_f32 ? 3.0625 : 6.0), V, D, 0);
      if (q8_as_f32) cpu::lm_head_pack_panels_q8_0(V, D, E_q8, P);
      else cpu::lm_head_pack_panels(V, D, E, D, P);
      panels = P;
    }
  }
  check_arg(!q8_as_f32 || q8_f32 || (panels && (!dh || cpu::lm_head_dh_from_panels(D))),
            "lm_cross_entropy_q8_0_as_f32: the panels path does not apply");  // (checked by the caller)

  const bool dh_panels = panels && cpu::lm_head_dh_from_panels(D);  // the backward from them too
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t m = std::min(rows, N - n0);
    if (q8_f32) {
      const prof::Scope sc(prof::Part::GemmOther, "q8_head_gemm_nt",
                           2.0 * static_cast<double>(m) * static_cast<double>(V) * static_cast<double>(D),
                           1.0625 * static_cast<double>(V) * static_cast<double>(D) + 4.0 * static_cast<double>(m) * V,
                           m, V, D);
      cpu::q8_0_head_logits_f32(cpu_be->level(), m, V, D, h + n0 * ldh, ldh, E_q8, logits, V);
    } else if (panels) {
      const prof::Scope sc(prof::Part::GemmOther, "lm_head_nt_bf16",
                           2.0 * static_cast<double>(m) * static_cast<double>(V) * static_cast<double>(D),
                           2.0 * static_cast<double>(V) * static_cast<double>(D) + 4.0 * static_cast<double>(m) * V,
                           m, V, D);
      cpu::lm_head_logits_bf16(m, V, D, h + n0 * ldh, ldh, panels, logits, V);
    } else if (E16 && bf16) be.half_gemm_nt_bf16(ht, m, V, D, h + n0 * ldh, ldh, E16, logits, V);
    else if (E16) be.half_gemm_nt(ht, m, V, D, h + n0 * ldh, ldh, E16, logits, V);
    else if (E_q8 && bf16) be.q8_0_gemm_nt_bf16(m, V, D, h + n0 * ldh, ldh, E_q8, logits, V);
    else if (E_q8) be.q8_0_gemm_nt(m, V, D, h + n0 * ldh, ldh, E_q8, logits, V);
    else if (bf16) be.gemm_nt_bf16(m, V, D, 1.0f, h + n0 * ldh, ldh, E, D, 0.0f, logits, V);
    else be.gemm_nt(m, V, D, 1.0f, h + n0 * ldh, ldh, E, D, 0.0f, logits, V);
    const int32_t* lab = labels + n0;
    if (device) {
      be.upload(dlab, lab, static_cast<size_t>(m) * sizeof(int32_t));
      lab = dlab;
    }
    be.cross_entropy_rows(m, V, logits, V, lab, grad_scale, dh != nullptr, loss);
    const float* lh = loss;
    if (device) {
      be.download(loss_host.data(), loss, static_cast<size_t>(m) * sizeof(float));
      lh = loss_host.data();
    }
    for (int64_t i = 0; i < m; ++i) res.loss_sum += lh[i];
    if (dh && q8_f32) {
      const prof::Scope sc(prof::Part::GemmOther, "q8_head_gemm_nn",
                           2.0 * static_cast<double>(m) * static_cast<double>(V) * static_cast<double>(D),
                           1.0625 * static_cast<double>(V) * static_cast<double>(D) + 4.0 * static_cast<double>(m) * V,
                           m, D, V);
      cpu::q8_0_head_dh_f32(cpu_be->level(), m, V, D, logits, V, E_q8, dh + n0 * lddh, lddh);
    } else if (dh && panels && dh_panels) {
      const prof::Scope sc(prof::Part::GemmOther, "lm_head_nn_bf16",
                           2.0 * static_cast<double>(m) * static_cast<double>(V) * static_cast<double>(D),
                           2.0 * static_cast<double>(V) * static_cast<double>(D) + 4.0 * static_cast<double>(m) * V,
                           m, D, V);
      cpu::lm_head_dh_bf16(m, V, D, logits, V, panels, dh + n0 * lddh, lddh);
    } else if (dh && E16) be.half_gemm_nn(ht, m, V, D, 1.0f, logits, V, E16, 0.0f, dh + n0 * lddh, lddh, bf16);
    else if (dh && E_q8) be.q8_0_gemm_nn(m, V, D, 1.0f, logits, V, E_q8, 0.0f, dh + n0 * lddh, lddh, bf16);
    else if (dh && bf16) be.gemm_nn_bf16(m, D, V, 1.0f, logits, V, E, D, 0.0f, dh + n0 * lddh, lddh);
    else if (dh) be.gemm_nn(m, D, V, 1.0f, logits, V, E, D, 0.0f, dh + n0 * lddh, lddh);
  }
  be.synchronize();
  // + the Q8_0 defaults' dequantized chunk (one at a time: the forward's in bf16, the backward's)
  const bool q8_chunk = E_q8 && !q8_as_f32 && (dh || bf16);
  res.workspace_bytes = scratch.bytes + (q8_chunk ? Backend::q8_0_gemm_nn_scratch_bytes(V, D) : 0) +
                        (E16 && (dh || bf16) ? Backend::half_chunk_scratch_bytes(V, D) : 0);
  return res;
}
}  // namespace

}  // namespace qlora
