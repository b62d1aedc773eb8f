// ctest for the C API (cpp/include/qlora/qlora.h): writes a tiny random Llama checkpoint
// (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 97), loads it fp32 and NF4, and checks
//  - model facts, finite and non-degenerate logits;
//  - greedy qlora_generate (KV cache) == repeatedly taking argmax of qlora_model_forward over the
//    growing sequence (no cache): an independent path through the engine;
//  - determinism (greedy and seeded sampling), stop ids, the callback's early stop;
//  - a sharded copy (model.safetensors.index.json) gives bit-identical logits;
//  - error paths return NULL / an error code with a message naming the problem, never crash.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "../examples/tiny_checkpoint.hpp"
#include "check.hpp"
#include "io/safetensors.hpp"
#include "qlora/qlora.h"
#include "qlora/qlora.hpp"

namespace fs = std::filesystem;

namespace {

const int64_t V = 97;

std::vector<float> forward(qlora_model* m, const std::vector<int32_t>& ids) {
  std::vector<float> out(ids.size() * V, NAN);  // [T, V]
  const int rc = qlora_model_forward(m, ids.data(), static_cast<int64_t>(ids.size()), out.data());
  CHECK(rc == QLORA_OK, "forward failed: %s", qlora_last_error());
  return out;
}

std::vector<int32_t> generate(qlora_model* m, const std::vector<int32_t>& prompt, int64_t max_new,
                              const qlora_sampling_params* sp) {
  std::vector<int32_t> out(static_cast<size_t>(max_new), -1);
  int64_t n = -1;
  const int rc = qlora_generate(m, prompt.data(), static_cast<int64_t>(prompt.size()), sp, out.data(), max_new, &n,
                                nullptr, nullptr);
  CHECK(rc == QLORA_OK, "generate failed: %s", qlora_last_error());
  out.resize(static_cast<size_t>(n < 0 ? 0 : n));
  return out;
}

qlora_model* load(const std::string& dir, int quant) {
  qlora_model_params p = qlora_model_default_params();
  p.quantize = quant;
  qlora_model* m = qlora_model_load(dir.c_str(), &p);
  CHECK(m != nullptr, "load %s failed: %s", dir.c_str(), qlora_last_error());
  return m;
}

void test_model(const std::string& dir, int quant) {
  const char* label = quant == QLORA_QUANT_NF4 ? "nf4" : "fp32";
  qlora_model* m = load(dir, quant);
  if (!m) return;
  CHECK(qlora_model_n_vocab(m) == V && qlora_model_n_embd(m) == 64 && qlora_model_n_layer(m) == 2 &&
            qlora_model_n_ctx_train(m) == 256 && qlora_model_bos_token(m) == 1,
        "%s: model facts", label);
  int32_t eos[4] = {-1, -1, -1, -1};
  CHECK(qlora_model_eos_tokens(m, eos, 4) == 1 && eos[0] == 2, "%s: eos ids", label);

  std::mt19937 g(quant * 7 + 3);
  std::uniform_int_distribution<int32_t> tok(0, V - 1);
  std::vector<int32_t> prompt(6);
  for (auto& t : prompt) t = tok(g);

  // Finite, non-degenerate logits.
  const std::vector<float> lg = forward(m, prompt);
  double mean = 0, var = 0;
  bool finite = true;
  for (float x : lg) finite &= std::isfinite(x), mean += x;
  mean /= lg.size();
  for (float x : lg) var += (x - mean) * (x - mean);
  CHECK(finite, "%s: non-finite logits", label);
  CHECK(var / lg.size() > 1e-2, "%s: logits nearly constant (var %g)", label, var / lg.size());

  // Greedy generation (KV cache) == argmax chaining over full forwards (no cache).
  const int64_t n_new = 10;
  const std::vector<int32_t> gen = generate(m, prompt, n_new, nullptr);
  CHECK(static_cast<int64_t>(gen.size()) == n_new, "%s: generated %zu tokens", label, gen.size());
  std::vector<int32_t> seq = prompt;
  for (size_t s = 0; s < gen.size(); ++s) {
    const std::vector<float> f = forward(m, seq);
    const float* row = f.data() + (seq.size() - 1) * V;  // [V] of the last position
    int32_t best = 0;
    for (int32_t v = 1; v < V; ++v)
      if (row[v] > row[best]) best = v;
    // A near-tie (gap below fp32 rounding of the two paths) may go either way.
    const bool ok = gen[s] == best || std::fabs(row[gen[s]] - row[best]) <= 1e-4f * (1.0f + std::fabs(row[best]));
    CHECK(ok, "%s: step %zu generated %d, forward argmax %d (logits %g vs %g)", label, s, gen[s], best, row[gen[s]],
          row[best]);
    seq.push_back(gen[s]);
  }
  CHECK(generate(m, prompt, n_new, nullptr) == gen, "%s: greedy generation not deterministic", label);

  // Seeded sampling is reproducible and stays in range.
  qlora_sampling_params sp = qlora_sampling_default_params();
  sp.temperature = 0.9f;
  sp.top_k = 20;
  sp.top_p = 0.95f;
  sp.seed = 42;
  const std::vector<int32_t> s1 = generate(m, prompt, 12, &sp), s2 = generate(m, prompt, 12, &sp);
  CHECK(s1 == s2 && s1.size() == 12, "%s: seeded sampling not reproducible", label);
  for (int32_t t : s1) CHECK(t >= 0 && t < V, "%s: sampled id %d out of range", label, t);

  // Stop ids: generation ends at (and keeps) the first stop token.
  sp = qlora_sampling_default_params();
  const int32_t stop = gen[3];
  sp.stop_ids = &stop;
  sp.n_stop_ids = 1;
  size_t first = 0;
  while (gen[first] != stop) ++first;
  const std::vector<int32_t> st = generate(m, prompt, n_new, &sp);
  CHECK(st.size() == first + 1 && std::equal(st.begin(), st.end(), gen.begin()), "%s: stop id: got %zu tokens",
        label, st.size());

  // The callback sees every token and can stop early.
  struct Seen {
    std::vector<int32_t> toks;
    size_t stop_after;
  } seen{{}, 4};
  auto cb = [](int32_t t, void* u) -> int {
    auto* s = static_cast<Seen*>(u);
    s->toks.push_back(t);
    return s->toks.size() >= s->stop_after ? 1 : 0;
  };
  std::vector<int32_t> out(n_new, -1);
  int64_t n_out = -1;
  int rc = qlora_generate(m, prompt.data(), 6, nullptr, out.data(), n_new, &n_out, cb, &seen);
  CHECK(rc == QLORA_OK && n_out == 4 && seen.toks.size() == 4 && std::equal(seen.toks.begin(), seen.toks.end(), gen.begin()),
        "%s: callback stop (rc %d, n_out %lld)", label, rc, static_cast<long long>(n_out));

  // Bad calls: error code + message, model still usable afterwards.
  std::vector<int32_t> bad = prompt;
  bad[2] = static_cast<int32_t>(V);
  std::vector<float> buf(bad.size() * V);
  rc = qlora_model_forward(m, bad.data(), static_cast<int64_t>(bad.size()), buf.data());
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "token id 97"), "%s: bad id: %d %s", label,
        rc, qlora_last_error());
  bad[2] = -5;
  rc = qlora_generate(m, bad.data(), static_cast<int64_t>(bad.size()), nullptr, out.data(), n_new, &n_out, nullptr,
                      nullptr);
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && n_out == 0 && contains(qlora_last_error(), "out of range"),
        "%s: bad prompt id: %d %s", label, rc, qlora_last_error());
  rc = qlora_model_forward(m, prompt.data(), 0, buf.data());
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "n_tokens"), "%s: empty forward", label);
  rc = qlora_model_forward(m, nullptr, 3, buf.data());
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT, "%s: NULL ids", label);
  sp = qlora_sampling_default_params();
  sp.top_p = 2.0f;
  rc = qlora_generate(m, prompt.data(), 6, &sp, out.data(), n_new, &n_out, nullptr, nullptr);
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "top_p"), "%s: top_p: %s", label,
        qlora_last_error());
  rc = qlora_generate(m, prompt.data(), 6, nullptr, out.data(), -1, &n_out, nullptr, nullptr);
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT, "%s: negative max_new_tokens", label);
  rc = qlora_generate(m, prompt.data(), 6, nullptr, out.data(), 0, &n_out, nullptr, nullptr);
  CHECK(rc == QLORA_OK && n_out == 0, "%s: max_new_tokens 0", label);
  CHECK(qlora_last_error()[0] == '\0', "%s: error not cleared after success", label);
  CHECK(forward(m, prompt) == lg, "%s: logits changed after failed calls", label);
  qlora_model_free(m);
}

// Copies the checkpoint into two shards plus model.safetensors.index.json.
void write_sharded(const std::string& src, const std::string& dst) {
  fs::create_directories(dst);
  fs::copy_file(fs::path(src) / "config.json", fs::path(dst) / "config.json", fs::copy_options::overwrite_existing);
  auto f = qlora::io::SafetensorsFile::open((fs::path(src) / "model.safetensors").string());
  std::vector<qlora::io::TensorToWrite> a, b;
  qlora::json::Value wm = qlora::json::Value::object();
  size_t i = 0;
  for (const auto& t : f->tensors()) {
    const bool first = i++ % 2 == 0;
    (first ? a : b).push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});
    wm.set(t.name, first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors");
  }
  qlora::io::write_safetensors((fs::path(dst) / "model-00001-of-00002.safetensors").string(), a);
  qlora::io::write_safetensors((fs::path(dst) / "model-00002-of-00002.safetensors").string(), b);
  qlora::json::Value idx = qlora::json::Value::object();
  idx.set("metadata", qlora::json::Value::object());
  idx.set("weight_map", wm);
  tiny::write_text((fs::path(dst) / "model.safetensors.index.json").string(), qlora::json::dump(idx));
}

void expect_load_error(const std::string& dir, const char* needle, const char* what, int quant = QLORA_QUANT_NONE) {
  qlora_model_params p = qlora_model_default_params();
  p.quantize = quant;
  qlora_model* m = qlora_model_load(dir.c_str(), &p);
  CHECK(m == nullptr && contains(qlora_last_error(), needle), "%s: expected NULL and '%s', got '%s'", what, needle,
        qlora_last_error());
  qlora_model_free(m);
}

void write_file(const fs::path& p, const std::string& text) { tiny::write_text(p.string(), text); }

void test_errors(const fs::path& root, const std::string& good) {
  CHECK(qlora_model_load(nullptr, nullptr) == nullptr && contains(qlora_last_error(), "NULL") &&
            qlora_last_status() == QLORA_ERR_INVALID_ARGUMENT,
        "NULL path");
  expect_load_error((root / "no_such_dir").string(), "no_such_dir", "missing dir");

  const fs::path bad = root / "bad";
  fs::create_directories(bad);
  fs::copy_file(fs::path(good) / "model.safetensors", bad / "model.safetensors");
  write_file(bad / "config.json", "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 6");
  expect_load_error(bad.string(), "not valid JSON", "truncated config");
  CHECK(qlora_last_status() == QLORA_ERR_FORMAT, "corrupt config status %d", qlora_last_status());
  write_file(bad / "config.json", "[1, 2]");
  expect_load_error(bad.string(), "JSON object", "config not an object");

  // Field rules mirror python/qlora_native/config.py.
  std::ifstream in(fs::path(good) / "config.json");
  const std::string cfg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto with = [&](const std::string& from, const std::string& to) {
    std::string c = cfg;
    const size_t at = c.find(from);
    CHECK(at != std::string::npos, "config lacks %s", from.c_str());
    if (at != std::string::npos) c.replace(at, from.size(), to);
    write_file(bad / "config.json", c);
  };
  with("\"hidden_size\": 64", "\"hidden_size\": 64.0");
  expect_load_error(bad.string(), "hidden_size must be an integer >= 1", "float hidden_size");
  with("\"LlamaForCausalLM\"", "\"GPT2LMHeadModel\"");
  expect_load_error(bad.string(), "unsupported architecture 'GPT2LMHeadModel'", "architecture");
  with("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
  expect_load_error(bad.string(), "num_key_value_heads (3) must divide", "kv heads");
  with("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"");
  expect_load_error(bad.string(), "hidden_act 'gelu' is not supported", "hidden_act");
  with("\"rope_theta\": 10000.0", "\"rope_theta\": -1");
  expect_load_error(bad.string(), "rope_theta must be a positive number", "rope_theta");
  with("\"rope_theta\": 10000.0", "\"rope_theta\": 10000.0, \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 2}");
  expect_load_error(bad.string(), "unsupported rope_scaling type 'yarn'", "rope yarn");
  with("\"vocab_size\": 97", "\"vocab_size\": 98");
  expect_load_error(bad.string(), "has shape [97, 64], expected [98, 64]", "shape mismatch");
  with("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
  expect_load_error(bad.string(), "missing tensor(s) in checkpoint: model.layers.2.", "missing tensors");
  with("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1");
  expect_load_error(bad.string(), "unexpected tensor(s) in checkpoint: ", "extra tensors");
  with("\"model_type\": \"llama\"", "\"model_type\": \"llama\", \"quantization_config\": {\"quant_method\": \"gptq\"}");
  expect_load_error(bad.string(), "quant_method 'gptq'", "gptq");

  // Options.
  write_file(bad / "config.json", cfg);
  qlora_model_params p = qlora_model_default_params();
  p.quantize = 7;
  CHECK(qlora_model_load(bad.c_str(), &p) == nullptr && contains(qlora_last_error(), "quantize"), "quantize 7");
  p = qlora_model_default_params();
  p.blocksize = 48;
  CHECK(qlora_model_load(bad.c_str(), &p) == nullptr && qlora_last_error()[0], "blocksize 48");
  p = qlora_model_default_params();
  p.backend = "tpu";
  CHECK(qlora_model_load(bad.c_str(), &p) == nullptr && qlora_last_error()[0], "backend tpu");

  // A truncated safetensors file.
  {
    const auto size = fs::file_size(bad / "model.safetensors");
    fs::resize_file(bad / "model.safetensors", size - 16);
    expect_load_error(bad.string(), "model.safetensors", "truncated safetensors");
  }
  // No weights at all.
  fs::remove(bad / "model.safetensors");
  expect_load_error(bad.string(), "no model.safetensors", "no weights");

  // The message is per thread: another thread sees none.
  std::string other = "unset";
  std::thread([&] { other = qlora_last_error(); }).join();
  CHECK(other.empty() && qlora_last_error()[0], "error message not thread-local");

  qlora_model_free(nullptr);  // ignored
  CHECK(qlora_model_n_vocab(nullptr) == -1, "NULL model facts");
  CHECK(qlora_model_forward(nullptr, nullptr, 1, nullptr) == QLORA_ERR_INVALID_ARGUMENT, "NULL model forward");
}

// The CUDA backend through the C API: the logits of the CPU backend to fp32 rounding (both
// accumulate plain fp32 FMAs; bound 16*sqrt(K)*eps32 relative to the largest logit, K = 96) and
// the same greedy tokens. Skipped where no GPU (or no CUDA build) is available.
void test_cuda(const std::string& dir) {
  qlora_model_params p = qlora_model_default_params();
  p.backend = "cuda";
  qlora_model* g = qlora_model_load(dir.c_str(), &p);
  if (!g) {
    CHECK(contains(qlora_last_error(), "unavailable"), "cuda load failed: %s", qlora_last_error());
    std::printf("test_capi: CUDA part skipped (%s)\n", qlora_last_error());
    return;
  }
  qlora_model* c = load(dir, QLORA_QUANT_NF4);
  const std::vector<int32_t> ids = {1, 50, 3, 96, 0, 7, 7, 12};
  const std::vector<float> lg = forward(g, ids), lc = forward(c, ids);
  float max_ref = 0, max_err = 0;
  for (size_t i = 0; i < lc.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(lc[i]));
    max_err = std::max(max_err, std::fabs(lg[i] - lc[i]));
  }
  const float tol = 16.0f * std::sqrt(96.0f) * 1.1920929e-7f;
  CHECK(max_err <= tol * max_ref, "cuda vs cpu logits: max err %g, max |logit| %g", max_err, max_ref);
  CHECK(generate(g, ids, 8, nullptr) == generate(c, ids, 8, nullptr), "cuda vs cpu greedy tokens differ");
  qlora_model_free(g);
  qlora_model_free(c);
}

}  // namespace

int main() {
  const fs::path root = fs::temp_directory_path() / ("qlora_test_capi_" + std::to_string(getpid()));
  const std::string dir = (root / "tiny").string();
  try {
    tiny::write_checkpoint(dir);
    test_model(dir, QLORA_QUANT_NONE);
    test_model(dir, QLORA_QUANT_NF4);

    // Sharded copy: bit-identical logits.
    const std::string sharded = (root / "sharded").string();
    write_sharded(dir, sharded);
    qlora_model* a = load(dir, QLORA_QUANT_NF4);
    qlora_model* b = load(sharded, QLORA_QUANT_NF4);
    if (a && b) {
      const std::vector<int32_t> ids = {1, 50, 3, 96, 0};
      CHECK(forward(a, ids) == forward(b, ids), "sharded checkpoint gives different logits");
    }
    qlora_model_free(a);
    qlora_model_free(b);
    test_errors(root, dir);
    test_cuda(dir);

    // The C++ wrapper: same tokens as the C calls, errors as exceptions.
    auto w = qlora::api::Model::load(dir);
    const std::vector<int32_t> p = {1, 50, 3};
    qlora_model* c = load(dir, QLORA_QUANT_NF4);
    std::vector<int32_t> seen;
    const std::vector<int32_t> wt = w.generate(p, 6, qlora_sampling_default_params(), [&](int32_t t) {
      seen.push_back(t);
      return seen.size() < 4;
    });
    CHECK(wt.size() == 4 && seen == wt && c && wt == std::vector<int32_t>(generate(c, p, 4, nullptr)),
          "C++ wrapper generate");
    CHECK(w.eos_tokens() == std::vector<int32_t>{2} && w.n_vocab() == V, "C++ wrapper facts");
    bool threw = false;
    try {
      w.forward({1, 200});
    } catch (const qlora::api::Error& e) {
      threw = e.code == QLORA_ERR_INVALID_ARGUMENT && contains(e.what(), "token id 200");
    }
    CHECK(threw, "C++ wrapper error");
    try {
      qlora::api::Model::load((root / "nope").string());
      CHECK(false, "C++ wrapper loaded a missing dir");
    } catch (const qlora::api::Error& e) {
      CHECK(contains(e.what(), "nope") && e.code == QLORA_ERR_IO, "C++ wrapper load error: %d %s", e.code, e.what());
    }
    qlora_model_free(c);
  } catch (const std::exception& e) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: exception %s\n", e.what());
  }
  std::error_code ec;
  fs::remove_all(root, ec);
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_capi: all checks passed\n");
  return 0;
}
