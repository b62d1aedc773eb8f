// safetensors writer: same layout and tensor order as the safetensors package, written atomically.
#include <algorithm>
#include <numeric>
#include <unordered_set>

#include "common/error.hpp"
#include "io/safetensors.hpp"
#include "json/json.hpp"

namespace qlora::io {

namespace {

// Position in the reference's Dtype enum ("increasing alignment order"); it stores tensors
// by descending rank, then by name.
int reference_rank(DType t) {
  switch (t) {
    case DType::BOOL: return 0;
    case DType::U8: return 1;
    case DType::I8: return 2;
    case DType::I16: return 3;
    case DType::U16: return 4;
    case DType::F16: return 5;
    case DType::BF16: return 6;
    case DType::I32: return 7;
    case DType::U32: return 8;
    case DType::F32: return 9;
    case DType::F64: return 10;
    case DType::I64: return 11;
    case DType::U64: return 12;
  }
  return 0;
}

}  // namespace

std::string safetensors_header(const std::vector<TensorToWrite>& tensors, const Metadata& metadata,
                               std::vector<size_t>* order_out) {
  std::unordered_set<std::string> seen;
  for (const auto& t : tensors) {
    const std::string w = "write_safetensors: tensor '" + t.name + "': ";
    check_arg(t.name != "__metadata__", "write_safetensors: '__metadata__' is reserved and cannot name a tensor");
    check_arg(seen.insert(t.name).second, "write_safetensors: duplicate tensor name '" + t.name + "'");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      check_arg(d >= 0, w + "negative dimension " + std::to_string(d));
      check_arg(!__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel), w + "shape product overflows");
    }
    uint64_t nbytes = 0;
    check_arg(!__builtin_mul_overflow(numel, uint64_t{dtype_size(t.dtype)}, &nbytes), w + "byte size overflows");
    check_arg(nbytes == t.nbytes, w + "has " + std::to_string(t.nbytes) + " bytes but dtype " + dtype_name(t.dtype) +
                                      " and its shape need " + std::to_string(nbytes));
    check_arg(t.data != nullptr || t.nbytes == 0, w + "null data");
  }
  std::unordered_set<std::string> meta_keys;
  for (const auto& kv : metadata)
    check_arg(meta_keys.insert(kv.first).second, "write_safetensors: duplicate metadata key '" + kv.first + "'");

  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const int ra = reference_rank(tensors[a].dtype), rb = reference_rank(tensors[b].dtype);
    return ra != rb ? ra > rb : tensors[a].name < tensors[b].name;
  });

  json::Object header;
  if (!metadata.empty()) {
    json::Object meta;
    for (const auto& [k, v] : metadata) meta.set(k, json::Value(v));
    header.set("__metadata__", json::Value(std::move(meta)));
  }
  uint64_t offset = 0;
  for (size_t i : order) {
    const TensorToWrite& t = tensors[i];
    json::Object entry;
    entry.set("dtype", json::Value(dtype_name(t.dtype)));
    json::Array shape;
    for (int64_t d : t.shape) shape.emplace_back(d);
    entry.set("shape", json::Value(std::move(shape)));
    entry.set("data_offsets", json::Value(json::Array{json::Value(offset), json::Value(offset + t.nbytes)}));
    offset += t.nbytes;
    header.set(t.name, json::Value(std::move(entry)));
  }
  std::string text = json::dump(json::Value(std::move(header)));  // ValueError on invalid UTF-8 names
  text.append((8 - text.size() % 8) % 8, ' ');
  if (order_out) *order_out = std::move(order);
  return text;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors, const Metadata& metadata) {
  std::vector<size_t> order;
  const std::string header = safetensors_header(tensors, metadata, &order);
  AtomicFileWriter out(path);
  uint8_t len[8];
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  out.write(len, 8);
  out.write(header.data(), header.size());
  for (size_t i : order) out.write(tensors[i].data, tensors[i].nbytes);
  out.commit();
}

}  // namespace qlora::io
