// GGUF -> model: config rules, name mapping and tensor-by-tensor loading (see gguf_model.hpp).
#include "gguf/gguf_model.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "common/error.hpp"
#include "gguf/dequant.hpp"
#include "nf4/nf4_codec.hpp"

namespace qlora::gguf {

namespace {

// Sane limits for the config fields, far above any real model: a larger number in a file is
// corruption, and the engine would size allocations by it.
constexpr int64_t kMaxHidden = int64_t(1) << 17;
constexpr int64_t kMaxHeads = int64_t(1) << 12;
constexpr int64_t kMaxHeadDim = int64_t(1) << 12;
constexpr int64_t kMaxLayers = int64_t(1) << 12;
constexpr int64_t kMaxVocab = int64_t(1) << 24;
constexpr int64_t kMaxContext = int64_t(1) << 24;

const std::map<std::string, std::string> kArchs = {{"llama", "LlamaForCausalLM"}, {"qwen2", "Qwen2ForCausalLM"}};

std::string py_str(const std::string& s) {
  Value v;
  v.type = VType::STRING;
  v.str = s;
  return v.repr();
}

using I128 = __int128;
std::string i128_str(I128 x) {
  if (x < 0) return "-" + i128_str(-x);
  std::string s;
  do s.insert(s.begin(), char('0' + int(x % 10))), x /= 10; while (x);
  return s;
}

// Typed access to the metadata (gguf_source.py's _value / _int / _float / _str / _token_id).
struct Meta {
  const File& f;

  const Value* value(const std::string& key, bool (*kind)(const Value&), const char* what, bool required) const {
    const Value* v = f.find(key);
    if (!v) {
      if (required) throw FormatError(f.path() + ": GGUF metadata " + key + " is missing");
      return nullptr;
    }
    if (!kind(*v))
      throw FormatError(f.path() + ": GGUF metadata " + key + " must be " + what + ", got " + v->type_name() + " " +
                        v->repr());
    return v;
  }
  static bool is_int(const Value& v) { return v.is_int(); }
  static bool is_num(const Value& v) { return v.is_int() || v.is_float(); }
  static bool is_str(const Value& v) { return v.type == VType::STRING; }
  static I128 int_of(const Value& v) { return v.is_signed() ? I128(v.i) : I128(v.u); }

  // An integer-typed field in [lo, hi] (a float such as 4.5 is refused, not truncated); `def`
  // when absent (required when def is null).
  int64_t integer(const std::string& key, const int64_t* def, int64_t hi, int64_t lo = 1) const {
    const Value* v = value(key, is_int, "an integer", def == nullptr);
    if (!v) return *def;
    const I128 x = int_of(*v);
    if (x < lo || x > hi)
      throw FormatError(f.path() + ": GGUF metadata " + key + " = " + i128_str(x) + " is outside [" +
                        std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return static_cast<int64_t>(x);
  }
  bool has(const std::string& key) const { return f.find(key) != nullptr; }
  // A positive, finite number (float- or integer-typed).
  double number(const std::string& key, const double* def) const {
    const Value* v = value(key, is_num, "a number", def == nullptr);
    if (!v) return *def;
    const double x = v->is_float() ? v->f : static_cast<double>(int_of(*v));
    if (!(std::isfinite(x) && x > 0))
      throw FormatError(f.path() + ": GGUF metadata " + key + " = " + v->repr() + " must be a positive finite number");
    return x;
  }
  const std::string* str(const std::string& key, bool required) const {
    const Value* v = value(key, is_str, "a string", required);
    return v ? &v->str : nullptr;
  }
  // A token id, or null (absent, or llama.cpp's "none": -1 / 0xFFFFFFFF).
  json::Value token_id(const std::string& key, int64_t n_vocab) const {
    const Value* v = value(key, is_int, "an integer", false);
    if (!v) return json::Value();
    const I128 x = int_of(*v);
    if (x == -1 || x == 0xFFFFFFFF) return json::Value();
    if (x < 0 || x >= n_vocab)
      throw FormatError(f.path() + ": GGUF metadata " + key + " = " + i128_str(x) + " is outside the vocabulary of " +
                        std::to_string(n_vocab) + " tokens");
    return json::Value(static_cast<int64_t>(x));
  }
};

bool ends_with(const std::string& s, const char* suf) {
  const size_t n = std::char_traits<char>::length(suf);
  return s.size() >= n && s.compare(s.size() - n, n, suf) == 0;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

std::string list5(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 5; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > 5) s += " (and " + std::to_string(v.size() - 5) + " more)";
  return s;
}

}  // namespace

bool is_llama_arch(const std::string& arch) { return kArchs.count(arch) != 0; }

const std::vector<std::pair<std::string, std::string>>& layer_names() {
  static const std::vector<std::pair<std::string, std::string>> t = {
      {"attn_q.weight", "self_attn.q_proj.weight"},     {"attn_k.weight", "self_attn.k_proj.weight"},
      {"attn_v.weight", "self_attn.v_proj.weight"},     {"attn_output.weight", "self_attn.o_proj.weight"},
      {"attn_output.bias", "self_attn.o_proj.bias"},    {"attn_q.bias", "self_attn.q_proj.bias"},
      {"attn_k.bias", "self_attn.k_proj.bias"},         {"attn_v.bias", "self_attn.v_proj.bias"},
      {"ffn_gate.weight", "mlp.gate_proj.weight"},      {"ffn_up.weight", "mlp.up_proj.weight"},
      {"ffn_down.weight", "mlp.down_proj.weight"},      {"attn_norm.weight", "input_layernorm.weight"},
      {"ffn_norm.weight", "post_attention_layernorm.weight"},
  };
  return t;
}

const std::vector<std::pair<std::string, std::string>>& global_names() {
  static const std::vector<std::pair<std::string, std::string>> t = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
  };
  return t;
}

std::string hf_name(const File& f, const std::string& name) {
  for (const auto& [g, h] : global_names())
    if (name == g) return h;
  if (name.rfind("blk.", 0) == 0) {  // blk.<digits>.<suffix>
    size_t k = 4;
    while (k < name.size() && name[k] >= '0' && name[k] <= '9') ++k;
    if (k > 4 && k < name.size() && name[k] == '.') {
      const std::string suffix = name.substr(k + 1);
      for (const auto& [g, h] : layer_names())
        if (suffix == g) return "model.layers." + name.substr(4, k - 4) + "." + h;
    }
  }
  if (name == "rope_freqs.weight") return "";
  throw ValueError(f.path() + ": unexpected GGUF tensor " + py_str(name) + " for a llama-architecture model");
}

json::Value hf_config(const File& f) {
  const std::string& path = f.path();
  if (f.big_endian()) throw ValueError(path + ": big-endian GGUF files are not supported");
  Meta m{f};
  const std::string arch = *m.str("general.architecture", true);
  if (!is_llama_arch(arch))
    throw ValueError(path + ": unsupported GGUF architecture " + py_str(arch) + " (supported: llama, qwen2)");
  const std::string& a = arch;
  const int64_t n_head = m.integer(a + ".attention.head_count", nullptr, kMaxHeads);
  const int64_t hidden = m.integer(a + ".embedding_length", nullptr, kMaxHidden);
  const int64_t n_kv = m.integer(a + ".attention.head_count_kv", &n_head, n_head);
  if (n_head % n_kv)
    throw FormatError(path + ": GGUF metadata " + a + ".attention.head_count = " + std::to_string(n_head) +
                      " is not a multiple of " + a + ".attention.head_count_kv = " + std::to_string(n_kv));
  int64_t n_vocab = 0;
  if (m.has(a + ".vocab_size")) {
    n_vocab = m.integer(a + ".vocab_size", nullptr, kMaxVocab);
  } else {
    const Value* toks = f.find("tokenizer.ggml.tokens");
    if (!toks || toks->type != VType::ARRAY || toks->elem != VType::STRING || toks->count == 0)
      throw FormatError(path + ": GGUF metadata has neither " + a + ".vocab_size nor tokenizer.ggml.tokens");
    n_vocab = static_cast<int64_t>(toks->count);
  }
  int64_t head_dim;
  if (m.has(a + ".attention.key_length")) {
    head_dim = m.integer(a + ".attention.key_length", nullptr, kMaxHeadDim);
  } else if (m.has(a + ".rope.dimension_count")) {
    head_dim = m.integer(a + ".rope.dimension_count", nullptr, kMaxHeadDim);
  } else {
    if (hidden % n_head)
      throw FormatError(path + ": GGUF metadata " + a + ".embedding_length = " + std::to_string(hidden) +
                        " is not a multiple of " + a + ".attention.head_count = " + std::to_string(n_head) +
                        " (and there is no " + a + ".attention.key_length)");
    head_dim = hidden / n_head;
  }
  bool has_output = false, has_q_bias = false, has_rope_freqs = false;
  for (const auto& t : f.tensors()) {
    has_output |= t.name == "output.weight";
    has_q_bias |= t.name == "blk.0.attn_q.bias";
    has_rope_freqs |= t.name == "rope_freqs.weight";
  }
  json::Value cfg = json::Value::object();
  json::Array archs;
  archs.emplace_back(kArchs.at(arch));
  cfg.set("architectures", json::Value(std::move(archs)));
  cfg.set("model_type", arch);
  cfg.set("vocab_size", n_vocab);
  cfg.set("hidden_size", hidden);
  cfg.set("intermediate_size", m.integer(a + ".feed_forward_length", nullptr, kMaxHidden * 64));
  cfg.set("num_hidden_layers", m.integer(a + ".block_count", nullptr, kMaxLayers));
  cfg.set("num_attention_heads", n_head);
  cfg.set("num_key_value_heads", n_kv);
  cfg.set("head_dim", head_dim);
  const double eps_def = 1e-6, theta_def = 10000.0;
  const int64_t ctx_def = 2048;
  cfg.set("rms_norm_eps", m.number(a + ".attention.layer_norm_rms_epsilon", &eps_def));
  cfg.set("rope_theta", m.number(a + ".rope.freq_base", &theta_def));
  cfg.set("max_position_embeddings", m.integer(a + ".context_length", &ctx_def, kMaxContext));
  cfg.set("tie_word_embeddings", !has_output);
  cfg.set("hidden_act", "silu");
  cfg.set("attention_bias", has_q_bias);
  cfg.set("bos_token_id", m.token_id("tokenizer.ggml.bos_token_id", n_vocab));
  cfg.set("eos_token_id", m.token_id("tokenizer.ggml.eos_token_id", n_vocab));
  if (const std::string* scaling = m.str(a + ".rope.scaling.type", false); scaling && !scaling->empty() && *scaling != "none") {
    if (*scaling != "linear") throw ValueError(path + ": unsupported GGUF rope scaling type " + py_str(*scaling));
    json::Value rs = json::Value::object();
    rs.set("rope_type", "linear");
    rs.set("factor", m.number(a + ".rope.scaling.factor", nullptr));
    cfg.set("rope_scaling", std::move(rs));
  }
  // Llama 3.1 GGUFs carry precomputed llama3 frequency factors instead of the parameters.
  if (has_rope_freqs) throw ValueError(path + ": GGUF rope_freqs (llama3 rope scaling) is not supported yet");
  // Refused before the engine allocates anything.
  for (const auto& t : f.tensors())
    if (!hf_name(f, t.name).empty() && !dequant_supported(t.type))
      throw ValueError(path + ": tensor " + t.name + " has unsupported GGUF type " + gtype_name(t.type));
  return cfg;
}

void unpermute_rows(const float* src, float* dst, int64_t rows, int64_t cols, int64_t n_head, const std::string& name) {
  if (n_head < 1 || rows % (2 * n_head))
    throw ValueError("tensor " + (name.empty() ? std::string("Q/K") : name) + ": " + std::to_string(rows) +
                     " rows do not split into " + std::to_string(n_head) + " heads of even size");
  const int64_t half = rows / n_head / 2;
  // GGUF row (h, i, j) [i < half, j < 2] holds HF row (h, j, i).
  for (int64_t h = 0; h < n_head; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t j = 0; j < 2; ++j) {
        const float* s = src + ((h * half + i) * 2 + j) * cols;
        float* d = dst + ((h * 2 + j) * half + i) * cols;
        std::copy(s, s + cols, d);
      }
}

void tensor_f32(const TensorInfo& t, const model::LlamaConfig& cfg, std::vector<float>& out,
                std::vector<float>& scratch) {
  const std::vector<int64_t> shape = t.shape();
  const int64_t numel = static_cast<int64_t>(t.numel());
  out.resize(static_cast<size_t>(numel));
  dequantize(t.type, t.data, out.data(), numel);
  const int64_t rows = shape[0], cols = numel / rows;
  const bool llama = cfg.arch == "llama";  // only llama-arch conversion permutes Q/K (qwen2: NEOX RoPE)
  int64_t heads = 0;
  if (llama && (ends_with(t.name, "attn_q.weight") || ends_with(t.name, "attn_q.bias"))) heads = cfg.num_heads;
  if (llama && (ends_with(t.name, "attn_k.weight") || ends_with(t.name, "attn_k.bias"))) heads = cfg.num_kv_heads;
  if (heads) {
    scratch.resize(out.size());
    unpermute_rows(out.data(), scratch.data(), rows, cols, heads, t.name);
    out.swap(scratch);
  }
}

void load_weights(const File& f, model::LlamaModel& m) {
  model::LlamaWeights& w = m.weights();
  const model::LlamaConfig& cfg = m.config();
  std::map<std::string, std::vector<int64_t>> expected;
  for (const auto& t : w.expected()) expected[t.name] = t.shape;
  std::vector<std::pair<std::string, const TensorInfo*>> present;  // HF name, file order
  for (const auto& t : f.tensors()) {
    std::string n = hf_name(f, t.name);
    if (!n.empty()) present.emplace_back(std::move(n), &t);
  }
  std::vector<std::string> extra, missing;
  std::set<std::string> have;
  for (const auto& [n, t] : present) {
    have.insert(n);
    if (!expected.count(n) && !w.ignorable(n)) extra.push_back(n);
  }
  if (!extra.empty()) throw ValueError("unexpected tensor(s) in checkpoint: " + list5(extra));
  for (const auto& t : w.expected())
    if (!have.count(t.name)) missing.push_back(t.name);
  if (!missing.empty()) throw ValueError("missing tensor(s) in checkpoint: " + list5(missing));
  for (const auto& [n, t] : present) {  // shapes as stored, before anything is dequantized
    auto it = expected.find(n);
    if (it != expected.end() && t->shape() != it->second)
      throw ValueError("tensor '" + n + "' has shape " + shape_str(t->shape()) + ", expected " + shape_str(it->second));
  }
  // One tensor at a time; the [vocab, hidden] ones in ~4 MiB fp32 row slabs (peak memory).
  std::vector<float> buf, tmp;
  for (const auto& [n, tp] : present) {
    if (!expected.count(n)) continue;
    const TensorInfo& t = *tp;
    const std::vector<int64_t> shape = t.shape();
    const bool slab = (n == "model.embed_tokens.weight" || n == "lm_head.weight") && shape.size() == 2;
    if (slab && w.head_half() &&
        t.type == uint32_t(w.half_type() == Backend::HalfType::BF16 ? GType::BF16 : GType::F16)) {
      // head_format f16 / bf16 chosen at load: the 16-bit rows as stored, never widened.
      w.load(n, t.data, w.half_type() == Backend::HalfType::BF16 ? DType::BF16 : DType::F16, shape);
      continue;
    }
    if (slab && n == "model.embed_tokens.weight" && t.type == uint32_t(GType::Q8_0) && shape[1] % 32 == 0 &&
        !w.head_half()) {
      // Kept as stored: 8-bit rows whose values equal their fp32 dequantization.
      w.load_embed_q8_0(t.data, static_cast<size_t>(t.nbytes));
      continue;
    }
    if (slab) {
      const int64_t rows = shape[0], cols = shape[1];
      const int64_t step = std::max<int64_t>(1, (int64_t(1) << 20) / cols);
      const uint64_t row_bytes = t.nbytes / static_cast<uint64_t>(rows);
      buf.resize(static_cast<size_t>(std::min(step, rows) * cols));
      for (int64_t r = 0; r < rows; r += step) {
        const int64_t nr = std::min(step, rows - r);
        dequantize(t.type, t.data + static_cast<uint64_t>(r) * row_bytes, buf.data(), nr * cols);
        w.load_rows(n, r, nr, cols, buf.data());
      }
      continue;
    }
    tensor_f32(t, cfg, buf, tmp);
    w.load(n, buf.data(), DType::F32, shape);
  }
  m.check_complete();
}

std::unique_ptr<model::LlamaModel> load_model(const File& f, Backend& be, const model::QuantSpec& quant,
                                              model::HfConfig* info, json::Value* hf) {
  const std::string& path = f.path();
  try {
    json::Value cfg = hf_config(f);
    model::HfConfig hc = model::parse_hf_config(cfg);
    if (quant.nf4) nf4::sizes(1, quant.blocksize, quant.double_quant);  // validates the blocksize early
    auto m = std::make_unique<model::LlamaModel>(be, hc.cfg, quant);
    load_weights(f, *m);
    if (info) *info = std::move(hc);
    if (hf) *hf = std::move(cfg);
    return m;
  } catch (const FormatError& e) {  // every loading error names the file
    if (std::string(e.what()).find(path) != std::string::npos) throw;
    throw FormatError(path + ": " + e.what());
  } catch (const ValueError& e) {
    if (std::string(e.what()).find(path) != std::string::npos) throw;
    throw ValueError(path + ": " + e.what());
  }
}

std::unique_ptr<model::LlamaModel> load_model(const std::string& path, Backend& be, const model::QuantSpec& quant,
                                              model::HfConfig* info, json::Value* hf) {
  std::shared_ptr<File> f = File::open(path);
  return load_model(*f, be, quant, info, hf);
}

}  // namespace qlora::gguf
