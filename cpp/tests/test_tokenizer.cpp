// ctest: the tokenizer C API on a small byte-level BPE tokenizer.json written here (GPT-2 byte
// alphabet, a few merges, one special token, BOS from tokenizer_config.json): ids, llama.h's
// negative-size convention, detokenize, pieces, parse_special off, invalid UTF-8, errors.
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "check.hpp"
#include "json/json.hpp"
#include "qlora/qlora.h"
#include "tokenizer/tokenizer.hpp"
#include "tokenizer/unicode.hpp"

namespace {
std::string byte_char(int b) {
  std::string s;
  qlora::tok::append_utf8(s, qlora::tok::byte_to_cpt(static_cast<uint8_t>(b)));
  return s;
}

void write(const std::string& path, const std::string& data) {
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(data.data(), 1, data.size(), f);
  std::fclose(f);
}

std::vector<int32_t> tokenize(qlora_tokenizer* t, const std::string& s, int add_special, int parse_special) {
  int32_t n = qlora_tokenize(t, s.data(), static_cast<int32_t>(s.size()), nullptr, 0, add_special, parse_special);
  if (n == 0) return {};
  CHECK(n < 0 && n != INT32_MIN, "size query %d (%s)", n, qlora_last_error());
  std::vector<int32_t> ids(static_cast<size_t>(-n));
  CHECK(qlora_tokenize(t, s.data(), static_cast<int32_t>(s.size()), ids.data(), -n, add_special, parse_special) == -n,
        "tokenize");
  return ids;
}

std::string detok(qlora_tokenizer* t, const std::vector<int32_t>& ids, int skip) {
  int32_t n = qlora_detokenize(t, ids.data(), static_cast<int32_t>(ids.size()), nullptr, 0, skip);
  if (n == 0) return "";
  std::string s(static_cast<size_t>(-n), '\0');
  CHECK(qlora_detokenize(t, ids.data(), static_cast<int32_t>(ids.size()), &s[0], -n, skip) == -n, "detokenize");
  return s;
}
}  // namespace

int main() {
  using qlora::json::Value;
  char tmpl[] = "/tmp/qlora_tok_XXXXXX";
  std::string dir = mkdtemp(tmpl);
  // vocab: the 256 byte characters (id = byte), then merges
  Value vocab = Value::object();
  for (int b = 0; b < 256; ++b) vocab.set(byte_char(b), b);
  const char* merged[][2] = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\xC4\xA0", "w"}};  // Ġ w
  Value merges = Value::array();
  int next = 256;
  for (auto& m : merged) {
    vocab.set(std::string(m[0]) + m[1], next++);
    merges.push_back(std::string(m[0]) + " " + m[1]);
  }
  Value model = Value::object();
  model.set("type", "BPE");
  model.set("vocab", vocab);
  model.set("merges", merges);
  Value pre = Value::object();
  pre.set("type", "ByteLevel");
  pre.set("add_prefix_space", false);
  pre.set("use_regex", true);
  Value dec = Value::object();
  dec.set("type", "ByteLevel");
  Value added = Value::array();
  for (auto [id, s] : {std::pair<int, const char*>{300, "<|bos|>"}, {301, "<|eot|>"}}) {
    Value a = Value::object();
    a.set("id", id);
    a.set("content", s);
    a.set("special", true);
    added.push_back(a);
  }
  Value tj = Value::object();
  tj.set("added_tokens", added);
  tj.set("normalizer", nullptr);
  tj.set("pre_tokenizer", pre);
  tj.set("post_processor", nullptr);
  tj.set("decoder", dec);
  tj.set("model", model);
  write(dir + "/tokenizer.json", qlora::json::dump(tj));
  write(dir + "/tokenizer_config.json", R"({"bos_token": "<|bos|>", "eos_token": "<|eot|>", "add_bos_token": true})");

  qlora_tokenizer* t = qlora_tokenizer_load(dir.c_str());
  CHECK(t != nullptr, "load: %s", qlora_last_error());
  if (!t) return 1;
  CHECK(qlora_tokenizer_n_vocab(t) == 302, "n_vocab %d", qlora_tokenizer_n_vocab(t));
  CHECK(qlora_token_bos(t) == 300 && qlora_token_eos(t) == 301 && qlora_token_pad(t) == -1, "special ids");
  auto ids = tokenize(t, "hello world<|eot|>", 1, 1);
  // <|bos|> hello Ġw o r l d <|eot|>
  std::vector<int32_t> want = {300, 259, 260, 'o', 'r', 'l', 'd', 301};
  CHECK(ids == want, "ids (%zu)", ids.size());
  CHECK(detok(t, ids, 0) == "<|bos|>hello world<|eot|>", "detokenize '%s'", detok(t, ids, 0).c_str());
  CHECK(detok(t, ids, 1) == "hello world", "detokenize skip");
  int32_t small[2];
  CHECK(qlora_tokenize(t, "hello world", -1, small, 2, 1, 1) == -7, "negative size");
  auto plain = tokenize(t, "<|eot|>", 0, 0);
  CHECK(plain.size() > 1 && detok(t, plain, 0) == "<|eot|>", "parse_special=0 keeps the text");
  char piece[8];
  CHECK(qlora_token_to_piece(t, 260, piece, sizeof piece) == 2 && std::string(piece, 2) == " w", "piece Ġw");
  CHECK(qlora_token_to_piece(t, 260, piece, 1) == -2, "piece too small");
  auto bad = tokenize(t, std::string("a\xFF" "b"), 0, 1);
  CHECK(detok(t, bad, 0) == "a\xEF\xBF\xBD" "b", "invalid UTF-8 read as U+FFFD");
  int32_t bad_id = 302;
  CHECK(qlora_detokenize(t, &bad_id, 1, nullptr, 0, 0) == INT32_MIN && contains(qlora_last_error(), "out of range"),
        "bad id");
  CHECK(qlora_last_status() == QLORA_ERR_INVALID_ARGUMENT, "status");
  qlora_tokenizer_free(t);

  CHECK(qlora_tokenizer_load((dir + "/nope.gguf").c_str()) == nullptr && qlora_last_status() == QLORA_ERR_IO, "missing");
  write(dir + "/tokenizer.json", "{\"model\": {\"type\": \"Unigram\"}}");
  CHECK(qlora_tokenizer_load(dir.c_str()) == nullptr && qlora_last_status() == QLORA_ERR_INVALID_ARGUMENT &&
            contains(qlora_last_error(), "Unigram"),
        "unsupported model: %s", qlora_last_error());
  write(dir + "/tokenizer.json", "{\"model\": ");
  CHECK(qlora_tokenizer_load(dir.c_str()) == nullptr && qlora_last_status() == QLORA_ERR_FORMAT, "corrupt json");
  unlink((dir + "/tokenizer.json").c_str());
  unlink((dir + "/tokenizer_config.json").c_str());
  rmdir(dir.c_str());
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  else std::printf("test_tokenizer: ok\n");
  return g_failures ? 1 : 0;
}
