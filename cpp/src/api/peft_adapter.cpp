#include "api/peft_adapter.hpp"

#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "gguf/dequant.hpp"
#include "io/atomic_dir.hpp"
#include "io/mapped_file.hpp"
#include "io/safetensors.hpp"
#include "json/json.hpp"
#include "model/linear.hpp"
#include "model/lora_check.hpp"
#include "model/lora_setup.hpp"
#include "model/weights.hpp"

namespace qlora::capi {

namespace {
namespace fs = std::filesystem;
using json::Value;
using model::kNumProj;

const char* const kParent[kNumProj] = {"self_attn", "self_attn", "self_attn", "self_attn", "mlp", "mlp", "mlp"};

std::string module_path(int64_t layer, int p) {
  return "model.layers." + std::to_string(layer) + "." + kParent[p] + "." + model::proj_name(p);
}
std::string tensor_name(int64_t layer, int p, char which) {
  return "base_model.model." + module_path(layer, p) + ".lora_" + which + ".weight";
}
std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}
// Python's repr of a JSON value, for messages that quote a config value as Python's do.
std::string repr(const Value& v) {
  switch (v.type()) {
    case json::Type::Null: return "None";
    case json::Type::Bool: return v.as_bool() ? "True" : "False";
    case json::Type::String: {
      std::string o = "'";
      for (char ch : v.as_string()) o += ch == '\\' ? "\\\\" : ch == '\'' ? "\\'" : std::string(1, ch);
      return o + "'";
    }
    case json::Type::Array: {
      std::string o = "[";
      for (size_t i = 0; i < v.size(); ++i) o += (i ? ", " : "") + repr(v.at(i));
      return o + "]";
    }
    default: return json::dump(v);
  }
}

// A pattern made only of [A-Za-z0-9_-.] and "\." (lora_config.py's _PLAIN): '.' matches any
// character, "\." a dot; no groups or quantifiers, so its matches have a fixed length.
struct Plain {
  std::string chars;       // the character each position matches
  std::vector<bool> any;  // true: '.', any character
  size_t size() const { return chars.size(); }
  bool at(const std::string& s, size_t pos) const {  // matches s[pos, pos + size())
    if (pos + size() > s.size()) return false;
    for (size_t i = 0; i < size(); ++i)
      if (!any[i] && s[pos + i] != chars[i]) return false;
    return true;
  }
};

std::optional<Plain> plain(const std::string& p) {
  Plain out;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size() && p[i + 1] == '.') {
      out.chars += '.', out.any.push_back(false), ++i;
    } else if (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-') {
      out.chars += c, out.any.push_back(false);
    } else if (c == '.') {
      out.chars += '.', out.any.push_back(true);
    } else {
      return std::nullopt;
    }
  }
  return out;
}

// Positions where "(.*\.)?" or "(?:^|.*?\.)" can end: 0 and after every '.'.
std::vector<size_t> starts(const std::string& key) {
  std::vector<size_t> s{0};
  for (size_t i = 0; i < key.size(); ++i)
    if (key[i] == '.') s.push_back(i + 1);
  return s;
}

// A config pattern: a plain name (matched here) or, when the caller gave a PatternMatcher, any
// regex (matched by it: Python's re rules, bounded in time by lora_config.py).
struct Pat {
  std::optional<Plain> plain;
  std::string src;
  const char* kind = "fullmatch";  // fullmatch (target/exclude), pattern (rank/alpha keys), layers
  std::string what;
};

// Python's bool / int checks: bool is not an int, an int-valued double is not an int either.
bool is_int(const Value& v) { return v.is_int(); }

struct Config {
  std::string where;  // the config file, for messages
  int64_t r = 8;
  double alpha = 8.0;
  bool rslora = false;
  // target_modules: kind 0 = list (names), 1 = all-linear, 2 = plain regex (fullmatch)
  int target_kind = 0;
  std::vector<std::string> targets;
  std::optional<Pat> target_re;
  std::string target_src;
  bool has_exclude = false, exclude_is_re = false;
  std::vector<std::string> exclude;
  std::optional<Pat> exclude_re;
  std::optional<std::vector<int64_t>> layers;  // layers_to_transform
  bool layers_is_int = false;
  std::vector<Pat> layers_patterns;
  std::vector<std::pair<Pat, int64_t>> rank_pattern;
  std::vector<std::pair<Pat, double>> alpha_pattern;
  const PatternMatcher* re = nullptr;  // null: regexes are refused
  const Value* raw = nullptr;          // the config object, for messages

  [[noreturn]] void fail(const std::string& msg) const { throw ValueError(where.empty() ? msg : where + ": " + msg); }

  Pat need_plain(const std::string& p, const char* kind, const std::string& what) const {
    Pat out{plain(p), p, kind, what};
    if (!out.plain && !(re && *re))
      fail(what + " '" + p + "' is a regular expression; the C API reads only plain names (letters, digits, '_', "
           "'-', '.', '\\.'). Load this adapter with qlora_native.Model.load_adapter (Python) or list the module "
           "names in target_modules / the pattern keys");
    return out;
  }

  // -1: no match; else 0, or for kind "layers" the layer index the pattern captured.
  int64_t call(const Pat& p, const std::string& key) const { return (*re)(p.src, p.kind, p.what, key); }
  bool fullmatch(const Pat& p, const std::string& key) const {
    if (p.plain) return p.plain->size() == key.size() && p.plain->at(key, 0);
    return call(p, key) >= 0;
  }

  bool excluded(const std::string& key) const {
    if (!has_exclude) return false;
    if (exclude_is_re) return fullmatch(*exclude_re, key);
    for (const auto& e : exclude)
      if (key == e || (key.size() > e.size() && key.compare(key.size() - e.size() - 1, std::string::npos, "." + e) == 0))
        return true;
    return false;
  }

  static bool ends_with_name(const std::string& key, const std::string& x) {
    return key.size() > x.size() && key.compare(key.size() - x.size() - 1, std::string::npos, "." + x) == 0;
  }

  // PEFT's check_target_module_exists for one module path (lora_config.py _targets).
  bool targets_key(const std::string& key, int64_t layer) const {
    if (excluded(key)) return false;
    if (target_kind == 1) {
      for (int p = 0; p < kNumProj; ++p)
        if (ends_with_name(key, model::proj_name(p))) return true;
      return false;
    }
    if (target_kind == 2) return fullmatch(*target_re, key);
    bool any = false;
    for (const auto& t : targets) {
      if (key == t) return true;  // an exact path is not filtered by layers_to_transform (PEFT)
      any = any || ends_with_name(key, t);
    }
    if (!any) return false;
    if (!layers || layers->empty()) return true;
    std::optional<int64_t> idx;
    if (layers_patterns.empty()) {
      idx = layer;  // the default rule ".*?\.[^.]*\.(\d+)\." reads "model.layers.<i>."
    } else {
      for (const Pat& pat : layers_patterns) {
        if (!pat.plain) {
          const int64_t i = call(pat, key);
          if (i >= 0) idx = i;
          if (idx) break;
          continue;
        }
        const Plain& p = *pat.plain;
        for (size_t s : starts(key)) {  // (?:^|.*?\.) p \. (\d+) \.
          if (!p.at(key, s)) continue;
          size_t i = s + p.size();
          if (i >= key.size() || key[i] != '.') continue;
          size_t j = ++i;
          while (j < key.size() && std::isdigit(static_cast<unsigned char>(key[j]))) ++j;
          if (j == i || j >= key.size() || key[j] != '.' || j - i > 18) continue;
          idx = std::stoll(key.substr(i, j - i));
          break;
        }
        if (idx) break;
      }
      if (!idx) return false;
    }
    for (int64_t l : *layers)
      if (l == *idx) return true;
    return false;
  }

  template <class T>
  T pattern_value(const std::vector<std::pair<Pat, T>>& pats, const std::string& key, T def) const {
    for (const auto& [pat, v] : pats) {  // get_pattern_key: first key whose (.*\.)?(key)$ matches
      if (!pat.plain) {
        if (call(pat, key) >= 0) return v;
        continue;
      }
      const Plain& p = *pat.plain;
      for (size_t s : starts(key))
        if (key.size() - s == p.size() && p.at(key, s)) return v;
    }
    return def;
  }
};

bool is_off_none(const Value& v) {  // lora_config._is_off(value, None)
  return v.is_null() || ((v.is_array() || v.is_object()) && v.size() == 0);
}

Config parse_config(const Value& d, const std::string& where, const PatternMatcher* re) {
  Config c;
  c.where = where;
  c.re = re;
  c.raw = &d;
  if (!d.is_object()) c.fail("adapter config must be a JSON object, got " + std::string(json::type_name(d.type())));
  const Value* pt = d.find("peft_type");
  if (!pt || !pt->is_string() || pt->as_string() != "LORA")
    c.fail("adapter config: peft_type must be 'LORA', got " + (pt ? repr(*pt) : "None") + " (only LoRA adapters are supported)");
  const Value* tt = d.find("task_type");
  if (tt && !tt->is_null() && !(tt->is_string() && tt->as_string() == "CAUSAL_LM"))
    c.fail("adapter config: task_type " + repr(*tt) + " is not supported (expected 'CAUSAL_LM' or null)");
  // PEFT features qlora_native does not implement: key -> (what "off" is, the feature's name).
  struct Unsupported {
    const char* key;
    int off;  // 0: None / [] / {}; 1: false; 2: "none"
    const char* feature;
  };
  static const Unsupported kUnsupported[] = {
      {"use_dora", 1, "DoRA (use_dora=True)"}, {"bias", 2, "training biases (bias != 'none')"},
      {"modules_to_save", 0, "modules_to_save (full trainable copies of modules)"},
      {"fan_in_fan_out", 1, "fan_in_fan_out=True (Conv1D-style weights)"}, {"lora_bias", 1, "lora_bias=True"},
      {"trainable_token_indices", 0, "trainable_token_indices"}, {"layer_replication", 0, "layer_replication"},
      {"target_parameters", 0, "target_parameters"}, {"use_qalora", 1, "QA-LoRA (use_qalora=True)"},
      {"alora_invocation_tokens", 0, "activated LoRA (alora_invocation_tokens)"},
      {"megatron_config", 0, "megatron_config"}, {"use_bdlora", 0, "BD-LoRA (use_bdlora)"},
      {"arrow_config", 0, "Arrow routing (arrow_config)"}, {"velora_config", 0, "VeLoRA (velora_config)"},
      {"kasa_config", 0, "KaSA (kasa_config)"}, {"monteclora_config", 0, "MonteCLoRA (monteclora_config)"}};
  for (const Unsupported& u : kUnsupported) {
    const Value* v = d.find(u.key);
    if (!v) continue;
    const bool off = u.off == 0   ? is_off_none(*v)
                     : u.off == 1 ? ((v->is_bool() && !v->as_bool()) || (v->is_number() && v->as_double() == 0.0))
                                  : (v->is_string() && v->as_string() == "none");
    if (!off)
      c.fail("adapter config: " + std::string(u.feature) + " is not supported by qlora_native (got " + u.key + "=" + repr(*v) + ")");
  }
  auto get = [&](const char* k) -> const Value* {
    const Value* v = d.find(k);
    return v && !v->is_null() ? v : nullptr;
  };
  if (const Value* v = d.find("r")) {  // PEFT's own defaults when absent: r 8, alpha 8, dropout 0
    if (!is_int(*v) || v->as_int() <= 0) c.fail("LoraConfig: r must be a positive int, got " + repr(*v));
    c.r = v->as_int();
  }
  if (const Value* v = d.find("lora_alpha")) {
    if (!v->is_number() || !std::isfinite(v->as_double()) || v->as_double() <= 0)
      c.fail("LoraConfig: lora_alpha must be a positive finite number, got " + repr(*v));
    c.alpha = v->as_double();
  }
  if (const Value* v = d.find("lora_dropout")) {
    if (!v->is_number() || !(v->as_double() >= 0.0 && v->as_double() < 1.0))
      c.fail("LoraConfig: lora_dropout must be a number in [0, 1), got " + repr(*v));
  }
  if (const Value* v = get("use_rslora")) {
    if (!v->is_bool()) c.fail("LoraConfig: use_rslora must be a bool, got " + repr(*v));
    c.rslora = v->as_bool();
  }
  if (const Value* v = get("init_lora_weights")) {
    std::string s = v->is_string() ? v->as_string() : "";
    for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (!v->is_bool() && s != "gaussian")
      c.fail("LoraConfig: init_lora_weights=" + repr(*v) + " is not supported (qlora_native implements True, False "
             "and 'gaussian'; PiSSA/OLoRA/LoftQ/EVA/CorDA/LoRA-GA/orthogonal inits are not)");
  }
  const Value* ltt = get("layers_to_transform");
  const Value* lp = get("layers_pattern");
  // Python tests layers_pattern for truth: "" and [] act as absent once their type is checked.
  const bool lp_set = lp && !((lp->is_string() && lp->as_string().empty()) || (lp->is_array() && lp->size() == 0));
  // target_modules
  if (const Value* t = get("target_modules")) {
    if (t->is_string()) {
      std::string low = t->as_string();
      for (char& ch : low) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (low == "all-linear") {
        c.target_kind = 1;
      } else {
        c.target_kind = 2;
        c.target_src = t->as_string();
        c.target_re = c.need_plain(t->as_string(), "fullmatch", "target_modules regex");
      }
      if (ltt) c.fail("LoraConfig: layers_to_transform cannot be used when target_modules is a str (PEFT rule); list "
                      "the module names instead");
      if (lp) c.fail("LoraConfig: layers_pattern cannot be used when target_modules is a str (PEFT rule)");
    } else {
      bool ok = t->is_array() && t->size() > 0;
      for (size_t i = 0; ok && i < t->size(); ++i) ok = t->at(i).is_string() && !t->at(i).as_string().empty();
      if (!ok)
        c.fail("LoraConfig: target_modules must be None, a regex string, 'all-linear' or a non-empty list of module "
               "names, got " + repr(*t));
      for (size_t i = 0; i < t->size(); ++i) {
        const std::string& x = t->at(i).as_string();
        const size_t dot = x.rfind('.');
        if (model::proj_index(dot == std::string::npos ? x : x.substr(dot + 1)) < 0)
          c.fail("LoraConfig: target module '" + x + "' is not supported: qlora_native puts adapters only on the "
                 "projections q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (not lm_head, "
                 "embed_tokens, norms)");
        c.targets.push_back(x);
      }
    }
  } else {
    c.targets = {"q_proj", "v_proj"};  // PEFT's default for model_type "llama"
  }
  if (lp_set && !ltt) c.fail("LoraConfig: layers_pattern needs layers_to_transform (PEFT rule)");
  if (ltt) {
    std::vector<int64_t> ls;
    bool ok = true;
    if (is_int(*ltt)) {
      ok = ltt->as_int() >= 0, ls.push_back(ltt->as_int()), c.layers_is_int = true;
    } else if (ltt->is_array()) {
      for (size_t i = 0; ok && i < ltt->size(); ++i) {
        ok = is_int(ltt->at(i)) && ltt->at(i).as_int() >= 0;
        if (ok) ls.push_back(ltt->at(i).as_int());
      }
    } else {
      ok = false;
    }
    if (!ok)
      c.fail("LoraConfig: layers_to_transform must be an int or a list of non-negative ints, got " + repr(*ltt));
    c.layers = ls;
  }
  if (lp) {
    std::vector<std::string> ps;
    bool ok = lp->is_string();
    if (ok) ps.push_back(lp->as_string());
    if (lp->is_array()) {
      ok = true;
      for (size_t i = 0; ok && i < lp->size(); ++i)
        if ((ok = lp->at(i).is_string())) ps.push_back(lp->at(i).as_string());
    }
    if (!ok) c.fail("LoraConfig: layers_pattern must be a str or a list of str, got " + repr(*lp));
    std::vector<Pat> pats;
    for (const auto& p : ps) pats.push_back(c.need_plain(p, "layers", "layers_pattern"));
    if (lp_set) c.layers_patterns = std::move(pats);
  }
  if (const Value* ex = get("exclude_modules")) {
    c.has_exclude = true;
    if (ex->is_string()) {
      c.exclude_is_re = true;
      c.exclude_re = c.need_plain(ex->as_string(), "fullmatch", "exclude_modules regex");
    } else {
      bool ok = ex->is_array();
      for (size_t i = 0; ok && i < ex->size(); ++i)
        if ((ok = ex->at(i).is_string())) c.exclude.push_back(ex->at(i).as_string());
      if (!ok) c.fail("LoraConfig: exclude_modules must be None, a regex string or a list, got " + repr(*ex));
    }
  }
  for (const char* attr : {"rank_pattern", "alpha_pattern"}) {
    const Value* pat = get(attr);
    if (!pat) continue;
    if (!pat->is_object())
      c.fail(std::string("LoraConfig: ") + attr + " must be a dict {regex: value}, got " + json::type_name(pat->type()));
    for (const auto& [k, v] : pat->as_object()) {
      const Pat p = c.need_plain(k, "pattern", std::string(attr) + " key");
      if (attr[0] == 'r') {
        if (!is_int(v) || v.as_int() <= 0)
          c.fail(std::string("LoraConfig: rank_pattern['") + k + "'] must be a positive int, got " + repr(v));
        c.rank_pattern.emplace_back(p, v.as_int());
      } else {
        if (!v.is_number() || !std::isfinite(v.as_double()) || v.as_double() <= 0)
          c.fail(std::string("LoraConfig: alpha_pattern['") + k + "'] must be a positive finite number, got " + repr(v));
        c.alpha_pattern.emplace_back(p, v.as_double());
      }
    }
  }
  return c;
}

struct Resolved {
  int64_t r;
  float scaling;
  double alpha, scaling_f64;
};

// LoraConfig.resolve: the adapted projections of an L-layer model, keyed layer * kNumProj + p.
std::map<int64_t, Resolved> resolve(const Config& c, int64_t L) {
  check_arg(L > 0, "resolve: num_layers must be a positive int, got " + std::to_string(L));
  if (c.target_kind == 2) {  // a regex that reaches a module other than the projections
    std::vector<std::string> others = {"model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb",
                                       "lm_head"};
    for (int64_t i = 0; i < L; ++i)
      for (const char* s : {"", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm", ".post_attention_layernorm"})
        others.push_back("model.layers." + std::to_string(i) + s);
    for (const auto& k : others)
      if (c.targets_key(k, -1))
        c.fail("LoraConfig: target_modules regex " + repr(Value(c.target_src)) + " matches '" + k + "', which is not one of the "
               "projections q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; qlora_native cannot "
               "adapt it");
  }
  std::map<int64_t, Resolved> out;
  for (int64_t l = 0; l < L; ++l)
    for (int p = 0; p < kNumProj; ++p) {
      const std::string key = module_path(l, p);
      if (!c.targets_key(key, l)) continue;
      const int64_t r = c.pattern_value(c.rank_pattern, key, c.r);
      const double alpha = c.pattern_value(c.alpha_pattern, key, c.alpha);
      const double scaling = model::lora_scaling(alpha, r, c.rslora);
      const float sf = static_cast<float>(scaling);
      if (!std::isfinite(sf))  // the engine keeps it in float32 (as Python's lora_add checks)
        c.fail("LoraConfig: the scaling of " + key + " (alpha " + json::dump(Value(alpha)) + ", r " + std::to_string(r) +
               ") is not finite in float32");
      out[l * kNumProj + p] = {r, sf, alpha, scaling};
    }
  if (out.empty()) {
    const Value none;
    auto field = [&](const char* k) { const Value* v = c.raw->find(k); return repr(v ? *v : none); };
    const Value* t = c.raw->find("target_modules");
    c.fail("LoraConfig: target_modules=" + (t && !t->is_null() ? repr(*t) : "None") + " (layers_to_transform=" +
           field("layers_to_transform") + ", exclude_modules=" + field("exclude_modules") +
           ") matches no projection of a " + std::to_string(L) + "-layer Llama model");
  }
  return out;
}

struct Parsed {
  int64_t layer;
  int p;
  char which;
};

// (layer, projection, 'A'|'B') of a canonical PEFT tensor name (adapter_io._parse_name).
Parsed parse_name(const std::string& name, const std::string& where) {
  static const std::string pre = "base_model.model.model.layers.";
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  if (name.compare(0, pre.size(), pre) == 0) {
    size_t i = pre.size(), j = i;
    while (j < name.size() && std::isdigit(static_cast<unsigned char>(name[j]))) ++j;
    if (j > i && j - i <= 9) {
      const int64_t layer = std::stoll(name.substr(i, j - i));
      for (int p = 0; p < kNumProj; ++p)
        for (char w : {'A', 'B'})
          if (name == tensor_name(layer, p, w)) return {layer, p, w};
    }
  }
  const size_t n = name.size();
  const std::string mv = "lora_magnitude_vector";
  if ((n >= mv.size() && name.compare(n - mv.size(), mv.size(), mv) == 0) || has(".lora_magnitude_vector."))
    throw ValueError(where + ": adapter tensor '" + name +
                     "': DoRA (lora_magnitude_vector) is not supported by qlora_native");
  if (has("lora_embedding_"))
    throw ValueError(where + ": adapter tensor '" + name + "': LoRA on embeddings is not supported (projections only)");
  if (has(".lora_B.bias") || has(".lora_A.bias"))
    throw ValueError(where + ": adapter tensor '" + name + "': LoRA biases (lora_bias=True) are not supported");
  auto ends = [&](const std::string& s) { return n >= s.size() && name.compare(n - s.size(), s.size(), s) == 0; };
  if (has("modules_to_save") || ends("lm_head.weight") || ends("embed_tokens.weight"))
    throw ValueError(where + ": adapter tensor '" + name +
                     "': full module weights (modules_to_save) are not supported");
  throw ValueError(where + ": unexpected adapter tensor '" + name + "': expected names like '" +
                   tensor_name(0, 0, 'A') + "' (PEFT format, adapter name stripped)");
}

// The tensor as float32 (F32 / F16 / BF16 / F64 as Python's loader accepts them).
std::vector<float> to_f32(const io::TensorInfo& t, const std::string& where) {
  const int64_t n = t.numel();
  std::vector<float> out(static_cast<size_t>(n));
  const uint8_t* d = t.data;
  switch (t.dtype) {
    case DType::F32: std::memcpy(out.data(), d, sizeof(float) * n); break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, d + 2 * i, 2);
        out[i] = gguf::half_to_float(h);  // IEEE binary16 -> float32, exact
      }
      break;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, d + 2 * i, 2);
        const uint32_t bits = static_cast<uint32_t>(h) << 16;
        std::memcpy(&out[i], &bits, 4);
      }
      break;
    case DType::F64:
      for (int64_t i = 0; i < n; ++i) {
        double x;
        std::memcpy(&x, d + 8 * i, 8);
        out[i] = static_cast<float>(x);
      }
      break;
    default:
      throw ValueError(where + ": tensor '" + t.name + "' has dtype " + dtype_name(t.dtype) +
                       "; expected float32, float16 or bfloat16");
  }
  return out;
}

int64_t s_in(const io::TensorInfo* a) { return a->shape[1]; }
int64_t s_out(const io::TensorInfo* b) { return b->shape[0]; }

}  // namespace

namespace {
// io::FileError with the caller's name first (Python raises it as FileNotFoundError / NotADirectoryError).
[[noreturn]] void file_error(int err, const std::string& path, const std::string& doing) {
  throw io::FileError(err, path, doing);
}
bool is_file(const std::string& p, struct stat& st) { return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode); }

// The symbolic [out, in] of each projection of a Llama layer: adapters on different projections
// must agree on the shared sizes (hidden, intermediate, q / kv widths).
const char* const kDims[kNumProj][2] = {{"q", "hidden"}, {"kv", "hidden"}, {"kv", "hidden"}, {"hidden", "q"},
                                        {"inter", "hidden"}, {"inter", "hidden"}, {"hidden", "inter"}};
}  // namespace

std::vector<PeftModulePlan> resolve_peft_config(const json::Value& d, int64_t num_layers, const std::string& where,
                                                const PatternMatcher& re) {
  const Config c = parse_config(d, where, &re);
  std::vector<PeftModulePlan> out;
  for (const auto& [k, v] : resolve(c, num_layers))
    out.push_back({k / kNumProj, static_cast<int>(k % kNumProj), v.r, v.alpha, v.scaling_f64, v.scaling});
  return out;
}

PeftRead read_peft_adapter(const std::string& dir, const PeftReadOptions& opt) {
  const std::string& api = opt.api;
  check_arg(!dir.empty(), api + ": dir is empty");
  io::recover_dir(dir);  // finish or roll back a killed save first (as every loader does)
  struct stat st {};
  const std::string holds = "(a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors)";
  if (::stat(dir.c_str(), &st) != 0) file_error(errno, dir, api + ": the adapter directory does not exist");
  if (!S_ISDIR(st.st_mode)) file_error(ENOTDIR, dir, api + ": '" + dir + "' is a file, not an adapter directory " + holds);
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string w_path = (fs::path(dir) / "adapter_model.safetensors").string();
  const std::string where = api + "(" + dir + ")";
  if (!is_file(cfg_path, st)) file_error(ENOENT, cfg_path, api + ": " + holds + "; missing");
  if (!is_file(w_path, st)) {
    const std::string bin = (fs::path(dir) / "adapter_model.bin").string();
    if (is_file(bin, st))
      throw ValueError(api + ": '" + bin + "' is a torch pickle, which qlora_native does not read; "
                       "convert it to adapter_model.safetensors (e.g. PeftModel.from_pretrained(base, dir)"
                       ".save_pretrained(dir, safe_serialization=True))");
    file_error(ENOENT, w_path, api + ": missing");
  }
  PeftRead out;
  try {
    json::ParseOptions po;
    po.allow_duplicate_keys = false;  // as io.read_json's default
    out.config = json::parse_file(cfg_path, po);
  } catch (const FormatError& e) {
    throw FormatError(cfg_path + ": not valid JSON (" + e.what() + ")");
  }
  Config cfg = parse_config(out.config, cfg_path, &opt.re);

  out.file = io::SafetensorsFile::open(w_path);
  std::map<int64_t, std::pair<const io::TensorInfo*, const io::TensorInfo*>> found;  // module -> (A, B)
  int64_t max_layer = -1;
  for (const io::TensorInfo& t : out.file->tensors()) {
    const Parsed q = parse_name(t.name, where);
    max_layer = std::max(max_layer, q.layer);
    auto& slot = found[q.layer * kNumProj + q.p];
    (q.which == 'A' ? slot.first : slot.second) = &t;
  }
  if (found.empty()) throw ValueError(where + ": the adapter has no LoRA tensors");
  const int64_t L = opt.num_layers > 0 ? opt.num_layers : max_layer + 1;
  if (max_layer >= L)
    throw ValueError(where + ": tensor for layer " + std::to_string(max_layer) + " but the model has " +
                     std::to_string(L) + " layers");
  const std::map<int64_t, Resolved> expected = resolve(cfg, L);
  std::set<std::string> missing, extras;
  for (const auto& [k, ab] : found) {
    const bool want = expected.count(k) != 0;
    for (int w = 0; w < 2; ++w) {
      const io::TensorInfo* t = w ? ab.second : ab.first;
      const std::string nm = tensor_name(k / kNumProj, static_cast<int>(k % kNumProj), w ? 'B' : 'A');
      if (t && !want) extras.insert(nm);
      if (!t && want) missing.insert(nm);
    }
  }
  for (const auto& [k, r] : expected)
    if (!found.count(k))
      for (char w : {'A', 'B'}) missing.insert(tensor_name(k / kNumProj, static_cast<int>(k % kNumProj), w));
  if (!extras.empty())
    throw ValueError(where + ": " + std::to_string(extras.size()) +
                     " tensor(s) for modules the config does not target, e.g. '" + *extras.begin() + "'");
  if (!missing.empty())
    throw ValueError(where + ": " + std::to_string(missing.size()) +
                     " tensor(s) missing for modules the config targets, e.g. '" + *missing.begin() + "'");

  std::map<std::string, std::pair<int64_t, std::string>> dims;  // symbolic size -> (value, who set it)
  for (const auto& [p, oi] : opt.module_shapes)
    for (int w = 0; w < 2; ++w)
      dims.emplace(kDims[p][w], std::make_pair(w ? oi.second : oi.first,
                                               std::string("module_shapes['") + model::proj_name(p) + "']"));
  for (const auto& [k, res] : expected) {
    const int64_t layer = k / kNumProj;
    const int p = static_cast<int>(k % kNumProj);
    const io::TensorInfo* t[2] = {found[k].first, found[k].second};
    const float* data[2];
    for (int w = 0; w < 2; ++w) {
      const io::TensorInfo& ti = *t[w];
      const bool isA = w == 0;
      const auto& s = ti.shape;
      if (s.size() != 2 || (isA ? s[0] : s[1]) != res.r || s[0] == 0 || s[1] == 0)
        throw ValueError(where + ": tensor '" + ti.name + "' has shape " + shape_str(s) + ", expected " +
                         (isA ? "[" + std::to_string(res.r) + ", in_features]" : "[out_features, " + std::to_string(res.r) + "]") +
                         " (r=" + std::to_string(res.r) + ")");
      if (opt.model_shape) {  // lora_A is [r, in] and lora_B [out, r] of this model's projection
        const auto [o, i] = opt.model_shape(layer, p);
        const std::vector<int64_t> want = isA ? std::vector<int64_t>{res.r, i} : std::vector<int64_t>{o, res.r};
        if (s != want)
          throw ValueError(where + ": tensor '" + ti.name + "' has shape " + shape_str(s) + " but layer " +
                           std::to_string(layer) + " " + model::proj_name(p) + " of the model is [out " +
                           std::to_string(o) + ", in " + std::to_string(i) + "], which needs " + shape_str(want) +
                           ": the adapter was made for another base model");
      }
      const char* sym = kDims[p][isA ? 1 : 0];
      const int64_t v = isA ? s[1] : s[0];
      const auto seen = dims.emplace(sym, std::make_pair(v, ti.name)).first->second;
      if (seen.first != v)
        throw ValueError(where + ": tensor '" + ti.name + "' has shape " + shape_str(s) + ", inconsistent with " +
                         (seen.second.rfind("module_shapes", 0) == 0 ? seen.second : "'" + seen.second + "'") +
                         " (" + sym + " size " + std::to_string(seen.first) + ")" +
                         (seen.second.rfind("module_shapes", 0) == 0 ? ": the adapter was made for another base model"
                                                                     : ""));
      // Aligned F32 is read in place from the mapping (one copy less of the adapter's bytes).
      if (ti.dtype == DType::F32 && reinterpret_cast<uintptr_t>(ti.data) % alignof(float) == 0) {
        data[w] = reinterpret_cast<const float*>(ti.data);
      } else {
        out.owned.push_back(to_f32(ti, where));
        data[w] = out.owned.back().data();
      }
    }
    // Finite, and an update float32 can carry (the engine's one rule for incoming LoRA factors).
    model::check_lora_factors(res.r, s_in(t[0]), s_out(t[1]), res.scaling, data[0], data[1], where,
                              "tensor '" + t[0]->name + "'", "tensor '" + t[1]->name + "'");
    out.modules.push_back({layer, p, res.r, s_in(t[0]), s_out(t[1]), res.scaling, data[0], data[1]});
  }
  return out;
}

std::shared_ptr<model::LoraAdapter> load_peft_adapter(model::LlamaModel& m, const std::string& dir) {
  PeftReadOptions opt;
  opt.num_layers = m.config().num_layers;
  opt.model_shape = [&m](int64_t layer, int p) {
    const model::Linear& lin = model::proj(m.weights().layers[layer], p);
    return std::make_pair(lin.out, lin.in);
  };
  const PeftRead r = read_peft_adapter(dir, opt);
  auto a = std::make_shared<model::LoraAdapter>();
  a->modules.resize(static_cast<size_t>(opt.num_layers * kNumProj));
  for (const PeftRead::Module& md : r.modules)
    a->modules[static_cast<size_t>(md.layer * kNumProj + md.p)] =
        model::make_lora_module(m.backend(), md.r, md.in, md.out, md.scaling, md.a, md.b);
  return a;
}

}  // namespace qlora::capi
