// GGUF vocabularies: a minimal reader of the `tokenizer.*` metadata (bounds-checked; tensor data is
// not touched) and the translation into a TokenizerDesc, following
// python/qlora_native/tokenizer_gguf.py (build_gguf_tokenizer) rule for rule.
#include <cstring>
#include <map>

#include "common/error.hpp"
#include "io/mapped_file.hpp"
#include "tokenizer/tokenizer.hpp"

namespace qlora::tok {

namespace {

enum GgufType : uint32_t { U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 };

struct Reader {
  const uint8_t* p;
  size_t n, pos = 0;
  const std::string& path;
  std::string key;  // the field being read, for messages

  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError(path + ": corrupt GGUF" + (key.empty() ? std::string() : " field '" + key + "'") + ": " + what +
                      " (at byte " + std::to_string(pos) + " of " + std::to_string(n) + ")");
  }
  void need(uint64_t k) const {
    if (k > n - pos) fail("truncated: " + std::to_string(k) + " bytes needed");
  }
  template <class T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str() {
    uint64_t len = get<uint64_t>();
    need(len);
    std::string s(reinterpret_cast<const char*>(p + pos), static_cast<size_t>(len));
    pos += static_cast<size_t>(len);
    return s;
  }
  static size_t scalar_size(uint32_t t) {
    switch (t) {
      case U8: case I8: case BOOL: return 1;
      case U16: case I16: return 2;
      case U32: case I32: case F32: return 4;
      case U64: case I64: case F64: return 8;
      default: return 0;
    }
  }
  void skip(uint32_t t, int depth = 0) {
    if (depth > 4) fail("arrays nested too deeply");
    if (t == STRING) {
      uint64_t len = get<uint64_t>();
      need(len);
      pos += static_cast<size_t>(len);
    } else if (t == ARRAY) {
      uint32_t et = get<uint32_t>();
      uint64_t cnt = get<uint64_t>();
      if (size_t s = scalar_size(et)) {
        if (cnt > (n - pos) / s) fail("array of " + std::to_string(cnt) + " elements past the end of the file");
        pos += static_cast<size_t>(cnt * s);
      } else if (et == STRING || et == ARRAY) {
        if (cnt > (n - pos) / 8) fail("array of " + std::to_string(cnt) + " elements past the end of the file");
        for (uint64_t i = 0; i < cnt; ++i) skip(et, depth + 1);
      } else {
        fail("unknown array element type " + std::to_string(et));
      }
    } else if (size_t s = scalar_size(t)) {
      need(s);
      pos += s;
    } else {
      fail("unknown value type " + std::to_string(t));
    }
  }
  // An integer scalar of any integer type (or bool) as int64.
  int64_t integer(uint32_t t) {
    switch (t) {
      case U8: return get<uint8_t>();
      case I8: return get<int8_t>();
      case U16: return get<uint16_t>();
      case I16: return get<int16_t>();
      case U32: return get<uint32_t>();
      case I32: return get<int32_t>();
      case U64: { uint64_t v = get<uint64_t>(); if (v > INT64_MAX) fail("integer out of range"); return static_cast<int64_t>(v); }
      case I64: return get<int64_t>();
      case BOOL: return get<uint8_t>() != 0;
      default: fail(std::string("expected an integer, got value type ") + std::to_string(t));
    }
  }
  uint64_t array_header(uint32_t t, uint32_t want_a, uint32_t want_b, size_t min_size) {
    if (t != ARRAY) fail("expected an array, got value type " + std::to_string(t));
    uint32_t et = get<uint32_t>();
    if (et != want_a && et != want_b) fail("unexpected array element type " + std::to_string(et));
    uint64_t cnt = get<uint64_t>();
    if (cnt > (n - pos) / min_size) fail("array of " + std::to_string(cnt) + " elements past the end of the file");
    last_elem = et;
    return cnt;
  }
  uint32_t last_elem = 0;
};

}  // namespace

GgufVocab read_gguf_vocab(const std::string& path) {
  auto file = io::MappedFile::open(path);
  Reader r{file->data(), file->size(), 0, path, ""};
  GgufVocab v;
  v.source = path;
  if (r.n < 24 || std::memcmp(r.p, "GGUF", 4) != 0) throw FormatError(path + ": not a GGUF file (bad magic or too short)");
  r.pos = 4;
  uint32_t version = r.get<uint32_t>();
  if (version < 2 || version > 3) throw FormatError(path + ": unsupported GGUF version " + std::to_string(version));
  r.get<uint64_t>();  // tensor count (not needed here)
  uint64_t n_kv = r.get<uint64_t>();
  if (n_kv > (r.n - r.pos) / 12) r.fail("metadata count " + std::to_string(n_kv) + " past the end of the file");
  bool have_model = false;
  auto id_of = [&](int64_t x) -> int32_t { return x < INT32_MIN || x > INT32_MAX ? -2 : static_cast<int32_t>(x); };
  std::map<std::string, int64_t> ids;
  for (uint64_t k = 0; k < n_kv; ++k) {
    r.key.clear();
    std::string key = r.str();
    r.key = key;
    uint32_t t = r.get<uint32_t>();
    if (key.compare(0, 10, "tokenizer.") != 0) {
      r.skip(t);
      continue;
    }
    if (key == "tokenizer.ggml.model" || key == "tokenizer.ggml.pre") {
      if (t != STRING) r.fail("expected a string");
      (key == "tokenizer.ggml.model" ? v.model : v.pre) = r.str();
      if (key == "tokenizer.ggml.model") have_model = true;
    } else if (key == "tokenizer.ggml.tokens" || key == "tokenizer.ggml.merges") {
      uint64_t cnt = r.array_header(t, STRING, STRING, 8);
      auto& dst = key == "tokenizer.ggml.tokens" ? v.tokens : v.merges;
      dst.reserve(static_cast<size_t>(cnt));
      for (uint64_t i = 0; i < cnt; ++i) dst.push_back(r.str());
      if (key == "tokenizer.ggml.merges") v.has_merges = true;
    } else if (key == "tokenizer.ggml.token_type") {
      uint64_t cnt = r.array_header(t, I32, U32, 4);
      v.types.resize(static_cast<size_t>(cnt));
      for (auto& x : v.types) x = static_cast<int32_t>(r.get<uint32_t>());
    } else if (key == "tokenizer.ggml.scores") {
      uint64_t cnt = r.array_header(t, F32, F32, 4);
      v.scores.resize(static_cast<size_t>(cnt));
      for (auto& x : v.scores) x = r.get<float>();
      v.has_scores = true;
    } else if (key == "tokenizer.ggml.bos_token_id" || key == "tokenizer.ggml.eos_token_id" ||
               key == "tokenizer.ggml.padding_token_id" || key == "tokenizer.ggml.unknown_token_id" ||
               key == "tokenizer.ggml.eot_token_id" || key == "tokenizer.ggml.eom_token_id") {
      if (t == BOOL || t == F32 || t == F64) r.fail("is not an integer");  // a float id would be truncated
      ids[key] = r.integer(t);
    } else if (key == "tokenizer.ggml.add_bos_token" || key == "tokenizer.ggml.add_eos_token" ||
               key == "tokenizer.ggml.add_space_prefix") {
      int b = r.integer(t) != 0;
      (key == "tokenizer.ggml.add_bos_token" ? v.add_bos : key == "tokenizer.ggml.add_eos_token" ? v.add_eos : v.add_space_prefix) = b;
    } else {
      r.skip(t);
    }
  }
  r.key.clear();
  if (!have_model) throw FormatError(path + ": GGUF file has no embedded tokenizer (no tokenizer.ggml.model key)");
  if (v.tokens.empty()) throw FormatError(path + ": GGUF tokenizer has no tokenizer.ggml.tokens");
  const size_t n = v.tokens.size();
  if ((!v.types.empty() && v.types.size() != n) || (v.has_scores && v.scores.size() != n))
    throw FormatError(path + ": token_type/scores length differs from the " + std::to_string(n) + " tokens");
  if (v.types.empty()) v.types.assign(n, kNormal);
  for (auto& [key, x] : ids) {
    int32_t* dst = key == "tokenizer.ggml.bos_token_id" ? &v.bos : key == "tokenizer.ggml.eos_token_id" ? &v.eos
                 : key == "tokenizer.ggml.padding_token_id" ? &v.pad : key == "tokenizer.ggml.unknown_token_id" ? &v.unk
                 : key == "tokenizer.ggml.eot_token_id" ? &v.eot : &v.eom;
    if (x >= 0 && static_cast<uint64_t>(x) < n) *dst = id_of(x);
    else if (x == -1 || x == 0xFFFFFFFFll) *dst = -1;  // llama.cpp's "none"
    else throw FormatError(path + ": " + key + " = " + std::to_string(x) + " is outside the vocabulary of " + std::to_string(n) + " tokens");
  }
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
