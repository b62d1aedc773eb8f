// bf16 inference copies of LoRA adapters (issue 8, adapter_dtype): every module's A and B packed
// by the backend (Backend::lora_pack_bf16) for the serving path's bf16 kernels. The fp32 factors
// stay the masters: training, merging, saving and backends without bf16 LoRA kernels use them.
//
// A copy is immutable once made. A pass takes the adapter's current copy (shared_ptr) when it
// starts and holds it to its end. Whoever writes an adapter's A/B (optimizer step, lora_set) calls
// lora_factors_changed afterwards: the next pass builds a fresh copy, and the stale one is freed
// when the last pass holding it ends. Adapters are never rewritten on replace: a replaced adapter
// is a new LoraAdapter with its own copy, and requests holding the old one keep it.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/buffer.hpp"
#include "model/lora.hpp"

namespace qlora::model {

struct LoraBf16Copy {
  DeviceBuffer buf;              // every module's packed copy, back to back
  std::vector<const void*> mod;  // [num_layers * kNumProj]: module's copy in buf, null: not adapted
  uint64_t version = 0;          // LoraAdapter::factors_version it was made from
};

// The adapter's current copy, made now if it has none or a stale one (thread-safe; concurrent
// callers wait for one build). Null where the backend has no bf16 LoRA kernels.
std::shared_ptr<const LoraBf16Copy> lora_bf16_copy(Backend& be, LoraAdapter& a);
// Call after writing A/B of any module of `a` (the write must be complete).
void lora_factors_changed(LoraAdapter& a);
// Bytes of the adapter's copy now held (0: none), for memory_footprint.
size_t lora_bf16_copy_bytes(const LoraAdapter& a);

}  // namespace qlora::model
