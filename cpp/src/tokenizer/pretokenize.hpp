// Pre-tokenizer splitting without a regex library: each SplitKind is one of the regexes llama.cpp
// and HF tokenizer.json files use, hand-written over code points and the generated Unicode
// classes (the approach of llama.cpp's unicode.cpp). A split keeps matches and the text between
// them as pieces (`tokenizers` Split behaviour "isolated"); a list of kinds is applied in turn,
// each one splitting the pieces left by the previous one.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qlora::tok {

enum class SplitKind : uint8_t {
  Gpt2,         // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)   (+ |\s+ form)
  Llama3,       // (?:'[sS]|'[tT]|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  Llama3Fold,   // the same with (?i:'s|...) (Unicode case folding: also U+017F for s, U+212A for k)
  Qwen2,        // Llama3 with \p{N} instead of \p{N}{1,3}
  Qwen2Fold,
  DigitEach,    // \p{N}  (tokenizers Digits(individual_digits=True))
  DigitRun,     // \p{N}+ (Digits(individual_digits=False))
  Ascii3Digits, // [0-9][0-9][0-9]
  PunctRun,     // [\p{P}\$\+<=>\^~\|]+
  MetaSplit,    // tokenizers Metaspace(split=True): a new piece at each U+2581 (merged with next)
};

const char* split_kind_name(SplitKind k);

// A piece: code point range [first, second).
using Piece = std::pair<uint32_t, uint32_t>;

// Splits cpts into pieces with the kinds in order. `pieces` is the output; `tmp` scratch.
void pre_split(const std::vector<uint32_t>& cpts, const std::vector<SplitKind>& kinds, std::vector<Piece>& pieces,
               std::vector<Piece>& tmp);

}  // namespace qlora::tok
