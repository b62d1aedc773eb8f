// HF tokenizer directories: tokenizer.json (BPE models of the GPT-2 / Llama 3 / Qwen2 / SmolLM
// byte-level families and the sentencepiece-style metaspace family) plus tokenizer_config.json,
// special_tokens_map.json, config.json and generation_config.json for the special ids, following
// python/qlora_native/tokenizer.py (_from_hf_dir, _dir_special_ids) rule for rule. Components this
// file does not implement are rejected with a ValueError naming them (never tokenized differently).
#include <sys/stat.h>

#include <cerrno>
#include <map>
#include <set>

#include "common/error.hpp"
#include "io/mapped_file.hpp"
#include "json/json.hpp"
#include "tokenizer/tokenizer.hpp"

namespace qlora::tok {

namespace {

using json::Value;

json::ParseOptions lenient() {
  json::ParseOptions o;
  o.allow_duplicate_keys = true;  // Python's json: the last duplicate wins
  return o;
}

// Python _read_json: a missing file or a non-object document reads as {}.
Value read_json_or_empty(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return Value::object();
  Value v = json::parse_file(path, lenient());
  return v.is_object() ? v : Value::object();
}

struct Ctx {
  std::string file;
  [[noreturn]] void unsupported(const std::string& what) const {
    throw ValueError(file + ": " + what + " is not supported by the C++ tokenizer");
  }
  [[noreturn]] void bad(const std::string& what) const { throw FormatError(file + ": " + what); }
};

std::string type_of(const Value& v, const Ctx& c, const char* where) {
  if (!v.is_object() || !v.contains("type") || !v.at("type").is_string()) c.bad(std::string(where) + " has no \"type\"");
  return v.at("type").as_string();
}

std::string string_pattern(const Value& v, const Ctx& c, const char* where, bool* is_regex = nullptr) {
  const Value* p = v.find("pattern");
  if (!p || !p->is_object()) c.bad(std::string(where) + ": no pattern");
  if (const Value* s = p->find("String")) {
    if (is_regex) *is_regex = false;
    return s->as_string();
  }
  if (const Value* s = p->find("Regex")) {
    if (!is_regex) c.unsupported(std::string(where) + " with a Regex pattern");
    *is_regex = true;
    return s->as_string();
  }
  c.bad(std::string(where) + ": pattern is neither String nor Regex");
}

// tokenizers stores these as a Rust `char`: exactly one code point (anything else fails to load there)
std::string one_char(const std::string& s, const Ctx& c, const std::string& what) {
  size_t cps = 0;
  for (unsigned char ch : s) cps += (ch & 0xC0) != 0x80;
  if (cps != 1) c.bad(what + " " + json::dump(Value(s)) + " is not one character");
  return s;
}

// an id from a JSON file, range-checked before it is narrowed (2^32 + 1 must not become 1);
// whether it lies in the vocabulary is checked by the Tokenizer
int32_t id32(int64_t x, const Ctx& c, const std::string& what) {
  if (x < INT32_MIN || x > INT32_MAX) c.bad(what + " = " + std::to_string(x) + " is out of range");
  return static_cast<int32_t>(x);
}

void add_normalizer(const Value& n, TokenizerDesc& d, const Ctx& c) {
  if (n.is_null()) return;
  std::string t = type_of(n, c, "normalizer");
  if (t == "Sequence") {
    for (const Value& x : n.at("normalizers").as_array()) add_normalizer(x, d, c);
  } else if (t == "Prepend") {
    d.normalizer.push_back({NormStep::Prepend, n.at("prepend").as_string(), ""});
  } else if (t == "Replace") {
    std::string pat = string_pattern(n, c, "Replace normalizer");
    if (pat.empty()) c.bad("Replace normalizer with an empty pattern");  // tokenizers panics on it
    d.normalizer.push_back({NormStep::Replace, pat, n.at("content").as_string()});
  } else if (t == "NFC") {  // Qwen2's tokenizer.json
    d.normalizer.push_back({NormStep::Nfc, "", ""});
  } else {
    c.unsupported("normalizer " + t);
  }
}

SplitKind split_kind_of(const std::string& re, const Ctx& c) {
  static const std::map<std::string, SplitKind> known = {
      {R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))", SplitKind::Gpt2},
      {R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", SplitKind::Gpt2},
      {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)", SplitKind::Llama3Fold},
      {R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)", SplitKind::Llama3},
      {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)", SplitKind::Qwen2Fold},
      {R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)", SplitKind::Qwen2},
      {R"(\p{N})", SplitKind::DigitEach},
      {R"(\p{N}+)", SplitKind::DigitRun},
      {R"([0-9][0-9][0-9])", SplitKind::Ascii3Digits},
      {R"([\p{P}\$\+<=>\^~\|]+)", SplitKind::PunctRun},
  };
  auto it = known.find(re);
  if (it == known.end()) c.unsupported("pre-tokenizer Split pattern " + json::dump(Value(re)));
  return it->second;
}

void add_pre(const Value& p, TokenizerDesc& d, const Ctx& c, bool first, bool last) {
  if (p.is_null()) return;
  std::string t = type_of(p, c, "pre_tokenizer");
  if (t == "Sequence") {
    const auto& v = p.at("pretokenizers").as_array();
    for (size_t i = 0; i < v.size(); ++i) add_pre(v[i], d, c, first && i == 0, last && i + 1 == v.size());
    return;
  }
  if (d.byte_level || d.metaspace) c.unsupported("a pre-tokenizer after ByteLevel / Metaspace");
  if (t == "ByteLevel") {
    if (p.get_or("add_prefix_space", false)) {
      if (!first) c.unsupported("ByteLevel(add_prefix_space=true) after another pre-tokenizer");
      d.byte_level_prefix_space = true;
    }
    if (p.get_or("use_regex", true)) d.splits.push_back(SplitKind::Gpt2);
    d.byte_level = true;
  } else if (t == "Split") {
    bool is_regex = false;
    std::string pat = string_pattern(p, c, "Split pre-tokenizer", &is_regex);
    if (p.get_or("behavior", std::string("Isolated")) != "Isolated" || p.get_or("invert", false))
      c.unsupported("Split pre-tokenizer behaviour other than Isolated");
    if (!is_regex) c.unsupported("Split pre-tokenizer with a String pattern");
    d.splits.push_back(split_kind_of(pat, c));
  } else if (t == "Digits") {
    d.splits.push_back(p.get_or("individual_digits", false) ? SplitKind::DigitEach : SplitKind::DigitRun);
  } else if (t == "Metaspace") {
    if (!last) c.unsupported("Metaspace before another pre-tokenizer");
    d.metaspace = true;
    d.meta_replacement = one_char(p.get_or("replacement", std::string("\xE2\x96\x81")), c, "Metaspace replacement");
    std::string scheme = p.get_or("prepend_scheme", std::string(p.get_or("add_prefix_space", true) ? "always" : "never"));
    if (scheme == "always") d.meta_prepend = MetaPrepend::Always;
    else if (scheme == "first") d.meta_prepend = MetaPrepend::First;
    else if (scheme == "never") d.meta_prepend = MetaPrepend::Never;
    else c.bad("Metaspace prepend_scheme " + json::dump(Value(scheme)));
    if (p.get_or("split", true)) d.splits.push_back(SplitKind::MetaSplit);
  } else {
    c.unsupported("pre-tokenizer " + t);
  }
}

void add_decoder(const Value& v, TokenizerDesc& d, const Ctx& c) {
  if (v.is_null()) return;
  std::string t = type_of(v, c, "decoder");
  if (t == "Sequence") {
    for (const Value& x : v.at("decoders").as_array()) add_decoder(x, d, c);
  } else if (t == "ByteLevel") {
    d.decoder.push_back({DecodeStep::ByteLevel, "", ""});
  } else if (t == "Replace") {
    std::string pat = string_pattern(v, c, "Replace decoder");
    if (pat.empty()) c.bad("Replace decoder with an empty pattern");
    d.decoder.push_back({DecodeStep::Replace, pat, v.at("content").as_string()});
  } else if (t == "ByteFallback") {
    d.decoder.push_back({DecodeStep::ByteFallback, "", ""});
  } else if (t == "Fuse") {
    d.decoder.push_back({DecodeStep::Fuse, "", ""});
  } else if (t == "Strip") {
    DecodeStep s{DecodeStep::Strip, one_char(v.at("content").as_string(), c, "Strip decoder content"), ""};
    for (auto [key, dst] : {std::pair<const char*, int32_t*>{"start", &s.start}, {"stop", &s.stop}}) {
      int64_t x = v.get_or(key, int64_t(0));
      if (x < 0 || x > INT32_MAX) c.bad("Strip decoder " + std::string(key) + " = " + std::to_string(x) + " is out of range");
      *dst = static_cast<int32_t>(x);
    }
    d.decoder.push_back(s);
  } else if (t == "Metaspace") {
    DecodeStep s{DecodeStep::Metaspace, one_char(v.get_or("replacement", std::string("\xE2\x96\x81")), c, "Metaspace decoder replacement"), ""};
    std::string scheme = v.get_or("prepend_scheme", std::string(v.get_or("add_prefix_space", true) ? "always" : "never"));
    s.prepend = scheme != "never";
    d.decoder.push_back(s);
  } else {
    c.unsupported("decoder " + t);
  }
}

// TemplateProcessing's "single" template -> prefix / suffix ids; false when there is none.
void add_post(const Value& v, TokenizerDesc& d, const Ctx& c) {
  if (v.is_null()) return;
  std::string t = type_of(v, c, "post_processor");
  if (t == "Sequence") {
    for (const Value& x : v.at("processors").as_array()) add_post(x, d, c);
  } else if (t == "ByteLevel") {
    // offsets only
  } else if (t == "TemplateProcessing") {
    const Value& specials = v.at("special_tokens");
    bool seen_a = false;
    for (const Value& item : v.at("single").as_array()) {
      if (const Value* s = item.find("SpecialToken")) {
        const Value* e = specials.find(s->at("id").as_string());
        if (!e) c.bad("post_processor: special token " + json::dump(s->at("id")) + " is not in special_tokens");
        for (const Value& id : e->at("ids").as_array())
          (seen_a ? d.suffix : d.prefix).push_back(id32(id.as_int(), c, "post_processor special token id"));
      } else if (const Value* q = item.find("Sequence")) {
        if (q->at("id").as_string() != "A") c.unsupported("a single-sequence template using sequence B");
        seen_a = true;
      } else {
        c.bad("post_processor: unknown template item " + json::dump(item));
      }
    }
  } else {
    c.unsupported("post_processor " + t);
  }
}

std::string token_str(const Value* v) {  // a special token as tokenizer_config.json writes it
  if (v && v->is_object()) v = v->find("content");
  return v && v->is_string() ? v->as_string() : std::string();
}

// config.json / generation_config.json ids: an int, a list of ints, or null; named with their file
std::vector<int32_t> int_ids(const Value* v, const Ctx& c, const std::string& key) {
  std::vector<int32_t> out;
  if (!v || v->is_null()) return out;
  auto one = [&](const Value& x) {
    if (x.is_bool()) return static_cast<int32_t>(x.as_bool());
    int64_t i = 0;
    try {
      i = x.as_int();  // an int, or a double holding one exactly (as Python's int(2.0))
    } catch (const FormatError&) {
      c.bad(key + " = " + json::dump(x) + " is not an integer");
    }
    return id32(i, c, key);
  };
  if (v->is_array()) {
    for (const Value& x : v->as_array()) out.push_back(one(x));
  } else {
    out.push_back(one(*v));
  }
  return out;
}

}  // namespace

TokenizerDesc desc_from_hf_dir(const std::string& dir) {
  const std::string file = dir + "/tokenizer.json";
  Ctx c{file};
  Value tj = json::parse_file(file, lenient());
  if (!tj.is_object()) c.bad("not a JSON object");
  TokenizerDesc d;
  d.source = dir;
  try {
    const Value& model = tj.at("model");
    std::string mtype = model.get_or("type", std::string("BPE"));
    if (mtype != "BPE") c.unsupported("model type " + mtype);
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (!model.get_or(k, std::string()).empty()) c.unsupported(std::string("BPE ") + k);
    if (const Value* dp = model.find("dropout"); dp && !dp->is_null() && dp->as_double() > 0) c.unsupported("BPE dropout");
    // id -> string over the model vocabulary and the added tokens
    std::map<int64_t, std::string> by_id;
    for (const auto& [s, id] : model.at("vocab").as_object()) {
      int64_t i = id.as_int();
      if (i < 0 || i >= INT32_MAX) c.bad("vocab id " + std::to_string(i) + " of " + json::dump(Value(s)) + " out of range");
      // one id, two strings: the first would vanish from the id table and be reported missing later
      if (auto [it, fresh] = by_id.emplace(i, s); !fresh)
        c.bad("vocab tokens " + json::dump(Value(it->second)) + " and " + json::dump(Value(s)) + " share id " +
              std::to_string(i));
    }
    const Value* added = tj.find("added_tokens");
    if (added && !added->is_null()) {
      for (const Value& a : added->as_array()) {
        AddedToken t;
        int64_t i = a.at("id").as_int();
        if (i < 0 || i >= INT32_MAX) c.bad("added token id " + std::to_string(i) + " out of range");
        t.id = static_cast<int32_t>(i);
        t.content = a.at("content").as_string();
        t.special = a.get_or("special", false);
        t.lstrip = a.get_or("lstrip", false);
        t.rstrip = a.get_or("rstrip", false);
        if (a.get_or("single_word", false)) c.unsupported("added token single_word (" + t.content + ")");
        by_id[i] = t.content;
        d.added.push_back(std::move(t));
      }
    }
    if (by_id.empty()) c.bad("empty vocabulary");
    // ids index a table: one far past the others would allocate a vector of that many strings
    constexpr int64_t kMaxHoles = int64_t(1) << 20;
    if (by_id.rbegin()->first >= static_cast<int64_t>(by_id.size()) + kMaxHoles)
      c.bad("token id " + std::to_string(by_id.rbegin()->first) + " (" + json::dump(Value(by_id.rbegin()->second)) +
            ") is far past the " + std::to_string(by_id.size()) + " tokens: ids must be dense (at most " +
            std::to_string(kMaxHoles) + " unused ids)");
    d.tokens.resize(static_cast<size_t>(by_id.rbegin()->first) + 1);
    for (auto& [i, s] : by_id) d.tokens[static_cast<size_t>(i)] = s;
    const Value& merges = model.at("merges");
    for (size_t k = 0; k < merges.size(); ++k) {
      const Value& m = merges.at(k);
      if (m.is_string()) {
        const std::string& s = m.as_string();
        size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          c.bad("model.merges[" + std::to_string(k) + "] = " + json::dump(m) + " is not two space-separated tokens");
        d.merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else if (m.is_array() && m.size() == 2) {
        d.merges.emplace_back(m.at(size_t(0)).as_string(), m.at(size_t(1)).as_string());
      } else {
        c.bad("model.merges[" + std::to_string(k) + "] is neither \"a b\" nor [a, b]");
      }
    }
    d.ignore_merges = model.get_or("ignore_merges", false);
    d.byte_fallback = model.get_or("byte_fallback", false);
    d.fuse_unk = model.get_or("fuse_unk", false);
    std::string unk = model.get_or("unk_token", std::string());
    if (!unk.empty()) {
      const Value* u = model.at("vocab").find(unk);
      if (!u) c.bad("model.unk_token " + json::dump(Value(unk)) + " is not in the vocabulary");
      d.model_unk_id = static_cast<int32_t>(u->as_int());
    }
    add_normalizer(tj.find("normalizer") ? tj.at("normalizer") : Value(), d, c);
    if (!d.normalizer.empty())
      for (const Value& a : added ? added->as_array() : json::Array{})
        if (a.get_or("normalized", false))
          c.unsupported("a normalized added token (" + a.at("content").as_string() + ") with a normalizer");
    add_pre(tj.find("pre_tokenizer") ? tj.at("pre_tokenizer") : Value(), d, c, true, true);
    const Value* dec = tj.find("decoder");
    add_decoder(dec ? *dec : Value(), d, c);
    d.join_with_spaces = !dec || dec->is_null();
    const Value* post = tj.find("post_processor");

    // special ids (tokenizer.py _dir_special_ids)
    Value cfg = read_json_or_empty(dir + "/tokenizer_config.json");
    Value stm = read_json_or_empty(dir + "/special_tokens_map.json");
    Value mcfg = read_json_or_empty(dir + "/config.json");
    Value gcfg = read_json_or_empty(dir + "/generation_config.json");
    std::map<std::string, int32_t> lookup;  // tokenizers' token_to_id: added tokens, then the model
    for (const auto& [s, id] : model.at("vocab").as_object()) lookup.emplace(s, static_cast<int32_t>(id.as_int()));
    for (const AddedToken& a : d.added) lookup[a.content] = a.id;
    int32_t ids[4];
    const char* names[4] = {"bos", "eos", "pad", "unk"};
    for (int k = 0; k < 4; ++k) {
      std::string key = std::string(names[k]) + "_token";
      std::string s = token_str(cfg.find(key));
      if (s.empty()) s = token_str(stm.find(key));
      ids[k] = -1;
      if (!s.empty()) {
        auto it = lookup.find(s);
        if (it != lookup.end()) ids[k] = it->second;
      }
      if (ids[k] < 0) {
        std::string key_id = std::string(names[k]) + "_token_id";
        auto from_cfg = int_ids(mcfg.find(key_id), Ctx{dir + "/config.json"}, key_id);
        if (!from_cfg.empty()) ids[k] = from_cfg[0];
      }
    }
    d.bos_id = ids[0];
    d.eos_id = ids[1];
    d.pad_id = ids[2];
    d.unk_id = ids[3];
    std::set<int64_t> eos_all;
    for (int32_t x : int_ids(mcfg.find("eos_token_id"), Ctx{dir + "/config.json"}, "eos_token_id")) eos_all.insert(x);
    for (int32_t x : int_ids(gcfg.find("eos_token_id"), Ctx{dir + "/generation_config.json"}, "eos_token_id"))
      eos_all.insert(x);
    if (d.eos_id >= 0) eos_all.insert(d.eos_id);
    for (int64_t x : eos_all) d.eos_ids.push_back(static_cast<int32_t>(x));
    // transformers replaces the post-processor when tokenizer_config sets add_bos/add_eos
    // explicitly (or there is none); otherwise tokenizer.json's post-processor decides
    if (cfg.contains("add_bos_token") || cfg.contains("add_eos_token") || !post || post->is_null()) {
      const Value* ab = cfg.find("add_bos_token");
      const Value* ae = cfg.find("add_eos_token");
      auto truthy = [](const Value* v) { return v && !v->is_null() && (v->is_bool() ? v->as_bool() : v->is_int() ? v->as_int() != 0 : true); };
      if (truthy(ab) && d.bos_id >= 0) d.prefix.push_back(d.bos_id);
      if (truthy(ae) && d.eos_id >= 0) d.suffix.push_back(d.eos_id);
    } else {
      add_post(*post, d, c);
    }
    const Value* cu = cfg.find("clean_up_tokenization_spaces");
    d.clean_up_spaces = cu && cu->is_bool() && cu->as_bool();
  } catch (const FormatError& e) {
    std::string m = e.what();
    if (m.compare(0, dir.size(), dir) == 0) throw;  // names its file already
    throw FormatError(file + ": " + m);
  }
  return d;
}

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  struct stat st;
  if (path.empty() || ::stat(path.c_str(), &st) != 0) throw io::FileError(errno ? errno : ENOENT, path, "cannot open tokenizer");
  if (S_ISDIR(st.st_mode)) {
    struct stat j;
    if (::stat((path + "/tokenizer.json").c_str(), &j) == 0 && S_ISREG(j.st_mode))
      return std::make_unique<Tokenizer>(desc_from_hf_dir(path));
    if (::stat((path + "/tokenizer.model").c_str(), &j) == 0)
      throw ValueError(path + ": only a sentencepiece tokenizer.model here; the C++ tokenizer reads tokenizer.json "
                              "or a GGUF vocabulary (convert the model, or use the Python face)");
    throw io::FileError(ENOENT, path + "/tokenizer.json", "no tokenizer.json in this directory");
  }
  if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".gguf") == 0)
    return std::make_unique<Tokenizer>(desc_from_gguf_vocab(read_gguf_vocab(path)));
  throw ValueError(path + ": expected a directory with tokenizer.json or a .gguf file");
}

}  // namespace qlora::tok
