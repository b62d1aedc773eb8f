// Multi-adapter LoRA terms on the CPU (Backend::lora_segments / lora_segments_many): the SGMV idea
// of Punica / S-LoRA. Segments of few rows (decode) run as ONE thread-pool job for all the
// problems of a call (q/k/v, gate/up): first every shrink t_s = x_s·A_sᵀ (tasks over rank rows,
// the fp32 GEMV kernels), then every expand y_s += alpha_s t_s·B_sᵀ (tasks over output columns,
// each reading its block of B_s once for all the segment's rows). An expand task waits for its
// problem's shrinks only; tasks are claimed in order, so every shrink it waits on is already
// running on another thread (or done): no barrier, no deadlock. Segments of many rows (prefill)
// take the blocked GEMM path (two gemm_nt, as the reference).
#pragma once
#include <cstdint>

#include "backend.hpp"
#include "cpu/features.hpp"

namespace qlora::cpu {

// Segments with more rows than this take the gemm_nt path.
constexpr int64_t kSgmvMaxRows = 64;

// level != Scalar (the scalar level is Backend's reference). t: the caller's scratch (max over
// segments of rows * r floats), used by the gemm_nt path only; the fused job has its own.
void lora_segments_many(SimdLevel level, int64_t np, const Backend::LoraProblem* p, float* t);

}  // namespace qlora::cpu
