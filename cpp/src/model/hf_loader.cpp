#include "model/hf_loader.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "common/error.hpp"
#include "gguf/gguf_model.hpp"
#include "io/mapped_file.hpp"
#include "io/safetensors.hpp"
#include "model/checkpoint_source.hpp"
#include "nf4/nf4_codec.hpp"

namespace qlora::model {

namespace {
namespace fs = std::filesystem;
using json::Value;

// ---------------------------------------------------------------- config.json
// Values print as Python's repr would, so messages read like config.py's.
std::string repr(const Value* v) {
  if (!v || v->is_null()) return "None";
  if (v->is_bool()) return v->as_bool() ? "True" : "False";
  if (v->is_string()) return "'" + v->as_string() + "'";
  if (v->is_double()) return gguf::py_float_repr(v->as_double());  // "1e-05", "nan", "inf" as Python
  if (v->is_array()) {  // Python's list repr: "[1, 'a']"
    std::string s = "[";
    for (size_t i = 0; i < v->size(); ++i) s += (i ? ", " : "") + repr(&v->at(i));
    return s + "]";
  }
  if (v->is_object()) {  // Python's dict repr: "{'a': 1}"
    std::string s = "{";
    for (const auto& [k, x] : v->as_object()) s += (s.size() > 1 ? ", '" : "'") + k + "': " + repr(&x);
    return s + "}";
  }
  return json::dump(*v);
}

// Python truthiness of an optional member.
bool truthy(const Value* v) {
  if (!v || v->is_null()) return false;
  if (v->is_bool()) return v->as_bool();
  if (v->is_int()) return v->as_int() != 0;
  if (v->is_double()) return v->as_double() != 0.0;
  if (v->is_string()) return !v->as_string().empty();
  return v->size() != 0;
}

const Value* member(const Value& d, const char* key) { return d.find(key); }

// An integer >= minimum (bools and floats rejected, as config.py's req_int).
int64_t req_int(const Value& d, const char* key, int64_t minimum = 1) {
  const Value* v = member(d, key);
  if (!v || !v->is_int() || v->as_int() < minimum)
    throw ValueError(std::string("config: ") + key + " must be an integer >= " + std::to_string(minimum) + ", got " +
                     repr(v));
  return v->as_int();
}

// A JSON bool; absent or null -> def ("yes" or 1 are errors, as in config.py's _Fields.bool).
bool opt_bool(const Value& d, const char* key, bool def = false) {
  const Value* v = member(d, key);
  if (!v || v->is_null()) return def;
  if (!v->is_bool()) throw ValueError(std::string("config: ") + key + " must be true or false, got " + repr(v));
  return v->as_bool();
}

// An integer >= minimum; absent or null -> def.
int64_t opt_int(const Value& d, const char* key, int64_t minimum, int64_t def) {
  const Value* v = member(d, key);
  if (!v || v->is_null()) return def;
  return req_int(d, key, minimum);
}

// Token ids of config.json: null, an id in [0, vocab) or (allow_list) a list of them.
std::vector<int64_t> token_ids(const Value& d, const char* key, int64_t vocab, bool allow_list) {
  const Value* v = member(d, key);
  std::vector<int64_t> out;
  if (!v || v->is_null()) return out;
  auto bad = [&]() {
    return ValueError(std::string("config: ") + key + " must be a token id in [0, " + std::to_string(vocab) + ")" +
                      (allow_list ? " or a list of them" : "") + ", got " + repr(v));
  };
  if (allow_list && v->is_array()) {
    for (const Value& x : v->as_array()) {
      if (!x.is_int() || x.as_int() < 0 || x.as_int() >= vocab) throw bad();
      out.push_back(x.as_int());
    }
    return out;
  }
  if (!v->is_int() || v->as_int() < 0 || v->as_int() >= vocab) throw bad();
  out.push_back(v->as_int());
  return out;
}

double positive(const Value* v, const std::string& key) {
  if (!v || !v->is_number() || !std::isfinite(v->as_double()) || v->as_double() <= 0)
    throw ValueError("config: " + key + " must be a positive number, got " + repr(v));
  return v->as_double();
}

// A positive number; absent or null -> def.
double num(const Value& d, const char* key, double def) {
  const Value* v = member(d, key);
  if (!v || v->is_null()) return def;
  return positive(v, key);
}

void rope_scaling(const Value* s, const Value* max_pos, LlamaConfig& c, Value& norm) {
  if (!s || s->is_null()) return;
  if (!s->is_object()) throw ValueError("config: rope_scaling must be an object or null, got " + repr(s));
  const Value* kind_v = s->find("rope_type");
  if (!kind_v) kind_v = s->find("type");
  const std::string kind = !kind_v ? "default" : kind_v->is_string() ? kind_v->as_string() : "";
  if (const Value* prf = s->find("partial_rotary_factor"); prf && !(prf->is_number() && prf->as_double() == 1.0))
    throw ValueError("config: rope partial_rotary_factor != 1 is not supported");
  if (kind_v && !kind_v->is_string())
    throw ValueError("config: unsupported rope_scaling type " + repr(kind_v) + " (supported: linear, llama3)");
  if (kind == "default") return;
  if (kind == "linear") {
    c.rope_type = RopeType::Linear;
    const double factor = positive(s->find("factor"), "rope_scaling.factor");
    c.rope_factor = static_cast<float>(factor);
    norm = Value::object();
    norm.set("rope_type", "linear");
    norm.set("factor", factor);
    return;
  }
  if (kind == "llama3") {
    c.rope_type = RopeType::Llama3;
    const double factor = positive(s->find("factor"), "rope_scaling.factor");
    c.rope_factor = static_cast<float>(factor);
    const double lo = positive(s->find("low_freq_factor"), "rope_scaling.low_freq_factor");
    const double hi = positive(s->find("high_freq_factor"), "rope_scaling.high_freq_factor");
    const Value* omp = s->find("original_max_position_embeddings");
    if (!omp) omp = max_pos;
    if (!omp || !omp->is_int() || omp->as_int() < 1)
      throw ValueError("config: rope_scaling.original_max_position_embeddings must be an integer >= 1, got " +
                       repr(omp));
    if (hi <= lo) throw ValueError("config: rope_scaling.high_freq_factor must exceed low_freq_factor");
    c.rope_low_freq_factor = static_cast<float>(lo);
    c.rope_high_freq_factor = static_cast<float>(hi);
    c.rope_original_max_pos = omp->as_int();
    norm = Value::object();
    norm.set("rope_type", "llama3");
    norm.set("factor", factor);
    norm.set("low_freq_factor", lo);
    norm.set("high_freq_factor", hi);
    norm.set("original_max_position_embeddings", omp->as_int());
    return;
  }
  throw ValueError("config: unsupported rope_scaling type " + repr(kind_v) + " (supported: linear, llama3)");
}

// bnb_format.is_prequantized: true for a bitsandbytes NF4 4-bit checkpoint, ValueError for
// quantizations the engine cannot load.
bool is_prequantized(const Value& d) {
  const Value* qc = d.find("quantization_config");
  if (!qc || qc->is_null()) return false;
  if (!qc->is_object()) throw ValueError("config: quantization_config must be an object, got " + repr(qc));
  if (qc->size() == 0) return false;
  auto flag = [&](const char* key) {
    const Value* v = qc->find(key);
    if (!v || v->is_null()) return false;
    if (!v->is_bool())
      throw ValueError(std::string("config: quantization_config.") + key + " must be true or false, got " + repr(v));
    return v->as_bool();
  };
  const Value* method = qc->find("quant_method");
  if (!method || !method->is_string() || method->as_string() != "bitsandbytes")
    throw ValueError("unsupported quantization_config.quant_method " + repr(method) +
                     " (only bitsandbytes NF4 4-bit)");
  if (flag("load_in_8bit") || flag("_load_in_8bit"))
    throw ValueError("bitsandbytes 8-bit checkpoints are not supported (only NF4 4-bit)");
  if (!(flag("load_in_4bit") || flag("_load_in_4bit")))
    throw ValueError("quantization_config is bitsandbytes but neither 4-bit nor 8-bit");
  const Value* kind = qc->find("bnb_4bit_quant_type");
  if (!(kind ? kind->is_string() && kind->as_string() == "nf4" : false))
    throw ValueError("bitsandbytes 4-bit quant type " + (kind ? repr(kind) : std::string("'fp4'")) +
                     " is not supported (only 'nf4')");
  const Value* storage = qc->find("bnb_4bit_quant_storage");
  if (storage && !(storage->is_string() && storage->as_string() == "uint8"))
    throw ValueError("bnb_4bit_quant_storage " + repr(storage) + " is not supported (only 'uint8')");
  return true;
}
}  // namespace

HfConfig parse_hf_config(const Value& d) {
  if (!d.is_object()) throw FormatError("config must be a JSON object");
  static const std::map<std::string, std::string> archs = {
      {"LlamaForCausalLM", "llama"}, {"MistralForCausalLM", "mistral"}, {"Qwen2ForCausalLM", "qwen2"}};
  static const std::map<std::string, std::string> model_types = {
      {"llama", "LlamaForCausalLM"}, {"mistral", "MistralForCausalLM"}, {"qwen2", "Qwen2ForCausalLM"}};
  std::string name;
  const Value* a = d.find("architectures");
  if (truthy(a)) {
    if (!a->is_array() || a->size() != 1)
      throw ValueError("config: architectures must list exactly one architecture, got " + repr(a));
    const Value& n = a->at(size_t(0));
    if (!n.is_string() || !archs.count(n.as_string()))
      throw ValueError("config: unsupported architecture " + repr(&n) +
                       " (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");
    name = n.as_string();
  } else {
    const Value* mt = d.find("model_type");
    if (!mt || !mt->is_string() || !model_types.count(mt->as_string()))
      throw ValueError("config: no 'architectures' and unsupported model_type " + repr(mt));
    name = model_types.at(mt->as_string());
  }
  HfConfig out;
  LlamaConfig& c = out.cfg;
  c.arch = archs.at(name);

  const int64_t hidden = req_int(d, "hidden_size");
  const int64_t heads = req_int(d, "num_attention_heads");
  // Absent or null: as many as the query heads (transformers); 0 is an error, not "absent".
  const int64_t kv_heads = opt_int(d, "num_key_value_heads", 1, heads);
  if (heads % kv_heads)
    throw ValueError("config: num_key_value_heads (" + std::to_string(kv_heads) +
                     ") must divide num_attention_heads (" + std::to_string(heads) + ")");
  const Value* hd = d.find("head_dim");
  int64_t head_dim;
  if (!hd || hd->is_null()) {
    if (hidden % heads)
      throw ValueError("config: hidden_size " + std::to_string(hidden) + " is not a multiple of num_attention_heads " +
                       std::to_string(heads));
    head_dim = hidden / heads;
  } else if (!hd->is_int() || hd->as_int() < 2 || hd->as_int() % 2) {
    throw ValueError("config: head_dim must be an even integer >= 2, got " + repr(hd));
  } else {
    head_dim = hd->as_int();
  }

  if (const Value* act = d.find("hidden_act"); act && !(act->is_string() && act->as_string() == "silu"))
    throw ValueError("config: hidden_act " + repr(act) + " is not supported (only 'silu')");
  if (opt_bool(d, "mlp_bias")) throw ValueError("config: mlp_bias=true is not supported");
  if (const Value* tp = d.find("pretraining_tp"); tp && !tp->is_null() && !(tp->is_int() && tp->as_int() == 1))
    throw ValueError("config: pretraining_tp != 1 is not supported (got " + repr(tp) + ")");

  // transformers >= 5 writes rope_parameters (with rope_theta inside); older: rope_theta + rope_scaling.
  const Value* rp = d.find("rope_parameters");
  const Value* scaling = d.find("rope_scaling");
  const Value* theta = d.find("rope_theta");
  if (rp && !rp->is_null() && !rp->is_object())
    throw ValueError("config: rope_parameters must be an object or null, got " + repr(rp));
  if (rp && rp->is_object()) {
    if (const Value* t = rp->find("rope_theta")) theta = t;
    if (!scaling || scaling->is_null()) scaling = rp;
  }
  const double rope_theta = (!theta || theta->is_null()) ? 10000.0 : positive(theta, "rope_theta");
  rope_scaling(scaling, d.find("max_position_embeddings"), c, out.rope_scaling);

  const bool attn_bias = opt_bool(d, "attention_bias");
  c.qkv_bias = c.arch == "qwen2" || attn_bias;
  c.o_bias = c.arch != "qwen2" && attn_bias;
  c.sliding_window = 0;
  if (c.arch == "mistral" && d.find("sliding_window") && !d.find("sliding_window")->is_null())
    c.sliding_window = req_int(d, "sliding_window");
  if (c.arch == "qwen2" && opt_bool(d, "use_sliding_window")) {
    c.sliding_window = req_int(d, "sliding_window");
    if (opt_int(d, "max_window_layers", 0, 0) < req_int(d, "num_hidden_layers"))
      throw ValueError("config: Qwen2 use_sliding_window with max_window_layers < layers is not supported");
  }

  c.vocab_size = req_int(d, "vocab_size");
  c.hidden_size = hidden;
  c.intermediate_size = req_int(d, "intermediate_size");
  c.num_layers = req_int(d, "num_hidden_layers");
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  out.rms_norm_eps = num(d, "rms_norm_eps", 1e-6);
  out.rope_theta = rope_theta;
  c.rms_norm_eps = static_cast<float>(out.rms_norm_eps);
  c.rope_theta = static_cast<float>(rope_theta);
  c.tie_word_embeddings = opt_bool(d, "tie_word_embeddings");
  c.max_position_embeddings = d.find("max_position_embeddings") ? req_int(d, "max_position_embeddings") : 2048;
  // An id outside the vocabulary would never be generated (an ignored EOS): refused.
  const std::vector<int64_t> bos = token_ids(d, "bos_token_id", c.vocab_size, true);
  if (!bos.empty()) out.bos_token_id = bos.front();
  out.eos_token_ids = token_ids(d, "eos_token_id", c.vocab_size, true);
  token_ids(d, "pad_token_id", c.vocab_size, false);
  c.validate();
  out.prequantized = is_prequantized(d);
  return out;
}

HfConfig read_hf_config(const std::string& dir) {
  // The error_code forms: the throwing ones raise filesystem_error (a bare RuntimeError in Python)
  // for a name too long, a symlink loop or a denied search; these say which, as OSError.
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw io::FileError(ec ? ec.value() : ENOENT, dir, "model directory: cannot open");
  const std::string path = (fs::path(dir) / "config.json").string();
  if (!fs::is_regular_file(path, ec)) throw io::FileError(ec ? ec.value() : ENOENT, path, "no config.json: cannot open");
  json::ParseOptions opt;
  opt.allow_duplicate_keys = true;  // as Python's json (the last one wins)
  Value d;
  try {
    d = json::parse_file(path, opt);
  } catch (const FormatError& e) {
    throw FormatError(path + ": not valid JSON (" + e.what() + ")");
  }
  if (!d.is_object()) throw FormatError(path + ": config must be a JSON object");
  return parse_hf_config(d);
}

// ---------------------------------------------------------------- safetensors tensors
namespace {

const char* const kQuantStateKey = "quant_state.bitsandbytes__nf4";
const char* const kAuxSuffixes[] = {"absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                    "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4"};

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

bool is_aux_key(const std::string& n) {
  for (const char* s : kAuxSuffixes)
    if (ends_with(n, std::string(".weight.") + s)) return true;
  return false;
}

std::string list5(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 5; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > 5) s += " (and " + std::to_string(v.size() - 5) + " more)";
  return s;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

template <class T>
std::vector<T> copy_array(const io::TensorInfo& t, DType want, int64_t count, const std::string& what) {
  check_arg(t.dtype == want, what + " must have dtype " + dtype_name(want) + ", got " + dtype_name(t.dtype));
  check_arg(t.numel() == count, what + " must hold " + std::to_string(count) + " values, got " +
                                    std::to_string(t.numel()));
  std::vector<T> out(static_cast<size_t>(count));
  if (count) std::memcpy(out.data(), t.data, sizeof(T) * static_cast<size_t>(count));  // data may be unaligned
  return out;
}

// Host copies of a stored bitsandbytes NF4 weight and the Nf4Ref viewing them
// (bnb_format.read_nf4 + NF4Tensor.from_quant_state / from_arrays).
struct StoredNf4 {
  std::vector<uint8_t> packed, absmax_codes;
  std::vector<float> absmax_f, nested, nested_map;
  Nf4Ref ref;
};

StoredNf4 read_nf4(const CheckpointSource& src, const std::string& w) {
  StoredNf4 s;
  auto need = [&](const std::string& key) -> const io::TensorInfo& {
    const io::TensorInfo* t = src.find(key);
    if (!t) throw ValueError(w + ": 4-bit weight lacks '" + key + "'");
    return *t;
  };
  try {
    const io::TensorInfo& st = need(w + "." + kQuantStateKey);
    check_arg(st.dtype == DType::U8, "quant state array must be uint8, got " + std::string(dtype_name(st.dtype)));
    Value d;
    try {
      d = json::parse(std::string_view(reinterpret_cast<const char*>(st.data), st.nbytes));
    } catch (const FormatError& e) {
      throw ValueError(std::string("malformed bitsandbytes quant state: ") + e.what());
    }
    check_arg(d.is_object(), "malformed bitsandbytes quant state: not a JSON object");
    const Value* qt = d.find("quant_type");
    check_arg(qt && qt->is_string() && qt->as_string() == "nf4", "quant_type must be 'nf4', got " + repr(qt));
    for (const char* key : {"blocksize", "dtype", "shape"})
      check_arg(d.contains(key), std::string("quant state lacks '") + key + "'");
    const bool nested = d.contains("nested_offset");
    if (nested) {
      const Value* nb = d.find("nested_blocksize");
      check_arg(!nb || (nb->is_int() && nb->as_int() == nf4::kNestedBlocksize),
                "nested_blocksize must be 256, got " + repr(nb));
      const Value* nd = d.find("nested_dtype");
      check_arg(!nd || (nd->is_string() && nd->as_string() == "float32"), "nested_dtype must be 'float32', got " + repr(nd));
    }
    const Value& shape = d.at("shape");
    check_arg(shape.is_array() && shape.size() == 2 && shape.at(size_t(0)).is_int() && shape.at(size_t(1)).is_int() &&
                  shape.at(size_t(0)).as_int() >= 1 && shape.at(size_t(1)).as_int() >= 1,
              "shape must be [rows, cols] with positive sizes, got " + json::dump(shape));
    const Value& bs = d.at("blocksize");
    check_arg(bs.is_int() && bs.as_int() >= 1 && bs.as_int() <= (1 << 30), "bad blocksize " + json::dump(bs));
    s.ref.rows = shape.at(size_t(0)).as_int();
    s.ref.cols = shape.at(size_t(1)).as_int();
    s.ref.blocksize = static_cast<int>(bs.as_int());
    s.ref.double_quant = nested;
    const nf4::Sizes sz = nf4::sizes(s.ref.numel(), s.ref.blocksize, nested);  // validates the blocksize

    const io::TensorInfo& absmax = need(w + ".absmax");
    check_arg(nested == (absmax.dtype == DType::U8), "quant state and absmax disagree on double quantization");
    s.packed = copy_array<uint8_t>(need(w), DType::U8, sz.packed_bytes, "packed");
    if (const io::TensorInfo* qm = src.find(w + ".quant_map")) {
      std::vector<float> m = copy_array<float>(*qm, DType::F32, 16, "quant_map");
      check_arg(std::equal(m.begin(), m.end(), kNf4Codes), "quant_map is not the NF4 code table");
    }
    if (nested) {
      s.absmax_codes = copy_array<uint8_t>(absmax, DType::U8, sz.n_blocks, "absmax");
      s.nested = copy_array<float>(need(w + ".nested_absmax"), DType::F32, sz.n_nested, "nested_absmax");
      for (float x : s.nested) check_arg(std::isfinite(x) && x >= 0, "nested_absmax must be finite and non-negative");
      if (const io::TensorInfo* nm = src.find(w + ".nested_quant_map"))
        s.nested_map = copy_array<float>(*nm, DType::F32, 256, "nested_map");
      const Value& off = d.at("nested_offset");
      check_arg(off.is_number() && std::isfinite(static_cast<float>(off.as_double())),
                "offset must be finite, got " + json::dump(off));
      s.ref.offset = static_cast<float>(off.as_double());
      s.ref.absmax = s.absmax_codes.data();
      s.ref.nested_absmax = s.nested.data();
      s.ref.nested_map = s.nested_map.empty() ? nf4::kDynamicMap : s.nested_map.data();
    } else {
      s.absmax_f = copy_array<float>(absmax, DType::F32, sz.n_blocks,
                                     "absmax (float32 without double quant; uint8 codes with it)");
      for (float x : s.absmax_f) check_arg(std::isfinite(x) && x >= 0, "absmax must be finite and non-negative");
      s.ref.absmax = s.absmax_f.data();
    }
    s.ref.packed = s.packed.data();
  } catch (const FormatError& e) {
    throw FormatError(w + ": " + e.what());
  } catch (const ValueError& e) {
    const std::string msg = e.what();
    if (msg.rfind(w + ":", 0) == 0) throw;
    throw ValueError(w + ": " + msg);
  }
  return s;
}

}  // namespace

std::unique_ptr<LlamaModel> load_hf_model(const std::string& dir, Backend& be, const QuantSpec& quant, HfConfig* info) {
  HfConfig hc = read_hf_config(dir);
  if (hc.prequantized && !quant.nf4)
    throw ValueError(dir + " is a pre-quantized bitsandbytes NF4 checkpoint: load it with NF4 quantization (Python: "
                     "quantize='nf4'; C: QLORA_QUANT_NF4)");
  if (quant.nf4) nf4::sizes(1, quant.blocksize, quant.double_quant);  // validates the blocksize early
  const CheckpointSource src = open_checkpoint(dir);  // model/checkpoint_source.hpp

  std::set<std::string> prequantized;  // "P.weight" names stored as bitsandbytes NF4
  if (hc.prequantized) {
    const std::string suffix = std::string(".weight.") + kQuantStateKey;
    for (const auto& [n, t] : src.where) {
      if (ends_with(n, ".weight.quant_state.bitsandbytes__fp4"))
        throw ValueError(n + ": fp4 weights are not supported (only nf4)");
      if (ends_with(n, suffix)) prequantized.insert(n.substr(0, n.size() - std::string(kQuantStateKey).size() - 1));
    }
  }
  std::vector<std::string> present;  // in file order
  for (const auto& f : src.files)
    for (const auto& t : f->tensors())
      if (!hc.prequantized || !is_aux_key(t.name)) present.push_back(t.name);

  auto model = std::make_unique<LlamaModel>(be, hc.cfg, quant);
  LlamaWeights& w = model->weights();
  std::map<std::string, std::vector<int64_t>> expected;
  for (const auto& t : w.expected()) expected[t.name] = t.shape;

  std::vector<std::string> extra, missing;
  for (const auto& n : present)
    if (!expected.count(n) && !w.ignorable(n)) extra.push_back(n);
  if (!extra.empty()) throw ValueError("unexpected tensor(s) in checkpoint: " + list5(extra));
  std::set<std::string> have(present.begin(), present.end());
  for (const auto& t : w.expected())
    if (!have.count(t.name)) missing.push_back(t.name);
  if (!missing.empty()) throw ValueError("missing tensor(s) in checkpoint: " + list5(missing));
  for (const auto& t : w.expected()) {
    if (prequantized.count(t.name)) continue;  // packed bytes; the quant state carries the shape
    const auto& shp = src.get(t.name).shape;
    if (shp != t.shape)
      throw ValueError("tensor '" + t.name + "' has shape " + shape_str(shp) + ", expected " + shape_str(t.shape));
  }
  // One tensor at a time straight from the mapping: never two full-precision copies of the model.
  for (const auto& n : present) {
    if (!expected.count(n)) continue;
    if (prequantized.count(n)) {
      StoredNf4 s = read_nf4(src, n);
      w.load_nf4(n, s.ref);
      continue;
    }
    const io::TensorInfo& t = src.get(n);
    if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
      throw ValueError("tensor '" + n + "' has dtype " + dtype_name(t.dtype) + ", expected F32, F16 or BF16");
    w.load(n, t.data, t.dtype, t.shape);
  }
  model->check_complete();
  if (info) *info = std::move(hc);
  return model;
}

std::unique_ptr<LlamaModel> load_model_from_path(const std::string& path, Backend& be, const QuantSpec& quant,
                                                 HfConfig* info) {
  std::error_code ec;
  if (!fs::is_directory(path, ec) && fs::exists(path, ec)) return gguf::load_model(path, be, quant, info);
  return load_hf_model(path, be, quant, info);
}

}  // namespace qlora::model
