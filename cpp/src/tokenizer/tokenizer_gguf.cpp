// GGUF vocabularies: the `tokenizer.*` metadata read with the engine's GGUF reader (io/gguf_read)
// and the translation into a TokenizerDesc, following
// python/qlora_native/tokenizer_gguf.py (build_gguf_tokenizer) rule for rule.
#include <cstring>
#include <map>

#include "common/error.hpp"
#include "io/gguf_read.hpp"
#include "tokenizer/tokenizer.hpp"

namespace qlora::tok {

GgufVocab read_gguf_vocab(const std::string& path) {
  // the engine's GGUF reader validates every count, offset and string before we look
  auto f = gguf::File::open(path);
  GgufVocab v;
  v.source = path;
  auto bad = [&](const std::string& key, const std::string& what) -> FormatError {
    return FormatError(path + ": GGUF field '" + key + "' " + what);
  };
  auto str = [&](const char* key, std::string& dst) {
    const gguf::Value* x = f->find(key);
    if (!x) return false;
    if (x->type != gguf::VType::STRING) throw bad(key, "is " + x->type_name() + ", not a string");
    dst = x->str;
    return true;
  };
  auto strings = [&](const char* key, std::vector<std::string>& dst) {
    const gguf::Value* x = f->find(key);
    if (!x) return false;
    if (x->type != gguf::VType::ARRAY || x->elem != gguf::VType::STRING) throw bad(key, "is " + x->type_name() + ", not an array of strings");
    for (std::string_view sv : f->strings(*x)) dst.emplace_back(sv);
    return true;
  };
  if (!str("tokenizer.ggml.model", v.model))
    throw FormatError(path + ": GGUF file has no embedded tokenizer (no tokenizer.ggml.model key)");
  str("tokenizer.ggml.pre", v.pre);
  strings("tokenizer.ggml.tokens", v.tokens);
  if (v.tokens.empty()) throw FormatError(path + ": GGUF tokenizer has no tokenizer.ggml.tokens");
  v.has_merges = strings("tokenizer.ggml.merges", v.merges);
  const size_t n = v.tokens.size();
  if (const gguf::Value* x = f->find("tokenizer.ggml.token_type")) {
    if (x->type != gguf::VType::ARRAY) throw bad("tokenizer.ggml.token_type", "is not an array");
    for (int64_t t : f->ints(*x)) v.types.push_back(t < INT32_MIN || t > INT32_MAX ? -1 : static_cast<int32_t>(t));
  }
  if (const gguf::Value* x = f->find("tokenizer.ggml.scores")) {
    if (x->type != gguf::VType::ARRAY) throw bad("tokenizer.ggml.scores", "is not an array");
    for (double d : f->floats(*x)) v.scores.push_back(static_cast<float>(d));
    v.has_scores = true;
  }
  if ((!v.types.empty() && v.types.size() != n) || (v.has_scores && v.scores.size() != n))
    throw FormatError(path + ": token_type/scores length differs from the " + std::to_string(n) + " tokens");
  if (v.types.empty()) v.types.assign(n, kNormal);
  auto id = [&](const char* key, int32_t& dst) {
    const gguf::Value* x = f->find(key);
    if (!x) return;
    if (!x->is_int()) throw bad(key, "= " + x->repr() + " is not an integer");  // a float id would be truncated
    int64_t val = x->is_signed() ? x->i : (x->u > INT64_MAX ? -2 : static_cast<int64_t>(x->u));
    if (val >= 0 && static_cast<uint64_t>(val) < n) dst = static_cast<int32_t>(val);
    else if (val == -1 || val == 0xFFFFFFFFll) dst = -1;  // llama.cpp's "none"
    else throw FormatError(path + ": " + key + " = " + x->repr() + " is outside the vocabulary of " + std::to_string(n) + " tokens");
  };
  id("tokenizer.ggml.bos_token_id", v.bos);
  id("tokenizer.ggml.eos_token_id", v.eos);
  id("tokenizer.ggml.padding_token_id", v.pad);
  id("tokenizer.ggml.unknown_token_id", v.unk);
  id("tokenizer.ggml.eot_token_id", v.eot);
  id("tokenizer.ggml.eom_token_id", v.eom);
  auto flag = [&](const char* key, int& dst) {  // Python: bool(value) of whatever is stored
    const gguf::Value* x = f->find(key);
    if (!x) return;
    if (x->type == gguf::VType::BOOL) dst = x->u != 0;
    else if (x->is_int()) dst = x->is_signed() ? x->i != 0 : x->u != 0;
    else if (x->is_float()) dst = x->f != 0;
    else throw bad(key, "is " + x->type_name() + ", not a bool");
  };
  flag("tokenizer.ggml.add_bos_token", v.add_bos);
  flag("tokenizer.ggml.add_eos_token", v.add_eos);
  flag("tokenizer.ggml.add_space_prefix", v.add_space_prefix);
  return v;
}

namespace {
struct PreSpec {
  std::vector<SplitKind> splits;
  bool ignore_merges = false, add_bos = false;
};

const PreSpec* find_pre(const std::string& name) {
  using K = SplitKind;
  static const std::map<std::string, PreSpec> table = [] {
    std::map<std::string, PreSpec> m;
    auto put = [&](std::initializer_list<const char*> names, PreSpec s) { for (const char* nm : names) m[nm] = s; };
    put({"default"}, {{K::PunctRun, K::Gpt2, K::DigitRun, K::Ascii3Digits}});
    put({"gpt-2", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code", "roberta-bpe",
         "mpt", "olmo", "jais", "trillion"}, {{K::Gpt2}});
    put({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}, {{K::DigitEach, K::Gpt2}});
    put({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}, {{K::Llama3}, true, true});
    put({"qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"}, {{K::Qwen2}});
    return m;
  }();
  auto it = table.find(name);
  return it == table.end() ? nullptr : &it->second;
}
}  // namespace

TokenizerDesc desc_from_gguf_vocab(const GgufVocab& v) {
  TokenizerDesc d;
  d.source = v.source;
  d.tokens = v.tokens;
  d.types = v.types.empty() ? std::vector<int32_t>(v.tokens.size(), kNormal) : v.types;
  const std::string meta = "\xE2\x96\x81";
  bool add_bos;
  if (v.model == "llama") {
    if (!v.has_scores) throw FormatError(v.source + ": GGUF `llama` tokenizer has no tokenizer.ggml.scores");
    d.scores = v.scores;
    d.spm_merges = true;
    d.model_unk_id = v.unk;
    d.fuse_unk = true;
    for (int32_t t : d.types) d.byte_fallback |= t == kByte;
    // llama.cpp: ' ' -> U+2581 on every stretch of raw text, and a leading one when add_space_prefix
    bool space_prefix = v.add_space_prefix != 0;  // absent (-1): true
    if (space_prefix) d.normalizer.push_back({NormStep::Prepend, meta, ""});
    d.normalizer.push_back({NormStep::Replace, " ", meta});
    d.decoder.push_back({DecodeStep::Replace, meta, " "});
    d.decoder.push_back({DecodeStep::ByteFallback, "", ""});
    d.decoder.push_back({DecodeStep::Fuse, "", ""});
    if (space_prefix) d.decoder.push_back({DecodeStep::Strip, " ", "", 1, 0});
    add_bos = v.add_bos != 0;  // absent: true
  } else if (v.model == "gpt2") {
    std::string pre = v.pre.empty() ? "default" : v.pre;  // llama.cpp falls back to its default regexes
    const PreSpec* spec = find_pre(pre);
    if (!spec) throw ValueError(v.source + ": unsupported GGUF pre-tokenizer tokenizer.ggml.pre = '" + pre + "'");
    if (!v.has_merges) throw FormatError(v.source + ": GGUF `gpt2` tokenizer has no tokenizer.ggml.merges");
    d.merges.reserve(v.merges.size());
    for (size_t k = 0; k < v.merges.size(); ++k) {
      const std::string& m = v.merges[k];
      size_t sp = m.find(' ');
      if (sp == std::string::npos || m.find(' ', sp + 1) != std::string::npos)
        throw FormatError(v.source + ": tokenizer.ggml.merges[" + std::to_string(k) + "] = '" + m + "' is not two space-separated tokens");
      d.merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
    }
    d.splits = spec->splits;
    d.byte_level = true;
    d.ignore_merges = spec->ignore_merges;
    d.decoder.push_back({DecodeStep::ByteLevel, "", ""});
    add_bos = v.add_bos < 0 ? spec->add_bos : v.add_bos != 0;
  } else {
    throw ValueError(v.source + ": unsupported GGUF tokenizer model tokenizer.ggml.model = '" + v.model + "' (supported: 'llama', 'gpt2')");
  }
  // control / unknown tokens are special added tokens, user-defined ones plain added tokens; an
  // added token's id is the vocabulary's id of its string (the last one when repeated)
  std::map<std::string, int32_t> last;
  for (size_t i = 0; i < d.tokens.size(); ++i) last[d.tokens[i]] = static_cast<int32_t>(i);
  std::map<std::string, bool> seen;
  for (size_t i = 0; i < d.tokens.size(); ++i) {
    int32_t t = d.types[i];
    if ((t != kControl && t != kUnknown && t != kUserDefined) || d.tokens[i].empty()) continue;
    if (seen.count(d.tokens[i])) continue;
    seen[d.tokens[i]] = true;
    d.added.push_back({last[d.tokens[i]], d.tokens[i], t != kUserDefined, false, false});
  }
  bool add_eos = v.add_eos > 0;
  if (add_bos && v.bos < 0) add_bos = false;
  if (add_eos && v.eos < 0) add_eos = false;
  if (add_bos) d.prefix.push_back(v.bos);
  if (add_eos) d.suffix.push_back(v.eos);
  d.bos_id = v.bos;
  d.eos_id = v.eos;
  d.pad_id = v.pad;
  d.unk_id = v.unk;
  if (v.eos >= 0) d.eos_ids.push_back(v.eos);
  for (int32_t x : {v.eot, v.eom})
    if (x >= 0 && x != v.eos) d.eos_ids.push_back(x);
  return d;
}

}  // namespace qlora::tok
