// A small JSON value, parser and writer (RFC 8259) for config.json, adapter_config.json and
// safetensors headers. Objects keep insertion order; integral numbers stay exact int64.
//
// Parsing is strict: invalid UTF-8, lone surrogates, raw control characters in strings,
// NaN/Infinity, leading zeros, trailing garbage and duplicate object keys all throw
// qlora::FormatError with the line/column/byte position. Nesting is capped (default 512)
// so hostile input cannot overflow the stack.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

namespace qlora::json {

enum class Type : uint8_t { Null, Bool, Int, Double, String, Array, Object };
const char* type_name(Type t);  // "null", "bool", "integer", "number", "string", "array", "object"

[[noreturn]] void throw_int_range();  // ValueError: unsigned value above INT64_MAX

class Value;
using Array = std::vector<Value>;

// An object: members in insertion order plus a name -> position index.
class Object {
 public:
  using Member = std::pair<std::string, Value>;
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  const Value* find(std::string_view key) const;
  Value* find(std::string_view key);
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  // Replaces the value of an existing key in place (position kept), else appends.
  void set(std::string key, Value v);
  // Appends; returns false (and changes nothing) if the key already exists.
  bool insert_unique(std::string key, Value v);
  const std::vector<Member>& items() const { return items_; }
  std::vector<Member>::const_iterator begin() const { return items_.begin(); }
  std::vector<Member>::const_iterator end() const { return items_.end(); }
  bool operator==(const Object& o) const;

 private:
  std::vector<Member> items_;
  std::unordered_map<std::string, size_t> index_;
};

class Value {
 public:
  Value() = default;  // null
  Value(std::nullptr_t) {}
  Value(bool b) : v_(b) {}
  template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  Value(T i) : v_(checked_int(i)) {}
  Value(double d) : v_(d) {}
  Value(float f) : v_(static_cast<double>(f)) {}
  Value(std::string s) : v_(std::move(s)) {}
  Value(std::string_view s) : v_(std::string(s)) {}
  Value(const char* s) : v_(std::string(s)) {}
  Value(Array a) : v_(std::move(a)) {}
  Value(Object o) : v_(std::move(o)) {}
  static Value array() { return Value(Array{}); }
  static Value object() { return Value(Object{}); }

  Type type() const { return static_cast<Type>(v_.index()); }
  bool is_null() const { return type() == Type::Null; }
  bool is_bool() const { return type() == Type::Bool; }
  bool is_int() const { return type() == Type::Int; }
  bool is_double() const { return type() == Type::Double; }
  bool is_number() const { return is_int() || is_double(); }
  bool is_string() const { return type() == Type::String; }
  bool is_array() const { return type() == Type::Array; }
  bool is_object() const { return type() == Type::Object; }

  // Typed access; a wrong type throws FormatError ("expected integer, got string").
  bool as_bool() const;
  int64_t as_int() const;    // Int, or a Double holding an exact int64 value (e.g. 1e3)
  double as_double() const;  // Int or Double
  const std::string& as_string() const;
  const Array& as_array() const;
  Array& as_array();
  const Object& as_object() const;
  Object& as_object();

  // Object access: at() throws FormatError naming a missing key; find() returns nullptr.
  const Value& at(std::string_view key) const;
  const Value* find(std::string_view key) const;
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  // Array access with bounds check.
  const Value& at(size_t i) const;
  size_t size() const;  // members of an array or object; throws for other types

  // The member's value if present and not null, else `def`; a present value of the wrong
  // type throws FormatError (a typo'd type in a config must not be silently ignored).
  bool get_or(std::string_view key, bool def) const;
  int64_t get_or(std::string_view key, int64_t def) const;
  int64_t get_or(std::string_view key, int def) const { return get_or(key, static_cast<int64_t>(def)); }
  double get_or(std::string_view key, double def) const;
  std::string get_or(std::string_view key, const std::string& def) const;
  std::string get_or(std::string_view key, const char* def) const { return get_or(key, std::string(def)); }

  // Building documents.
  void set(std::string key, Value v) { as_object().set(std::move(key), std::move(v)); }
  void push_back(Value v) { as_array().push_back(std::move(v)); }

  bool operator==(const Value& o) const { return v_ == o.v_; }
  bool operator!=(const Value& o) const { return !(*this == o); }

 private:
  template <class T>
  static int64_t checked_int(T i);
  [[noreturn]] void type_error(Type want) const;
  std::variant<std::nullptr_t, bool, int64_t, double, std::string, Array, Object> v_;
};

struct ParseOptions {
  size_t max_depth = 512;             // nested arrays/objects allowed
  bool allow_duplicate_keys = false;  // true: the last duplicate wins (Python json's behaviour)
};

// Parses one JSON document (surrounding whitespace allowed). Throws FormatError.
Value parse(std::string_view text, const ParseOptions& opt = {});
// Reads and parses a file; errors name the path. Missing file: io::FileError (ENOENT).
Value parse_file(const std::string& path, const ParseOptions& opt = {});

// Serializes. indent < 0: compact (",", ":"), like serde_json and the safetensors header.
// indent >= 0: one member per line, ", " -> ",\n", ": " separators (Python json.dumps(indent=n)).
// Non-ASCII is written as UTF-8; doubles use the shortest round-trip form, always with a '.'
// or exponent so they parse back as doubles. NaN/Inf throw ValueError (JSON has no spelling).
std::string dump(const Value& v, int indent = -1);
void dump_string(std::string& out, std::string_view s);  // appends a quoted, escaped string

// Strict UTF-8 check (no overlongs, no surrogates, <= U+10FFFF). Returns the byte offset of the
// first invalid sequence, or npos when valid.
size_t find_invalid_utf8(std::string_view s);

inline bool Object::operator==(const Object& o) const { return items_ == o.items_; }

template <class T>
int64_t Value::checked_int(T i) {
  if constexpr (std::is_unsigned_v<T> && sizeof(T) >= sizeof(int64_t)) {
    if (i > static_cast<T>(INT64_MAX)) throw_int_range();
  }
  return static_cast<int64_t>(i);
}

}  // namespace qlora::json
