// Runs cuda/ops_attention_train_backward_tiled.cu's kernels under the CPU emulator (emu.hpp) against
// a float64 reference: tests/test_cuda_emu_attention.py builds it with the kernel source (rewritten
// for the emulator: dynamic shared memory and launches) as tiled_emu.cpp. Arguments: cases
// "B,T,Hq,Hkv,hd,pad,bf16" (pad: masked leading keys of batch row 1; key T/2 of row 0 is masked
// too). Checks every gradient element (inputs with row strides wider than the heads; the padding
// columns of the outputs must stay untouched). Prints a line per tensor, exits 1 on a failure.
#include <cmath>
#include <random>

#include "tiled_emu.cpp"

namespace {
int fails = 0;

// Row-major [rows, ld] fp32 with the heads in the first H * hd columns.
struct Mat {
  int64_t ld;
  std::vector<float> a;
  float& at(int64_t row, int64_t head, int hd, int e) { return a[row * ld + head * hd + e]; }
};

void run_case(int B, int T, int Hq, int Hkv, int hd, int pad, bool bf16) {
  std::mt19937 gen(B * 1000 + T * 10 + hd + Hq);
  std::normal_distribution<float> nd;
  const int G = Hq / Hkv;
  const int64_t rows = int64_t{B} * T;
  auto make = [&](int64_t ld, bool random) {
    Mat m{ld, std::vector<float>(rows * ld, NAN)};
    if (random)
      for (float& x : m.a) x = nd(gen);
    return m;
  };
  Mat q = make(Hq * hd + 3, true), k = make(Hkv * hd + 1, true), v = make(Hkv * hd + 2, true);
  Mat dout = make(Hq * hd + 5, true);
  Mat dq = make(Hq * hd + 1, false), dk = make(Hkv * hd + 3, false), dv = make(Hkv * hd + 4, false);
  for (Mat* m : {&dq, &dk, &dv})  // padding columns: a sentinel the kernels must not touch
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = (m == &dq ? Hq : Hkv) * hd; c < m->ld; ++c) m->a[i * m->ld + c] = 7.0f;
  std::vector<int32_t> km(rows, 1);
  if (B > 1)
    for (int s = 0; s < pad && s < T; ++s) km[T + s] = 0;
  if (T > 4) km[T / 2] = 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Forward in float64: P, then lse and delta = dO·O rounded to fp32 (what the op receives).
  std::vector<float> lse(size_t(B) * Hq * T), delta(lse.size());
  std::vector<double> P(lse.size() * T, 0.0);
  auto dot = [&](Mat& x, int64_t rx, int hx, Mat& y, int64_t ry, int hy) {
    double d = 0;
    for (int e = 0; e < hd; ++e) d += double(x.at(rx, hx, hd, e)) * y.at(ry, hy, hd, e);
    return d;
  };
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int t = 0; t < T; ++t) {
        const size_t r = (size_t(b) * Hq + h) * T + t;
        std::vector<double> S(t + 1, -INFINITY);
        double mx = -INFINITY;
        for (int s = 0; s <= t; ++s)
          if (km[b * T + s]) mx = std::max(mx, S[s] = dot(q, b * T + t, h, k, b * T + s, h / G) * scale);
        if (mx == -INFINITY) {
          lse[r] = -INFINITY, delta[r] = 0.0f;
          continue;
        }
        double den = 0;
        for (int s = 0; s <= t; ++s) den += std::exp(S[s] - mx);
        lse[r] = float(mx + std::log(den));
        for (int s = 0; s <= t; ++s) P[r * T + s] = std::exp(S[s] - double(lse[r]));
        double dl = 0;
        for (int e = 0; e < hd; ++e) {
          double o = 0;
          for (int s = 0; s <= t; ++s) o += P[r * T + s] * v.at(b * T + s, h / G, hd, e);
          dl += double(dout.at(b * T + t, h, hd, e)) * float(o);
        }
        delta[r] = float(dl);
      }
  // Gradients in float64 from that P, lse and delta.
  std::vector<double> rq(rows * Hq * hd, 0.0), rk(rows * Hkv * hd, 0.0), rv(rows * Hkv * hd, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int t = 0; t < T; ++t) {
        const size_t r = (size_t(b) * Hq + h) * T + t;
        const int kh = h / G;
        for (int s = 0; s <= t; ++s) {
          const double p = P[r * T + s];
          if (p == 0.0) continue;
          const double ds = p * (dot(dout, b * T + t, h, v, b * T + s, kh) - delta[r]) * scale;
          for (int e = 0; e < hd; ++e) {
            rq[(size_t(b * T + t) * Hq + h) * hd + e] += ds * k.at(b * T + s, kh, hd, e);
            rk[(size_t(b * T + s) * Hkv + kh) * hd + e] += ds * q.at(b * T + t, h, hd, e);
            rv[(size_t(b * T + s) * Hkv + kh) * hd + e] += p * dout.at(b * T + t, h, hd, e);
          }
        }
      }

  qlora::cuda::attention_train_backward_tiled(nullptr, B, T, Hq, Hkv, hd, q.a.data(), q.ld, k.a.data(), k.ld,
                                              v.a.data(), v.ld, km.data(), scale, lse.data(), dout.a.data(), dout.ld,
                                              delta.data(), dq.a.data(), dq.ld, dk.a.data(), dk.ld, dv.a.data(), dv.ld,
                                              bf16);
  std::printf("case B%d T%d Hq%d Hkv%d hd%d pad%d %s\n", B, T, Hq, Hkv, hd, pad, bf16 ? "bf16" : "fp32");
  auto check = [&](const char* name, Mat& got, const std::vector<double>& ref, int H) {
    double mx = 0, worst = 0;
    for (double x : ref) mx = std::max(mx, std::fabs(x));
    int bad = 0;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t c = 0; c < H * hd; ++c) {
        const double g = got.a[i * got.ld + c], r = ref[i * H * hd + c], e = std::fabs(g - r);
        // bf16: operands rounded to 8 bits; floors: with T = 1, dP - delta cancels to ~1e-8.
        const double tol = bf16 ? 2e-2 * (mx + std::fabs(r)) + 5e-3 : 1e-5 * (mx + std::fabs(r)) + 1e-6;
        if (!(e <= tol) && bad++ < 3) std::printf("   %s row %ld col %ld: got %g, want %g\n", name, long(i), long(c), g, r);
        worst = std::max(worst, e);
      }
      for (int64_t c = H * hd; c < got.ld; ++c)
        if (got.a[i * got.ld + c] != 7.0f && bad++ < 3) std::printf("   %s: padding column written\n", name);
    }
    std::printf("  %s: worst error %.3g (max |ref| %.3g), %d bad\n", name, worst, mx, bad);
    fails += bad != 0;
  };
  check("dq", dq, rq, Hq);
  check("dk", dk, rk, Hkv);
  check("dv", dv, rv, Hkv);
}
}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    int B, T, Hq, Hkv, hd, pad, bf16;
    if (std::sscanf(argv[i], "%d,%d,%d,%d,%d,%d,%d", &B, &T, &Hq, &Hkv, &hd, &pad, &bf16) != 7) return 2;
    run_case(B, T, Hq, Hkv, hd, pad, bf16 != 0);
  }
  std::printf(fails ? "FAILURES %d\n" : "ALL OK\n", fails);
  return fails != 0;
}
