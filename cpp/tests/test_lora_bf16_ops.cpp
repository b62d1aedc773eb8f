// Which LoRA GEMM each bit of the bf16 op mask (model/lora.hpp LoraBf16, QLORA_LORA_BF16) switches,
// pinned bit for bit: every output of lora_forward / lora_backward (and the grouped calls) depends
// only on the bits of the GEMMs that compute it:
//   y  <- shrink, expand;   dB <- bwd_shrink, db;   dA <- dt, da;   dx <- dt, dx.
// For all 128 masks, each output equals the one computed with the mask cut down to its own bits
// (so no other bit changes it), equals the fp32 result when none of them is set and the all-bf16
// result when all are; and every non-empty subset of its bits changes it (each bit is live). Then
// QLORA_LORA_BF16's parsing: unset / 0 (fp32, the default), 1 / all, forward, backward, comma lists,
// and a bad value throws ValueError naming the variable. On cpu (AVX512-BF16 kernels, where the CPU
// has them) and cpu:scalar (the emulating oracle).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "check.hpp"
#include "common/error.hpp"
#include "lora_fixture.hpp"
#include "model/lora.hpp"

using namespace qlora;
using namespace qlora::model;
using lora_fixture::Dev;
using lora_fixture::down;
using lora_fixture::wave;

namespace {

constexpr int64_t M = 37, D = 40;
const int64_t kOut[3] = {40, 24, 24}, kRank[3] = {16, 8, 5};
constexpr float kScale = 0.75f;

// The four outputs of one pass (forward + backward of three modules, per module or grouped).
struct Outs {
  std::vector<float> y, dB, dA, dx;
};
enum Out { kY, kDB, kDA, kDX };
const unsigned kDeps[4] = {kLoraShrink | kLoraExpand, kLoraBwdShrink | kLoraDB, kLoraDt | kLoraDA,
                           kLoraDt | kLoraDx};
const char* const kOutName[4] = {"y", "dB", "dA", "dx"};
const std::vector<float>& pick(const Outs& o, int k) {
  return k == kY ? o.y : k == kDB ? o.dB : k == kDA ? o.dA : o.dx;
}

struct Setup {
  Backend& be;
  std::unique_ptr<LoraAdapter> ad;
  LoraModule* m[3];
  int64_t total_out = 0;
  std::vector<float> xh, dyh, y0h, dx0h;
  explicit Setup(Backend& b) : be(b), ad(lora_fixture::make_qkv_adapter(b, D, kOut, kRank, 0.01f)) {
    for (int i = 0; i < 3; ++i) total_out += kOut[i];
    pack_lora_params(be, *ad);  // q, k, v back to back: groupable
    ensure_lora_grads(be, *ad);
    for (int i = 0; i < 3; ++i) m[i] = ad->at(0, i);
    xh = wave(static_cast<size_t>(M * D), 0.9f, 1.0f, 0.01f);
    dx0h = wave(static_cast<size_t>(M * D), 0.33f, 1.0f, 0.01f);
    dyh = wave(static_cast<size_t>(M * total_out), 0.55f, 1.0f, 0.01f);
    y0h = wave(static_cast<size_t>(M * total_out), 0.21f, 0.1f, 0.01f);
  }

  Outs run(LoraBf16 b, bool grouped) {
    zero_lora_grads(be, *ad);
    const Dev x(be, xh), y(be, y0h), dy(be, dyh), dx(be, dx0h);
    const Dev t(be, std::vector<float>(M * 29)), dt(be, std::vector<float>(M * 29));
    float* ys[3];
    const float* dys[3];
    int64_t ld[3];
    for (int64_t i = 0, off = 0; i < 3; off += M * kOut[i], ++i)
      ys[i] = y.f() + off, dys[i] = dy.f() + off, ld[i] = kOut[i];
    if (grouped) {
      const LoraModule* cm[3] = {m[0], m[1], m[2]};
      lora_forward_group(be, 3, cm, M, x.f(), D, ys, ld, t.f(), kScale, b);
      lora_backward_group(be, 3, m, M, x.f(), D, dys, ld, dx.f(), D, 0.5f, t.f(), dt.f(), kScale, b);
    } else {
      for (int i = 0; i < 3; ++i) {
        lora_forward(be, *m[i], M, x.f(), D, ys[i], ld[i], t.f(), kScale, b);
        lora_backward(be, *m[i], M, x.f(), D, dys[i], ld[i], dx.f(), D, i == 0 ? 0.5f : 1.0f, t.f(), dt.f(), kScale,
                      b);
      }
    }
    Outs o{y.get(), {}, {}, dx.get()};
    for (int i = 0; i < 3; ++i) {
      const auto a = down(be, m[i]->dA, static_cast<size_t>(kRank[i] * D));
      const auto g = down(be, m[i]->dB, static_cast<size_t>(kOut[i] * kRank[i]));
      o.dA.insert(o.dA.end(), a.begin(), a.end());
      o.dB.insert(o.dB.end(), g.begin(), g.end());
    }
    return o;
  }
};

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

void check_backend(Backend& be, const char* name) {
  if (!be.has_bf16_compute()) {
    std::printf("test_lora_bf16_ops: %s has no bf16 compute, skipped\n", name);
    return;
  }
  Setup s(be);
  for (const bool grouped : {false, true}) {
    const char* how = grouped ? "grouped" : "per module";
    std::vector<Outs> all(kLoraBf16All + 1);
    for (unsigned mask = 0; mask <= kLoraBf16All; ++mask) all[mask] = s.run(LoraBf16::mask(mask), grouped);
    const Outs& f32 = all[0];
    const Outs& b16 = all[kLoraBf16All];
    // the bool form: false = fp32, true = all bf16 (the callers from before the mask)
    const Outs o_false = s.run(false, grouped), o_true = s.run(true, grouped);
    for (int k = 0; k < 4; ++k) {
      CHECK(same(pick(o_false, k), pick(f32, k)) && same(pick(o_true, k), pick(b16, k)), "%s %s: bool %s", name,
            how, kOutName[k]);
      CHECK(!same(pick(f32, k), pick(b16, k)), "%s %s: %s: bf16 is not live", name, how, kOutName[k]);
    }
    for (unsigned mask = 0; mask <= kLoraBf16All; ++mask)
      for (int k = 0; k < 4; ++k) {
        const unsigned own = mask & kDeps[k];
        const auto& got = pick(all[mask], k);
        CHECK(same(got, pick(all[own], k)), "%s %s: %s under mask 0x%x depends on bits outside 0x%x", name, how,
              kOutName[k], mask, kDeps[k]);
        if (own == 0) CHECK(same(got, pick(f32, k)), "%s %s: %s mask 0x%x: not fp32", name, how, kOutName[k], mask);
        if (own == kDeps[k])
          CHECK(same(got, pick(b16, k)), "%s %s: %s mask 0x%x: not all-bf16", name, how, kOutName[k], mask);
        if (own != 0 && mask == own)
          CHECK(!same(got, pick(f32, k)), "%s %s: %s mask 0x%x: a bit is not live", name, how, kOutName[k], mask);
      }
  }
}

void check_env() {
  struct Case {
    const char* v;
    unsigned ops;
  } cases[] = {{nullptr, 0},
               {"0", 0},
               {"1", kLoraBf16All},
               {"all", kLoraBf16All},
               {"forward", kLoraShrink | kLoraExpand},
               {"backward", kLoraBwdShrink | kLoraDt | kLoraDB | kLoraDA | kLoraDx},
               {"dx", kLoraDx},
               {"shrink,da", kLoraShrink | kLoraDA},
               {"bwd_shrink,dt,db", kLoraBwdShrink | kLoraDt | kLoraDB}};
  for (const Case& c : cases) {
    if (c.v) setenv("QLORA_LORA_BF16", c.v, 1);
    else unsetenv("QLORA_LORA_BF16");
    CHECK(lora_bf16_ops().ops == c.ops, "QLORA_LORA_BF16=%s: 0x%x, want 0x%x", c.v ? c.v : "(unset)",
          lora_bf16_ops().ops, c.ops);
  }
  for (const char* bad : {"2", "yes", "dx,", ",dx", "shrink,,db", "DX", "split", " 1"}) {
    setenv("QLORA_LORA_BF16", bad, 1);
    bool threw = false;
    try {
      (void)lora_bf16_ops();
    } catch (const ValueError& e) {
      threw = contains(e.what(), "QLORA_LORA_BF16") && contains(e.what(), bad);
    }
    CHECK(threw, "QLORA_LORA_BF16='%s' did not throw a ValueError naming it", bad);
  }
  unsetenv("QLORA_LORA_BF16");
}

}  // namespace

int main() {
  check_backend(get_backend("cpu"), "cpu");
  check_backend(get_backend("cpu:scalar"), "cpu:scalar");
  check_env();
  if (g_failures == 0) std::printf("test_lora_bf16_ops: ok\n");
  return g_failures ? 1 : 0;
}
