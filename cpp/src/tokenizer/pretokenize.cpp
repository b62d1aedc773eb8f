#include "tokenizer/pretokenize.hpp"

#include "tokenizer/unicode.hpp"

namespace qlora::tok {

const char* split_kind_name(SplitKind k) {
  switch (k) {
    case SplitKind::Gpt2: return "gpt2";
    case SplitKind::Llama3: return "llama3";
    case SplitKind::Llama3Fold: return "llama3 (?i)";
    case SplitKind::Qwen2: return "qwen2";
    case SplitKind::Qwen2Fold: return "qwen2 (?i)";
    case SplitKind::DigitEach: return "\\p{N}";
    case SplitKind::DigitRun: return "\\p{N}+";
    case SplitKind::Ascii3Digits: return "[0-9]{3}";
    case SplitKind::PunctRun: return "punctuation";
    case SplitKind::MetaSplit: return "metaspace";
  }
  return "?";
}

namespace {

constexpr uint32_t kNone = 0xFFFFFFFF;

struct Span {
  const std::vector<uint32_t>& c;
  uint32_t b, e;
  uint32_t cpt(uint32_t p) const { return p >= b && p < e ? c[p] : kNone; }
  uint8_t flags(uint32_t p) const { return p >= b && p < e ? cpt_flags(c[p]) : 0; }
};

// Appends [prev, end) as a piece when non-empty; returns its length.
struct Out {
  std::vector<Piece>& v;
  uint32_t prev;
  uint32_t add(uint32_t end) {
    uint32_t len = end - prev;
    if (len) v.emplace_back(prev, end);
    prev = end;
    return len;
  }
};

bool is_wlnum(uint8_t f) { return f & (kSpace | kLetter | kNumber); }

// ' followed by s t m d / re ve ll (optionally case-folded); returns the match length or 0.
uint32_t contraction(const Span& s, uint32_t pos, int fold) {
  if (s.cpt(pos) != '\'' || pos + 1 >= s.e) return 0;
  auto low = [&](uint32_t c) -> uint32_t {
    if (!fold) return c;
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (fold == 2 && c == 0x17F) return 's';  // LATIN SMALL LETTER LONG S folds to s
    if (fold == 2 && c == 0x212A) return 'k';  // KELVIN SIGN folds to k
    return c;
  };
  uint32_t a = low(s.cpt(pos + 1));
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (pos + 2 < s.e) {
    uint32_t b = low(s.cpt(pos + 2));
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  return 0;
}

void split_gpt2(const Span& s, std::vector<Piece>& out) {
  Out o{out, s.b};
  for (uint32_t pos = s.b; pos < s.e;) {
    const uint32_t cpt = s.cpt(pos);
    const uint8_t flags = s.flags(pos);
    if (uint32_t n = contraction(s, pos, 0)) {
      pos += o.add(pos + n);
      continue;
    }
    uint8_t f2 = cpt == ' ' ? s.flags(pos + 1) : flags;
    if (f2 & kLetter) {  // ' ?\p{L}+'
      pos += cpt == ' ';
      while (f2 & kLetter) f2 = s.flags(++pos);
      o.add(pos);
      continue;
    }
    if (f2 & kNumber) {  // ' ?\p{N}+'
      pos += cpt == ' ';
      while (f2 & kNumber) f2 = s.flags(++pos);
      o.add(pos);
      continue;
    }
    if (!is_wlnum(f2) && f2) {  // ' ?[^\s\p{L}\p{N}]+'
      pos += cpt == ' ';
      while (!is_wlnum(f2) && f2) f2 = s.flags(++pos);
      o.add(pos);
      continue;
    }
    uint32_t nws = 0;
    while (s.flags(pos + nws) & kSpace) ++nws;
    if (nws > 1 && s.cpt(pos + nws) != kNone) {  // '\s+(?!\S)': leave the last one to the next word
      pos += nws - 1;
      o.add(pos);
      continue;
    }
    if (nws > 0) {
      pos += nws;
      o.add(pos);
      continue;
    }
    o.add(++pos);
  }
}

void split_llama3(const Span& s, std::vector<Piece>& out, uint32_t max_digits, int fold) {
  Out o{out, s.b};
  for (uint32_t pos = s.b; pos < s.e;) {
    const uint32_t cpt = s.cpt(pos);
    const uint8_t flags = s.flags(pos);
    if (uint32_t n = contraction(s, pos, fold)) {
      pos += o.add(pos + n);
      continue;
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (!(cpt == '\r' || cpt == '\n' || (flags & kNumber))) {
      if ((flags & kLetter) || (s.flags(pos + 1) & kLetter)) {
        ++pos;
        while (s.flags(pos) & kLetter) ++pos;
        o.add(pos);
        continue;
      }
    }
    if (flags & kNumber) {  // \p{N}{1,max}
      uint32_t ini = pos;
      while (s.flags(pos) & kNumber) {
        if (++pos - ini >= max_digits) {
          o.add(pos);
          ini = pos;
        }
      }
      o.add(pos);
      continue;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    uint8_t f2 = cpt == ' ' ? s.flags(pos + 1) : flags;
    if (!is_wlnum(f2) && f2) {
      pos += cpt == ' ';
      while (!is_wlnum(f2) && f2) f2 = s.flags(++pos);
      for (uint32_t c = s.cpt(pos); c == '\r' || c == '\n'; c = s.cpt(++pos)) {}
      o.add(pos);
      continue;
    }
    uint32_t nws = 0, last_rn = 0;
    while (s.flags(pos + nws) & kSpace) {
      uint32_t c = s.cpt(pos + nws);
      if (c == '\r' || c == '\n') last_rn = pos + nws + 1;
      ++nws;
    }
    if (last_rn > 0) {  // \s*[\r\n]+
      pos = last_rn;
      o.add(pos);
      continue;
    }
    if (nws > 1 && s.cpt(pos + nws) != kNone) {  // \s+(?!\S)
      pos += nws - 1;
      o.add(pos);
      continue;
    }
    if (nws > 0) {  // \s+
      pos += nws;
      o.add(pos);
      continue;
    }
    o.add(++pos);
  }
}

// Isolates the maximal runs (or, each=true, the single code points) for which pred holds.
template <class Pred>
void split_runs(const Span& s, std::vector<Piece>& out, bool each, Pred pred) {
  Out o{out, s.b};
  uint32_t pos = s.b;
  while (pos < s.e) {
    if (!pred(s.c[pos])) {
      ++pos;
      continue;
    }
    o.add(pos);
    if (each) {
      o.add(++pos);
    } else {
      while (pos < s.e && pred(s.c[pos])) ++pos;
      o.add(pos);
    }
  }
  o.add(s.e);
}

void split_ascii3(const Span& s, std::vector<Piece>& out) {
  Out o{out, s.b};
  uint32_t pos = s.b;
  auto dig = [&](uint32_t p) { return p < s.e && s.c[p] >= '0' && s.c[p] <= '9'; };
  while (pos < s.e) {
    if (dig(pos) && dig(pos + 1) && dig(pos + 2)) {
      o.add(pos);
      pos += 3;
      o.add(pos);
    } else {
      ++pos;
    }
  }
  o.add(s.e);
}

void split_meta(const Span& s, std::vector<Piece>& out) {
  Out o{out, s.b};
  for (uint32_t pos = s.b; pos < s.e; ++pos)
    if (s.c[pos] == 0x2581) o.add(pos);
  o.add(s.e);
}

bool punct_like(uint32_t c) {
  return c == '$' || c == '+' || c == '<' || c == '=' || c == '>' || c == '^' || c == '~' || c == '|' ||
         (cpt_flags(c) & kPunct);
}

void split_one(const Span& s, SplitKind k, std::vector<Piece>& out) {
  switch (k) {
    case SplitKind::Gpt2: return split_gpt2(s, out);
    case SplitKind::Llama3: return split_llama3(s, out, 3, 1);
    case SplitKind::Llama3Fold: return split_llama3(s, out, 3, 2);
    case SplitKind::Qwen2: return split_llama3(s, out, 1, 1);
    case SplitKind::Qwen2Fold: return split_llama3(s, out, 1, 2);
    case SplitKind::DigitEach: return split_runs(s, out, true, [](uint32_t c) { return cpt_flags(c) & kNumber; });
    case SplitKind::DigitRun: return split_runs(s, out, false, [](uint32_t c) { return cpt_flags(c) & kNumber; });
    case SplitKind::Ascii3Digits: return split_ascii3(s, out);
    case SplitKind::PunctRun: return split_runs(s, out, false, punct_like);
    case SplitKind::MetaSplit: return split_meta(s, out);
  }
}

}  // namespace

void pre_split(const std::vector<uint32_t>& cpts, const std::vector<SplitKind>& kinds, std::vector<Piece>& pieces,
               std::vector<Piece>& tmp) {
  pieces.clear();
  if (cpts.empty()) return;
  pieces.emplace_back(0, static_cast<uint32_t>(cpts.size()));
  for (SplitKind k : kinds) {
    tmp.clear();
    for (const Piece& p : pieces) split_one(Span{cpts, p.first, p.second}, k, tmp);
    pieces.swap(tmp);
  }
}

}  // namespace qlora::tok
