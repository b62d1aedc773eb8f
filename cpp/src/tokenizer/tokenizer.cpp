#include "tokenizer/tokenizer.hpp"

#include <algorithm>
#include <cstring>

#include "common/error.hpp"
#include "tokenizer/unicode.hpp"

namespace qlora::tok {

// ---------------------------------------------------------------- GPT-2 byte alphabet
namespace {
struct ByteMap {
  uint32_t to[256];
  int16_t from[324];  // code points used are < 324
  ByteMap() {
    std::fill(std::begin(from), std::end(from), int16_t(-1));
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) {
      bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to[b] = keep ? static_cast<uint32_t>(b) : 256 + n++;
      from[to[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// FNV-1a, finished by a shift-xor; split in steps so that the hashes of all prefixes of a string
// cost one step each (the scored-vocabulary merge search below)
constexpr uint64_t kFnvBasis = 1469598103934665603ull;
uint64_t fnv_step(uint64_t h, unsigned char c) { return (h ^ c) * 1099511628211ull; }
uint64_t fnv_finish(uint64_t h) { return h ^ (h >> 29); }

uint64_t hash_bytes(std::string_view s) {
  uint64_t h = kFnvBasis;
  for (unsigned char c : s) h = fnv_step(h, c);
  return fnv_finish(h);
}

uint64_t hash_pair(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  return k;
}

size_t table_size(size_t n) {
  size_t s = 16;
  while (s < n * 2) s <<= 1;
  return s;
}

void replace_all(std::string& s, const std::string& a, const std::string& b) {
  if (a.empty() || s.find(a) == std::string::npos) return;
  std::string r;
  r.reserve(s.size() + s.size() / 4);
  size_t i = 0;
  for (size_t j; (j = s.find(a, i)) != std::string::npos; i = j + a.size()) r.append(s, i, j - i).append(b);
  r.append(s, i, std::string::npos);
  s.swap(r);
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// "<0xNN>" -> NN, else -1 (tokenizers' ByteFallback test: 6 bytes, hex in either case)
int byte_token_value(std::string_view t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; };
  int h = hex(t[3]), l = hex(t[4]);
  return h < 0 || l < 0 ? -1 : h * 16 + l;
}

// Is the code point ending at s[end) / starting at s[pos] White_Space? Returns its length or 0.
size_t space_before(std::string_view s, size_t end) {
  size_t b = end;
  while (b > 0 && (static_cast<unsigned char>(s[b - 1]) & 0xC0) == 0x80 && end - b < 3) --b;
  if (b == 0) return 0;
  --b;
  std::vector<uint32_t> c, o;
  decode_utf8(s.substr(b, end - b), c, o);
  return c.size() == 1 && (cpt_flags(c[0]) & kSpace) ? end - b : 0;
}
size_t space_at(std::string_view s, size_t pos) {
  size_t l = utf8_seq_len(s, pos);
  if (!l) return 0;
  std::vector<uint32_t> c, o;
  decode_utf8(s.substr(pos, l), c, o);
  return cpt_flags(c[0]) & kSpace ? l : 0;
}
}  // namespace

uint32_t byte_to_cpt(uint8_t b) { return byte_map().to[b]; }
int byte_from_cpt(uint32_t cp) { return cp < 324 ? byte_map().from[cp] : -1; }

// ---------------------------------------------------------------- string index
void Tokenizer::StrIndex::build(const std::vector<std::string>& keys) {
  keys_ = &keys;
  size_t n = table_size(keys.size());
  slots_.assign(n, -1);
  mask_ = n - 1;
  for (size_t i = 0; i < keys.size(); ++i) {
    size_t h = hash_bytes(keys[i]) & mask_;
    while (slots_[h] >= 0 && keys[static_cast<size_t>(slots_[h])] != keys[i]) h = (h + 1) & mask_;
    slots_[h] = static_cast<int32_t>(i);  // a repeated string: the later id replaces the earlier
  }
}

int32_t Tokenizer::StrIndex::find(std::string_view s) const { return find_hashed(s, hash_bytes(s)); }

int32_t Tokenizer::StrIndex::find_hashed(std::string_view s, uint64_t hash) const {
  if (slots_.empty()) return -1;
  size_t h = hash & mask_;
  while (slots_[h] >= 0) {
    if ((*keys_)[static_cast<size_t>(slots_[h])] == s) return slots_[h];
    h = (h + 1) & mask_;
  }
  return -1;
}

// ---------------------------------------------------------------- construction
struct Tokenizer::Scratch {
  std::string norm, buf;
  std::vector<uint32_t> cpts, offs;
  std::vector<Piece> pieces, tmp;
  struct Sym {
    int32_t id, prev, next;
    bool unk;
  };
  std::vector<Sym> syms;
  std::vector<std::pair<uint64_t, int32_t>> heap;  // (rank << 32 | pos, new id)
  std::vector<int32_t> word;
};

Tokenizer::Tokenizer(TokenizerDesc d) : d_(std::move(d)) {
  const size_t n = d_.tokens.size();
  const std::string& src = d_.source;
  if (n == 0) throw FormatError(src + ": the tokenizer has no tokens");
  if (n > static_cast<size_t>(INT32_MAX)) throw FormatError(src + ": too many tokens");
  if (!d_.types.empty() && d_.types.size() != n)
    throw FormatError(src + ": token_type has " + std::to_string(d_.types.size()) + " entries for " + std::to_string(n) + " tokens");
  auto check_id = [&](int32_t id, const char* what) {
    if (id < -1 || id >= static_cast<int32_t>(n))
      throw FormatError(src + ": " + what + " = " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(n) + " tokens");
  };
  check_id(d_.bos_id, "bos_token_id");
  check_id(d_.eos_id, "eos_token_id");
  check_id(d_.pad_id, "pad_token_id");
  check_id(d_.unk_id, "unk_token_id");
  check_id(d_.model_unk_id, "unk_token");
  for (int32_t id : d_.eos_ids) check_id(id, "eos_token_id");
  for (int32_t id : d_.prefix) check_id(id, "post-processor token");
  for (int32_t id : d_.suffix) check_id(id, "post-processor token");
  vocab_.build(d_.tokens);
  const ByteMap& bm = byte_map();

  // merges
  std::vector<std::pair<int32_t, int32_t>> pairs;  // (a, b) in rank order; new id from a + b
  std::vector<int32_t> merged;
  if (d_.spm_merges) {
    if (d_.scores.size() != n)
      throw FormatError(src + ": scores has " + std::to_string(d_.scores.size()) + " entries for " + std::to_string(n) + " tokens");
    struct Cand { float neg; int32_t i; uint32_t k; int32_t a, b; };
    std::vector<Cand> c;
    // Every split of every token is tried. Hashing each prefix and suffix afresh costs len^2 per
    // token (a 1 MB token in a GGUF took hours); instead the prefix hash is extended one byte per
    // step and a half is looked up only if some token has its length.
    std::vector<uint8_t> has_len;
    for (const std::string& s : d_.tokens) {
      if (s.size() >= has_len.size()) has_len.resize(s.size() + 1, 0);
      has_len[s.size()] = 1;
    }
    for (size_t i = 0; i < n; ++i) {
      int32_t t = d_.types.empty() ? kNormal : d_.types[i];
      if (t != kNormal && t != kUserDefined && t != kUnused) continue;
      const std::string& s = d_.tokens[i];
      if (d_.scores[i] != d_.scores[i]) throw FormatError(src + ": scores[" + std::to_string(i) + "] is NaN");
      uint64_t h = kFnvBasis;
      for (size_t k = 1; k < s.size(); ++k) {
        h = fnv_step(h, static_cast<unsigned char>(s[k - 1]));
        if ((static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) continue;  // split at code points only
        if (!has_len[k] || !has_len[s.size() - k]) continue;
        int32_t a = vocab_.find_hashed(std::string_view(s).substr(0, k), fnv_finish(h));
        if (a < 0) continue;
        int32_t b = vocab_.find(std::string_view(s).substr(k));
        if (b >= 0) c.push_back({-d_.scores[i], static_cast<int32_t>(i), static_cast<uint32_t>(k), a, b});
      }
    }
    std::sort(c.begin(), c.end(), [](const Cand& x, const Cand& y) {
      if (x.neg != y.neg) return x.neg < y.neg;
      if (x.i != y.i) return x.i < y.i;
      return x.k < y.k;
    });
    for (const Cand& m : c) {
      pairs.emplace_back(m.a, m.b);
      merged.push_back(vocab_.find(d_.tokens[static_cast<size_t>(m.i)]));
    }
  } else {
    for (size_t r = 0; r < d_.merges.size(); ++r) {
      const auto& [a, b] = d_.merges[r];
      int32_t ia = vocab_.find(a), ib = vocab_.find(b), im = vocab_.find(a + b);
      if (ia < 0 || ib < 0 || im < 0)
        throw FormatError(src + ": merges[" + std::to_string(r) + "] = '" + a + " " + b + "': token '" +
                          (ia < 0 ? a : ib < 0 ? b : a + b) + "' is not in the vocabulary");
      pairs.emplace_back(ia, ib);
      merged.push_back(im);
    }
  }
  size_t ms = table_size(pairs.size());
  mkeys_.assign(ms, ~0ull);
  mvals_.assign(ms, 0);
  mmask_ = ms - 1;
  for (size_t r = 0; r < pairs.size(); ++r) {
    uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(pairs[r].first)) << 32) | static_cast<uint32_t>(pairs[r].second);
    size_t h = hash_pair(key) & mmask_;
    while (mkeys_[h] != ~0ull && mkeys_[h] != key) h = (h + 1) & mmask_;
    mkeys_[h] = key;  // a repeated pair: the later rank wins (tokenizers collects into a map)
    mvals_[h] = (static_cast<uint64_t>(r) << 32) | static_cast<uint32_t>(merged[r]);
  }

  // byte symbols
  for (int b = 0; b < 256; ++b) {
    if (d_.byte_level) {
      std::string ch;
      append_utf8(ch, bm.to[b]);
      byte_id_[b] = vocab_.find(ch);
    } else {
      char name[8];
      snprintf(name, sizeof name, "<0x%02X>", b);
      byte_id_[b] = vocab_.find(name);
    }
  }

  // special flags, pieces
  special_.assign(n, 0);
  for (const AddedToken& a : d_.added) {
    check_id(a.id, "added token id");
    if (a.id < 0) throw FormatError(src + ": added token '" + a.content + "' has no id");
    if (a.content.empty()) throw FormatError(src + ": added token " + std::to_string(a.id) + " is empty");
    if (a.special) special_[static_cast<size_t>(a.id)] = 1;
  }
  pieces_.resize(n);
  std::vector<uint32_t> cp, off;
  for (size_t i = 0; i < n; ++i) {
    const std::string& t = d_.tokens[i];
    std::string& p = pieces_[i];
    if (special_[i]) {  // control tokens: their text as it is
      p = t;
    } else if (d_.byte_level) {
      std::string tmp;
      decode_utf8(sanitize_utf8(t, tmp), cp, off);
      bool ok = true;
      for (uint32_t c : cp) {
        int b = byte_from_cpt(c);
        if (b < 0) { ok = false; break; }
        p.push_back(static_cast<char>(b));
      }
      if (!ok) p = t;  // tokenizers' ByteLevel decoder: such a token stays as it is
    } else {
      int bv = (!d_.types.empty() && d_.types[i] == kByte) || d_.byte_fallback ? byte_token_value(t) : -1;
      if (bv >= 0) {
        p.assign(1, static_cast<char>(bv));
      } else {
        p = t;
        replace_all(p, d_.meta_replacement, " ");
      }
    }
  }
  if (d_.byte_level) {  // raw bytes -> id for ignore_merges (tokens outside the alphabet never match)
    raw_keys_.resize(n);
    // "\xFF\xFE" keeps special tokens from matching raw text (no UTF-8 piece starts with it)
    for (size_t i = 0; i < n; ++i) raw_keys_[i] = special_[i] ? std::string("\xFF\xFE") + d_.tokens[i] : pieces_[i];
    raw_vocab_.build(raw_keys_);
  }

  // added tokens by first byte, longest first (leftmost-longest matching)
  added_by_byte_.assign(256, {});
  for (size_t k = 0; k < d_.added.size(); ++k)
    added_by_byte_[static_cast<unsigned char>(d_.added[k].content[0])].push_back(static_cast<int32_t>(k));
  for (auto& v : added_by_byte_)
    std::stable_sort(v.begin(), v.end(), [&](int32_t x, int32_t y) {
      return d_.added[static_cast<size_t>(x)].content.size() > d_.added[static_cast<size_t>(y)].content.size();
    });
}

int32_t Tokenizer::token_to_id(std::string_view s) const {
  for (const AddedToken& a : d_.added)
    if (a.content == s) return a.id;
  return vocab_.find(s);
}

int64_t Tokenizer::merge_of(int32_t a, int32_t b) const {
  uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  size_t h = hash_pair(key) & mmask_;
  while (mkeys_[h] != ~0ull) {
    if (mkeys_[h] == key) return static_cast<int64_t>(mvals_[h]);
    h = (h + 1) & mmask_;
  }
  return -1;
}

// ---------------------------------------------------------------- encoding
void Tokenizer::encode(std::string_view text, bool add_special, bool parse_special, std::vector<int32_t>& out) const {
  Scratch sc;
  std::string fixed;
  std::string_view s = sanitize_utf8(text, fixed);
  if (add_special) out.insert(out.end(), d_.prefix.begin(), d_.prefix.end());
  size_t seg = 0, pos = 0;
  const size_t n = s.size();
  if (!d_.added.empty()) {
    while (pos < n) {
      const auto& cands = added_by_byte_[static_cast<unsigned char>(s[pos])];
      const AddedToken* hit = nullptr;
      for (int32_t k : cands) {
        const AddedToken& a = d_.added[static_cast<size_t>(k)];
        if ((!a.special || parse_special) && a.content.size() <= n - pos &&
            std::memcmp(s.data() + pos, a.content.data(), a.content.size()) == 0) {
          hit = &a;
          break;
        }
      }
      if (!hit) {
        ++pos;
        continue;
      }
      size_t start = pos, end = pos + hit->content.size();
      if (hit->lstrip)
        while (start > seg) {
          size_t l = space_before(s, start);
          if (!l) break;
          start -= l;
        }
      if (hit->rstrip)
        while (end < n) {
          size_t l = space_at(s, end);
          if (!l) break;
          end += l;
        }
      encode_segment(s.substr(seg, start - seg), seg == 0, sc, out);
      out.push_back(hit->id);
      seg = pos = end;
    }
  }
  encode_segment(s.substr(seg), seg == 0, sc, out);
  if (add_special) out.insert(out.end(), d_.suffix.begin(), d_.suffix.end());
}

void Tokenizer::encode_segment(std::string_view seg, bool at_start, Scratch& sc, std::vector<int32_t>& out) const {
  if (seg.empty()) return;
  std::string& s = sc.norm;
  s.assign(seg.data(), seg.size());
  for (const NormStep& st : d_.normalizer) {
    if (st.kind == NormStep::Prepend) {
      if (!s.empty()) s.insert(0, st.a);
    } else if (st.kind == NormStep::Nfc) {
      nfc(s, sc.buf);
      s.swap(sc.buf);
    } else {
      replace_all(s, st.a, st.b);
    }
  }
  if (d_.metaspace) {
    replace_all(s, " ", d_.meta_replacement);
    bool pre = d_.meta_prepend == MetaPrepend::Always || (d_.meta_prepend == MetaPrepend::First && at_start);
    if (pre && !starts_with(s, d_.meta_replacement)) s.insert(0, d_.meta_replacement);
  }
  if (d_.byte_level_prefix_space && !starts_with(s, " ")) s.insert(0, " ");
  if (s.empty()) return;
  if (d_.splits.empty()) {
    bpe_word(s, sc, out);
    return;
  }
  decode_utf8(s, sc.cpts, sc.offs);
  pre_split(sc.cpts, d_.splits, sc.pieces, sc.tmp);
  for (const Piece& p : sc.pieces)  // bpe_word does not touch sc.norm
    bpe_word(std::string_view(s).substr(sc.offs[p.first], sc.offs[p.second] - sc.offs[p.first]), sc, out);
}

void Tokenizer::bpe_word(std::string_view w, Scratch& sc, std::vector<int32_t>& out) const {
  const bool cacheable = w.size() <= 64;
  if (cacheable) {
    std::lock_guard<std::mutex> lk(cache_mu_);
    auto it = cache_.find(std::string(w));
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  sc.word.clear();
  int32_t whole = d_.ignore_merges ? (d_.byte_level ? raw_vocab_.find(w) : vocab_.find(w)) : -1;
  if (whole >= 0) sc.word.push_back(whole);
  else bpe_merge(w, sc, sc.word);
  out.insert(out.end(), sc.word.begin(), sc.word.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lk(cache_mu_);
    if (cache_.size() >= 100000) cache_.clear();  // bounded: a long-running process keeps ~MBs
    cache_.emplace(std::string(w), sc.word);
  }
}

void Tokenizer::bpe_merge(std::string_view w, Scratch& sc, std::vector<int32_t>& out) const {
  auto& syms = sc.syms;
  syms.clear();
  auto add = [&](int32_t id, bool unk) {
    if (unk && d_.fuse_unk && !syms.empty() && syms.back().unk) return;
    syms.push_back({id, static_cast<int32_t>(syms.size()) - 1, static_cast<int32_t>(syms.size()) + 1, unk});
  };
  auto unknown = [&]() {
    if (d_.model_unk_id >= 0) add(d_.model_unk_id, true);  // no unk token: the character is dropped
  };
  if (d_.byte_level) {
    for (unsigned char b : w) {
      if (byte_id_[b] >= 0) add(byte_id_[b], false);
      else unknown();
    }
  } else {
    for (size_t i = 0; i < w.size();) {
      size_t l = utf8_seq_len(w, i);
      if (!l) l = 1;
      int32_t id = vocab_.find(w.substr(i, l));
      if (id >= 0) {
        add(id, false);
      } else {
        bool all = d_.byte_fallback;
        for (size_t k = 0; all && k < l; ++k) all = byte_id_[static_cast<unsigned char>(w[i + k])] >= 0;
        if (all) for (size_t k = 0; k < l; ++k) add(byte_id_[static_cast<unsigned char>(w[i + k])], false);
        else unknown();
      }
      i += l;
    }
  }
  if (syms.empty()) return;
  syms.back().next = -1;
  auto& heap = sc.heap;
  heap.clear();
  // min-heap on (rank, position): std heap functions build a max-heap, so compare reversed
  auto cmp = [](const std::pair<uint64_t, int32_t>& x, const std::pair<uint64_t, int32_t>& y) { return x.first > y.first; };
  auto push = [&](int32_t pos) {
    int32_t nx = syms[static_cast<size_t>(pos)].next;
    if (nx < 0) return;
    int64_t m = merge_of(syms[static_cast<size_t>(pos)].id, syms[static_cast<size_t>(nx)].id);
    if (m < 0) return;
    heap.emplace_back((static_cast<uint64_t>(m) & 0xFFFFFFFF00000000ull) | static_cast<uint32_t>(pos),
                      static_cast<int32_t>(m & 0xFFFFFFFF));
    std::push_heap(heap.begin(), heap.end(), cmp);
  };
  for (size_t i = 0; i + 1 < syms.size(); ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), cmp);
    auto [key, new_id] = heap.back();
    heap.pop_back();
    int32_t pos = static_cast<int32_t>(key & 0xFFFFFFFF);
    auto& s = syms[static_cast<size_t>(pos)];
    if (s.id < 0 || s.next < 0) continue;  // merged away, or no right neighbour any more
    auto& r = syms[static_cast<size_t>(s.next)];
    int64_t m = merge_of(s.id, r.id);
    if (m < 0 || static_cast<int32_t>(m & 0xFFFFFFFF) != new_id) continue;  // stale (tokenizers' check)
    s.id = new_id;
    s.unk = false;
    r.id = -1;
    s.next = r.next;
    if (s.next >= 0) syms[static_cast<size_t>(s.next)].prev = pos;
    if (s.prev >= 0) push(s.prev);
    push(pos);
  }
  for (int32_t i = 0; i >= 0; i = syms[static_cast<size_t>(i)].next) out.push_back(syms[static_cast<size_t>(i)].id);
}

// ---------------------------------------------------------------- decoding
std::string Tokenizer::decode(const int32_t* ids, size_t n, bool skip_special) const {
  std::vector<std::string> toks;
  toks.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    int32_t id = ids[k];
    check_arg(id >= 0 && id < n_vocab(), "decode: token id " + std::to_string(id) + " at index " + std::to_string(k) +
                                             " is out of range [0, " + std::to_string(n_vocab()) + ")");
    if (skip_special && special_[static_cast<size_t>(id)]) continue;
    toks.push_back(d_.tokens[static_cast<size_t>(id)]);
  }
  std::vector<uint32_t> cp, off;
  for (const DecodeStep& st : d_.decoder) {
    switch (st.kind) {
      case DecodeStep::Replace:
        for (auto& t : toks) replace_all(t, st.a, st.b);
        break;
      case DecodeStep::ByteFallback: {
        std::vector<std::string> o;
        std::string bytes;
        size_t nb = 0;
        auto flush = [&] {
          if (!nb) return;
          std::string tmp;
          if (sanitize_utf8(bytes, tmp).data() == bytes.data()) o.push_back(bytes);
          else for (size_t k = 0; k < nb; ++k) o.emplace_back("\xEF\xBF\xBD");  // one U+FFFD per byte token
          bytes.clear();
          nb = 0;
        };
        for (auto& t : toks) {
          int v = byte_token_value(t);
          if (v >= 0) {
            bytes.push_back(static_cast<char>(v));
            ++nb;
          } else {
            flush();
            o.push_back(std::move(t));
          }
        }
        flush();
        toks.swap(o);
        break;
      }
      case DecodeStep::Fuse: {
        std::string all;
        for (auto& t : toks) all += t;
        toks.assign(1, std::move(all));
        break;
      }
      case DecodeStep::Strip:
        for (auto& t : toks) {
          decode_utf8(t, cp, off);
          uint32_t c0 = 0;
          if (!st.a.empty()) {
            std::vector<uint32_t> a, ao;
            decode_utf8(st.a, a, ao);
            c0 = a[0];
          }
          size_t b = 0, e = cp.size();
          for (int32_t k = 0; k < st.start && b < e && cp[b] == c0; ++k) ++b;
          for (int32_t k = 0; k < st.stop && e > b && cp[e - 1] == c0; ++k) --e;
          t = t.substr(off[b], off[e] - off[b]);
        }
        break;
      case DecodeStep::ByteLevel: {
        std::string bytes;
        for (auto& t : toks) {
          decode_utf8(t, cp, off);
          size_t mark = bytes.size();
          bool ok = true;
          for (uint32_t c : cp) {
            int b = byte_from_cpt(c);
            if (b < 0) { ok = false; break; }
            bytes.push_back(static_cast<char>(b));
          }
          if (!ok) bytes.resize(mark), bytes += t;
        }
        std::string fixed;
        std::string_view v = sanitize_utf8(bytes, fixed);
        toks.assign(1, std::string(v));
        break;
      }
      case DecodeStep::Metaspace:
        for (size_t i = 0; i < toks.size(); ++i) {
          std::string& t = toks[i];
          std::string r;
          for (size_t j = 0; j < t.size();) {
            if (!st.a.empty() && t.compare(j, st.a.size(), st.a) == 0) {
              if (!(i == 0 && st.prepend)) r.push_back(' ');
              j += st.a.size();
            } else {
              r.push_back(t[j++]);
            }
          }
          t.swap(r);
        }
        break;
    }
  }
  std::string text;
  for (size_t i = 0; i < toks.size(); ++i) {
    if (i && d_.join_with_spaces) text += ' ';
    text += toks[i];
  }
  if (d_.clean_up_spaces) {
    static const char* const kPairs[][2] = {{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
                                            {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
    for (auto& p : kPairs) replace_all(text, p[0], p[1]);
  }
  std::string fixed;
  std::string_view v = sanitize_utf8(text, fixed);
  return v.data() == text.data() ? text : std::string(v);
}

}  // namespace qlora::tok
