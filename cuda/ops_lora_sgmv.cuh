// Mixed-adapter LoRA on the device (Backend::lora_segments_many, the SGMV form of Punica /
// S-LoRA): the segments of several projections (q/k/v, gate/up, ...) that share an input, each a
// run of rows with its own adapter and rank, in two launches: shrink t = x·Aᵀ (one block per rank
// row of a segment, its threads splitting the input dimension, all the segment's rows at once: a
// grouped GEMV for decode) and expand y += alpha t·Bᵀ (t in
// shared memory, one thread per output column). Segments of more than kSgmvMaxRows rows (prefill)
// take two tiled fp32 GEMMs instead (the Backend default), as the CPU does.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "backend.hpp"

namespace qlora::cuda {

constexpr int64_t kSgmvMaxRows = 64;     // longer segments: two GEMMs
constexpr int64_t kSgmvMaxTile = 4096;   // rows * r floats of t held in shared memory by the expand
constexpr int kSgmvMaxEntries = 40;      // segments per launch (the launch parameter block)

// One segment of one problem, pointers already at its first row.
struct SgmvEntry {
  const float* x;  // [rows, in], row stride ldx
  float* y;        // [rows, out], row stride ldy
  const float* A;  // [r, in]
  const float* B;  // [out, r]
  float* t;        // [rows, r] scratch
  int32_t ldx, ldy, in, out, rows, r;
  float alpha;
  int32_t shrink0, expand0;  // first work item of this entry in each launch
};
struct SgmvBatch {
  int32_t n;                      // entries
  int32_t shrink_items, expand_items;
  SgmvEntry e[kSgmvMaxEntries];
};
static_assert(sizeof(SgmvBatch) <= 4000, "kernel parameter block limit (4 KiB)");

// Runs the shrink then the expand launch of one batch on `stream` (device pointers, shapes
// checked by the caller).
void lora_sgmv(cudaStream_t stream, const SgmvBatch& batch);

// The whole of CudaBackend::lora_segments_many (ops_lora_sgmv_host.cpp): checks the problems,
// sends short segments through the SGMV launches (scratch for their t from be.alloc) and long
// ones through be.gemm_nt (scratch: the caller's t).
void lora_segments_many_op(Backend& be, cudaStream_t stream, int64_t np, const Backend::LoraProblem* p, float* t);

}  // namespace qlora::cuda
