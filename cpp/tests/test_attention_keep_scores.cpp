// The bf16 training attention's kept scores (ops::attention_train_keep_scores,
// cpu/ops_attention_train_bf16.cpp): an armed forward keeps its fp32 scores, the next backward on the
// same q, k, key mask and lse reads them: the same bits as computing them again; a backward on other
// inputs computes its own; the slot is used (a backward after an in-place change of q, which the
// contract forbids, shows the forward's scores); QLORA_ATTN_BF16_KEEP=1 turns it on (opt-in),
// =0 or QLORA_ATTN_BF16_KEEP_MB=0 off.
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "cpu/features.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/ops_backward.hpp"

using namespace qlora::cpu;

namespace {
struct Case {
  int64_t B, T, Hq, Hkv, hd;
};
struct Grads {
  std::vector<float> dq, dk, dv;
  bool operator==(const Grads& o) const {
    auto eq = [](const std::vector<float>& a, const std::vector<float>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
    };
    return eq(dq, o.dq) && eq(dk, o.dk) && eq(dv, o.dv);
  }
};

void run_case(const Case& c) {
  const int64_t QD = c.Hq * c.hd, KD = c.Hkv * c.hd;
  std::mt19937 g(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto mk = [&](int64_t n) {
    std::vector<float> x(static_cast<size_t>(n));
    for (auto& e : x) e = nd(g);
    return x;
  };
  std::vector<float> q = mk(c.B * c.T * QD), k = mk(c.B * c.T * KD), v = mk(c.B * c.T * KD), dout = mk(c.B * c.T * QD);
  std::vector<int32_t> mask(static_cast<size_t>(c.B * c.T), 1);
  for (int64_t t = 0; t < 3 && t < c.T; ++t) mask[t] = 0;  // left padding in row 0
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
  std::vector<float> out(q.size()), lse(static_cast<size_t>(c.B * c.Hq * c.T));
  auto fwd = [&](const std::vector<float>& qq) {
    ops::attention_train(SimdLevel::AVX512, c.B, c.T, c.Hq, c.Hkv, c.hd, qq.data(), QD, k.data(), KD, v.data(), KD,
                         mask.data(), scale, out.data(), QD, lse.data(), true);
  };
  auto bwd = [&](const std::vector<float>& qq) {
    Grads r{std::vector<float>(q.size()), std::vector<float>(k.size()), std::vector<float>(v.size())};
    ops::attention_train_backward(SimdLevel::AVX512, c.B, c.T, c.Hq, c.Hkv, c.hd, qq.data(), QD, k.data(), KD,
                                  v.data(), KD, mask.data(), scale, out.data(), QD, lse.data(), dout.data(), QD,
                                  r.dq.data(), QD, r.dk.data(), KD, r.dv.data(), KD, true);
    return r;
  };
  fwd(q);
  const std::vector<float> out0 = out, lse0 = lse;
  const Grads ref = bwd(q);

  ops::attention_train_keep_scores(true);
  fwd(q);
  CHECK(out == out0 && lse == lse0, "armed forward T=%lld: other outputs", static_cast<long long>(c.T));
  CHECK(bwd(q) == ref, "kept scores T=%lld: not the recomputed bits", static_cast<long long>(c.T));
  CHECK(bwd(q) == ref, "second backward T=%lld", static_cast<long long>(c.T));

  // another q (another buffer): its own scores
  std::vector<float> q2 = q;
  for (size_t i = 0; i < q2.size(); i += 3) q2[i] *= 1.25f;
  const Grads ref2 = bwd(q2);  // out, lse of q's forward
  ops::attention_train_keep_scores(true);
  fwd(q);
  CHECK(bwd(q2) == ref2, "backward on another q T=%lld used the kept scores", static_cast<long long>(c.T));

  // the slot really is read: q changed in place after an armed forward (against the contract) ->
  // the backward sees the forward's scores, not those of the new q
  std::vector<float> qa = q;
  ops::attention_train_keep_scores(true);
  fwd(qa);
  const std::vector<float> lse_a = lse;
  qa = q2;  // same buffer (same capacity: no reallocation), new values
  const Grads stale = bwd(qa);
  lse = lse_a;
  CHECK(!(stale == bwd(qa)), "T=%lld: the kept scores were not used", static_cast<long long>(c.T));

  // switched off: computed again
  for (const char* sw : {"QLORA_ATTN_BF16_KEEP=0", "QLORA_ATTN_BF16_KEEP_MB=0"}) {
    std::string s(sw);
    const auto e = s.find('=');
    setenv(s.substr(0, e).c_str(), s.substr(e + 1).c_str(), 1);
    qa = q;
    ops::attention_train_keep_scores(true);
    fwd(qa);
    qa = q2;
    CHECK(bwd(qa) == ref2, "%s: kept scores used", sw);
    setenv("QLORA_ATTN_BF16_KEEP", "1", 1);
    unsetenv("QLORA_ATTN_BF16_KEEP_MB");
  }
  ops::attention_train_keep_scores(false);
}
}  // namespace

int main() {
  if (!bf16_compute_available(SimdLevel::AVX512)) {
    std::printf("skip: no AVX512-BF16 on this CPU\n");
    return 0;
  }
  setenv("QLORA_ATTN_BACKWARD", "fused", 1);
  setenv("QLORA_ATTN_BF16_KEEP", "1", 1);  // opt-in
  for (const Case& c : {Case{2, 131, 6, 2, 64}, Case{1, 70, 4, 2, 20}, Case{2, 64, 3, 3, 80}}) run_case(c);
  CHECK(ops::attention_train_kept_scores_bytes(4, 256, 9) == 4 * 9 * 40960 * 4, "slot size");
  CHECK(ops::attention_train_kept_scores_bytes(4, 2048, 9) == 0, "over the cap");
  if (g_failures) std::fprintf(stderr, "%d failures\n", g_failures);
  return g_failures ? 1 : 0;
}
