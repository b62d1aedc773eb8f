#include "model/peft_config.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>

#include "common/error.hpp"

namespace qlora::model {

namespace {

[[noreturn]] void bad(const std::string& field, const std::string& want, const json::Value& v) {
  throw ValueError("adapter config: " + field + " must be " + want + ", got " + json::type_name(v.type()));
}

bool is_str_array(const json::Value& v) {
  if (!v.is_array()) return false;
  for (const auto& x : v.as_array())
    if (!x.is_string()) return false;
  return true;
}

json::Value sorted_names(const json::Value& v) {  // Python's sorted(): code point = UTF-8 byte order
  if (!v.is_array()) return v;
  std::vector<std::string> names;
  for (const auto& x : v.as_array()) names.push_back(x.as_string());
  std::sort(names.begin(), names.end());
  json::Array a;
  for (auto& n : names) a.emplace_back(std::move(n));
  return json::Value(std::move(a));
}

json::Value sort_keys(const json::Value& v) {  // json.dumps(sort_keys=True), at every level
  if (v.is_array()) {
    json::Array a;
    for (const auto& x : v.as_array()) a.push_back(sort_keys(x));
    return json::Value(std::move(a));
  }
  if (!v.is_object()) return v;
  std::vector<const json::Object::Member*> ms;
  for (const auto& m : v.as_object()) ms.push_back(&m);
  std::sort(ms.begin(), ms.end(), [](auto* a, auto* b) { return a->first < b->first; });
  json::Object o;
  for (auto* m : ms) o.set(m->first, sort_keys(m->second));
  return json::Value(std::move(o));
}

// json.dumps' ensure_ascii: every code point outside ' '..'~' left in the (valid UTF-8) text is
// written \uXXXX, lowercase hex, astral ones as a surrogate pair. Non-ASCII bytes only occur
// inside strings, and control characters there are already escaped by json::dump.
std::string ensure_ascii(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  auto esc = [&out](unsigned cp) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "\\u%04x", cp);
    out += buf;
  };
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x7f) {
      out += s[i++];
      continue;
    }
    unsigned cp = c, n = 0;
    if (c == 0x7f) n = 0;
    else if (c >= 0xf0) cp = c & 0x07, n = 3;
    else if (c >= 0xe0) cp = c & 0x0f, n = 2;
    else cp = c & 0x1f, n = 1;
    for (unsigned k = 1; k <= n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
    i += n + 1;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      esc(0xd800 + (cp >> 10));
      esc(0xdc00 + (cp & 0x3ff));
    } else {
      esc(cp);
    }
  }
  return out;
}

}  // namespace

double float_as_written(float v) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest spelling that round-trips the float
  *r.ptr = '\0';
  return std::strtod(buf, nullptr);
}

PeftConfigFields peft_config_fields(const json::Value& obj) {
  if (!obj.is_object()) bad("the fields", "an object", obj);
  PeftConfigFields f;
  for (const auto& [k, v] : obj.as_object()) {
    if (k == "r") {
      if (!v.is_int() || v.as_int() <= 0) bad(k, "a positive integer", v);
      f.r = v.as_int();
    } else if (k == "lora_alpha") {
      if (!v.is_number()) bad(k, "a number", v);
      f.lora_alpha = v;
    } else if (k == "lora_dropout") {
      if (!v.is_number()) bad(k, "a number", v);
      f.lora_dropout = v.as_double();
    } else if (k == "target_modules") {
      if (!v.is_string() && !is_str_array(v)) bad(k, "a list of names or a regex string", v);
      f.target_modules = v;
    } else if (k == "exclude_modules") {
      if (!v.is_null() && !v.is_string() && !is_str_array(v)) bad(k, "null, a list of names or a regex string", v);
      f.exclude_modules = v;
    } else if (k == "use_rslora") {
      if (!v.is_bool()) bad(k, "a bool", v);
      f.use_rslora = v.as_bool();
    } else if (k == "init_lora_weights") {
      if (!v.is_bool() && !v.is_string()) bad(k, "a bool or a string", v);
      f.init_lora_weights = v;
    } else if (k == "rank_pattern" || k == "alpha_pattern") {
      if (!v.is_object()) bad(k, "an object", v);
      for (const auto& [pk, pv] : v.as_object())
        if (k == "rank_pattern" ? !pv.is_int() : !pv.is_number())
          bad(k + "[" + pk + "]", k == "rank_pattern" ? "an integer" : "a number", pv);
      (k == "rank_pattern" ? f.rank_pattern : f.alpha_pattern) = v;
    } else if (k == "layers_to_transform") {
      bool ok = v.is_null() || v.is_int();
      if (v.is_array()) {
        ok = true;
        for (const auto& x : v.as_array()) ok = ok && x.is_int();
      }
      if (!ok) bad(k, "null, an integer or a list of integers", v);
      f.layers_to_transform = v;
    } else if (k == "layers_pattern") {
      if (!v.is_null() && !v.is_string() && !is_str_array(v)) bad(k, "null, a string or a list of strings", v);
      f.layers_pattern = v;
    } else if (k == "base_model_name_or_path") {
      if (!v.is_null() && !v.is_string()) bad(k, "null or a string", v);
      f.base_model_name_or_path = v;
    } else {
      throw ValueError("adapter config: unknown field '" + k + "'");
    }
  }
  return f;
}

std::string peft_config_json(const PeftConfigFields& f) {
  json::Value c = json::Value::object();
  // PEFT's LoraConfig fields this engine implements, plus the ones it writes off / empty.
  c.set("peft_type", "LORA");
  c.set("task_type", "CAUSAL_LM");
  c.set("base_model_name_or_path", f.base_model_name_or_path);
  c.set("inference_mode", true);
  c.set("r", f.r);
  c.set("lora_alpha", f.lora_alpha);
  c.set("lora_dropout", f.lora_dropout);
  c.set("target_modules", sorted_names(f.target_modules));
  c.set("exclude_modules", sorted_names(f.exclude_modules));
  c.set("use_rslora", f.use_rslora);
  c.set("init_lora_weights", f.init_lora_weights);
  c.set("rank_pattern", f.rank_pattern);
  c.set("alpha_pattern", f.alpha_pattern);
  c.set("layers_to_transform", f.layers_to_transform);
  c.set("layers_pattern", f.layers_pattern);
  c.set("bias", "none");
  c.set("use_dora", false);
  c.set("modules_to_save", nullptr);
  c.set("fan_in_fan_out", false);
  c.set("lora_bias", false);
  c.set("revision", nullptr);
  c.set("auto_mapping", nullptr);
  return ensure_ascii(json::dump(sort_keys(c), 2)) + "\n";
}

}  // namespace qlora::model
