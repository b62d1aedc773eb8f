// ctest for the C API's contexts and loaded adapters (qlora.h "Contexts and loaded adapters") on
// the tiny random checkpoint with PEFT adapter directories written here:
//  - two contexts on one model with different adapters generate from two threads at the same
//    time, each call giving exactly its single-thread tokens and logits;
//  - set_adapters replacing the set mid-way (from the running call's callback, or from another
//    thread in a loop) changes only later calls, never a call already running;
//  - an adapter freed while a context uses it keeps working in that context; freed / foreign /
//    NULL handles, n < 0, NaN / Inf scales give errors; scale 0 = base; two adapters combine;
//  - loading refuses an adapter for another base (module and both shapes named), NaN / Inf, a
//    regex target, DoRA, missing files;
//  - the training calls keep working with contexts open, and a context outliving its model fails
//    cleanly.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "../examples/tiny_checkpoint.hpp"
#include "check.hpp"
#include "io/safetensors.hpp"
#include "json/json.hpp"
#include "qlora/qlora.h"
#include "qlora/qlora.hpp"

namespace fs = std::filesystem;

namespace {

const int64_t V = 97, D = 64, INTER = 96, L = 2, KV = 32;  // tiny::Spec: 4 heads of 16, 2 KV heads
const char* const kProj[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
const int64_t kOut[7] = {D, KV, KV, D, INTER, INTER, D}, kIn[7] = {D, D, D, D, D, D, INTER};

struct AdapterSpec {
  int64_t r = 4;
  double alpha = 8;
  bool rslora = false;
  uint32_t mask = 0x7F;
  uint32_t seed = 1;
  float b_scale = 0.5f;           // B ~ U(+-b_scale): a visible effect on the logits
  std::string config_extra;        // raw JSON members appended to adapter_config.json
  int64_t cfg_r = -1;              // >= 0: the config's r (else r)
  int64_t out_delta = 0;           // > 0: q_proj B rows for another base (out + delta)
  bool nan = false;                // a NaN in layer 1 down_proj lora_B
  qlora::json::Value targets;      // overrides target_modules when not null
};

// Writes a PEFT directory: adapter_config.json + adapter_model.safetensors (F32).
void write_adapter(const std::string& dir, const AdapterSpec& s) {
  fs::create_directories(dir);
  std::mt19937 g(s.seed);
  std::vector<std::vector<float>> keep;
  std::vector<qlora::io::TensorToWrite> ts;
  qlora::json::Array targets;
  for (int p = 0; p < 7; ++p)
    if (s.mask & (1u << p)) targets.emplace_back(kProj[p]);
  for (int64_t l = 0; l < L; ++l)
    for (int p = 0; p < 7; ++p) {
      if (!(s.mask & (1u << p))) continue;
      const std::string base = "base_model.model.model.layers." + std::to_string(l) + (p < 4 ? ".self_attn." : ".mlp.") +
                               kProj[p];
      const int64_t out = kOut[p] + (p == 0 ? s.out_delta : 0);
      for (int w = 0; w < 2; ++w) {
        const std::vector<int64_t> shape = w == 0 ? std::vector<int64_t>{s.r, kIn[p]} : std::vector<int64_t>{out, s.r};
        const float a = w == 0 ? 1.0f / std::sqrt(static_cast<float>(kIn[p])) : s.b_scale;
        std::uniform_real_distribution<float> u(-a, a);
        std::vector<float> v(static_cast<size_t>(shape[0] * shape[1]));
        for (auto& x : v) x = u(g);
        if (s.nan && l == 1 && p == 6 && w == 1) v[3] = NAN;
        keep.push_back(std::move(v));
        ts.push_back({base + (w == 0 ? ".lora_A.weight" : ".lora_B.weight"), qlora::DType::F32, shape,
                      keep.back().data(), keep.back().size() * sizeof(float)});
      }
    }
  qlora::io::write_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), ts, {{"format", "pt"}});
  std::string cfg = "{\"peft_type\": \"LORA\", \"task_type\": \"CAUSAL_LM\", \"r\": " + std::to_string(s.cfg_r >= 0 ? s.cfg_r : s.r) +
                    ", \"lora_alpha\": " + qlora::json::dump(qlora::json::Value(s.alpha)) +
                    ", \"use_rslora\": " + (s.rslora ? "true" : "false") + ", \"target_modules\": " +
                    qlora::json::dump(s.targets.is_null() ? qlora::json::Value(targets) : s.targets) + s.config_extra +
                    "}";
  tiny::write_text((fs::path(dir) / "adapter_config.json").string(), cfg);
}

std::vector<int32_t> gen(qlora_context* c, const std::vector<int32_t>& prompt, int64_t n,
                         qlora_token_callback cb = nullptr, void* user = nullptr,
                         const qlora_sampling_params* sp = nullptr) {
  std::vector<int32_t> out(static_cast<size_t>(n), -1);
  int64_t got = 0;
  const int rc = qlora_context_generate(c, prompt.data(), static_cast<int64_t>(prompt.size()), sp, out.data(), n, &got,
                                        cb, user);
  CHECK(rc == QLORA_OK, "context_generate: %s", qlora_last_error());
  out.resize(static_cast<size_t>(got));
  return out;
}

std::vector<float> fwd(qlora_context* c, const std::vector<int32_t>& ids) {
  std::vector<float> out(ids.size() * V, NAN);
  const int rc = qlora_context_forward(c, ids.data(), static_cast<int64_t>(ids.size()), out.data());
  CHECK(rc == QLORA_OK, "context_forward: %s", qlora_last_error());
  return out;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

void set(qlora_context* c, std::vector<qlora_adapter*> ads, std::vector<float> scales) {
  const int rc = qlora_context_set_adapters(c, ads.data(), scales.data(), static_cast<int32_t>(ads.size()));
  CHECK(rc == QLORA_OK, "set_adapters: %s", qlora_last_error());
}

const std::vector<int32_t> kPrompt = {1, 17, 42, 5, 88, 23};
const int64_t kNew = 24;

void test_contexts(const fs::path& root) {
  const std::string model_dir = (root / "tiny").string();
  qlora_model_params mp = qlora_model_default_params();
  mp.quantize = QLORA_QUANT_NONE;
  qlora_model* m = qlora_model_load(model_dir.c_str(), &mp);
  CHECK(m != nullptr, "load: %s", qlora_last_error());
  if (!m) return;
  AdapterSpec s1, s2;
  s2.r = 8, s2.alpha = 16, s2.rslora = true, s2.mask = 0x05 | 0x40, s2.seed = 2;  // q, v, down
  write_adapter((root / "a1").string(), s1);
  write_adapter((root / "a2").string(), s2);
  qlora_adapter* a1 = qlora_adapter_load(m, (root / "a1").string().c_str());
  CHECK(a1 != nullptr, "adapter_load a1: %s", qlora_last_error());
  qlora_adapter* a2 = qlora_adapter_load(m, (root / "a2").string().c_str());
  CHECK(a2 != nullptr, "adapter_load a2: %s", qlora_last_error());
  if (!a1 || !a2) return;

  qlora_context* c0 = qlora_context_new(m, qlora_context_default_params());
  qlora_context* c1 = qlora_context_new(m, qlora_context_default_params());
  qlora_context* c2 = qlora_context_new(m, qlora_context_default_params());
  CHECK(c0 && c1 && c2, "context_new: %s", qlora_last_error());
  set(c1, {a1}, {1.0f});
  set(c2, {a2}, {1.0f});

  // Single-thread references; the base context equals the existing qlora_generate / forward.
  const std::vector<int32_t> t0 = gen(c0, kPrompt, kNew), t1 = gen(c1, kPrompt, kNew), t2 = gen(c2, kPrompt, kNew);
  const std::vector<float> l0 = fwd(c0, kPrompt), l1 = fwd(c1, kPrompt), l2 = fwd(c2, kPrompt);
  {
    std::vector<int32_t> g(kNew);
    int64_t n = 0;
    CHECK(qlora_generate(m, kPrompt.data(), 6, nullptr, g.data(), kNew, &n, nullptr, nullptr) == QLORA_OK, "gen");
    CHECK(g == t0, "base context != qlora_generate");
    std::vector<float> lg(kPrompt.size() * V);
    CHECK(qlora_model_forward(m, kPrompt.data(), 6, lg.data()) == QLORA_OK, "fwd");
    CHECK(max_diff(lg, l0) == 0.0, "base context forward != qlora_model_forward");
  }
  CHECK(t1 != t0 && t2 != t0 && t1 != t2, "the adapters must change greedy tokens (test is vacuous otherwise)");
  CHECK(max_diff(l1, l0) > 1e-2 && max_diff(l2, l0) > 1e-2, "adapters must change the logits");

  // Greedy tokens of the forward path agree with generation's first token.
  int32_t arg = 0;
  for (int64_t v = 1; v < V; ++v)
    if (l1[(kPrompt.size() - 1) * V + v] > l1[(kPrompt.size() - 1) * V + arg]) arg = static_cast<int32_t>(v);
  CHECK(arg == t1[0], "context forward argmax %d != generated %d", arg, t1[0]);

  // Two threads, two contexts, different adapters, at the same time: each == its single run.
  {
    std::atomic<int> go{0}, bad1{0}, bad2{0};
    auto worker = [&](qlora_context* c, const std::vector<int32_t>& want, const std::vector<float>& wl,
                      std::atomic<int>& bad) {
      go.fetch_add(1);
      while (go.load() < 2) std::this_thread::yield();
      for (int it = 0; it < 6; ++it) {
        if (gen(c, kPrompt, kNew) != want) bad.fetch_add(1);
        if (max_diff(fwd(c, kPrompt), wl) != 0.0) bad.fetch_add(1);
      }
    };
    std::thread th1(worker, c1, std::cref(t1), std::cref(l1), std::ref(bad1));
    std::thread th2(worker, c2, std::cref(t2), std::cref(l2), std::ref(bad2));
    th1.join();
    th2.join();
    CHECK(bad1.load() == 0 && bad2.load() == 0, "concurrent contexts differ from single-thread: %d / %d", bad1.load(),
          bad2.load());
  }

  // set_adapters from the running call's own callback: this call keeps a1, the next gets a2.
  {
    struct U {
      qlora_context* c;
      qlora_adapter* a2;
      int n = 0, rc = 0, rc_busy = 0;
    } u{c1, a2};
    auto cb = [](int32_t, void* p) -> int {
      U& x = *static_cast<U*>(p);
      if (++x.n == 5) {
        qlora_adapter* ads[1] = {x.a2};
        x.rc = qlora_context_set_adapters(x.c, ads, nullptr, 1);
        int32_t tok = 0;
        int64_t got = 0;
        x.rc_busy = qlora_context_generate(x.c, &tok, 1, nullptr, &tok, 1, &got, nullptr, nullptr);
      }
      return 0;
    };
    CHECK(gen(c1, kPrompt, kNew, cb, &u) == t1, "a call changed its adapters mid-way");
    CHECK(u.rc == QLORA_OK, "set_adapters from a callback failed");
    CHECK(u.rc_busy == QLORA_ERR_INVALID_ARGUMENT, "a second call on a busy context must be refused, got %d",
          u.rc_busy);
    CHECK(gen(c1, kPrompt, kNew) == t2, "the call after set_adapters must use the new set");
    set(c1, {a1}, {1.0f});
    CHECK(gen(c1, kPrompt, kNew) == t1, "set back to a1");
  }

  // Another thread toggling the set while this one generates: every call is all a1 or all a2.
  {
    std::atomic<bool> stop{false};
    std::thread toggler([&] {
      for (int i = 0; !stop.load(); ++i) {
        qlora_adapter* ads[1] = {i % 2 ? a1 : a2};
        if (qlora_context_set_adapters(c1, ads, nullptr, 1) != QLORA_OK) break;
        std::this_thread::yield();
      }
    });
    int mixed = 0, n1 = 0, n2 = 0;
    for (int it = 0; it < 20; ++it) {
      const std::vector<int32_t> t = gen(c1, kPrompt, kNew);
      t == t1 ? ++n1 : t == t2 ? ++n2 : ++mixed;
    }
    stop.store(true);
    toggler.join();
    CHECK(mixed == 0, "%d calls mixed two adapter sets (a1 %d, a2 %d)", mixed, n1, n2);
    set(c1, {a1}, {1.0f});
  }

  // Scales: 0 = base; 0.5 differs; {a1 .5, a1 .5} ~ {a1 1} (combined path); a zero entry drops out.
  {
    qlora_context* c = qlora_context_new(m, qlora_context_default_params());
    set(c, {a1}, {0.0f});
    CHECK(max_diff(fwd(c, kPrompt), l0) == 0.0, "scale 0 must be the base model");
    set(c, {a1}, {0.5f});
    const std::vector<float> lh = fwd(c, kPrompt);
    CHECK(max_diff(lh, l1) > 1e-3 && max_diff(lh, l0) > 1e-3, "scale 0.5 must differ from 0 and 1");
    set(c, {a1, a1}, {0.5f, 0.5f});
    const double d = max_diff(fwd(c, kPrompt), l1);
    CHECK(d < 1e-4, "{a1 .5, a1 .5} vs {a1 1}: max diff %g", d);
    set(c, {a1, a2}, {1.0f, 0.0f});
    CHECK(max_diff(fwd(c, kPrompt), l1) == 0.0, "{a1 1, a2 0} must equal {a1 1}");
    set(c, {a1, a2}, {1.0f, 1.0f});
    const std::vector<float> l12 = fwd(c, kPrompt);
    CHECK(max_diff(l12, l1) > 1e-3 && max_diff(l12, l2) > 1e-3, "two adapters must both contribute");
    set(c, {}, {});
    CHECK(max_diff(fwd(c, kPrompt), l0) == 0.0, "n = 0 must clear the set");
    CHECK(qlora_context_set_adapters(c, nullptr, nullptr, 0) == QLORA_OK, "n = 0 with NULL arrays");

    // Errors: the set is kept on every one of them.
    set(c, {a2}, {1.0f});
    qlora_adapter* ads[2] = {a1, nullptr};
    float sc[2] = {1.0f, NAN};
    CHECK(qlora_context_set_adapters(c, ads, sc, -1) == QLORA_ERR_INVALID_ARGUMENT && contains(qlora_last_error(), "n must"),
          "n < 0: %s", qlora_last_error());
    CHECK(qlora_context_set_adapters(c, nullptr, nullptr, 1) == QLORA_ERR_INVALID_ARGUMENT, "NULL adapters");
    CHECK(qlora_context_set_adapters(c, ads, nullptr, 2) == QLORA_ERR_INVALID_ARGUMENT &&
              contains(qlora_last_error(), "adapters[1] is NULL"),
          "NULL element: %s", qlora_last_error());
    ads[1] = a2;
    CHECK(qlora_context_set_adapters(c, ads, sc, 2) == QLORA_ERR_INVALID_ARGUMENT &&
              contains(qlora_last_error(), "not finite"),
          "NaN scale: %s", qlora_last_error());
    sc[1] = INFINITY;
    CHECK(qlora_context_set_adapters(c, ads, sc, 2) == QLORA_ERR_INVALID_ARGUMENT, "Inf scale");
    CHECK(qlora_context_set_adapters(nullptr, ads, nullptr, 1) == QLORA_ERR_INVALID_ARGUMENT, "NULL ctx");
    CHECK(max_diff(fwd(c, kPrompt), l2) == 0.0, "a failed set_adapters must keep the set");
    qlora_context_free(c);
    CHECK(qlora_context_set_adapters(c, ads, nullptr, 1) == QLORA_ERR_INVALID_ARGUMENT &&
              contains(qlora_last_error(), "not a live qlora_context"),
          "freed ctx: %s", qlora_last_error());
    CHECK(qlora_context_forward(c, kPrompt.data(), 6, nullptr) == QLORA_ERR_INVALID_ARGUMENT, "freed ctx forward");
    qlora_context_free(c);  // double free: ignored (recorded)
    CHECK(contains(qlora_last_error(), "already freed"), "double context_free: %s", qlora_last_error());
  }

  // n_ctx bounds a call; context_new errors.
  {
    qlora_context_params p = qlora_context_default_params();
    p.n_ctx = 10;
    qlora_context* c = qlora_context_new(m, p);
    std::vector<int32_t> out(8);
    int64_t got = 0;
    CHECK(qlora_context_generate(c, kPrompt.data(), 6, nullptr, out.data(), 5, &got, nullptr, nullptr) ==
                  QLORA_ERR_INVALID_ARGUMENT &&
              contains(qlora_last_error(), "n_ctx 10"),
          "n_ctx: %s", qlora_last_error());
    CHECK(qlora_context_generate(c, kPrompt.data(), 6, nullptr, out.data(), 4, &got, nullptr, nullptr) == QLORA_OK,
          "n_ctx exactly: %s", qlora_last_error());
    qlora_context_free(c);
    p.n_ctx = 0;
    c = qlora_context_new(m, p);
    std::vector<int32_t> long_prompt(250, 3);
    CHECK(qlora_context_generate(c, long_prompt.data(), 250, nullptr, out.data(), 8, &got, nullptr, nullptr) ==
              QLORA_ERR_INVALID_ARGUMENT,
          "default n_ctx = max_position_embeddings (256)");
    qlora_context_free(c);
    p.n_ctx = -1;
    CHECK(qlora_context_new(m, p) == nullptr && qlora_last_status() == QLORA_ERR_INVALID_ARGUMENT, "n_ctx < 0");
    CHECK(qlora_context_new(nullptr, qlora_context_default_params()) == nullptr, "NULL model");
    CHECK(qlora_context_generate(nullptr, kPrompt.data(), 6, nullptr, out.data(), 1, &got, nullptr, nullptr) ==
              QLORA_ERR_INVALID_ARGUMENT,
          "NULL ctx generate");
    CHECK(qlora_context_forward(c1, nullptr, 6, nullptr) == QLORA_ERR_INVALID_ARGUMENT, "NULL ids");
    const int32_t bad_ids[2] = {1, 500};
    std::vector<float> lg(2 * V);
    CHECK(qlora_context_forward(c1, bad_ids, 2, lg.data()) == QLORA_ERR_INVALID_ARGUMENT &&
              contains(qlora_last_error(), "out of range"),
          "bad id: %s", qlora_last_error());
  }

  // An adapter from another model is refused; freeing an adapter in use is safe.
  {
    qlora_model* m2 = qlora_model_load(model_dir.c_str(), &mp);
    qlora_adapter* b = qlora_adapter_load(m2, (root / "a1").string().c_str());
    CHECK(b != nullptr, "load on m2: %s", qlora_last_error());
    CHECK(qlora_context_set_adapters(c1, &b, nullptr, 1) == QLORA_ERR_INVALID_ARGUMENT &&
              contains(qlora_last_error(), "another model"),
          "foreign adapter: %s", qlora_last_error());
    qlora_model_free(m2);  // frees b with it
    qlora_adapter_free(b);  // already freed with its model: ignored
    CHECK(contains(qlora_last_error(), "not a live qlora_adapter"), "adapter_free after model: %s", qlora_last_error());

    qlora_adapter_free(a1);  // c1 still uses it
    CHECK(gen(c1, kPrompt, kNew) == t1, "a freed adapter must keep working in the context that holds it");
    CHECK(qlora_context_set_adapters(c2, &a1, nullptr, 1) == QLORA_ERR_INVALID_ARGUMENT &&
              contains(qlora_last_error(), "not a live qlora_adapter"),
          "freed adapter: %s", qlora_last_error());
  }

  // Training calls on the same model keep working with contexts open; contexts are unaffected.
  {
    qlora_lora_params lp = qlora_lora_default_params();
    lp.r = 4;
    CHECK(qlora_adapter_add(m, "train", &lp) == QLORA_OK, "adapter_add: %s", qlora_last_error());
    CHECK(qlora_train_configure(m, 1e-2f, 0.0f) == QLORA_OK, "train_configure: %s", qlora_last_error());
    std::vector<int32_t> ids(2 * 16), labels(2 * 16);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = labels[i] = static_cast<int32_t>((i * 7 + 3) % V);
    float first = 0, loss = 0;
    for (int step = 0; step < 15; ++step) {
      CHECK(qlora_train_step(m, ids.data(), labels.data(), 2, 16, -1.0f, 1.0f, &loss) == QLORA_OK, "train_step: %s",
            qlora_last_error());
      if (step == 0) first = loss;
    }
    CHECK(loss < first, "training must lower the loss (%g -> %g)", first, loss);
    std::vector<int32_t> g(kNew);
    int64_t n = 0;
    CHECK(qlora_generate(m, kPrompt.data(), 6, nullptr, g.data(), kNew, &n, nullptr, nullptr) == QLORA_OK, "gen");
    CHECK(g != t0, "qlora_generate must use the trained adapter");
    CHECK(gen(c0, kPrompt, kNew) == t0 && gen(c2, kPrompt, kNew) == t2, "contexts must not see the trained adapter");
    CHECK(qlora_adapter_save(m, (root / "trained").string().c_str()) == QLORA_OK, "save: %s", qlora_last_error());
    qlora_adapter* tr = qlora_adapter_load(m, (root / "trained").string().c_str());  // saved -> loaded in a context
    CHECK(tr != nullptr, "load trained: %s", qlora_last_error());
    set(c0, {tr}, {1.0f});
    CHECK(gen(c0, kPrompt, kNew) == g, "the saved trained adapter in a context == qlora_generate with it");
    set(c0, {}, {});
  }

  // The C++ wrapper: RAII handles over the same calls.
  {
    auto wm = qlora::api::Model::load(model_dir, mp);
    qlora::api::Adapter w1 = wm.load_adapter((root / "a1").string());
    qlora::api::Context wc = wm.new_context();
    wc.set_adapters({{&w1, 1.0f}});
    CHECK(wc.generate(kPrompt, kNew) == t1, "wrapper generate");
    CHECK(max_diff(wc.forward(kPrompt), l1) == 0.0, "wrapper forward");
    wc.set_adapters({});
    CHECK(wc.generate(kPrompt, kNew) == t0, "wrapper base");
    bool threw = false;
    try {
      wm.load_adapter((root / "nope").string());
    } catch (const qlora::api::Error& e) {
      threw = e.code == QLORA_ERR_IO;
    }
    CHECK(threw, "wrapper load_adapter must throw Error(IO)");
    CHECK(wm.adapter_dtype() == "auto", "wrapper adapter_dtype default: %s", wm.adapter_dtype().c_str());
    wm.set_adapter_dtype("float32");
    CHECK(wm.adapter_dtype() == "float32", "wrapper set_adapter_dtype: %s", wm.adapter_dtype().c_str());
    threw = false;
    try {
      wm.set_adapter_dtype("fp8");
    } catch (const qlora::api::Error& e) {
      threw = e.code == QLORA_ERR_INVALID_ARGUMENT;
    }
    CHECK(threw && wm.adapter_dtype() == "float32", "wrapper set_adapter_dtype(\"fp8\") must throw, setting kept");
  }

  // A context outliving its model: calls fail, the last context_free releases the model.
  qlora_context_free(c1);
  qlora_context_free(c2);
  qlora_model_free(m);  // c0 still open, a2 freed with the model
  std::vector<int32_t> out(4);
  int64_t got = 0;
  CHECK(qlora_context_generate(c0, kPrompt.data(), 6, nullptr, out.data(), 4, &got, nullptr, nullptr) ==
                QLORA_ERR_INVALID_ARGUMENT &&
            contains(qlora_last_error(), "model was freed"),
        "context after model_free: %s", qlora_last_error());
  qlora_context_free(c0);
}

void expect_load_error(qlora_model* m, const std::string& dir, int code, const char* sub) {
  qlora_adapter* a = qlora_adapter_load(m, dir.c_str());
  CHECK(a == nullptr && qlora_last_status() == code && contains(qlora_last_error(), sub),
        "load %s: want %d '%s', got %d '%s'", dir.c_str(), code, sub, qlora_last_status(), qlora_last_error());
  if (a) qlora_adapter_free(a);
}

void test_load_errors(const fs::path& root) {
  qlora_model_params mp = qlora_model_default_params();  // NF4: shapes come from the model either way
  qlora_model* m = qlora_model_load((root / "tiny").string().c_str(), &mp);
  CHECK(m != nullptr, "load: %s", qlora_last_error());
  if (!m) return;
  AdapterSpec s;
  s.out_delta = 32;  // q_proj lora_B [96, r] for a model whose q_proj is [64, 64]
  write_adapter((root / "other_base").string(), s);
  expect_load_error(m, (root / "other_base").string(), QLORA_ERR_INVALID_ARGUMENT,
                    "has shape [96, 4] but layer 0 q_proj of the model is [out 64, in 64], which needs [64, 4]");
  s = {};
  s.nan = true;
  write_adapter((root / "nan").string(), s);
  expect_load_error(m, (root / "nan").string(), QLORA_ERR_INVALID_ARGUMENT,
                    "'base_model.model.model.layers.1.mlp.down_proj.lora_B.weight' contains NaN or Inf");
  s = {};
  s.targets = qlora::json::Value(".*proj");
  write_adapter((root / "regex").string(), s);
  expect_load_error(m, (root / "regex").string(), QLORA_ERR_INVALID_ARGUMENT, "is a regular expression");
  s = {};
  s.config_extra = ", \"use_dora\": true";
  write_adapter((root / "dora").string(), s);
  expect_load_error(m, (root / "dora").string(), QLORA_ERR_INVALID_ARGUMENT, "DoRA (use_dora=True) is not supported");
  s = {};
  s.targets = qlora::json::Array{qlora::json::Value("q_proj")};  // the file also holds k..down
  write_adapter((root / "extra").string(), s);
  expect_load_error(m, (root / "extra").string(), QLORA_ERR_INVALID_ARGUMENT,
                    "for modules the config does not target");
  s = {};
  s.mask = 0x01;
  s.targets = qlora::json::Value("all-linear");
  write_adapter((root / "missing").string(), s);
  expect_load_error(m, (root / "missing").string(), QLORA_ERR_INVALID_ARGUMENT,
                    "missing for modules the config targets");
  // Plain-name patterns are read (rank_pattern must then match the shapes).
  s = {};
  s.mask = 0x01, s.r = 2;
  s.targets = qlora::json::Value("model\\.layers\\.0\\.self_attn\\.q_proj");
  s.config_extra = ", \"rank_pattern\": {\"q_proj\": 2}", s.cfg_r = 8;
  write_adapter((root / "plain").string(), s);
  // the writer put both layers' q_proj: layer 1 is not targeted by the regex
  expect_load_error(m, (root / "plain").string(), QLORA_ERR_INVALID_ARGUMENT, "layers.1.self_attn.q_proj.lora_A");
  s.targets = qlora::json::Value("model\\.layers\\..\\.self_attn\\.q_proj");  // '.' = any: both layers
  write_adapter((root / "plain_ok").string(), s);
  qlora_adapter* pa = qlora_adapter_load(m, (root / "plain_ok").string().c_str());
  CHECK(pa != nullptr, "plain-name regex + rank_pattern: %s", qlora_last_error());
  qlora_adapter_free(pa);
  s.config_extra = ", \"rank_pattern\": {\"q_proj\": 3}";  // the file's r is 2
  write_adapter((root / "plain_bad_r").string(), s);
  expect_load_error(m, (root / "plain_bad_r").string(), QLORA_ERR_INVALID_ARGUMENT, "expected [3, in_features] (r=3)");
  expect_load_error(m, (root / "no_such_dir").string(), QLORA_ERR_IO, "no_such_dir");
  expect_load_error(m, (root / "tiny" / "config.json").string(), QLORA_ERR_IO, "not an adapter directory");
  expect_load_error(m, (root / "tiny").string(), QLORA_ERR_IO, "adapter_config.json");
  fs::create_directories(root / "bad_json");
  tiny::write_text((root / "bad_json" / "adapter_config.json").string(), "{\"peft_type\": ");
  write_adapter((root / "bad_json2").string(), AdapterSpec{});
  fs::copy_file(root / "bad_json2" / "adapter_model.safetensors", root / "bad_json" / "adapter_model.safetensors");
  expect_load_error(m, (root / "bad_json").string(), QLORA_ERR_FORMAT, "not valid JSON");
  CHECK(qlora_adapter_load(nullptr, (root / "a1").string().c_str()) == nullptr, "NULL model");
  CHECK(qlora_adapter_load(m, nullptr) == nullptr && qlora_last_status() == QLORA_ERR_INVALID_ARGUMENT, "NULL dir");
  qlora_adapter_free(nullptr);
  qlora_context_free(nullptr);
  // A good adapter on the NF4 model loads; adapters not freed are freed with the model.
  qlora_adapter* ok = qlora_adapter_load(m, (root / "a1").string().c_str());
  CHECK(ok != nullptr, "a1 on NF4: %s", qlora_last_error());
  qlora_model_free(m);
}

}  // namespace

int main() {
  const fs::path root = fs::temp_directory_path() / ("qlora_test_capi_context_" + std::to_string(getpid()));
  try {
    tiny::write_checkpoint((root / "tiny").string());
    test_contexts(root);
    test_load_errors(root);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: exception %s\n", e.what());
    ++g_failures;
  }
  std::error_code ec;
  fs::remove_all(root, ec);
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  else std::printf("test_capi_context: OK\n");
  return g_failures ? 1 : 0;
}
