// Merging a LoRA adapter into the frozen projections (LlamaModel::merge_adapter, in merge.cpp):
// W' = deq(W) + scaling * B·A in fp32 over the base the adapter was trained on (NF4 dequantized
// with the model's own codec, never a different precision), optionally rounded to bf16 / fp16,
// kept as an fp32 Linear or re-quantized to NF4 with the base's blocksize / double quant.
#pragma once
#include <cstdint>

namespace qlora::model {

enum class MergeRound { F32, BF16, F16 };

struct MergeOptions {
  bool subtract = false;    // unmerge: W -= scaling * B·A (fp32 projections only)
  bool requantize = false;  // store the merged weight as NF4 (else fp32)
  MergeRound round = MergeRound::F32;  // rounding of the merged weight before it is stored
};

// Round-to-nearest-even of x to bfloat16 / float16, returned as float (NaN stays NaN; a value
// beyond float16's range becomes inf).
float round_to_bf16(float x);
float round_to_f16(float x);

}  // namespace qlora::model
