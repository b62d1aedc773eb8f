// Runs the KV-cache attention (cuda/ops_attention.cu: the decode kernel with the shared warp merge
// of attention_warp_merge.cuh for T < kFlashMinT, the flash-tiled prefill kernel from kFlashMinT)
// under the CPU emulator (emu.hpp, built as sm_75: plain loads instead of cp.async) against
// float64, over fp32 and bf16 caches. tests/test_cuda_emu_attention.py builds it. Arguments: cases
// "B,T,Hq,Hkv,hd,S_cap,start,bf16" (batch row 1 has its first 5 cache slots masked; slot 2 of row 0
// too). Exits 1 on a failure.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "ops_attention.cuh"

namespace {
int fails = 0;

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void run_case(int B, int T, int Hq, int Hkv, int hd, int S, int start, bool bf16) {
  std::mt19937 gen(B * 3 + T * 5 + hd * 7 + S);
  std::normal_distribution<float> nd;
  const int G = Hq / Hkv;
  const int64_t ldq = int64_t{Hq} * hd + 2, ldo = int64_t{Hq} * hd + 1, n_cache = int64_t{B} * Hkv * S * hd;
  std::vector<float> q(int64_t{B} * T * ldq), kc(n_cache), vc(n_cache), out(int64_t{B} * T * ldo, 7.0f);
  for (auto* a : {&q, &kc, &vc})
    for (float& x : *a) x = nd(gen);
  std::vector<uint16_t> kb(n_cache), vb(n_cache);
  for (int64_t i = 0; i < n_cache; ++i) {
    kb[i] = to_bf16(kc[i]), vb[i] = to_bf16(vc[i]);
    if (bf16) kc[i] = from_bf16(kb[i]), vc[i] = from_bf16(vb[i]);  // the reference sees the cache's values
  }
  std::vector<int32_t> km(int64_t{B} * S, 1);
  if (S > 2) km[2] = 0;
  if (B > 1)
    for (int s = 0; s < 5 && s < S; ++s) km[S + s] = 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  if (bf16)
    qlora::cuda::attention_kv_bf16(nullptr, B, T, Hq, Hkv, hd, q.data(), ldq, kb.data(), vb.data(), S, start, km.data(),
                                   scale, out.data(), ldo);
  else
    qlora::cuda::attention(nullptr, B, T, Hq, Hkv, hd, q.data(), ldq, kc.data(), vc.data(), S, start, km.data(), scale,
                           out.data(), ldo);
  int bad = 0;
  double worst = 0;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < Hq; ++h) {
        const float* K = &kc[(int64_t{b} * Hkv + h / G) * S * hd];
        const float* V = &vc[(int64_t{b} * Hkv + h / G) * S * hd];
        const float* qr = &q[(int64_t{b} * T + t) * ldq + h * hd];
        std::vector<double> sc(start + t + 1, -INFINITY);
        double mx = -INFINITY;
        for (int s = 0; s <= start + t; ++s) {
          if (!km[b * S + s]) continue;
          double d = 0;
          for (int e = 0; e < hd; ++e) d += double(qr[e]) * K[int64_t{s} * hd + e];
          sc[s] = d * scale, mx = std::max(mx, sc[s]);
        }
        double den = 0;
        for (double x : sc) den += x == -INFINITY ? 0.0 : std::exp(x - mx);
        for (int e = 0; e < hd; ++e) {
          double o = 0, mag = 0;
          for (int s = 0; s <= start + t; ++s)
            if (sc[s] != -INFINITY) {
              const double p = std::exp(sc[s] - mx) / den;
              o += p * V[int64_t{s} * hd + e], mag += p * std::fabs(V[int64_t{s} * hd + e]);
            }
          const double g = out[(int64_t{b} * T + t) * ldo + h * hd + e], err = std::fabs(g - o);
          if (!(err <= 1e-5 * (mag + 1.0)) && bad++ < 3)
            std::printf("   out [b%d t%d h%d d%d]: got %g, want %g\n", b, t, h, e, g, o);
          worst = std::max(worst, err);
        }
        for (int64_t c = int64_t{Hq} * hd; c < ldo; ++c)
          if (out[(int64_t{b} * T + t) * ldo + c] != 7.0f && bad++ < 3) std::printf("   padding column written\n");
      }
  std::printf("case B%d T%d Hq%d Hkv%d hd%d S%d start%d %s (%s): worst error %.3g, %d bad\n", B, T, Hq, Hkv, hd, S,
              start, bf16 ? "bf16 cache" : "fp32 cache", T >= qlora::cuda::kFlashMinT ? "flash" : "decode", worst, bad);
  fails += bad != 0;
}
}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    int B, T, Hq, Hkv, hd, S, start, bf16;
    if (std::sscanf(argv[i], "%d,%d,%d,%d,%d,%d,%d,%d", &B, &T, &Hq, &Hkv, &hd, &S, &start, &bf16) != 8) return 2;
    run_case(B, T, Hq, Hkv, hd, S, start, bf16 != 0);
  }
  std::printf(fails ? "FAILURES %d\n" : "ALL OK\n", fails);
  return fails != 0;
}
