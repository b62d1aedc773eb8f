// Grouped LoRA (model/lora.hpp lora_forward_group / lora_backward_group) against the per-module
// lora_forward / lora_backward on cpu and cpu:devsim: the arena order puts [A_q; A_k; A_v] back to back
// (ranks 2, 3, 1 here), outputs, dA, dB and dx (beta 0.5) agree within an fp32 summation-order bound;
// an unpacked adapter is not groupable; peft_order maps PEFT order onto the arena order.
#include <cmath>
#include <memory>
#include <vector>

#include "backend.hpp"
#include "check.hpp"
#include "lora_fixture.hpp"
#include "model/lora.hpp"

using namespace qlora;
using namespace qlora::model;
using namespace lora_fixture;

namespace {

constexpr int64_t M = 7, D = 24;
const int64_t kOut[3] = {24, 8, 8}, kRank[3] = {2, 3, 1};

std::unique_ptr<LoraAdapter> make_adapter(Backend& be) { return make_qkv_adapter(be, D, kOut, kRank); }

void check_backend(Backend& be, const char* name) {
  const double tol = 64.0 * std::ldexp(1.0, -23);
  auto ad = make_adapter(be);
  const LoraModule* sep[3] = {ad->at(0, 0), ad->at(0, 1), ad->at(0, 2)};
  CHECK(!lora_group_adjacent(sep, 3, false), "%s: separately allocated A factors reported adjacent", name);
  pack_lora_params(be, *ad);
  ensure_lora_grads(be, *ad);
  LoraModule* m[3] = {ad->at(0, 0), ad->at(0, 1), ad->at(0, 2)};
  const LoraModule* cm[3] = {m[0], m[1], m[2]};
  CHECK(lora_group_adjacent(cm, 3, true), "%s: packed q/k/v not adjacent", name);
  CHECK(lora_rank_sum(cm, 3) == 6, "%s: rank sum", name);
  // Arena order: A_q A_k A_v B_q B_k B_v; PEFT order: A_q B_q A_k B_k A_v B_v.
  const std::vector<size_t> po = ad->peft_order();
  CHECK((po == std::vector<size_t>{0, 3, 1, 4, 2, 5}), "%s: peft_order", name);

  const auto xh = wave(static_cast<size_t>(M * D), 0.9f, 1.0f);
  Dev x(be, xh), t(be, std::vector<float>(M * 6)), dt(be, std::vector<float>(M * 6));
  std::vector<std::unique_ptr<Dev>> y0, y1, dy;
  for (int i = 0; i < 3; ++i) {
    const auto yi = wave(static_cast<size_t>(M * kOut[i]), 0.2f * (i + 1), 0.1f);
    y0.push_back(std::make_unique<Dev>(be, yi));
    y1.push_back(std::make_unique<Dev>(be, yi));
    dy.push_back(std::make_unique<Dev>(be, wave(static_cast<size_t>(M * kOut[i]), 0.55f + 0.1f * i, 1.0f)));
  }
  // Forward.
  for (int i = 0; i < 3; ++i) lora_forward(be, *m[i], M, x.f(), D, y0[i]->f(), kOut[i], t.f(), 0.75f);
  float* ys[3] = {y1[0]->f(), y1[1]->f(), y1[2]->f()};
  const int64_t ld[3] = {kOut[0], kOut[1], kOut[2]};
  lora_forward_group(be, 3, cm, M, x.f(), D, ys, ld, t.f(), 0.75f);
  for (int i = 0; i < 3; ++i) CHECK(close(y1[i]->get(), y0[i]->get(), tol), "%s: forward output %d", name, i);

  // Backward: per module (dx = 0.5 dx + sum), then grouped into fresh gradients.
  const auto dx0h = wave(static_cast<size_t>(M * D), 0.33f, 1.0f);
  Dev dx0(be, dx0h), dx1(be, dx0h);
  for (int i = 0; i < 3; ++i)
    lora_backward(be, *m[i], M, x.f(), D, dy[i]->f(), kOut[i], dx0.f(), D, i == 0 ? 0.5f : 1.0f, t.f(), dt.f(), 0.75f);
  std::vector<std::vector<float>> dA0, dB0;
  for (int i = 0; i < 3; ++i)
    dA0.push_back(down(be, m[i]->dA, kRank[i] * D)), dB0.push_back(down(be, m[i]->dB, kOut[i] * kRank[i]));
  zero_lora_grads(be, *ad);
  const float* dys[3] = {dy[0]->f(), dy[1]->f(), dy[2]->f()};
  lora_backward_group(be, 3, m, M, x.f(), D, dys, ld, dx1.f(), D, 0.5f, t.f(), dt.f(), 0.75f);
  CHECK(close(dx1.get(), dx0.get(), tol), "%s: dx", name);
  for (int i = 0; i < 3; ++i) {
    CHECK(close(down(be, m[i]->dA, kRank[i] * D), dA0[i], tol), "%s: dA %d", name, i);
    CHECK(close(down(be, m[i]->dB, kOut[i] * kRank[i]), dB0[i], tol), "%s: dB %d", name, i);
  }
  // Scale 0: the forward leaves y bit-identical.
  const auto before = y1[0]->get();
  lora_forward_group(be, 3, cm, M, x.f(), D, ys, ld, t.f(), 0.0f);
  CHECK(y1[0]->get() == before, "%s: scale 0 changed the output", name);
}

}  // namespace

int main() {
  check_backend(get_backend("cpu"), "cpu");
  check_backend(get_backend("cpu:devsim"), "cpu:devsim");
  if (g_failures == 0) std::printf("test_lora_group: ok\n");
  return g_failures ? 1 : 0;
}
