// Tokenizers in C++: text <-> token ids for the vocabularies the Python face supports (GGUF
// `llama` SPM and `gpt2` byte-level BPE vocabularies, HF tokenizer.json BPE models), giving the
// same ids as the Python face (python/qlora_native/tokenizer.py, tokenizer_gguf.py).
//
// Everything is built from a plain TokenizerDesc; desc_from_gguf_vocab / desc_from_hf_dir
// translate the two model sources into it (tokenizer_gguf.cpp, tokenizer_json.cpp).
//
// Encoding, as `tokenizers` does it: added tokens are matched whole in the raw text (leftmost,
// longest first; special ones only when parse_special); each stretch of text between them is
// normalized (string prepend / replace steps, Metaspace), split by the pre-tokenizer kinds
// (pretokenize.hpp), mapped to GPT-2's byte alphabet when byte_level, and BPE-merged by merge
// rank. SPM vocabularies (scores, no merges) merge the adjacent pair whose concatenation is the
// best-scored token, as llama.cpp and sentencepiece do: expressed as merges ranked by score
// (the same derivation as tokenizer_gguf._spm_merges). Unknown characters fall back to <0xNN>
// byte tokens when byte_fallback, else to unk (fused), else are dropped (tokenizers' rule).
// Invalid UTF-8 input is repaired first: see sanitize_utf8 in unicode.hpp.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizer/pretokenize.hpp"

namespace qlora::tok {

// llama.cpp token types (gguf.TokenType).
enum TokenType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;  // matched only with parse_special; skipped by decode(skip_special)
  bool lstrip = false;   // the match swallows whitespace on its left / right (tokenizers AddedToken)
  bool rstrip = false;
};

struct NormStep {  // tokenizers normalizers.Prepend / Replace (string pattern) / NFC
  enum Kind : uint8_t { Prepend, Replace, Nfc } kind;
  std::string a, b;  // Prepend: a = prefix; Replace: a -> b
};

struct DecodeStep {  // tokenizers decoders
  enum Kind : uint8_t { Replace, ByteFallback, Fuse, Strip, ByteLevel, Metaspace } kind;
  std::string a, b;       // Replace: a -> b; Strip: a = the character; Metaspace: a = replacement
  int32_t start = 0, stop = 0;  // Strip counts
  bool prepend = true;    // Metaspace: prepend_scheme != never
};

enum class MetaPrepend : uint8_t { Never, First, Always };

struct TokenizerDesc {
  std::string source;                   // file or directory, for messages
  std::vector<std::string> tokens;      // id -> token string (GPT-2 byte alphabet when byte_level)
  std::vector<int32_t> types;           // TokenType per id (empty: all normal)
  std::vector<float> scores;            // spm_merges: score per id
  std::vector<std::pair<std::string, std::string>> merges;  // rank order
  bool spm_merges = false;              // derive merges from scores instead of `merges`
  std::vector<NormStep> normalizer;
  bool metaspace = false;               // tokenizers Metaspace pre-tokenizer (' ' -> replacement)
  std::string meta_replacement = "\xE2\x96\x81";
  MetaPrepend meta_prepend = MetaPrepend::Always;
  std::vector<SplitKind> splits;        // pre-tokenizer, applied in order
  bool byte_level = false;              // GPT-2 byte-to-unicode mapping before the model
  bool byte_level_prefix_space = false; // ByteLevel(add_prefix_space=True)
  bool ignore_merges = false;           // a piece that is itself a token is emitted whole
  bool byte_fallback = false;
  bool fuse_unk = false;
  int32_t model_unk_id = -1;            // the BPE model's unk token (-1: none, unknown chars dropped)
  std::vector<AddedToken> added;
  std::vector<int32_t> prefix, suffix;  // ids add_special puts around the text (post-processor)
  std::vector<DecodeStep> decoder;
  bool join_with_spaces = false;        // no decoder at all: tokenizers joins the tokens with ' '
  bool clean_up_spaces = false;         // transformers' clean_up_tokenization in decode
  // special ids (-1: none)
  int32_t bos_id = -1, eos_id = -1, pad_id = -1, unk_id = -1;
  std::vector<int32_t> eos_ids;  // every id that ends a turn (eos included)
};

// GGUF tokenizer metadata with llama.cpp's keys resolved (python tokenizer_gguf.GGUFVocab).
struct GgufVocab {
  std::string source;
  std::string model;  // tokenizer.ggml.model
  std::string pre;    // tokenizer.ggml.pre ("" = absent)
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<float> scores;
  bool has_scores = false;
  std::vector<std::string> merges;
  bool has_merges = false;
  int32_t bos = -1, eos = -1, pad = -1, unk = -1, eot = -1, eom = -1;
  int add_bos = -1, add_eos = -1, add_space_prefix = -1;  // -1: key absent
};

TokenizerDesc desc_from_gguf_vocab(const GgufVocab& v);
GgufVocab read_gguf_vocab(const std::string& path);  // minimal GGUF metadata reader
TokenizerDesc desc_from_hf_dir(const std::string& dir);  // tokenizer.json (+ tokenizer_config.json ...)

class Tokenizer {
 public:
  explicit Tokenizer(TokenizerDesc d);
  // A .gguf file (its embedded vocabulary) or an HF directory with tokenizer.json.
  static std::unique_ptr<Tokenizer> load(const std::string& path);

  // Appends the ids of `text` (any bytes; see sanitize_utf8) to out.
  void encode(std::string_view text, bool add_special, bool parse_special, std::vector<int32_t>& out) const;
  // The text of ids as the Python face's decode returns it (valid UTF-8). Ids must be in range.
  std::string decode(const int32_t* ids, size_t n, bool skip_special) const;
  // Raw bytes one token stands for (llama_token_to_piece with special = true): GPT-2 byte
  // alphabet and <0xNN> undone, the metaspace character as ' '; may be partial UTF-8.
  const std::string& piece(int32_t id) const { return pieces_[static_cast<size_t>(id)]; }
  int32_t n_vocab() const { return static_cast<int32_t>(d_.tokens.size()); }
  const std::string& token(int32_t id) const { return d_.tokens[static_cast<size_t>(id)]; }
  int32_t token_to_id(std::string_view s) const;  // -1 when absent
  bool is_special(int32_t id) const { return special_[static_cast<size_t>(id)] != 0; }
  const TokenizerDesc& desc() const { return d_; }

  // Open-addressing string -> id index (last id wins for repeated strings, like a Python dict).
  class StrIndex {
   public:
    void build(const std::vector<std::string>& keys);
    int32_t find(std::string_view s) const;
    int32_t find_hashed(std::string_view s, uint64_t hash) const;  // hash: hash_bytes(s)
   private:
    const std::vector<std::string>* keys_ = nullptr;
    std::vector<int32_t> slots_;
    size_t mask_ = 0;
  };

 private:
  struct Scratch;
  void encode_segment(std::string_view seg, bool at_start, Scratch& sc, std::vector<int32_t>& out) const;
  void bpe_word(std::string_view w, Scratch& sc, std::vector<int32_t>& out) const;
  void bpe_merge(std::string_view w, Scratch& sc, std::vector<int32_t>& out) const;
  int64_t merge_of(int32_t a, int32_t b) const;  // (rank << 32 | new id) or -1

  TokenizerDesc d_;
  StrIndex vocab_;          // token string -> id
  StrIndex raw_vocab_;      // byte_level: raw bytes -> id (for ignore_merges)
  std::vector<std::string> raw_keys_;
  std::vector<std::string> pieces_;
  std::vector<uint8_t> special_;
  int32_t byte_id_[256];    // byte_level: id of each byte's character; else <0xNN> token id (-1)
  // merges: open addressing on (a << 32 | b)
  std::vector<uint64_t> mkeys_;
  std::vector<uint64_t> mvals_;
  size_t mmask_ = 0;
  // added tokens grouped by first byte, longest first
  std::vector<std::vector<int32_t>> added_by_byte_;
  // word cache (piece bytes -> ids)
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

// GPT-2's byte -> code point map (bytes_to_unicode).
uint32_t byte_to_cpt(uint8_t b);
// Inverse: code point -> byte, or -1.
int byte_from_cpt(uint32_t cp);

}  // namespace qlora::tok
