// The LoRA GEMMs in bf16 compute (model/lora.hpp, bf16 = true: the training pass under
// compute_dtype="bfloat16") against a float64 reference that rounds the same operands to bf16
// (RNE) at the same points: x, A in the shrink t = x·Aᵀ; t, B in the expand; dy, B in dt = s dy·B;
// dy, t in dB; dt, x in dA; dt, A in dx. u = 2^-8 (bf16's relative rounding bound). Bounds:
//  - vs that reference: fp32 accumulation, (K + 6) eps32 * the magnitude sum |a|·|b| of the GEMM,
//    plus 2u * |t| (or |dt|) times the second factor's magnitude where the engine's fp32 t rounds
//    to the neighbouring bf16 of the reference's double t (an intermediate "flip": rare); and at
//    least 99% of the elements within the accumulation bound alone (so the rounding points are
//    the reference's: fp32 operands would miss it almost everywhere);
//  - vs the exact float64 result (no rounding): 4 rounded operands per chain, 4u + the above.
// Grouped (q/k/v through lora_*_group) == per-module within the fp32 bound, and bf16 = false is
// the fp32 result bit for bit (the old code path). On cpu (AVX512-BF16 kernels, where the CPU has
// them) and cpu:scalar (the emulating oracle).
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "backend.hpp"
#include "check.hpp"
#include "lora_fixture.hpp"
#include "model/lora.hpp"

using namespace qlora;
using namespace qlora::model;
using lora_fixture::close;
using lora_fixture::Dev;
using lora_fixture::down;
using lora_fixture::make_qkv_adapter;

namespace {

constexpr int64_t M = 61, D = 40;  // 61 rows: two 28-row tiles and a tail
const int64_t kOut[3] = {40, 24, 24}, kRank[3] = {16, 8, 5};
constexpr double U = 1.0 / 256, EPS32 = 1.1920928955078125e-07;
constexpr float kScale = 0.75f;

double r16(double v) {  // RNE to bf16 (normal range; denormals flushed as the kernels do)
  float f = static_cast<float>(v);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7F800000u) == 0) return 0.0;
  b = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &b, 4);
  return f;
}

std::vector<float> wave(size_t n, float f, float s) { return lora_fixture::wave(n, f, s, 0.01f); }

// Row-major double matrices; C[i][j] = sum_k a(i, k) b(k, j) with optional rounding of each operand.
struct Mat {
  int64_t rows, cols;
  std::vector<double> v;
  Mat(int64_t r, int64_t c) : rows(r), cols(c), v(static_cast<size_t>(r * c), 0.0) {}
  double& at(int64_t i, int64_t j) { return v[static_cast<size_t>(i * cols + j)]; }
  double at(int64_t i, int64_t j) const { return v[static_cast<size_t>(i * cols + j)]; }
};
Mat from(const std::vector<float>& h, int64_t r, int64_t c) {
  Mat m(r, c);
  for (size_t i = 0; i < m.v.size(); ++i) m.v[i] = h[i];
  return m;
}
Mat round16(const Mat& a) {
  Mat m = a;
  for (double& x : m.v) x = r16(x);
  return m;
}
Mat absm(const Mat& a) {
  Mat m = a;
  for (double& x : m.v) x = std::fabs(x);
  return m;
}
Mat tr(const Mat& a) {
  Mat m(a.cols, a.rows);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) m.at(j, i) = a.at(i, j);
  return m;
}
Mat mul(const Mat& a, const Mat& b, double s = 1.0) {  // s * a·b
  Mat c(a.rows, b.cols);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t k = 0; k < a.cols; ++k)
      for (int64_t j = 0; j < b.cols; ++j) c.at(i, j) += s * a.at(i, k) * b.at(k, j);
  return c;
}
Mat add(const Mat& a, const Mat& b, double s = 1.0) {
  Mat c = a;
  for (size_t i = 0; i < c.v.size(); ++i) c.v[i] += s * b.v[i];
  return c;
}

// Engine result `got` vs rounded reference `ref` (acc: accumulation bound, flip: intermediate
// flip term) and vs exact `ex` (4u * mag + acc + flip). Returns the fraction within acc alone.
double check_out(const char* name, const char* what, const std::vector<float>& got, const Mat& ref, const Mat& acc,
                 const Mat& flip, const Mat& ex, const Mat& mag) {
  int64_t tight = 0, bad = 0, bad_ex = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(got[i] - ref.v[i]);
    tight += e <= acc.v[i] + 1e-30;
    bad += e > acc.v[i] + flip.v[i] + 1e-30;
    bad_ex += std::fabs(got[i] - ex.v[i]) > 4 * U * mag.v[i] + acc.v[i] + flip.v[i] + 1e-30;
  }
  CHECK(bad == 0, "%s: %s: %lld elements off the rounded reference", name, what, static_cast<long long>(bad));
  CHECK(bad_ex == 0, "%s: %s: %lld elements off the exact reference", name, what, static_cast<long long>(bad_ex));
  return static_cast<double>(tight) / static_cast<double>(got.size());
}

std::unique_ptr<LoraAdapter> make_adapter(Backend& be) {
  auto a = make_qkv_adapter(be, D, kOut, kRank, 0.01f);
  pack_lora_params(be, *a);
  ensure_lora_grads(be, *a);
  return a;
}

void check_backend(Backend& be, const char* name) {
  if (!be.has_bf16_compute()) {
    std::printf("test_lora_bf16: %s has no bf16 compute, skipped\n", name);
    return;
  }
  auto ad = make_adapter(be);
  LoraModule* m[3] = {ad->at(0, 0), ad->at(0, 1), ad->at(0, 2)};
  const auto xh = wave(static_cast<size_t>(M * D), 0.9f, 1.0f), dx0h = wave(static_cast<size_t>(M * D), 0.33f, 1.0f);
  Dev x(be, xh), t(be, std::vector<float>(M * 29)), dt(be, std::vector<float>(M * 29));
  const Mat X = from(xh, M, D), Xr = round16(X), DX0 = from(dx0h, M, D);
  double worst_tight = 1.0;
  std::vector<std::vector<float>> y_mod, dA_mod, dB_mod;
  std::vector<float> dx_mod;
  {
    Dev dx(be, dx0h);
    for (int i = 0; i < 3; ++i) {
      const LoraModule& mi = *m[i];
      const int64_t r = mi.r, out = mi.out;
      const double s = static_cast<double>(kScale) * mi.scaling;
      const Mat A = from(down(be, mi.A.f32(), r * D), r, D), B = from(down(be, mi.B.f32(), out * r), out, r);
      const Mat Ar = round16(A), Br = round16(B);
      const auto y0h = wave(static_cast<size_t>(M * out), 0.2f * (i + 1), 0.1f);
      const auto dyh = wave(static_cast<size_t>(M * out), 0.55f + 0.1f * i, 1.0f);
      const Mat Y0 = from(y0h, M, out), DY = from(dyh, M, out), DYr = round16(DY);
      Dev y(be, y0h), y32(be, y0h), dy(be, dyh);

      // Forward: y = y0 + s * r(r(x)·r(A)ᵀ)·r(B)ᵀ.
      lora_forward(be, mi, M, x.f(), D, y.f(), out, t.f(), kScale, true);
      lora_forward(be, mi, M, x.f(), D, y32.f(), out, t.f(), kScale, false);
      const Mat T = mul(Xr, tr(Ar)), Tr = round16(T), Tex = mul(X, tr(A));
      const Mat Tmag = mul(absm(X), tr(absm(A)));
      const Mat yref = add(Y0, mul(Tr, tr(Br), s)), yex = add(Y0, mul(Tex, tr(B), s));
      const Mat ymag = add(absm(Y0), mul(Tmag, tr(absm(B)), s));
      Mat yacc = ymag, yflip = mul(Tmag, tr(absm(B)), 2 * U * s);
      for (double& v : yacc.v) v *= (r + D + 8) * EPS32;
      const auto yg = y.get();
      worst_tight = std::fmin(worst_tight, check_out(name, "forward", yg, yref, yacc, yflip, yex, ymag));
      y_mod.push_back(yg);
      {  // the criterion discriminates: the fp32 branch misses the rounded reference almost everywhere
        const auto y32g = y32.get();
        int64_t hit = 0;
        for (size_t k = 0; k < y32g.size(); ++k) hit += std::fabs(y32g[k] - yref.v[k]) <= yacc.v[k] + 1e-30;
        CHECK(hit < static_cast<int64_t>(y32g.size()) / 2, "%s: fp32 forward matches the bf16 reference", name);
      }
      // bf16 = false: exactly the two fp32 GEMMs of before.
      {
        Dev tt(be, std::vector<float>(M * r)), yy(be, y0h);
        be.gemm_nt(M, r, D, 1.0f, x.f(), D, mi.A.f32(), D, 0.0f, tt.f(), r);
        be.gemm_nt(M, out, r, kScale * mi.scaling, tt.f(), r, mi.B.f32(), r, 1.0f, yy.f(), out);
        CHECK(yy.get() == y32.get(), "%s: fp32 LoRA forward changed", name);
      }

      // Backward into zeroed gradients; dx accumulates over the three modules (beta 0.5 first).
      lora_backward(be, *m[i], M, x.f(), D, dy.f(), out, dx.f(), D, i == 0 ? 0.5f : 1.0f, t.f(), dt.f(), kScale, true);
      const Mat DT = mul(DYr, Br, s), DTr = round16(DT), DTex = mul(DY, B, s);
      const Mat DTmag = mul(absm(DY), absm(B), s);
      // dB = s * r(dy)ᵀ·r(t)   [out, r]
      const Mat dBref = mul(tr(DYr), Tr, s), dBex = mul(tr(DY), Tex, s), dBmag = mul(tr(absm(DY)), Tmag, s);
      Mat dBacc = dBmag, dBflip = dBmag;
      for (double& v : dBacc.v) v *= (M + D + 8) * EPS32;
      for (double& v : dBflip.v) v *= 2 * U;
      // dA = r(dt)ᵀ·r(x)   [r, D]
      const Mat dAref = mul(tr(DTr), Xr), dAex = mul(tr(DTex), X), dAmag = mul(tr(DTmag), absm(X));
      Mat dAacc = dAmag, dAflip = dAmag;
      for (double& v : dAacc.v) v *= (M + out + 8) * EPS32;
      for (double& v : dAflip.v) v *= 2 * U;
      const auto dBg = down(be, mi.dB, out * r), dAg = down(be, mi.dA, r * D);
      worst_tight = std::fmin(worst_tight, check_out(name, "dB", dBg, dBref, dBacc, dBflip, dBex, dBmag));
      worst_tight = std::fmin(worst_tight, check_out(name, "dA", dAg, dAref, dAacc, dAflip, dAex, dAmag));
      dA_mod.push_back(dAg), dB_mod.push_back(dBg);
    }
    dx_mod = dx.get();
  }
  // dx = 0.5 dx0 + sum_i r(dt_i)·r(A_i), checked once for the sum.
  {
    Mat dxref = DX0, dxex = DX0, dxmag = absm(DX0);
    for (double& v : dxref.v) v *= 0.5;
    for (double& v : dxex.v) v *= 0.5;
    for (double& v : dxmag.v) v *= 0.5;
    for (int i = 0; i < 3; ++i) {
      const LoraModule& mi = *m[i];
      const int64_t r = mi.r, out = mi.out;
      const double s = static_cast<double>(kScale) * mi.scaling;
      const Mat A = from(down(be, mi.A.f32(), r * D), r, D), B = from(down(be, mi.B.f32(), out * r), out, r);
      const Mat DY = from(wave(static_cast<size_t>(M * out), 0.55f + 0.1f * i, 1.0f), M, out);
      const Mat DTr = round16(mul(round16(DY), round16(B), s));
      dxref = add(dxref, mul(DTr, round16(A)));
      dxex = add(dxex, mul(mul(DY, B, s), A));
      dxmag = add(dxmag, mul(mul(absm(DY), absm(B), s), absm(A)));
    }
    Mat dxacc = dxmag, dxflip = dxmag;
    for (double& v : dxacc.v) v *= (29 + 64 + 8) * EPS32;
    for (double& v : dxflip.v) v *= 2 * U;
    worst_tight = std::fmin(worst_tight, check_out(name, "dx", dx_mod, dxref, dxacc, dxflip, dxex, dxmag));
  }
  CHECK(worst_tight >= 0.99, "%s: only %.3f of the elements match the rounded reference to fp32 accuracy", name,
        worst_tight);

  // Grouped q/k/v in bf16 == per module (the same bf16 products; fp32 sums reordered).
  const double tol = 64.0 * EPS32;
  zero_lora_grads(be, *ad);
  const LoraModule* cm[3] = {m[0], m[1], m[2]};
  std::vector<std::unique_ptr<Dev>> ys, dys;
  float* yp[3];
  const float* dyp[3];
  int64_t ld[3];
  for (int i = 0; i < 3; ++i) {
    ys.push_back(std::make_unique<Dev>(be, wave(static_cast<size_t>(M * kOut[i]), 0.2f * (i + 1), 0.1f)));
    dys.push_back(std::make_unique<Dev>(be, wave(static_cast<size_t>(M * kOut[i]), 0.55f + 0.1f * i, 1.0f)));
    yp[i] = ys[i]->f(), dyp[i] = dys[i]->f(), ld[i] = kOut[i];
  }
  lora_forward_group(be, 3, cm, M, x.f(), D, yp, ld, t.f(), kScale, true);
  Dev dx(be, dx0h);
  lora_backward_group(be, 3, m, M, x.f(), D, dyp, ld, dx.f(), D, 0.5f, t.f(), dt.f(), kScale, true);
  for (int i = 0; i < 3; ++i) {
    CHECK(close(ys[i]->get(), y_mod[i], tol), "%s: grouped forward %d", name, i);
    CHECK(close(down(be, m[i]->dA, kRank[i] * D), dA_mod[i], tol), "%s: grouped dA %d", name, i);
    CHECK(close(down(be, m[i]->dB, kOut[i] * kRank[i]), dB_mod[i], tol), "%s: grouped dB %d", name, i);
  }
  CHECK(close(dx.get(), dx_mod, tol), "%s: grouped dx", name);
}

}  // namespace

int main() {
  check_backend(get_backend("cpu"), "cpu");
  check_backend(get_backend("cpu:scalar"), "cpu:scalar");
  if (g_failures == 0) std::printf("test_lora_bf16: ok\n");
  return g_failures ? 1 : 0;
}
