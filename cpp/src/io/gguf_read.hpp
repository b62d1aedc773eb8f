// GGUF files (llama.cpp): a validating, zero-copy reader over a read-only memory map.
//
// Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): "GGUF", u32 version (2 or 3),
// u64 tensor count, u64 metadata count, the metadata key/values (u64-length-prefixed UTF-8 key,
// u32 value type, value; arrays: u32 element type, u64 count, elements), the tensor infos (name,
// u32 n_dims, u64 dims fastest-first, u32 GGML type, u64 offset relative to the data section),
// then the data section at the next multiple of general.alignment (default 32).
//
// Nothing in the file is trusted: every count, length, dimension and offset is checked against
// the bytes that remain and against sane limits before anything is read or allocated by it;
// strings must be valid UTF-8, BOOLs 0 or 1, keys and tensor names unique, tensor types known,
// rows a whole number of blocks, data ranges inside the file, aligned and non-overlapping.
// A violation throws FormatError "<path>: not a readable GGUF file: <what>" naming the field
// (and the key or tensor). Files of either byte order are read (values are swapped on access).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "io/mapped_file.hpp"

namespace qlora::gguf {

// Metadata value types (GGUFValueType).
enum class VType : uint32_t { U8 = 0, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 };
const char* vtype_name(VType t);  // "UINT8", ..., as the gguf package spells them

// GGML tensor types that matter here (the reader knows every type of the gguf package's table).
enum class GType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q2_K = 10, Q3_K = 11,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};
// Block size (elements) and bytes per block of a GGML type; false for an unknown type.
bool gtype_traits(uint32_t type, int64_t* block, int64_t* type_size);
std::string gtype_name(uint32_t type);  // "Q4_K", "IQ4_NL", ... ("type 99" when unknown)

// Limits far above any real model that bound what a parser of the file may allocate.
constexpr uint64_t kMaxTensors = 1 << 16;          // Llama 3.1 405B has 1,138
constexpr uint64_t kMaxArrayElements = 1 << 21;    // all metadata arrays together
constexpr uint32_t kMaxDims = 4;                   // GGML_MAX_DIMS
constexpr uint64_t kMaxTensorName = 256;           // llama.cpp's own limit is 64
constexpr uint32_t kMaxAlignment = 1 << 16;

// One metadata value. Scalars are decoded; a string is copied; an array keeps its element type,
// count and where its (validated) elements start in the mapping.
struct Value {
  VType type = VType::U8;
  // scalars: integers in i (signed types) or u (unsigned types, BOOL); floats in f
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string str;         // STRING
  VType elem = VType::U8;  // ARRAY
  uint64_t count = 0;      // ARRAY
  const uint8_t* data = nullptr;  // ARRAY: first element (strings: the first length prefix)

  bool is_int() const;    // an integer type (not BOOL)
  bool is_float() const;  // FLOAT32 / FLOAT64
  bool is_signed() const { return type == VType::I8 || type == VType::I16 || type == VType::I32 || type == VType::I64; }
  std::string type_name() const;  // "UINT32", "ARRAY[STRING]"
  std::string repr() const;       // the value as Python's repr would print it (arrays: "[...]")
};

struct TensorInfo {
  std::string name;
  std::vector<uint64_t> dims;  // GGUF order: fastest-varying first
  uint32_t type = 0;           // GGML type
  uint64_t offset = 0;         // absolute file offset of the data
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;  // inside the mapping (valid while the file object lives)
  uint64_t numel() const;
  // HF order (slowest first, [out, in] for a matrix), as int64.
  std::vector<int64_t> shape() const;
};

class File {
 public:
  // Maps and validates `path`. FileError (OSError in Python) when it cannot be opened (missing:
  // ENOENT, a directory: EISDIR); FormatError for anything malformed, and for an empty file or
  // one that is not a regular file (a device, pipe or socket).
  static std::shared_ptr<File> open(const std::string& path);
  // Same validation of bytes in memory (kept alive by the caller); `label` names them in errors.
  static std::shared_ptr<File> from_buffer(const uint8_t* data, size_t size, const std::string& label);

  const std::string& path() const { return label_; }
  size_t size() const { return size_; }
  uint32_t version() const { return version_; }
  bool big_endian() const { return swap_; }  // written on a big-endian machine
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }
  const uint8_t* bytes() const { return base_; }

  const std::vector<std::pair<std::string, Value>>& kv() const { return kv_; }  // file order
  const Value* find(const std::string& key) const;                              // nullptr if absent
  const std::vector<TensorInfo>& tensors() const { return tensors_; }           // file order
  const TensorInfo* tensor(const std::string& name) const;                      // nullptr if absent

  // Array contents (the arrays were validated when the file was opened). ValueError when `v` is
  // not an array of the requested kind: strings; any integer type; FLOAT32/FLOAT64 or integers.
  std::vector<std::string_view> strings(const Value& v) const;
  std::vector<int64_t> ints(const Value& v) const;    // UINT64 values above INT64_MAX: ValueError
  std::vector<uint64_t> uints(const Value& v) const;  // UINT8/16/32/64 arrays
  std::vector<double> floats(const Value& v) const;
  std::vector<uint8_t> bools(const Value& v) const;   // BOOL arrays

 private:
  File() = default;
  void parse();
  std::shared_ptr<io::MappedFile> file_;
  std::string label_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  uint32_t version_ = 0;
  bool swap_ = false;
  uint32_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, Value>> kv_;
  std::unordered_map<std::string, size_t> kv_index_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

// Python's repr of a float (shortest round-trip: "1e-05", "10000.0", "nan", "inf").
std::string py_float_repr(double v);
// Strict UTF-8 (as Python's decoder: no overlongs, surrogates or code points past U+10FFFF).
bool valid_utf8(const uint8_t* p, size_t n);

}  // namespace qlora::gguf
