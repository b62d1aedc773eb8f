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

// ---------------------------------------------------------------- NFC (UAX #15)
namespace {
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

uint8_t ccc_of(uint32_t cp) {
  if (cp < 0x300) return 0;
  const CccEntry* e = std::lower_bound(kCcc, kCcc + kCccCount, cp, [](const CccEntry& x, uint32_t v) { return x.cp < v; });
  return e != kCcc + kCccCount && e->cp == cp ? e->ccc : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {  // Hangul syllables: algorithmic
    uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const DecompEntry* e = std::lower_bound(kDecomp, kDecomp + kDecompCount, cp, [](const DecompEntry& x, uint32_t v) { return x.cp < v; });
  if (e == kDecomp + kDecompCount || e->cp != cp) {
    out.push_back(cp);
    return;
  }
  for (uint32_t k = 0; k < e->len; ++k) decompose(kDecompData[e->first + k], out);
}

uint32_t compose(uint32_t a, uint32_t b) {  // 0: none
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const ComposeEntry* e = std::lower_bound(kCompose, kCompose + kComposeCount, std::make_pair(a, b),
                                           [](const ComposeEntry& x, const std::pair<uint32_t, uint32_t>& v) {
                                             return x.a < v.first || (x.a == v.first && x.b < v.second);
                                           });
  return e != kCompose + kComposeCount && e->a == a && e->b == b ? e->c : 0;
}
}  // namespace

void nfc(std::string_view s, std::string& out) {
  std::vector<uint32_t> cps, offs;
  decode_utf8(s, cps, offs);
  bool simple = true;  // below U+0300 nothing decomposes, combines or composes
  for (uint32_t c : cps) simple &= c < 0x300;
  if (simple) {
    out.assign(s.data(), s.size());
    return;
  }
  std::vector<uint32_t> d;
  d.reserve(cps.size() + 8);
  for (uint32_t c : cps) decompose(c, d);
  // canonical ordering: stable sort of each run of non-starters by combining class
  for (size_t i = 0; i < d.size();) {
    if (!ccc_of(d[i])) { ++i; continue; }
    size_t j = i;
    while (j < d.size() && ccc_of(d[j])) ++j;
    std::stable_sort(d.begin() + static_cast<std::ptrdiff_t>(i), d.begin() + static_cast<std::ptrdiff_t>(j),
                     [](uint32_t x, uint32_t y) { return ccc_of(x) < ccc_of(y); });
    i = j;
  }
  // canonical composition
  std::vector<uint32_t> r;
  r.reserve(d.size());
  long starter = -1;
  int last_ccc = 0;
  for (uint32_t c : d) {
    int cc = ccc_of(c);
    if (starter >= 0) {
      bool adjacent = static_cast<long>(r.size()) - 1 == starter;
      bool blocked = !adjacent && (last_ccc == 0 || last_ccc >= cc);
      if (!blocked) {
        if (uint32_t p = compose(r[static_cast<size_t>(starter)], c)) {
          r[static_cast<size_t>(starter)] = p;
          continue;
        }
      }
    }
    if (cc == 0) starter = static_cast<long>(r.size());
    r.push_back(c);
    last_ccc = cc;
  }
  out.clear();
  for (uint32_t c : r) append_utf8(out, c);
}

}  // namespace qlora::tok
