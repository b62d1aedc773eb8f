// ctest for cpu::nf4_gemv_nt: every SIMD level vs the scalar reference (double accumulation) on
// random valid NF4 weights (random nibbles, scales, nested scales), ragged shapes, straddling
// blocks, double quant on/off, alpha/beta. Bound: the fp32 worst case |err| <= gamma_K * sum|x*w|
// (gamma_K ~ K*eps), which any wrong weight or block scale still exceeds by orders of magnitude.
// `test_nf4_gemv bench [rows cols]` times M = 1..4 at the best level and prints GB/s streamed.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/features.hpp"
#include "cpu/gemm_scalar.hpp"
#include "cpu/nf4_gemv.hpp"
#include "common/error.hpp"
#include "cpu/threads.hpp"
#include "nf4/nf4_codec.hpp"
#include "tensor_types.hpp"

using namespace qlora;

namespace {

struct Weight {  // owns the arrays an Nf4Ref points to
  std::vector<uint8_t> packed, absmax_codes;
  std::vector<float> absmax_f, nested;
  Nf4Ref ref;
};

Weight random_weight(std::mt19937& g, int64_t rows, int64_t cols, int bs, bool dq) {
  Weight w;
  const int64_t n = rows * cols, nb = (n + bs - 1) / bs;
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  w.packed.resize((n + 1) / 2);
  for (auto& b : w.packed) b = static_cast<uint8_t>(byte(g));
  w.ref.packed = w.packed.data();
  w.ref.rows = rows;
  w.ref.cols = cols;
  w.ref.blocksize = bs;
  w.ref.double_quant = dq;
  if (dq) {
    w.absmax_codes.resize(nb);
    for (auto& c : w.absmax_codes) c = static_cast<uint8_t>(byte(g));
    w.nested.resize((nb + 255) / 256);
    for (auto& v : w.nested) v = u(g);
    w.ref.absmax = w.absmax_codes.data();
    w.ref.nested_absmax = w.nested.data();
    w.ref.nested_map = nf4::kDynamicMap;
    w.ref.offset = 2.5f;  // keeps decoded scales positive-ish like real absmax
  } else {
    w.absmax_f.resize(nb);
    for (auto& v : w.absmax_f) v = u(g);
    w.ref.absmax = w.absmax_f.data();
  }
  return w;
}

int g_failures = 0;

void check_case(std::mt19937& g, cpu::SimdLevel level, int64_t M, int64_t rows, int64_t cols, int bs, bool dq,
                float alpha, float beta) {
  Weight w = random_weight(g, rows, cols, bs, dq);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t ldx = cols + 3, ldy = rows + 5;  // padded leading dimensions
  std::vector<float> X(M * ldx), Y0(M * ldy), Y(M * ldy), R(M * ldy);
  for (auto& v : X) v = nd(g);
  for (auto& v : Y0) v = nd(g);
  Y = Y0;
  R = Y0;
  if (beta == 0.0f)  // beta == 0 must not read Y: poison it
    for (int64_t i = 0; i < M * ldy; ++i) Y[i] = NAN;
  cpu::nf4_gemv_nt(level, M, alpha, X.data(), ldx, w.ref, beta, Y.data(), ldy);
  cpu::scalar::nf4_gemm_nt(M, alpha, X.data(), ldx, w.ref, beta, R.data(), ldy);
  const double eps = std::ldexp(1.0, -24);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r) {
      double mag = 0.0;  // sum |x * w|
      for (int64_t c = 0; c < cols; ++c)
        mag += std::fabs(static_cast<double>(X[m * ldx + c]) * cpu::scalar::nf4_element(w.ref, r * cols + c));
      const double ref = R[m * ldy + r];
      const double tol = 2.0 * (cols + 4) * eps * std::fabs(alpha) * mag +
                         4.0 * eps * (std::fabs(ref) + std::fabs(beta * Y0[m * ldy + r])) + 1e-30;
      const double got = Y[m * ldy + r];
      if (!(std::fabs(got - ref) <= tol)) {
        if (++g_failures <= 10)
          std::printf("FAIL level=%s M=%lld rows=%lld cols=%lld bs=%d dq=%d alpha=%g beta=%g: y[%lld,%lld]=%.9g ref=%.9g tol=%.3g\n",
                      cpu::simd_level_name(level), (long long)M, (long long)rows, (long long)cols, bs, (int)dq, alpha,
                      beta, (long long)m, (long long)r, got, ref, tol);
        return;
      }
    }
  // Y outside [M, rows] (the ldy padding) must be untouched.
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = rows; r < ldy; ++r)
      if (beta != 0.0f && std::memcmp(&Y[m * ldy + r], &Y0[m * ldy + r], 4) != 0 && ++g_failures <= 10)
        std::printf("FAIL: padding of Y written (level=%s)\n", cpu::simd_level_name(level));
}

int run_tests() {
  std::mt19937 g(12345);
  const int64_t dims[] = {1, 2, 7, 32, 63, 64, 65, 96, 577};
  int n_cases = 0;
  for (cpu::SimdLevel level : cpu::supported_simd_levels()) {
    if (level == cpu::SimdLevel::Scalar) continue;
    for (int64_t M = 1; M <= cpu::kNf4GemvMaxM; ++M)
      for (int64_t rows : dims)
        for (int64_t cols : dims)
          for (bool dq : {true, false}) {
            const int bs = (rows * cols) % 3 == 0 ? 32 : ((rows + cols) % 2 ? 64 : 128);
            check_case(g, level, M, rows, cols, bs, dq, 1.0f, 0.0f);
            ++n_cases;
          }
    // Block sizes, SIMD-friendly K with straddling blocks, alpha/beta, more rows than threads.
    for (int bs : {32, 64, 128, 256, 1024, 4096})
      for (int64_t cols : {32, 96, 160, 576, 4096}) {
        check_case(g, level, 1 + (bs % 4), 37, cols, bs, true, 0.75f, -1.5f);
        check_case(g, level, cpu::kNf4GemvMaxM, 300, cols, bs, false, -2.0f, 0.5f);
        n_cases += 2;
      }
  }
  // Bad arguments throw ValueError (never a crash or a silent wrong answer).
  {
    Weight w = random_weight(g, 4, 64, 64, true);
    std::vector<float> X(8 * 64, 1.0f), Y(8 * 4);
    auto expect_throw = [&](const char* what, auto&& call) {
      ++n_cases;
      try {
        call();
      } catch (const ValueError&) {
        return;
      }
      ++g_failures;
      std::printf("FAIL: %s did not throw ValueError\n", what);
    };
    const cpu::SimdLevel best = cpu::best_simd_level();
    expect_throw("M = 0", [&] { cpu::nf4_gemv_nt(best, 0, 1.0f, X.data(), 64, w.ref, 0.0f, Y.data(), 4); });
    expect_throw("M > kNf4GemvMaxM",
                 [&] { cpu::nf4_gemv_nt(best, cpu::kNf4GemvMaxM + 1, 1.0f, X.data(), 64, w.ref, 0.0f, Y.data(), 4); });
    expect_throw("ldx < cols", [&] { cpu::nf4_gemv_nt(best, 2, 1.0f, X.data(), 63, w.ref, 0.0f, Y.data(), 4); });
    Nf4Ref bad = w.ref;
    bad.blocksize = 48;
    expect_throw("blocksize 48", [&] { cpu::nf4_gemv_nt(best, 1, 1.0f, X.data(), 64, bad, 0.0f, Y.data(), 4); });
  }
  std::printf("%d cases, %d failures\n", n_cases, g_failures);
  return g_failures ? 1 : 0;
}

int run_bench(int64_t rows, int64_t cols) {
  std::mt19937 g(1);
  Weight w = random_weight(g, rows, cols, 64, true);
  const double bytes = static_cast<double>(w.packed.size() + w.absmax_codes.size() + w.nested.size() * 4);
  std::vector<float> X(cpu::kNf4GemvMaxM * cols, 0.5f), Y(cpu::kNf4GemvMaxM * rows);
  for (cpu::SimdLevel level : cpu::supported_simd_levels()) {
    if (level == cpu::SimdLevel::Scalar) continue;
    for (int64_t M = 1; M <= cpu::kNf4GemvMaxM; ++M) {
      double best = 1e30;
      for (int it = 0; it < 30; ++it) {
        auto t0 = std::chrono::steady_clock::now();
        cpu::nf4_gemv_nt(level, M, 1.0f, X.data(), cols, w.ref, 0.0f, Y.data(), rows);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::printf("%-8s %lldx%lld M=%lld: %8.1f us  %6.1f GB/s  %6.1f GFLOP/s  (%d threads)\n",
                  cpu::simd_level_name(level), (long long)rows, (long long)cols, (long long)M, best * 1e6,
                  bytes / best * 1e-9, 2.0 * M * rows * cols / best * 1e-9, cpu::num_threads());
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "bench")
    return run_bench(argc > 3 ? std::atoll(argv[2]) : 4096, argc > 3 ? std::atoll(argv[3]) : 4096);
  return run_tests();
}
