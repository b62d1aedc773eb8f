#include "tokenizer/unicode.hpp"

#include <algorithm>
#include <memory>

namespace qlora::tok {

namespace {
// One byte per code point (1.1 MB), expanded from the generated runs on first use.
const uint8_t* flag_table() {
  static const std::unique_ptr<uint8_t[]> table = [] {
    std::unique_ptr<uint8_t[]> t(new uint8_t[0x110000]);
    for (size_t r = 0; r < kUnicodeRunCount; ++r) {
      uint32_t end = r + 1 < kUnicodeRunCount ? kUnicodeRuns[r + 1].first : 0x110000;
      std::fill(t.get() + kUnicodeRuns[r].first, t.get() + end, static_cast<uint8_t>(kUnicodeRuns[r].flags | kValid));
    }
    return t;
  }();
  return table.get();
}
}  // namespace

uint8_t cpt_flags(uint32_t cp) { return cp < 0x110000 ? flag_table()[cp] : 0; }

size_t utf8_seq_len(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  unsigned char c = p[i];
  if (c < 0x80) return 1;
  auto cont = [&](size_t k, unsigned char lo, unsigned char hi) { return i + k < n && p[i + k] >= lo && p[i + k] <= hi; };
  if (c >= 0xC2 && c <= 0xDF) return cont(1, 0x80, 0xBF) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    return cont(1, lo, hi) && cont(2, 0x80, 0xBF) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    return cont(1, lo, hi) && cont(2, 0x80, 0xBF) && cont(3, 0x80, 0xBF) ? 4 : 0;
  }
  return 0;
}

// Bytes of the maximal ill-formed subpart starting at s[i] (Unicode 3.9, "U+FFFD substitution of
// maximal subparts"): a lead byte plus the continuation bytes that were still acceptable.
static size_t bad_subpart_len(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  unsigned char c = p[i];
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c >= 0xE0 && c <= 0xEF) need = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
  else if (c >= 0xF0 && c <= 0xF4) need = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
  else return 1;  // 0x80..0xC1, 0xF5..0xFF: never valid
  size_t k = 1;
  if (i + k < n && p[i + k] >= lo && p[i + k] <= hi) {
    ++k;
    while (k <= need && i + k < n && p[i + k] >= 0x80 && p[i + k] <= 0xBF) ++k;
  }
  return k;
}

std::string_view sanitize_utf8(std::string_view s, std::string& buf) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    if (static_cast<unsigned char>(s[i]) < 0x80) { ++i; continue; }
    size_t l = utf8_seq_len(s, i);
    if (l == 0) break;
    i += l;
  }
  if (i == n) return s;
  buf.assign(s.data(), i);
  while (i < n) {
    size_t l = utf8_seq_len(s, i);
    if (l) {
      buf.append(s.data() + i, l);
      i += l;
    } else {
      buf.append("\xEF\xBF\xBD");
      i += bad_subpart_len(s, i);
    }
  }
  return buf;
}

void decode_utf8(std::string_view s, std::vector<uint32_t>& cpts, std::vector<uint32_t>& offsets) {
  cpts.clear();
  offsets.clear();
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, n = s.size();
  while (i < n) {
    offsets.push_back(static_cast<uint32_t>(i));
    unsigned char c = p[i];
    uint32_t cp;
    if (c < 0x80) cp = c, i += 1;
    else if (c < 0xE0) cp = ((c & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu), i += 2;
    else if (c < 0xF0) cp = ((c & 0x0Fu) << 12) | ((p[i + 1] & 0x3Fu) << 6) | (p[i + 2] & 0x3Fu), i += 3;
    else cp = ((c & 0x07u) << 18) | ((p[i + 1] & 0x3Fu) << 12) | ((p[i + 2] & 0x3Fu) << 6) | (p[i + 3] & 0x3Fu), i += 4;
    cpts.push_back(cp);
  }
  offsets.push_back(static_cast<uint32_t>(n));
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace qlora::tok
