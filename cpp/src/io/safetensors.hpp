// safetensors files: a zero-copy memory-mapped reader and an atomic writer.
//
// Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, then the data buffer.
// Header: {"__metadata__": {str: str}?, "<name>": {"dtype": "F32", "shape": [..],
// "data_offsets": [begin, end]}, ...}, offsets relative to the data buffer, C order, little-endian.
//
// The reader validates like the reference (huggingface/safetensors) and a bit stricter:
//  - header length <= 100,000,000 and inside the file; the header must be a JSON object;
//  - sorted by offsets, the tensors must tile the data buffer exactly: the first starts at 0,
//    each begins where the previous ends (no holes, no overlaps), the last ends at the end of
//    the file (no trailing bytes); end - begin == numel * dtype size (overflow-checked);
//  - stricter than the reference: duplicate JSON keys are rejected (the reference keeps the
//    last), and so is a dtype outside qlora::DType (F8_*, C64, ...);
//  - like the reference: extra fields in a tensor entry are ignored, "__metadata__": null is
//    accepted as no metadata, zero-sized tensors may share an offset.
// Tensor data pointers are into the mapping; they are aligned to the element size whenever
// the writer padded the header to 8 bytes and sorted tensors by alignment (both this writer and
// the reference do), but a foreign file may give unaligned pointers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "io/mapped_file.hpp"
#include "tensor_types.hpp"

namespace qlora::io {

using Metadata = std::vector<std::pair<std::string, std::string>>;  // header order kept

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;     // [] for a scalar
  const uint8_t* data = nullptr;  // [nbytes], inside the mapping: valid while the file object lives
  size_t nbytes = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Maps and validates the file. FormatError for malformed content, FileError for OS errors.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  // Same validation on bytes already in memory (the caller keeps them alive); `label` names
  // the source in error messages.
  static std::shared_ptr<SafetensorsFile> from_buffer(const uint8_t* data, size_t size, const std::string& label);

  const TensorInfo* find(const std::string& name) const;  // nullptr when absent
  const TensorInfo& at(const std::string& name) const;    // ValueError naming the tensor when absent
  std::vector<std::string> names() const;                 // in data-offset (file) order
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data-offset order
  const Metadata& metadata() const { return metadata_; }
  size_t header_size() const { return header_len_; }  // N
  const std::string& path() const { return label_; }

 private:
  SafetensorsFile() = default;
  void parse(const uint8_t* data, size_t size);
  std::shared_ptr<MappedFile> file_;
  std::string label_;
  size_t header_len_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  Metadata metadata_;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // [nbytes] little-endian, C order
  size_t nbytes = 0;
};

// Writes atomically (temp file in the same directory, fsync, rename). Like the safetensors
// package, tensors are stored sorted by dtype alignment (largest first) then by name, and
// the header is padded with spaces to a multiple of 8 bytes. Bad input (duplicate or reserved
// names, nbytes != numel * dtype size, negative dims) throws ValueError before anything is written.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const Metadata& metadata = {});
// The bytes of the header (without the 8-byte length) the writer would produce, and the
// storage order it uses (indices into `tensors`).
std::string safetensors_header(const std::vector<TensorToWrite>& tensors, const Metadata& metadata,
                               std::vector<size_t>* order = nullptr);

}  // namespace qlora::io
