// GGUF reader: walks the header, metadata and tensor infos with every count, length and offset
// bounded by the bytes that remain before it is used (see gguf_read.hpp).
#include "io/gguf_read.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/error.hpp"

namespace qlora::gguf {

namespace {

const char* const kVTypeNames[] = {"UINT8", "INT8",  "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
                                   "BOOL",  "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64"};

// Size of a fixed-size scalar value type; 0 for STRING / ARRAY / unknown.
size_t scalar_size(uint32_t t) {
  switch (static_cast<VType>(t)) {
    case VType::U8: case VType::I8: case VType::BOOL: return 1;
    case VType::U16: case VType::I16: return 2;
    case VType::U32: case VType::I32: case VType::F32: return 4;
    case VType::U64: case VType::I64: case VType::F64: return 8;
    default: return 0;
  }
}

// The gguf package's GGML_QUANT_SIZES (block size, bytes per block) and type names.
struct GTypeRow {
  uint32_t id;
  const char* name;
  int64_t block, size;
};
const GTypeRow kGTypes[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},          {2, "Q4_0", 32, 18},       {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},       {8, "Q8_0", 32, 34},       {9, "Q8_1", 32, 40},
    {10, "Q2_K", 256, 84},    {11, "Q3_K", 256, 110},    {12, "Q4_K", 256, 144},    {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},    {16, "IQ2_XXS", 256, 66},  {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},    {20, "IQ4_NL", 32, 18},    {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82},   {23, "IQ4_XS", 256, 136},  {24, "I8", 1, 1},          {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},         {28, "F64", 1, 8},         {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},    {35, "TQ2_0", 256, 66},    {39, "MXFP4", 32, 17},
    {40, "NVFP4", 64, 36},    {41, "Q1_0", 128, 18},
};

const GTypeRow* gtype_row(uint32_t t) {
  for (const auto& r : kGTypes)
    if (r.id == t) return &r;
  return nullptr;
}

template <class T>
T load(const uint8_t* p, bool swap) {
  T v;
  std::memcpy(&v, p, sizeof v);
  if (swap) {
    uint8_t b[sizeof v];
    std::memcpy(b, &v, sizeof v);
    std::reverse(b, b + sizeof v);
    std::memcpy(&v, b, sizeof v);
  }
  return v;
}

// The walker: an offset into [base, base + size) and the checks of gguf_check.py.
struct Walker {
  const std::string& path;
  const uint8_t* base;
  uint64_t size;
  uint64_t off = 0;
  bool swap = false;
  uint64_t elements = 0;  // array elements seen so far (kMaxArrayElements)

  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError(path + ": not a readable GGUF file: " + what);
  }
  void need(uint64_t n, const std::string& what) const {
    if (n > size - off)
      fail(what + " at offset " + std::to_string(off) + " needs " + std::to_string(n) + " bytes, only " +
           std::to_string(size - off) + " left in the file");
  }
  template <class T>
  T scalar(const std::string& what) {
    need(sizeof(T), what);
    const T v = load<T>(base + off, swap);
    off += sizeof(T);
    return v;
  }
  std::string string(const std::string& what, uint64_t limit = UINT64_MAX) {
    const uint64_t n = scalar<uint64_t>("length of " + what);
    if (n > limit) fail(what + " is " + std::to_string(n) + " bytes long (limit " + std::to_string(limit) + ")");
    need(n, what);
    const uint8_t* p = base + off;
    if (!valid_utf8(p, n)) fail(what + " is not valid UTF-8");
    off += n;
    return std::string(reinterpret_cast<const char*>(p), n);
  }
  // The elements of a string array: lengths checked, contents UTF-8 validated, nothing copied.
  void skip_strings(uint64_t count, const std::string& what) {
    for (uint64_t i = 0; i < count; ++i) {
      if (size - off < 8) fail(what + "[" + std::to_string(i) + "] runs past the end of the file");
      const uint64_t n = load<uint64_t>(base + off, swap);
      off += 8;
      if (n > size - off)
        fail(what + "[" + std::to_string(i) + "] is " + std::to_string(n) + " bytes long, only " +
             std::to_string(size - off) + " left in the file");
      if (!valid_utf8(base + off, n)) fail(what + "[" + std::to_string(i) + "] is not valid UTF-8");
      off += n;
    }
  }

  Value value(uint32_t t, const std::string& key) {
    Value v;
    v.type = static_cast<VType>(t);
    if (scalar_size(t)) {
      const std::string what = "value of " + key;
      switch (v.type) {
        case VType::U8: v.u = scalar<uint8_t>(what); break;
        case VType::I8: v.i = scalar<int8_t>(what); break;
        case VType::U16: v.u = scalar<uint16_t>(what); break;
        case VType::I16: v.i = scalar<int16_t>(what); break;
        case VType::U32: v.u = scalar<uint32_t>(what); break;
        case VType::I32: v.i = scalar<int32_t>(what); break;
        case VType::U64: v.u = scalar<uint64_t>(what); break;
        case VType::I64: v.i = scalar<int64_t>(what); break;
        case VType::F32: v.f = scalar<float>(what); break;
        case VType::F64: v.f = scalar<double>(what); break;
        case VType::BOOL:
          v.u = scalar<uint8_t>(what);
          if (v.u > 1) fail(key + " is a BOOL holding " + std::to_string(v.u) + " (not 0 or 1)");
          break;
        default: break;
      }
      return v;
    }
    if (v.type == VType::STRING) {
      v.str = string("value of " + key);
      return v;
    }
    if (v.type != VType::ARRAY) fail(key + " has unknown value type " + std::to_string(t));
    const uint32_t it = scalar<uint32_t>("element type of " + key);
    const uint64_t count = scalar<uint64_t>("element count of " + key);
    if (it == uint32_t(VType::ARRAY)) fail(key + " is an array of arrays (not supported)");
    if (!scalar_size(it) && it != uint32_t(VType::STRING))
      fail(key + " is an array of unknown value type " + std::to_string(it));
    if (count > kMaxArrayElements || (elements += count) > kMaxArrayElements)
      fail(key + " has " + std::to_string(count) + " elements: the metadata arrays exceed the limit of " +
           std::to_string(kMaxArrayElements) + " elements in all");
    v.elem = static_cast<VType>(it);
    v.count = count;
    v.data = base + off;
    if (it == uint32_t(VType::STRING)) {
      if (count > (size - off) / 8)  // each element takes at least its 8-byte length
        fail(key + " claims " + std::to_string(count) + " strings, more than the " + std::to_string(size - off) +
             " bytes left can hold");
      skip_strings(count, key);
    } else {
      const uint64_t n = count * scalar_size(it);  // count <= 2^21: no overflow
      need(n, std::to_string(count) + " " + kVTypeNames[it] + " elements of " + key);
      if (it == uint32_t(VType::BOOL))
        for (uint64_t k = 0; k < n; ++k)
          if (base[off + k] > 1) fail(key + " holds a BOOL that is neither 0 nor 1");
      off += n;
    }
    return v;
  }
};

std::string dims_str(const std::vector<uint64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

}  // namespace

const char* vtype_name(VType t) {
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? kVTypeNames[i] : "UNKNOWN";
}

bool gtype_traits(uint32_t type, int64_t* block, int64_t* type_size) {
  const GTypeRow* r = gtype_row(type);
  if (!r) return false;
  if (block) *block = r->block;
  if (type_size) *type_size = r->size;
  return true;
}

std::string gtype_name(uint32_t type) {
  const GTypeRow* r = gtype_row(type);
  return r ? r->name : "type " + std::to_string(type);
}

bool Value::is_int() const {
  switch (type) {
    case VType::U8: case VType::I8: case VType::U16: case VType::I16: case VType::U32: case VType::I32:
    case VType::U64: case VType::I64: return true;
    default: return false;
  }
}

bool Value::is_float() const { return type == VType::F32 || type == VType::F64; }

std::string Value::type_name() const {
  if (type == VType::ARRAY) return std::string("ARRAY[") + vtype_name(elem) + "]";
  return vtype_name(type);
}

std::string Value::repr() const {
  if (is_int()) return is_signed() ? std::to_string(i) : std::to_string(u);
  if (is_float()) return py_float_repr(f);
  if (type == VType::BOOL) return u ? "True" : "False";
  if (type == VType::STRING) {  // Python's repr: single quotes unless the text holds one
    const bool dq = str.find('\'') != std::string::npos && str.find('"') == std::string::npos;
    const char q = dq ? '"' : '\'';
    std::string s(1, q);
    for (char c : str) {
      if (c == q || c == '\\') s += '\\';
      if (c == '\n') { s += "\\n"; continue; }
      if (c == '\t') { s += "\\t"; continue; }
      if (c == '\r') { s += "\\r"; continue; }
      s += c;
    }
    return s + q;
  }
  return "None";  // arrays: the gguf_check layout kept no contents (value None)
}

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;  // bounded by the file size when the file was opened
  return n;
}

std::vector<int64_t> TensorInfo::shape() const {
  return std::vector<int64_t>(dims.rbegin(), dims.rend());
}

std::string py_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[40];
  int prec = 1;
  for (; prec <= 17; ++prec) {  // the shortest %e that reads back as v
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  // buf: [-]d.ddde[+-]XX -> digits and decimal exponent
  std::string s(buf);
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t k = 0; k < e; ++k)
    if (s[k] != '.') digits += s[k];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp < -4 || exp >= 16) {  // Python's repr switches to exponent notation here
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    const std::string e_digits = std::to_string(std::abs(exp));  // |exp| <= 324 for a double
    out += exp < 0 ? "e-" : "e+";
    if (e_digits.size() < 2) out += '0';  // at least two exponent digits, as Python
    out += e_digits;
  } else if (exp < 0) {
    out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  } else {
    const size_t int_len = static_cast<size_t>(exp) + 1;
    if (digits.size() <= int_len)
      out = digits + std::string(int_len - digits.size(), '0') + ".0";
    else
      out = digits.substr(0, int_len) + "." + digits.substr(int_len);
  }
  return neg ? "-" + out : out;
}

bool valid_utf8(const uint8_t* p, size_t n) {
  size_t i = 0;
  while (i < n) {
    const uint8_t c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else return false;
    if (n - i < len) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

std::shared_ptr<File> File::open(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) throw io::FileError(ENOENT, path, "GGUF file not found:");
    throw FormatError(path + ": cannot read the GGUF file (" + std::strerror(errno) + ")");
  }
  if (S_ISDIR(st.st_mode)) throw io::FileError(EISDIR, path, "is a directory, not a GGUF file:");
  if (!S_ISREG(st.st_mode))
    throw FormatError(path + ": not a regular file (a device, pipe or socket), so not a GGUF file");
  if (st.st_size == 0) throw FormatError(path + ": empty file, not a GGUF file");
  std::shared_ptr<File> f(new File());
  f->file_ = io::MappedFile::open(path);
  f->label_ = path;
  f->base_ = f->file_->data();
  f->size_ = f->file_->size();
  if (f->size_ == 0) throw FormatError(path + ": empty file, not a GGUF file");
  f->parse();
  return f;
}

std::shared_ptr<File> File::from_buffer(const uint8_t* data, size_t size, const std::string& label) {
  std::shared_ptr<File> f(new File());
  f->label_ = label;
  f->base_ = data;
  f->size_ = size;
  f->parse();
  return f;
}

void File::parse() {
  Walker w{label_, base_, size_};
  w.need(4, "magic");
  if (std::memcmp(base_, "GGUF", 4) != 0) {
    std::string m = "b'";  // as Python prints bytes
    for (int k = 0; k < 4; ++k) {
      const uint8_t c = base_[k];
      char hex[8];
      if (c == '\\' || c == '\'') m += '\\', m += char(c);
      else if (c >= 0x20 && c < 0x7F) m += char(c);
      else std::snprintf(hex, sizeof hex, "\\x%02x", c), m += hex;
    }
    w.fail("bad magic " + m + "' (expected b'GGUF')");
  }
  w.off = 4;
  uint32_t version = w.scalar<uint32_t>("version");
  if ((version & 0xFFFF) == 0 && version != 0) {  // written on a machine of the other byte order
    w.swap = true;
    version = load<uint32_t>(base_ + 4, true);
  }
  if (version != 2 && version != 3) w.fail("unsupported GGUF version " + std::to_string(version) + " (supported: 2, 3)");
  version_ = version;
  swap_ = w.swap;
  const uint64_t n_tensors = w.scalar<uint64_t>("tensor count");
  const uint64_t n_kv = w.scalar<uint64_t>("metadata key/value count");
  const uint64_t left = size_ - w.off;
  // a key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info 8 + 4 + 4 + 8
  if (n_kv > left / 13)
    w.fail("metadata key/value count " + std::to_string(n_kv) + " is more than the " + std::to_string(left) +
           " bytes left can hold");
  if (n_tensors > std::min<uint64_t>(left / 24, kMaxTensors))
    w.fail("tensor count " + std::to_string(n_tensors) + " is more than the file can hold (or the limit of " +
           std::to_string(kMaxTensors) + ")");
  kv_.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = w.string("key of metadata entry " + std::to_string(i));
    const uint32_t t = w.scalar<uint32_t>("type of " + key);
    if (kv_index_.count(key)) w.fail("duplicate metadata key '" + key + "'");
    Value v = w.value(t, key);
    kv_index_[key] = kv_.size();
    kv_.emplace_back(std::move(key), std::move(v));
  }

  if (const Value* a = find("general.alignment")) {
    if (a->type != VType::U32 || a->u == 0 || a->u > kMaxAlignment || (a->u & (a->u - 1)))
      w.fail("general.alignment must be a UINT32 power of two <= " + std::to_string(kMaxAlignment) + ", got " +
             a->type_name() + " " + a->repr());
    alignment_ = static_cast<uint32_t>(a->u);
  }

  struct Rel {
    uint64_t rel;
  };
  std::vector<Rel> rels;
  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    t.name = w.string("name of tensor " + std::to_string(i), kMaxTensorName);
    if (tensor_index_.count(t.name)) w.fail("duplicate tensor name '" + t.name + "'");
    const std::string& name = t.name;
    const uint32_t n_dims = w.scalar<uint32_t>("dimension count of tensor " + name);
    if (n_dims < 1 || n_dims > kMaxDims)
      w.fail("tensor " + name + " has " + std::to_string(n_dims) + " dimensions (1 to " + std::to_string(kMaxDims) + ")");
    for (uint32_t d = 0; d < n_dims; ++d)
      t.dims.push_back(w.scalar<uint64_t>("dimension " + std::to_string(d) + " of tensor " + name));
    t.type = w.scalar<uint32_t>("type of tensor " + name);
    const uint64_t rel = w.scalar<uint64_t>("data offset of tensor " + name);
    int64_t block = 0, type_size = 0;
    if (!gtype_traits(t.type, &block, &type_size)) w.fail("tensor " + name + " has unknown GGML type " + std::to_string(t.type));
    unsigned __int128 n_el = 1;
    for (uint64_t d : t.dims) {
      if (d == 0) w.fail("tensor " + name + " has a zero dimension (dims " + dims_str(t.dims) + ")");
      n_el *= d;  // at most 4 factors < 2^64, checked after each: cannot wrap 128 bits
      if (n_el >= (static_cast<unsigned __int128>(1) << 63))
        w.fail("tensor " + name + " has too many elements (dims " + dims_str(t.dims) + ")");
    }
    if (t.dims[0] % static_cast<uint64_t>(block))
      w.fail("tensor " + name + ": row length " + std::to_string(t.dims[0]) +
             " is not a multiple of the type's block size " + std::to_string(block));
    if (rel % alignment_)
      w.fail("tensor " + name + ": data offset " + std::to_string(rel) + " is not a multiple of the alignment " +
             std::to_string(alignment_));
    const unsigned __int128 nbytes = n_el / static_cast<uint64_t>(block) * static_cast<uint64_t>(type_size);
    t.nbytes = nbytes > UINT64_MAX ? UINT64_MAX : static_cast<uint64_t>(nbytes);  // > any file: refused below
    tensor_index_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
    rels.push_back({rel});
  }

  data_offset_ = (w.off + alignment_ - 1) / alignment_ * alignment_;
  for (size_t k = 0; k < tensors_.size(); ++k) {
    TensorInfo& t = tensors_[k];
    const unsigned __int128 start = static_cast<unsigned __int128>(data_offset_) + rels[k].rel;
    const unsigned __int128 end = start + t.nbytes;
    auto u128 = [](unsigned __int128 x) {  // exact decimal, as Python's ints print
      std::string s;
      do s.insert(s.begin(), char('0' + int(x % 10))), x /= 10; while (x);
      return s;
    };
    if (end > size_)
      w.fail("tensor " + t.name + ": data [" + u128(start) + ", " + u128(end) + ") runs past the end of the file (" +
             std::to_string(size_) + " bytes)");
    t.offset = static_cast<uint64_t>(start);
    t.data = base_ + t.offset;
  }
  // Tensor data ranges must not overlap (nor share an offset): each byte belongs to one tensor.
  std::vector<const TensorInfo*> by_start;
  for (const auto& t : tensors_) by_start.push_back(&t);
  std::stable_sort(by_start.begin(), by_start.end(),
                   [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < by_start.size(); ++k) {
    const TensorInfo& a = *by_start[k - 1];
    const TensorInfo& b = *by_start[k];
    if (a.offset + a.nbytes > b.offset)
      w.fail("tensors " + a.name + " and " + b.name + " overlap (data [" + std::to_string(a.offset) + ", " +
             std::to_string(a.offset + a.nbytes) + ") and [" + std::to_string(b.offset) + ", " +
             std::to_string(b.offset + b.nbytes) + "))");
  }
}

const Value* File::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const TensorInfo* File::tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

std::vector<std::string_view> File::strings(const Value& v) const {
  check_arg(v.type == VType::ARRAY && v.elem == VType::STRING, "GGUF value is " + v.type_name() + ", not ARRAY[STRING]");
  std::vector<std::string_view> out;
  out.reserve(v.count);
  const uint8_t* p = v.data;
  for (uint64_t i = 0; i < v.count; ++i) {  // validated on open: every length lies inside the file
    const uint64_t n = load<uint64_t>(p, swap_);
    out.emplace_back(reinterpret_cast<const char*>(p + 8), n);
    p += 8 + n;
  }
  return out;
}

std::vector<int64_t> File::ints(const Value& v) const {
  check_arg(v.type == VType::ARRAY, "GGUF value is " + v.type_name() + ", not an array");
  Value e;
  e.type = v.elem;
  check_arg(e.is_int(), "GGUF value is " + v.type_name() + ", not an array of integers");
  const size_t sz = scalar_size(uint32_t(v.elem));
  std::vector<int64_t> out;
  out.reserve(v.count);
  for (uint64_t i = 0; i < v.count; ++i) {
    const uint8_t* p = v.data + i * sz;
    int64_t x = 0;
    switch (v.elem) {
      case VType::U8: x = *p; break;
      case VType::I8: x = static_cast<int8_t>(*p); break;
      case VType::U16: x = load<uint16_t>(p, swap_); break;
      case VType::I16: x = load<int16_t>(p, swap_); break;
      case VType::U32: x = load<uint32_t>(p, swap_); break;
      case VType::I32: x = load<int32_t>(p, swap_); break;
      case VType::I64: x = load<int64_t>(p, swap_); break;
      case VType::U64: {
        const uint64_t u = load<uint64_t>(p, swap_);
        check_arg(u <= uint64_t(INT64_MAX), "GGUF UINT64 array element " + std::to_string(u) + " exceeds INT64_MAX");
        x = static_cast<int64_t>(u);
        break;
      }
      default: break;
    }
    out.push_back(x);
  }
  return out;
}

std::vector<uint64_t> File::uints(const Value& v) const {
  check_arg(v.type == VType::ARRAY && (v.elem == VType::U8 || v.elem == VType::U16 || v.elem == VType::U32 ||
                                       v.elem == VType::U64),
            "GGUF value is " + v.type_name() + ", not an array of unsigned integers");
  if (v.elem != VType::U64) {
    const std::vector<int64_t> xs = ints(v);
    return std::vector<uint64_t>(xs.begin(), xs.end());
  }
  std::vector<uint64_t> out;
  out.reserve(v.count);
  for (uint64_t i = 0; i < v.count; ++i) out.push_back(load<uint64_t>(v.data + 8 * i, swap_));
  return out;
}

std::vector<double> File::floats(const Value& v) const {
  check_arg(v.type == VType::ARRAY, "GGUF value is " + v.type_name() + ", not an array");
  if (v.elem == VType::F32 || v.elem == VType::F64) {
    std::vector<double> out;
    out.reserve(v.count);
    for (uint64_t i = 0; i < v.count; ++i)
      out.push_back(v.elem == VType::F32 ? double(load<float>(v.data + 4 * i, swap_)) : load<double>(v.data + 8 * i, swap_));
    return out;
  }
  const std::vector<int64_t> xs = ints(v);
  return std::vector<double>(xs.begin(), xs.end());
}

std::vector<uint8_t> File::bools(const Value& v) const {
  check_arg(v.type == VType::ARRAY && v.elem == VType::BOOL, "GGUF value is " + v.type_name() + ", not ARRAY[BOOL]");
  return std::vector<uint8_t>(v.data, v.data + v.count);
}

}  // namespace qlora::gguf
