// The AVX2 row kernels (cpu/rowops_kernels_avx2.cpp, cpu/swiglu_kernels_avx2.cpp) against the AVX-512
// ones, bit for bit: the same exp (simd_exp_avx2.hpp's short form for |x| <= 87 gives the same bits as
// the two-halves 2^n and as vscalefps) and the double sums in the same lanes and fold order. The
// training ops round these double sums to fp32, so only the raw kernel results show an order change.
// Skipped (passes) where the CPU lacks AVX-512.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "cpu/features.hpp"
#include "cpu/rowops_kernels.hpp"
#include "cpu/swiglu_kernels.hpp"

using namespace qlora::cpu;

namespace {

bool same(const float* a, const float* b, int64_t n) { return std::memcmp(a, b, sizeof(float) * n) == 0; }
bool same(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

}  // namespace

int main() {
  if (!simd_level_supported(SimdLevel::AVX512) || !simd_level_supported(SimdLevel::AVX2)) {
    std::printf("skipped: needs AVX2 and AVX-512\n");
    return 0;
  }
  const rowk::Kernels &A = rowk::kernels_avx2, &B = rowk::kernels_avx512;
  std::mt19937 rng(15);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const float edge[] = {87.0f, -87.0f, 87.01f, -87.01f, 88.7f, 88.73f, -100.0f, -103.9f, -104.0f, -120.0f,
                        95.0f, -INFINITY, 0.0f, -0.0f};
  for (int64_t n : {1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 576, 577, 1003, 4099}) {
    for (int kind = 0; kind < 3; ++kind) {  // plain, edge values spliced in, mostly wide-form magnitudes
      std::vector<float> x(n), w(n), g(n), u(n), d(n);
      for (int64_t i = 0; i < n; ++i) {
        x[i] = nd(rng) * (kind == 2 ? 40.0f : 1.0f);
        w[i] = nd(rng), g[i] = nd(rng), u[i] = nd(rng), d[i] = nd(rng);
      }
      if (kind == 1)
        for (int64_t i = 0; i < n && i < static_cast<int64_t>(sizeof edge / sizeof *edge); ++i) x[(i * 7) % n] = edge[i];
      std::vector<float> fin(x);  // the sums take finite values
      for (float& v : fin)
        if (!std::isfinite(v)) v = 1.0f;
      CHECK(same(A.sumsq(fin.data(), n), B.sumsq(fin.data(), n)), "sumsq n=%ld kind=%d", (long)n, kind);
      double s2, d2, s5, d5;
      A.sumsq_dot(fin.data(), w.data(), g.data(), n, &s2, &d2);
      B.sumsq_dot(fin.data(), w.data(), g.data(), n, &s5, &d5);
      CHECK(same(s2, s5) && same(d2, d5), "sumsq_dot n=%ld kind=%d", (long)n, kind);
      const float sub = kind == 2 ? 0.0f : 2.5f;
      CHECK(same(A.exp_sum_ro(x.data(), n, sub), B.exp_sum_ro(x.data(), n, sub)), "exp_sum_ro n=%ld kind=%d",
            (long)n, kind);
      std::vector<float> e2(x), e5(x);
      const double t2 = A.exp_sum(e2.data(), n, sub), t5 = B.exp_sum(e5.data(), n, sub);
      CHECK(same(t2, t5) && same(e2.data(), e5.data(), n), "exp_sum n=%ld kind=%d", (long)n, kind);
      e2 = x, e5 = x;
      A.exp_scale(e2.data(), n, sub, 0.375f);
      B.exp_scale(e5.data(), n, sub, 0.375f);
      CHECK(same(e2.data(), e5.data(), n), "exp_scale n=%ld kind=%d", (long)n, kind);
      std::vector<float> dg2(n), du2(n), dg5(n), du5(n), o2(n), o5(n);
      A.swiglu_bwd(n, fin.data(), u.data(), d.data(), dg2.data(), du2.data());
      B.swiglu_bwd(n, fin.data(), u.data(), d.data(), dg5.data(), du5.data());
      CHECK(same(dg2.data(), dg5.data(), n) && same(du2.data(), du5.data(), n), "swiglu_bwd n=%ld kind=%d", (long)n,
            kind);
      swiglu_k::rows_avx2(0, 1, n, fin.data(), n, u.data(), n, o2.data(), n);
      swiglu_k::rows_avx512(0, 1, n, fin.data(), n, u.data(), n, o5.data(), n);
      CHECK(same(o2.data(), o5.data(), n), "swiglu n=%ld kind=%d", (long)n, kind);
      CHECK(A.max(fin.data(), n) == B.max(fin.data(), n), "max n=%ld kind=%d", (long)n, kind);
    }
  }
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
