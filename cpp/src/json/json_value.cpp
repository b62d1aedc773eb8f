// json::Value / json::Object: typed accessors with clear errors.
#include <cmath>

#include "common/error.hpp"
#include "json/json.hpp"

namespace qlora::json {

const char* type_name(Type t) {
  switch (t) {
    case Type::Null: return "null";
    case Type::Bool: return "bool";
    case Type::Int: return "integer";
    case Type::Double: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "?";
}

void throw_int_range() { throw ValueError("JSON: integer above INT64_MAX cannot be stored exactly"); }

// ---------------------------------------------------------------- Object

const Value* Object::find(std::string_view key) const {
  auto it = index_.find(std::string(key));
  return it == index_.end() ? nullptr : &items_[it->second].second;
}

Value* Object::find(std::string_view key) {
  auto it = index_.find(std::string(key));
  return it == index_.end() ? nullptr : &items_[it->second].second;
}

void Object::set(std::string key, Value v) {
  if (Value* old = find(key)) {
    *old = std::move(v);
    return;
  }
  index_.emplace(key, items_.size());
  items_.emplace_back(std::move(key), std::move(v));
}

bool Object::insert_unique(std::string key, Value v) {
  auto [it, inserted] = index_.emplace(key, items_.size());
  if (!inserted) return false;
  items_.emplace_back(std::move(key), std::move(v));
  return true;
}

// ---------------------------------------------------------------- Value

void Value::type_error(Type want) const {
  throw FormatError(std::string("JSON: expected ") + type_name(want) + ", got " + type_name(type()));
}

bool Value::as_bool() const {
  if (!is_bool()) type_error(Type::Bool);
  return std::get<bool>(v_);
}

int64_t Value::as_int() const {
  if (is_int()) return std::get<int64_t>(v_);
  if (is_double()) {
    const double d = std::get<double>(v_);
    // [-2^63, 2^63) is exactly representable at the ends; anything else is not an int64.
    if (std::trunc(d) == d && d >= -9223372036854775808.0 && d < 9223372036854775808.0)
      return static_cast<int64_t>(d);
    throw FormatError("JSON: expected integer, got non-integral number " + dump(*this));
  }
  type_error(Type::Int);
}

double Value::as_double() const {
  if (is_double()) return std::get<double>(v_);
  if (is_int()) return static_cast<double>(std::get<int64_t>(v_));
  type_error(Type::Double);
}

const std::string& Value::as_string() const {
  if (!is_string()) type_error(Type::String);
  return std::get<std::string>(v_);
}

const Array& Value::as_array() const {
  if (!is_array()) type_error(Type::Array);
  return std::get<Array>(v_);
}

Array& Value::as_array() {
  if (!is_array()) type_error(Type::Array);
  return std::get<Array>(v_);
}

const Object& Value::as_object() const {
  if (!is_object()) type_error(Type::Object);
  return std::get<Object>(v_);
}

Object& Value::as_object() {
  if (!is_object()) type_error(Type::Object);
  return std::get<Object>(v_);
}

const Value* Value::find(std::string_view key) const { return as_object().find(key); }

const Value& Value::at(std::string_view key) const {
  const Value* v = find(key);
  if (!v) throw FormatError("JSON: object has no key '" + std::string(key) + "'");
  return *v;
}

const Value& Value::at(size_t i) const {
  const Array& a = as_array();
  if (i >= a.size())
    throw FormatError("JSON: index " + std::to_string(i) + " out of range for array of " + std::to_string(a.size()));
  return a[i];
}

size_t Value::size() const {
  if (is_array()) return std::get<Array>(v_).size();
  if (is_object()) return std::get<Object>(v_).size();
  throw FormatError(std::string("JSON: size() of a ") + type_name(type()));
}

namespace {
// Runs `get` on the member, adding the key to a type error.
template <class T, class F>
T member_or(const Value& obj, std::string_view key, T def, F get) {
  const Value* v = obj.find(key);
  if (!v || v->is_null()) return def;
  try {
    return get(*v);
  } catch (const FormatError& e) {
    std::string_view msg = e.what();
    if (msg.substr(0, 6) == "JSON: ") msg.remove_prefix(6);
    throw FormatError("JSON key '" + std::string(key) + "': " + std::string(msg));
  }
}
}  // namespace

bool Value::get_or(std::string_view key, bool def) const {
  return member_or(*this, key, def, [](const Value& v) { return v.as_bool(); });
}
int64_t Value::get_or(std::string_view key, int64_t def) const {
  return member_or(*this, key, def, [](const Value& v) { return v.as_int(); });
}
double Value::get_or(std::string_view key, double def) const {
  return member_or(*this, key, def, [](const Value& v) { return v.as_double(); });
}
std::string Value::get_or(std::string_view key, const std::string& def) const {
  return member_or(*this, key, def, [](const Value& v) { return v.as_string(); });
}

}  // namespace qlora::json
