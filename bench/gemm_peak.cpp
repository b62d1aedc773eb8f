// One-thread share of the core's FMA peak reached by the fp32 GEMM micro-kernel alone (packed panels
// hot in cache, the driver's tile walk) and by whole GEMMs (packing and NF4 decode included) on the
// SmolLM2-135M training shapes, at one SIMD level. The peak is a register-only FMA loop of that level's
// width (10 independent chains), sampled before and after every timing; its best sample is the peak
// (on a shared VM the clock moves: compare the cases' best rates with it, and medians with medians).
//
// Built by every x86 build as target gemm_peak (tools/dev-build build/dev makes build/dev/gemm_peak);
// run it on one thread:
//   QLORA_NUM_THREADS=1 build/dev/gemm_peak avx2 [rounds=7]      (or avx512)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

#include "cpu/gemm.hpp"

using namespace qlora;
using namespace qlora::cpu;

namespace {

double cpu_s() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// GFLOP/s of 10 independent FMA chains (enough to cover 2 ports x 4 cycles of latency), named
// variables so that they stay in registers.
#define QLORA_PROBE(NAME, TARGET, V, SET1, FMA, CON, LANES)                                             \
  __attribute__((target(TARGET), noinline)) double NAME(long n) {                                       \
    V c0 = SET1(0.f), c1 = SET1(.1f), c2 = SET1(.2f), c3 = SET1(.3f), c4 = SET1(.4f), c5 = SET1(.5f),    \
      c6 = SET1(.6f), c7 = SET1(.7f), c8 = SET1(.8f), c9 = SET1(.9f);                                    \
    const V a = SET1(0.999999f), b = SET1(1e-7f);                                                        \
    const double t0 = cpu_s();                                                                           \
    for (long k = 0; k < n; ++k) {                                                                       \
      c0 = FMA(a, c0, b), c1 = FMA(a, c1, b), c2 = FMA(a, c2, b), c3 = FMA(a, c3, b), c4 = FMA(a, c4, b); \
      c5 = FMA(a, c5, b), c6 = FMA(a, c6, b), c7 = FMA(a, c7, b), c8 = FMA(a, c8, b), c9 = FMA(a, c9, b); \
      __asm__ volatile("" : CON(c0), CON(c1), CON(c2), CON(c3), CON(c4), CON(c5), CON(c6), CON(c7),      \
                       CON(c8), CON(c9));                                                                \
    }                                                                                                    \
    return 2.0 * LANES * 10 * n / (cpu_s() - t0) / 1e9;                                                 \
  }
#define QLORA_X(v) "+x"(v)
#define QLORA_V(v) "+v"(v)
QLORA_PROBE(probe_avx2, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, QLORA_X, 8)
QLORA_PROBE(probe_avx512, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, QLORA_V, 16)

std::vector<float> fill(size_t n, uint32_t seed) {  // uniform in [-1, 1)
  std::vector<float> v(n);
  for (auto& x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = static_cast<int32_t>(seed) * (1.0f / 2147483648.0f);
  }
  return v;
}

struct Case {
  std::string name;
  double flop;
  std::function<void()> run;
  std::vector<double> rate = {};
};

}  // namespace

int main(int argc, char** argv) {
  const bool v512 = argc > 1 && std::string(argv[1]) == "avx512";
  const SimdLevel lv = v512 ? SimdLevel::AVX512 : SimdLevel::AVX2;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 7;
  const auto probe = [&] { return v512 ? probe_avx512(1000000) : probe_avx2(1000000); };

  // Kernel alone: the driver's walk (each B micro-panel down an A block of mc rows) over 8 panels,
  // A block and B panels packed once (in L2), K = 576 in one depth block, beta = 0.
  const GemmPanels& gp = gemm_panels(lv);
  const int64_t kc = gemm_depth_block(lv, 576), M = 1024;
  const int64_t mc0 = gemm_blocking_in_use(lv).mc, nblk = (M + mc0 - 1) / mc0;
  const int64_t mc = ((M + nblk - 1) / nblk + gp.mr - 1) / gp.mr * gp.mr, npan = 8, ldc = npan * gp.nr;
  float* Ap = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kc * mc));
  float* Bp = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kc * gp.nr * npan));
  std::vector<float> Ck(mc * ldc), ta = fill(kc * mc, 1), tb = fill(kc * gp.nr * npan, 2);
  std::memcpy(Ap, ta.data(), sizeof(float) * ta.size());
  std::memcpy(Bp, tb.data(), sizeof(float) * tb.size());

  // Whole GEMMs: NF4 weights (random codes, float absmax, blocksize 64) and fp32 operands.
  std::vector<uint8_t> packed(1536 * 1536 / 2);
  uint32_t s = 7;
  for (auto& b : packed) b = static_cast<uint8_t>((s = s * 1664525u + 1013904223u) >> 24);
  std::vector<float> absmax = fill(1536 * 1536 / 64, 3);
  for (auto& a : absmax) a = 0.02f + 0.01f * a;
  const auto nf4 = [&](int64_t rows, int64_t cols) {
    Nf4Ref w;
    w.packed = packed.data();
    w.absmax = absmax.data();
    w.rows = rows, w.cols = cols, w.blocksize = 64, w.double_quant = false;
    return w;
  };
  std::vector<float> X = fill(M * 1536, 4), Y = fill(M * 1536, 5), H = fill(256 * 576, 6), E = fill(49152 * 576, 7),
                     L = fill(256 * 49152, 8), D = fill(256 * 576, 9);
  std::vector<Case> cases;
  cases.push_back({"ukernel alone " + std::to_string(gp.mr) + "x" + std::to_string(gp.nr) + " kc " +
                       std::to_string(kc) + " mc " + std::to_string(mc),
                   2.0 * mc * ldc * kc, [&] {
                     for (int64_t p = 0; p < npan; ++p)
                       for (int64_t i = 0; i < mc; i += gp.mr)
                         gp.ukernel(kc, Ap + i * kc, Bp + p * gp.nr * kc, Ck.data() + i * ldc + p * gp.nr, ldc, 1.0f,
                                    0.0f, gp.mr, gp.nr);
                   }});
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{1536, 576}, {576, 576}, {192, 576}, {576, 1536}}) {
    const Nf4Ref w = nf4(n, k);
    cases.push_back({"nf4_gemm_nt 1024x" + std::to_string(n) + "x" + std::to_string(k), 2.0 * M * n * k,
                     [&, w, n, k] { nf4_gemm_nt(lv, M, 1.0f, X.data(), k, w, 0.0f, Y.data(), n); }});
  }
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{576, 1536}, {1536, 576}, {576, 576}}) {
    const Nf4Ref w = nf4(k, n);  // dX[M, n] = dY[M, k] · W[k, n]
    cases.push_back({"nf4_gemm_nn 1024x" + std::to_string(n) + "x" + std::to_string(k), 2.0 * M * n * k,
                     [&, w, n, k] { nf4_gemm_nn(lv, M, 1.0f, X.data(), k, w, 0.0f, Y.data(), n); }});
  }
  cases.push_back({"gemm_nt 256x49152x576 (logits)", 2.0 * 256 * 49152 * 576,
                   [&] { gemm_nt(lv, 256, 49152, 576, 1.0f, H.data(), 576, E.data(), 576, 0.0f, L.data(), 49152); }});
  cases.push_back({"gemm_nn 256x576x49152 (dh)", 2.0 * 256 * 49152 * 576,
                   [&] { gemm_nn(lv, 256, 576, 49152, 1.0f, L.data(), 49152, E.data(), 576, 0.0f, D.data(), 576); }});

  std::vector<double> probes;
  for (auto& c : cases) c.run();  // warm-up
  for (int r = 0; r < rounds; ++r) {
    for (auto& c : cases) {
      const double p0 = probe();
      const double t0 = cpu_s();
      int n = 0;
      while (cpu_s() - t0 < 0.15) c.run(), ++n;
      const double g = c.flop * n / (cpu_s() - t0) / 1e9, p1 = probe();
      probes.push_back(p0), probes.push_back(p1);
      c.rate.push_back(g);
    }
  }
  std::sort(probes.begin(), probes.end());
  const double peak = probes.back();
  std::printf("%s, 1 thread CPU time, %d rounds; FMA probe max %.1f GFLOP/s (median %.1f)\n", v512 ? "avx512" : "avx2",
              rounds, peak, probes[probes.size() / 2]);
  std::printf("%-40s %8s %8s %9s\n", "case (GFLOP/s)", "max", "median", "max/peak");
  for (auto& c : cases) {
    std::sort(c.rate.begin(), c.rate.end());
    std::printf("%-40s %8.1f %8.1f %8.0f%%\n", c.name.c_str(), c.rate.back(), c.rate[c.rate.size() / 2],
                100 * c.rate.back() / peak);
  }
  std::free(Ap);
  std::free(Bp);
}
