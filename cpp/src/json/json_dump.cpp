// JSON writer. Compact output matches serde_json (what the safetensors package writes);
// indented output and float spelling match Python's json.dumps(ensure_ascii=False).
#include <charconv>
#include <cmath>
#include <cstring>

#include "common/error.hpp"
#include "json/json.hpp"

namespace qlora::json {

namespace {

constexpr size_t kMaxDumpDepth = 512;  // programmatic documents: keep recursion bounded

// Python repr(float): shortest round-trip digits; fixed notation for 1e-4 <= |x| < 1e16.
void append_double(std::string& out, double d) {
  if (!std::isfinite(d)) throw ValueError("JSON cannot represent NaN or infinity");
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string_view sci(buf, r.ptr - buf);  // "-d.ddde+XX"
  const size_t epos = sci.find('e');
  const int exp10 = std::atoi(std::string(sci.substr(epos + 1)).c_str());
  if (exp10 < -4 || exp10 >= 16) {
    out.append(sci);
    return;
  }
  std::string_view mant = sci.substr(0, epos);
  if (!mant.empty() && mant[0] == '-') {
    out += '-';
    mant.remove_prefix(1);
  }
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  if (exp10 < 0) {
    out += "0.";
    out.append(static_cast<size_t>(-exp10 - 1), '0');
    out += digits;
  } else {
    const size_t int_len = static_cast<size_t>(exp10) + 1;
    if (digits.size() <= int_len) {
      out += digits;
      out.append(int_len - digits.size(), '0');
      out += ".0";
    } else {
      out.append(digits, 0, int_len);
      out += '.';
      out.append(digits, int_len, std::string::npos);
    }
  }
}

void newline(std::string& out, int indent, size_t level) {
  out += '\n';
  out.append(static_cast<size_t>(indent) * level, ' ');
}

void dump_value(std::string& out, const Value& v, int indent, size_t level) {
  if (level > kMaxDumpDepth) throw ValueError("JSON dump: nesting deeper than 512");
  switch (v.type()) {
    case Type::Null: out += "null"; return;
    case Type::Bool: out += v.as_bool() ? "true" : "false"; return;
    case Type::Int: {
      char buf[24];
      auto r = std::to_chars(buf, buf + sizeof buf, v.as_int());
      out.append(buf, r.ptr);
      return;
    }
    case Type::Double: append_double(out, v.as_double()); return;
    case Type::String: dump_string(out, v.as_string()); return;
    case Type::Array: {
      const Array& a = v.as_array();
      out += '[';
      for (size_t i = 0; i < a.size(); ++i) {
        if (i) out += ',';
        if (indent >= 0) newline(out, indent, level + 1);
        dump_value(out, a[i], indent, level + 1);
      }
      if (indent >= 0 && !a.empty()) newline(out, indent, level);
      out += ']';
      return;
    }
    case Type::Object: {
      const Object& o = v.as_object();
      out += '{';
      bool first = true;
      for (const auto& [k, x] : o) {
        if (!first) out += ',';
        first = false;
        if (indent >= 0) newline(out, indent, level + 1);
        dump_string(out, k);
        out += indent >= 0 ? ": " : ":";
        dump_value(out, x, indent, level + 1);
      }
      if (indent >= 0 && !o.empty()) newline(out, indent, level);
      out += '}';
      return;
    }
  }
}

}  // namespace

void dump_string(std::string& out, std::string_view s) {
  const size_t bad = find_invalid_utf8(s);
  if (bad != std::string_view::npos)
    throw ValueError("JSON dump: string is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  out += '"';
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

std::string dump(const Value& v, int indent) {
  std::string out;
  dump_value(out, v, indent, 0);
  return out;
}

}  // namespace qlora::json
