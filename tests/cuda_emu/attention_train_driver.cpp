// Runs the whole training attention op pair under the CPU emulator (emu.hpp): attention_train
// (ops_attention_train.cu, the warp merge of attention_warp_merge.cuh) and the
// attention_train_backward launcher (ops_attention_train_backward.cu: the delta kernel, then the
// tiled kernels or the untiled reference ones) against float64. tests/test_cuda_emu_attention.py
// builds it with those sources rewritten for the emulator. Arguments: cases
// "B,T,Hq,Hkv,hd,pad,mode", mode 0: fp32, 1: bf16, 2: fp32 with QLORA_CUDA_ATTN_BACKWARD=reference,
// 3: bf16 with QLORA_CUDA_ATTN_BACKWARD=simt. Exits 1 on a failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ops_attention_train.cuh"
#include "ops_attention_train_backward.cuh"

namespace {
int fails = 0;

void compare(const char* name, const float* got, int64_t ld, const std::vector<double>& ref, int64_t rows,
             int64_t width, double rel, double floor) {
  double mx = 0, worst = 0;
  for (double x : ref) mx = std::max(mx, std::isfinite(x) ? std::fabs(x) : 0.0);
  int bad = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < width; ++c) {
      const double g = got[i * ld + c], r = ref[i * width + c];
      const bool ok = std::isinf(r) ? g == r : std::fabs(g - r) <= rel * (mx + std::fabs(r)) + floor;
      if (!ok && bad++ < 3) std::printf("   %s [%ld, %ld]: got %g, want %g\n", name, long(i), long(c), g, r);
      if (std::isfinite(r)) worst = std::max(worst, std::fabs(g - r));
    }
  std::printf("  %s: worst error %.3g (max |ref| %.3g), %d bad\n", name, worst, mx, bad);
  fails += bad != 0;
}

void run_case(int B, int T, int Hq, int Hkv, int hd, int pad, int mode) {
  std::mt19937 gen(B * 7 + T * 13 + hd * 17 + Hq);
  std::normal_distribution<float> nd;
  const int G = Hq / Hkv;
  const int64_t rows = int64_t{B} * T, QD = int64_t{Hq} * hd, KD = int64_t{Hkv} * hd;
  std::vector<float> q(rows * QD), k(rows * KD), v(rows * KD), dout(rows * QD);
  for (auto* a : {&q, &k, &v, &dout})
    for (float& x : *a) x = nd(gen);
  std::vector<int32_t> km(rows, 1);
  if (B > 1)
    for (int s = 0; s < pad && s < T; ++s) km[T + s] = 0;
  if (T > 4) km[T / 2] = 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // float64 forward and backward
  std::vector<double> O(rows * QD, 0.0), L(size_t(B) * Hq * T, -INFINITY), dQ(rows * QD, 0.0), dK(rows * KD, 0.0),
      dV(rows * KD, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int kh = h / G;
      for (int t = 0; t < T; ++t) {
        std::vector<double> P(t + 1, 0.0);
        double mx = -INFINITY;
        for (int s = 0; s <= t; ++s) {
          if (!km[b * T + s]) continue;
          double d = 0;
          for (int e = 0; e < hd; ++e) d += double(q[(b * T + t) * QD + h * hd + e]) * k[(b * T + s) * KD + kh * hd + e];
          P[s] = d * scale, mx = std::max(mx, P[s]);
        }
        if (mx == -INFINITY) continue;
        double den = 0;
        for (int s = 0; s <= t; ++s) den += km[b * T + s] ? std::exp(P[s] - mx) : 0.0;
        L[(size_t(b) * Hq + h) * T + t] = mx + std::log(den);
        for (int s = 0; s <= t; ++s) P[s] = km[b * T + s] ? std::exp(P[s] - mx) / den : 0.0;
        double delta = 0;
        for (int e = 0; e < hd; ++e) {
          double o = 0;
          for (int s = 0; s <= t; ++s) o += P[s] * v[(b * T + s) * KD + kh * hd + e];
          O[(b * T + t) * QD + h * hd + e] = o;
          delta += o * dout[(b * T + t) * QD + h * hd + e];
        }
        for (int s = 0; s <= t; ++s) {
          if (P[s] == 0.0) continue;
          double dp = 0;
          for (int e = 0; e < hd; ++e) dp += double(dout[(b * T + t) * QD + h * hd + e]) * v[(b * T + s) * KD + kh * hd + e];
          const double ds = P[s] * (dp - delta) * scale;
          for (int e = 0; e < hd; ++e) {
            dQ[(b * T + t) * QD + h * hd + e] += ds * k[(b * T + s) * KD + kh * hd + e];
            dK[(b * T + s) * KD + kh * hd + e] += ds * q[(b * T + t) * QD + h * hd + e];
            dV[(b * T + s) * KD + kh * hd + e] += P[s] * dout[(b * T + t) * QD + h * hd + e];
          }
        }
      }
    }

  const char* names[] = {"fp32", "bf16", "fp32 reference", "bf16 simt"};
  std::printf("case B%d T%d Hq%d Hkv%d hd%d pad%d %s\n", B, T, Hq, Hkv, hd, pad, names[mode]);
  std::vector<float> out(rows * QD, NAN), lse(size_t(B) * Hq * T, NAN);
  qlora::cuda::attention_train(nullptr, B, T, Hq, Hkv, hd, q.data(), QD, k.data(), KD, v.data(), KD, km.data(), scale,
                               out.data(), QD, lse.data());
  compare("out", out.data(), QD, O, rows, QD, 1e-5, 1e-6);
  compare("lse", lse.data(), T, L, int64_t{B} * Hq, T, 1e-6, 1e-5);
  if (mode >= 2)
    setenv("QLORA_CUDA_ATTN_BACKWARD", mode == 2 ? "reference" : "simt", 1);
  else
    unsetenv("QLORA_CUDA_ATTN_BACKWARD");
  std::vector<float> dq(rows * QD, NAN), dk(rows * KD, NAN), dv(rows * KD, NAN), delta(lse.size(), NAN);
  qlora::cuda::attention_train_backward(nullptr, B, T, Hq, Hkv, hd, q.data(), QD, k.data(), KD, v.data(), KD, km.data(),
                                        scale, out.data(), QD, lse.data(), dout.data(), QD, dq.data(), QD, dk.data(), KD,
                                        dv.data(), KD, delta.data(), mode == 1 || mode == 3);
  const double rel = mode == 1 ? 2e-2 : 1e-4, floor = mode == 1 ? 5e-3 : 1e-5;  // bf16 tensor cores: 8-bit operands
  compare("dq", dq.data(), QD, dQ, rows, QD, rel, floor);
  compare("dk", dk.data(), KD, dK, rows, KD, rel, floor);
  compare("dv", dv.data(), KD, dV, rows, KD, rel, floor);
}
}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    int B, T, Hq, Hkv, hd, pad, mode;
    if (std::sscanf(argv[i], "%d,%d,%d,%d,%d,%d,%d", &B, &T, &Hq, &Hkv, &hd, &pad, &mode) != 7 || mode < 0 || mode > 3)
      return 2;
    run_case(B, T, Hq, Hkv, hd, pad, mode);
  }
  std::printf(fails ? "FAILURES %d\n" : "ALL OK\n", fails);
  return fails != 0;
}
