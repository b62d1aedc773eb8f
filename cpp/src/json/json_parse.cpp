// Strict recursive-descent JSON parser (RFC 8259) with a depth cap and precise error positions.
#include <charconv>
#include <cstring>

#include "common/error.hpp"
#include "io/mapped_file.hpp"
#include "json/json.hpp"

namespace qlora::json {

namespace {

// Length of the valid UTF-8 sequence at p (1..4), or 0 if it is invalid or truncated.
size_t utf8_seq_len(const unsigned char* p, size_t avail) {
  const unsigned c = p[0];
  if (c < 0x80) return 1;
  auto cont = [&](size_t i, unsigned lo = 0x80, unsigned hi = 0xBF) {
    return i < avail && p[i] >= lo && p[i] <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c == 0xE0) return cont(1, 0xA0) && cont(2) ? 3 : 0;
  if (c == 0xED) return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0;  // no UTF-16 surrogates
  if (c >= 0xE1 && c <= 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (c == 0xF0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c == 0xF4) return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;  // <= U+10FFFF
  return 0;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

class Parser {
 public:
  Parser(std::string_view s, const ParseOptions& opt) : s_(s), opt_(opt) {}

  Value document() {
    if (s_.size() >= 3 && std::memcmp(s_.data(), "\xEF\xBB\xBF", 3) == 0)
      fail("UTF-8 byte order mark before the value (not allowed in JSON)", 0);
    skip_ws();
    Value v = value();
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected trailing characters after the JSON value", pos_);
    return v;
  }

 private:
  std::string_view s_;
  const ParseOptions& opt_;
  size_t pos_ = 0;
  size_t depth_ = 0;

  [[noreturn]] void fail(const std::string& msg, size_t at) const {
    at = std::min(at, s_.size());
    size_t line = 1, col = 1;
    for (size_t i = 0; i < at; ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    throw FormatError("invalid JSON at line " + std::to_string(line) + ", column " + std::to_string(col) +
                      " (byte " + std::to_string(at) + "): " + msg);
  }

  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }

  std::string describe_here() const {
    if (at_end()) return "end of input";
    const unsigned char c = static_cast<unsigned char>(s_[pos_]);
    if (c >= 0x20 && c < 0x7F) return std::string("'") + static_cast<char>(c) + "'";
    char buf[8];
    std::snprintf(buf, sizeof buf, "0x%02X", c);
    return std::string("byte ") + buf;
  }

  void skip_ws() {
    while (!at_end()) {
      const char c = s_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  void expect(char c, const char* what) {
    if (peek() != c) fail(std::string("expected ") + what + ", got " + describe_here(), pos_);
    ++pos_;
  }

  Value value() {
    switch (peek()) {
      case '{': return object();
      case '[': return array();
      case '"': return Value(string());
      case 't': literal("true"); return Value(true);
      case 'f': literal("false"); return Value(false);
      case 'n': literal("null"); return Value();
      default:
        if (peek() == '-' || is_digit(peek())) return number();
        fail("expected a JSON value, got " + describe_here(), pos_);
    }
  }

  void literal(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.substr(pos_, n) != word) fail(std::string("invalid literal (expected '") + word + "')", pos_);
    pos_ += n;
  }

  void enter() {
    if (++depth_ > opt_.max_depth)
      fail("nesting deeper than " + std::to_string(opt_.max_depth) + " arrays/objects", pos_);
  }

  Value object() {
    enter();
    ++pos_;  // '{'
    Object obj;
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      --depth_;
      return Value(std::move(obj));
    }
    for (;;) {
      skip_ws();
      const size_t key_pos = pos_;
      if (peek() != '"') fail("expected a string key, got " + describe_here(), pos_);
      std::string key = string();
      skip_ws();
      expect(':', "':' after an object key");
      skip_ws();
      Value v = value();
      if (opt_.allow_duplicate_keys) {
        obj.set(std::move(key), std::move(v));
      } else if (!obj.contains(key)) {
        obj.insert_unique(std::move(key), std::move(v));
      } else {
        fail("duplicate object key \"" + key + "\"", key_pos);
      }
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect('}', "',' or '}' in an object");
      break;
    }
    --depth_;
    return Value(std::move(obj));
  }

  Value array() {
    enter();
    ++pos_;  // '['
    Array arr;
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      --depth_;
      return Value(std::move(arr));
    }
    for (;;) {
      skip_ws();
      arr.push_back(value());
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect(']', "',' or ']' in an array");
      break;
    }
    --depth_;
    return Value(std::move(arr));
  }

  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape", pos_);
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_ + i];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("invalid hex digit in \\u escape", pos_ + i);
    }
    pos_ += 4;
    return v;
  }

  std::string string() {
    const size_t start = pos_;
    ++pos_;  // '"'
    std::string out;
    for (;;) {
      // Copy the run of plain ASCII characters at once.
      size_t run = pos_;
      while (run < s_.size()) {
        const unsigned char c = static_cast<unsigned char>(s_[run]);
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
        ++run;
      }
      out.append(s_.data() + pos_, run - pos_);
      pos_ = run;
      if (at_end()) fail("unterminated string", start);
      const unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("raw control character in string (must be escaped)", pos_);
      if (c >= 0x80) {
        const size_t n = utf8_seq_len(reinterpret_cast<const unsigned char*>(s_.data()) + pos_, s_.size() - pos_);
        if (n == 0) fail("invalid UTF-8 in string", pos_);
        out.append(s_.data() + pos_, n);
        pos_ += n;
        continue;
      }
      // Backslash escape.
      const size_t esc = pos_++;
      if (at_end()) fail("unterminated string", start);
      switch (s_[pos_++]) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("lone low surrogate in \\u escape", esc);
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s_.substr(pos_, 2) != "\\u") fail("high surrogate not followed by a \\u low surrogate", esc);
            pos_ += 2;
            const uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("high surrogate not followed by a low surrogate", esc);
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("invalid escape sequence", esc);
      }
    }
  }

  Value number() {
    const size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
      if (is_digit(peek())) fail("leading zeros are not allowed in numbers", start);
    } else if (is_digit(peek())) {
      while (is_digit(peek())) ++pos_;
    } else {
      fail("expected a digit after '-'", pos_);
    }
    bool integral = true;
    if (peek() == '.') {
      integral = false;
      ++pos_;
      if (!is_digit(peek())) fail("expected a digit after the decimal point", pos_);
      while (is_digit(peek())) ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      integral = false;
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!is_digit(peek())) fail("expected a digit in the exponent", pos_);
      while (is_digit(peek())) ++pos_;
    }
    const char* b = s_.data() + start;
    const char* e = s_.data() + pos_;
    if (integral) {
      int64_t i = 0;
      auto r = std::from_chars(b, e, i);
      if (r.ec == std::errc() && r.ptr == e) return Value(i);
      // Beyond int64: kept as the nearest double (documented limitation).
    }
    double d = 0;
    auto r = std::from_chars(b, e, d);
    if (r.ec == std::errc::result_out_of_range) {
      if (decimal_exponent(b, e) < 0) return Value(*b == '-' ? -0.0 : 0.0);  // underflow: Python gives 0.0 too
      fail("number out of the double range", start);
    }
    if (r.ec != std::errc() || r.ptr != e) fail("invalid number", start);
    return Value(d);
  }

  // Rough power of ten of a validated JSON number (sign of the answer is what matters).
  static long long decimal_exponent(const char* b, const char* e) {
    if (*b == '-') ++b;
    long long exp10 = 0;
    bool seen_point = false, found = false;
    long long int_digits = 0, lead_frac_zeros = 0;
    const char* p = b;
    for (; p < e && *p != 'e' && *p != 'E'; ++p) {
      if (*p == '.') {
        seen_point = true;
        continue;
      }
      if (!found && *p == '0') {
        if (seen_point) ++lead_frac_zeros;
        continue;
      }
      if (!found) found = true;
      if (!seen_point) ++int_digits;
    }
    if (!found) return -1;  // zero
    exp10 = int_digits > 0 ? int_digits - 1 : -(lead_frac_zeros + 1);
    if (p < e) {  // exponent, saturated
      ++p;
      bool neg = false;
      if (*p == '+' || *p == '-') neg = (*p++ == '-');
      long long x = 0;
      for (; p < e; ++p) x = std::min<long long>(x * 10 + (*p - '0'), 1000000000LL);
      exp10 += neg ? -x : x;
    }
    return exp10;
  }
};

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_seq_len(p + i, s.size() - i);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

Value parse(std::string_view text, const ParseOptions& opt) { return Parser(text, opt).document(); }

Value parse_file(const std::string& path, const ParseOptions& opt) {
  const std::string text = io::read_file(path);
  try {
    return parse(text, opt);
  } catch (const FormatError& e) {
    throw FormatError(path + ": " + e.what());
  }
}

}  // namespace qlora::json
