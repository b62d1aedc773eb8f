// ctest for LoRA training through the C API (qlora_adapter_add / qlora_train_configure /
// qlora_train_step) on the tiny random checkpoint: the first loss equals the cross-entropy
// recomputed from qlora_model_forward logits, ~30 steps on one batch drive the loss below half,
// generation changes, and bad calls fail with INVALID_ARGUMENT and a message; forward, generate and
// train_step refuse more positions than max_position_embeddings.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "../examples/tiny_checkpoint.hpp"
#include "check.hpp"
#include "io/safetensors.hpp"
#include "json/json.hpp"
#include "qlora/qlora.h"

namespace fs = std::filesystem;

namespace {

const int64_t V = 97, B = 2, T = 16;

std::vector<int32_t> greedy(qlora_model* m, const std::vector<int32_t>& prompt, int64_t n) {
  std::vector<int32_t> out(static_cast<size_t>(n), -1);
  int64_t got = 0;
  const int rc = qlora_generate(m, prompt.data(), static_cast<int64_t>(prompt.size()), nullptr, out.data(), n, &got,
                                nullptr, nullptr);
  CHECK(rc == QLORA_OK, "generate: %s", qlora_last_error());
  out.resize(static_cast<size_t>(got));
  return out;
}

// Mean CE (float64) of labels[b, t+1] given ids[b, 0..t], from the C forward's logits.
double reference_loss(qlora_model* m, const std::vector<int32_t>& ids, const std::vector<int32_t>& labels) {
  double sum = 0.0;
  int64_t n = 0;
  std::vector<float> lg(static_cast<size_t>(T * V));  // [T, V] of one row
  for (int64_t b = 0; b < B; ++b) {
    CHECK(qlora_model_forward(m, ids.data() + b * T, T, lg.data()) == QLORA_OK, "forward: %s", qlora_last_error());
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int32_t y = labels[b * T + t + 1];
      if (y == -100) continue;
      const float* row = lg.data() + t * V;
      double mx = row[0], se = 0.0;
      for (int64_t v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(row[v]));
      for (int64_t v = 0; v < V; ++v) se += std::exp(row[v] - mx);
      sum += mx + std::log(se) - row[y];
      ++n;
    }
  }
  return sum / n;
}

void test_train(const std::string& dir, const std::string& save_dir) {
  qlora_model* m = qlora_model_load(dir.c_str(), nullptr);  // NF4 default
  CHECK(m != nullptr, "load: %s", qlora_last_error());
  if (!m) return;
  std::mt19937 g(7);
  std::vector<int32_t> ids(static_cast<size_t>(B * T));  // [B, T]
  for (auto& v : ids) v = static_cast<int32_t>(3 + g() % (V - 3));
  std::vector<int32_t> labels = ids;  // [B, T], transformers convention (shift inside)
  labels[0] = labels[T] = -100;       // ignored anyway (no predecessor); the first targets stay
  labels[3] = -100;                    // one ignored target
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + 4);
  const std::vector<int32_t> base_gen = greedy(m, prompt, 10);
  std::vector<float> base_lg(static_cast<size_t>(T * V)), lg(static_cast<size_t>(T * V));
  CHECK(qlora_model_forward(m, ids.data(), T, base_lg.data()) == QLORA_OK, "forward");

  float loss = 0.0f;
  // Errors before an adapter / with a bad spec.
  int rc = qlora_train_step(m, ids.data(), labels.data(), B, T, 1e-3f, 0.0f, &loss);
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "adapter"), "no adapter: %d %s", rc,
        qlora_last_error());
  CHECK(qlora_train_configure(m, 1e-3f, 0.0f) == QLORA_ERR_INVALID_ARGUMENT, "configure without adapter");
  qlora_lora_params p = qlora_lora_default_params();
  CHECK(p.r == 16 && p.alpha == 32.0f && p.dropout == 0.0f && p.use_rslora == 0 && p.target_mask == QLORA_LORA_ALL,
        "defaults");
  p.target_mask = 1u << 7;
  rc = qlora_adapter_add(m, "x", &p);
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "target mask"), "bad mask: %d %s", rc,
        qlora_last_error());
  p = qlora_lora_default_params();
  p.r = 0;
  CHECK(qlora_adapter_add(m, "x", &p) == QLORA_ERR_INVALID_ARGUMENT, "r = 0 accepted");
  CHECK(qlora_adapter_add(m, nullptr, nullptr) == QLORA_ERR_INVALID_ARGUMENT, "NULL name accepted");

  p = qlora_lora_default_params();
  p.r = 8, p.seed = 11;
  CHECK(qlora_adapter_add(m, "ft", &p) == QLORA_OK, "adapter_add: %s", qlora_last_error());
  CHECK(qlora_adapter_add(m, "ft", &p) == QLORA_ERR_INVALID_ARGUMENT, "duplicate name accepted");
  // B = 0 at init: the adapted model equals the base.
  CHECK(qlora_model_forward(m, ids.data(), T, lg.data()) == QLORA_OK && lg == base_lg, "fresh adapter changed logits");
  rc = qlora_train_step(m, ids.data(), labels.data(), B, T, 1e-3f, 0.0f, &loss);
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "configure"), "before configure: %d %s", rc,
        qlora_last_error());
  CHECK(qlora_train_configure(m, 2e-2f, 0.01f) == QLORA_OK, "configure: %s", qlora_last_error());
  CHECK(qlora_train_configure(m, NAN, 0.0f) == QLORA_ERR_INVALID_ARGUMENT, "NaN lr accepted");

  std::vector<int32_t> bad = labels;
  bad[5] = static_cast<int32_t>(V);
  rc = qlora_train_step(m, ids.data(), bad.data(), B, T, -1.0f, 1.0f, &loss);
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "label 97"), "bad label: %d %s", rc,
        qlora_last_error());
  bad = ids;
  bad[2] = -1;
  rc = qlora_train_step(m, bad.data(), labels.data(), B, T, -1.0f, 1.0f, &loss);
  CHECK(rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "token id -1"), "bad id: %d %s", rc,
        qlora_last_error());
  std::vector<int32_t> none(labels.size(), -100);
  CHECK(qlora_train_step(m, ids.data(), none.data(), B, T, -1.0f, 1.0f, &loss) == QLORA_ERR_INVALID_ARGUMENT,
        "all-ignored labels accepted");
  CHECK(qlora_train_step(m, ids.data(), labels.data(), B, 1, -1.0f, 1.0f, &loss) == QLORA_ERR_INVALID_ARGUMENT,
        "seq 1 accepted");
  // Failed calls changed nothing.
  CHECK(qlora_model_forward(m, ids.data(), T, lg.data()) == QLORA_OK && lg == base_lg, "failed steps changed logits");

  const double ref = reference_loss(m, ids, labels);
  std::vector<float> losses;
  for (int s = 0; s < 30; ++s) {
    rc = qlora_train_step(m, ids.data(), labels.data(), B, T, -1.0f, 1.0f, &loss);
    CHECK(rc == QLORA_OK && std::isfinite(loss), "step %d: %d %s", s, rc, qlora_last_error());
    losses.push_back(loss);
  }
  // Same weights and math, fp32 sums over ~30 terms of size ~5: a few ulps of the total.
  CHECK(std::fabs(losses[0] - ref) <= 1e-4 * ref, "first loss %.7g vs forward-logits CE %.7g", losses[0], ref);
  CHECK(losses.back() < 0.5f * losses[0], "loss %.4g -> %.4g did not halve", losses[0], losses.back());
  std::printf("train: loss %.4f -> %.4f over 30 steps\n", losses[0], losses.back());
  CHECK(greedy(m, prompt, 10) != base_gen, "generation unchanged by training");
  CHECK(qlora_model_forward(m, ids.data(), T, lg.data()) == QLORA_OK && lg != base_lg, "logits unchanged");

  // Save: PEFT names and shapes, trained (nonzero) B, config fields.
  CHECK(qlora_adapter_save(m, nullptr) == QLORA_ERR_INVALID_ARGUMENT, "NULL dir accepted");
  CHECK(qlora_adapter_save(m, save_dir.c_str()) == QLORA_OK, "save: %s", qlora_last_error());
  auto st = qlora::io::SafetensorsFile::open(save_dir + "/adapter_model.safetensors");
  CHECK(st->tensors().size() == 2 * 2 * 7, "saved %zu tensors", st->tensors().size());
  const auto& qa = st->at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  const auto& db = st->at("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
  CHECK(qa.shape == (std::vector<int64_t>{8, 64}) && db.shape == (std::vector<int64_t>{64, 8}), "saved shapes");
  CHECK(st->at("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").shape == (std::vector<int64_t>{8, 96}),
        "down_proj A shape");
  bool nonzero = false;
  for (int64_t i = 0; i < db.numel(); ++i) nonzero |= reinterpret_cast<const float*>(db.data)[i] != 0.0f;
  CHECK(nonzero, "saved B is all zero after training");
  std::ifstream f(save_dir + "/adapter_config.json");
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto cfg = qlora::json::parse(text);
  CHECK(cfg.at("peft_type").as_string() == "LORA" && cfg.at("r").as_int() == 8 &&
            cfg.at("target_modules").as_array().size() == 7,
        "adapter_config.json: %s", text.c_str());
  qlora_model_free(m);
}

// The model-level calls refuse more positions than max_position_embeddings (Python's default, the
// contexts' default n_ctx) with INVALID_ARGUMENT naming the call and both numbers; exactly the limit
// runs; a context with a larger n_ctx still runs past it.
void test_positions(const std::string& dir) {
  qlora_model_params p = qlora_model_default_params();
  p.quantize = QLORA_QUANT_NONE;
  qlora_model* m = qlora_model_load(dir.c_str(), &p);
  CHECK(m != nullptr, "load: %s", qlora_last_error());
  if (!m) return;
  const int64_t n = qlora_model_n_ctx_train(m);
  CHECK(n == 256, "max_position_embeddings %lld", static_cast<long long>(n));
  std::mt19937 g(11);
  std::vector<int32_t> ids(static_cast<size_t>(n + 1));  // [n + 1]
  for (auto& v : ids) v = static_cast<int32_t>(3 + g() % (V - 3));
  std::vector<float> lg(static_cast<size_t>((n + 1) * V));
  auto refused = [](int rc, const char* call, const std::string& what) {
    const std::string want = std::string(call) + ": " + what + " exceeds the model's max_position_embeddings 256";
    return rc == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), want.c_str());
  };
  CHECK(refused(qlora_model_forward(m, ids.data(), n + 1, lg.data()), "qlora_model_forward", "n_tokens 257"),
        "forward n + 1: %s", qlora_last_error());
  CHECK(qlora_model_forward(m, ids.data(), n, lg.data()) == QLORA_OK, "forward n: %s", qlora_last_error());

  std::vector<int32_t> out(8, -1);
  int64_t got = -1;
  CHECK(refused(qlora_generate(m, ids.data(), n - 4, nullptr, out.data(), 5, &got, nullptr, nullptr), "qlora_generate",
                "prompt (252) + max_new_tokens (5)") &&
            got == 0,
        "generate n + 1: %s", qlora_last_error());
  CHECK(refused(qlora_generate(m, ids.data(), n + 1, nullptr, out.data(), 0, &got, nullptr, nullptr), "qlora_generate",
                "prompt (257) + max_new_tokens (0)"),
        "generate prompt n + 1: %s", qlora_last_error());
  CHECK(qlora_generate(m, ids.data(), n - 4, nullptr, out.data(), 4, &got, nullptr, nullptr) == QLORA_OK && got == 4,
        "generate n: %s", qlora_last_error());

  CHECK(qlora_adapter_add(m, "a", nullptr) == QLORA_OK && qlora_train_configure(m, 1e-3f, 0.0f) == QLORA_OK,
        "adapter: %s", qlora_last_error());
  std::vector<int32_t> labels = ids;
  float loss = NAN;
  CHECK(refused(qlora_train_step(m, ids.data(), labels.data(), 1, n + 1, -1.0f, 1.0f, &loss), "qlora_train_step",
                "seq 257") &&
            std::isnan(loss),
        "train n + 1: %s", qlora_last_error());
  CHECK(qlora_train_step(m, ids.data(), labels.data(), 1, n, -1.0f, 1.0f, &loss) == QLORA_OK && std::isfinite(loss),
        "train n: %s", qlora_last_error());

  qlora_context_params cp = qlora_context_default_params();
  cp.n_ctx = n + 1;  // a context past max_position_embeddings: the way to run longer sequences
  qlora_context* c = qlora_context_new(m, cp);
  CHECK(c != nullptr && qlora_context_forward(c, ids.data(), n + 1, lg.data()) == QLORA_OK, "context n + 1: %s",
        qlora_last_error());
  qlora_context_free(c);
  qlora_model_free(m);
}

}  // namespace

int main() {
  const fs::path root = fs::temp_directory_path() / ("qlora_test_capi_train_" + std::to_string(getpid()));
  try {
    tiny::write_checkpoint((root / "tiny").string());
    test_train((root / "tiny").string(), (root / "adapter").string());
    test_positions((root / "tiny").string());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: exception %s\n", e.what());
    ++g_failures;
  }
  std::error_code ec;
  fs::remove_all(root, ec);
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  else std::printf("test_capi_train: OK\n");
  return g_failures ? 1 : 0;
}
