// safetensors reader: validates the header against the data buffer before exposing any view.
#include <algorithm>
#include <cstring>

#include "common/error.hpp"
#include "io/safetensors.hpp"
#include "json/json.hpp"

namespace qlora::io {

namespace {

constexpr uint64_t kMaxHeader = 100'000'000;  // the reference's limit

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian; add byte swapping");

// A non-negative JSON integer (int64). `what` names the field in errors.
uint64_t non_negative_int(const json::Value& v, const std::string& what) {
  if (!v.is_int()) throw FormatError(what + " must be an integer, got " + (v.is_double() ? json::dump(v) : json::type_name(v.type())));
  const int64_t i = v.as_int();
  if (i < 0) throw FormatError(what + " must be non-negative, got " + std::to_string(i));
  return static_cast<uint64_t>(i);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // the reader checked the in-order product for overflow
  return n;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->file_ = MappedFile::open(path);
  f->label_ = path;
  f->parse(f->file_->data(), f->file_->size());
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::from_buffer(const uint8_t* data, size_t size,
                                                              const std::string& label) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->label_ = label;
  f->parse(data, size);
  return f;
}

void SafetensorsFile::parse(const uint8_t* data, size_t size) {
  const std::string where = "safetensors '" + label_ + "': ";
  auto fail = [&](const std::string& msg) -> void { throw FormatError(where + msg); };

  if (size < 8) fail("file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  uint64_t n = 0;
  std::memcpy(&n, data, 8);
  if (n > kMaxHeader) fail("header length " + std::to_string(n) + " exceeds the 100000000-byte limit");
  if (n > size - 8)
    fail("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) + " bytes)");
  header_len_ = static_cast<size_t>(n);
  const uint8_t* buffer = data + 8 + header_len_;  // the data buffer
  const uint64_t buffer_len = size - 8 - header_len_;

  json::Value header;
  try {
    header = json::parse(std::string_view(reinterpret_cast<const char*>(data + 8), header_len_));
  } catch (const FormatError& e) {
    fail(std::string("bad header: ") + e.what());
  }
  if (!header.is_object()) fail(std::string("header must be a JSON object, got ") + json::type_name(header.type()));

  // Collect entries; offsets are validated after sorting, like the reference.
  struct Entry {
    TensorInfo info;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (const auto& [name, v] : header.as_object()) {
    if (name == "__metadata__") {
      if (v.is_null()) continue;
      if (!v.is_object()) fail(std::string("__metadata__ must be an object, got ") + json::type_name(v.type()));
      for (const auto& [k, s] : v.as_object()) {
        if (!s.is_string())
          fail("__metadata__['" + k + "'] must be a string, got " + json::type_name(s.type()));
        metadata_.emplace_back(k, s.as_string());
      }
      continue;
    }
    const std::string t = "tensor '" + name + "': ";
    if (!v.is_object()) fail(t + "entry must be an object, got " + json::type_name(v.type()));
    const json::Value* dtype = v.find("dtype");
    const json::Value* shape = v.find("shape");
    const json::Value* offs = v.find("data_offsets");
    if (!dtype) fail(t + "missing 'dtype'");
    if (!shape) fail(t + "missing 'shape'");
    if (!offs) fail(t + "missing 'data_offsets'");
    Entry e;
    e.info.name = name;
    if (!dtype->is_string()) fail(t + "'dtype' must be a string");
    try {
      e.info.dtype = dtype_from_name(dtype->as_string());
    } catch (const FormatError& err) {
      fail(t + err.what());
    }
    if (!shape->is_array()) fail(t + "'shape' must be an array");
    // numel * itemsize computed in uint64 with overflow checks; must also fit int64 / size_t.
    // Checked in shape order like the reference, so [2^62, 4, 0] overflows rather than being empty.
    uint64_t numel = 1, nbytes = 0;
    try {
      for (const json::Value& d : shape->as_array()) {
        const uint64_t dim = non_negative_int(d, "dimension");
        e.info.shape.push_back(static_cast<int64_t>(dim));
        if (__builtin_mul_overflow(numel, dim, &numel)) fail(t + "shape product overflows");
      }
      if (__builtin_mul_overflow(numel, uint64_t{dtype_size(e.info.dtype)}, &nbytes)) fail(t + "byte size overflows");
      if (!offs->is_array() || offs->size() != 2) fail(t + "'data_offsets' must be an array [begin, end]");
      e.begin = non_negative_int(offs->at(size_t{0}), "data_offsets[0]");
      e.end = non_negative_int(offs->at(size_t{1}), "data_offsets[1]");
    } catch (const FormatError& err) {
      if (std::strncmp(err.what(), where.c_str(), where.size()) == 0) throw;
      fail(t + err.what());
    }
    if (nbytes > static_cast<uint64_t>(INT64_MAX)) fail(t + "byte size overflows");
    if (e.begin > e.end)
      fail(t + "data_offsets begin " + std::to_string(e.begin) + " > end " + std::to_string(e.end));
    if (e.end > buffer_len)
      fail(t + "data_offsets end " + std::to_string(e.end) + " past the data buffer (" + std::to_string(buffer_len) +
           " bytes)");
    if (e.end - e.begin != nbytes)
      fail(t + "data_offsets span " + std::to_string(e.end - e.begin) + " bytes but dtype " +
           dtype_name(e.info.dtype) + " and its shape need " + std::to_string(nbytes));
    e.info.nbytes = static_cast<size_t>(nbytes);
    e.info.data = buffer + e.begin;
    entries.push_back(std::move(e));
  }

  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  for (const Entry& e : entries) {
    if (e.begin != pos) {
      if (e.begin < pos) fail("tensor '" + e.info.name + "' overlaps the previous tensor (begins at " +
                              std::to_string(e.begin) + ", previous ends at " + std::to_string(pos) + ")");
      fail("hole in the data buffer: bytes [" + std::to_string(pos) + ", " + std::to_string(e.begin) +
           ") before tensor '" + e.info.name + "' belong to no tensor");
    }
    pos = e.end;
  }
  if (pos != buffer_len)
    fail("data buffer is " + std::to_string(buffer_len) + " bytes but the tensors cover " + std::to_string(pos) +
         " (trailing bytes or truncated header offsets)");

  tensors_.reserve(entries.size());
  for (Entry& e : entries) {
    index_.emplace(e.info.name, tensors_.size());
    tensors_.push_back(std::move(e.info));
  }
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::at(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) throw ValueError("safetensors '" + label_ + "': no tensor named '" + name + "'");
  return *t;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& t : tensors_) out.push_back(t.name);
  return out;
}

}  // namespace qlora::io
