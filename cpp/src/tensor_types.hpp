// Element types and the non-owning NF4 weight view shared by every backend.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace qlora {

enum class DType : uint8_t { F32, F16, BF16, U8, I8, I32, I64, BOOL, F64, I16, U16, U32, U64 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);           // safetensors spelling: "F32", "BF16", ...
DType dtype_from_name(const std::string&);  // throws FormatError for unknown names

// A frozen weight W[rows, cols] (= [out_features, in_features]) in bitsandbytes NF4 layout
// (see shared/reference/nf4-format.md). The flat row-major index j = r*cols + c is cut into
// blocks of `blocksize`; blocks may straddle rows; the last block may be partial.
// Pointers are in the memory of the backend the view is handed to.
struct Nf4Ref {
  const uint8_t* packed = nullptr;         // [(n+1)/2] two codes a byte, first in the high nibble
  const void* absmax = nullptr;            // double_quant: uint8 codes [n_blocks]; else float [n_blocks]
  const float* nested_absmax = nullptr;    // [ceil(n_blocks/256)] (double_quant only)
  const float* nested_map = nullptr;       // [256] signed dynamic map (double_quant only)
  float offset = 0.0f;                     // mean of absmax (double_quant only)
  int64_t rows = 0, cols = 0;
  int blocksize = 64;
  bool double_quant = true;

  int64_t numel() const { return rows * cols; }
  int64_t n_blocks() const { return (numel() + blocksize - 1) / blocksize; }
};

// The 16 NF4 code values (float32), index = nibble.
extern const float kNf4Codes[16];

}  // namespace qlora
