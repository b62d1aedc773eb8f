// ctest for the GGUF reader and dequantization (cpp/src/io/gguf_read, cpp/src/gguf/dequant) without
// Python: a hand-built file in memory reads back (metadata of several types, tensor infos, offsets),
// each single-byte truncation and a set of corruptions throw FormatError naming the field, and
// Q8_0 / Q4_0 / F16 blocks decode to known values.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "check.hpp"
#include "common/error.hpp"
#include "gguf/dequant.hpp"
#include "io/gguf_read.hpp"

using qlora::gguf::File;
using qlora::gguf::VType;

namespace {

struct Buf {
  std::vector<uint8_t> b;
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof v);
  }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
  }
};

// "GGUF" v3, 3 metadata values, 2 F32 tensors a[8] (offset 0) and b[2, 2] (offset 32).
std::vector<uint8_t> tiny() {
  Buf f;
  f.b = {'G', 'G', 'U', 'F'};
  f.put<uint32_t>(3);
  f.put<uint64_t>(2);
  f.put<uint64_t>(3);
  f.str("general.architecture");
  f.put<uint32_t>(uint32_t(VType::STRING));
  f.str("llama");
  f.str("x.count");
  f.put<uint32_t>(uint32_t(VType::I32));
  f.put<int32_t>(-7);
  f.str("x.list");
  f.put<uint32_t>(uint32_t(VType::ARRAY));
  f.put<uint32_t>(uint32_t(VType::STRING));
  f.put<uint64_t>(2);
  f.str("ab");
  f.str("");
  f.str("a");
  f.put<uint32_t>(1);
  f.put<uint64_t>(8);
  f.put<uint32_t>(0);
  f.put<uint64_t>(0);
  f.str("b");
  f.put<uint32_t>(2);
  f.put<uint64_t>(2);
  f.put<uint64_t>(2);
  f.put<uint32_t>(0);
  f.put<uint64_t>(32);
  while (f.b.size() % 32) f.b.push_back(0);
  for (int i = 0; i < 12; ++i) f.put<float>(float(i));
  return f.b;
}

std::string error_of(const std::vector<uint8_t>& data) {
  try {
    File::from_buffer(data.data(), data.size(), "mem.gguf");
  } catch (const qlora::FormatError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("WRONG TYPE: ") + e.what();
  }
  return "";
}

}  // namespace

int main() {
  const std::vector<uint8_t> good = tiny();
  auto f = File::from_buffer(good.data(), good.size(), "mem.gguf");
  CHECK(f->version() == 3 && f->kv().size() == 3 && f->tensors().size() == 2, "layout");
  CHECK(f->find("general.architecture") && f->find("general.architecture")->str == "llama", "string value");
  CHECK(f->find("x.count") && f->find("x.count")->i == -7 && f->find("x.count")->repr() == "-7", "int value");
  const auto strs = f->strings(*f->find("x.list"));
  CHECK(strs.size() == 2 && strs[0] == "ab" && strs[1].empty(), "string array");
  const auto* b = f->tensor("b");
  CHECK(b && b->shape() == std::vector<int64_t>({2, 2}) && b->nbytes == 16 && b->offset == f->data_offset() + 32,
        "tensor b");
  float b0 = 0;
  std::memcpy(&b0, b->data, 4);
  CHECK(b0 == 8.0f, "tensor b data %g", b0);

  int refused = 0;
  for (size_t n = 0; n < good.size(); ++n) {  // every truncation
    const std::string e = error_of(std::vector<uint8_t>(good.begin(), good.begin() + n));
    CHECK(contains(e.c_str(), "mem.gguf: not a readable GGUF file: "), "truncated at %zu: '%s'", n, e.c_str());
    refused += !e.empty();
  }
  CHECK(refused == int(good.size()), "%d truncations refused", refused);

  struct Mut {
    size_t at;
    std::vector<uint8_t> bytes;
    const char* want;
  };
  const size_t kv0 = 24;  // first key's length
  const Mut muts[] = {
      {0, {'G', 'G', 'M', 'L'}, "bad magic"},
      {4, {1, 0, 0, 0}, "unsupported GGUF version 1"},
      {8, {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF}, "tensor count"},
      {kv0, {0, 0, 0, 0, 0, 1, 0, 0}, "key of metadata entry 0"},
      {kv0 + 8 + 20, {13, 0, 0, 0}, "general.architecture has unknown value type 13"},
      {kv0 + 8 + 20 + 4 + 8, {0xC3, 0x28}, "value of general.architecture is not valid UTF-8"},
  };
  for (const Mut& m : muts) {
    std::vector<uint8_t> d = good;
    std::memcpy(d.data() + m.at, m.bytes.data(), m.bytes.size());
    const std::string e = error_of(d);
    CHECK(contains(e.c_str(), m.want), "mutation '%s' gave '%s'", m.want, e.c_str());
  }

  // Dequantization: Q8_0 (d = 0.5) and Q4_0 (d = 2) blocks, an F16 value.
  uint8_t q8[34] = {0x00, 0x38};  // fp16 0.5
  for (int j = 0; j < 32; ++j) q8[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(j - 16));
  float out[32];
  qlora::gguf::dequantize(uint32_t(qlora::gguf::GType::Q8_0), q8, out, 32);
  CHECK(out[0] == -8.0f && out[31] == 7.5f, "Q8_0 %g %g", out[0], out[31]);
  uint8_t q4[18] = {0x00, 0x40};  // fp16 2.0
  for (int j = 0; j < 16; ++j) q4[2 + j] = static_cast<uint8_t>(j | (15 - j) << 4);
  qlora::gguf::dequantize(uint32_t(qlora::gguf::GType::Q4_0), q4, out, 32);
  CHECK(out[0] == -16.0f && out[15] == 14.0f && out[16] == 14.0f && out[31] == -16.0f, "Q4_0 %g %g %g %g", out[0],
        out[15], out[16], out[31]);
  CHECK(qlora::gguf::half_to_float(0x3C00) == 1.0f && qlora::gguf::half_to_float(0x0001) == std::ldexp(1.0f, -24),
        "half");
  bool threw = false;
  try {
    qlora::gguf::dequantize(20, q4, out, 32);  // IQ4_NL
  } catch (const qlora::ValueError&) {
    threw = true;
  }
  CHECK(threw, "unsupported type throws ValueError");

  // py_float_repr (float metadata shown as Python's repr): both notations, exponent widths 2 and 3.
  const std::pair<double, const char*> reprs[] = {
      {1e-05, "1e-05"}, {1e16, "1e+16"}, {1.5e-300, "1.5e-300"}, {1e300, "1e+300"}, {5e-324, "5e-324"},
      {1.7976931348623157e308, "1.7976931348623157e+308"}, {0.1, "0.1"}, {123.0, "123.0"}, {-2.5e-07, "-2.5e-07"},
      {1234567890123456.0, "1234567890123456.0"}, {-0.0, "-0.0"}, {0.0001, "0.0001"}, {1e100, "1e+100"},
      {NAN, "nan"}, {-INFINITY, "-inf"}};
  for (const auto& [v, want] : reprs) {
    const std::string got = qlora::gguf::py_float_repr(v);
    CHECK(got == want, "py_float_repr(%.17g) = %s, want %s", v, got.c_str(), want);
  }

  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
