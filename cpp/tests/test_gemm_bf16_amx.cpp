// ctest for the AMX-BF16 micro-kernel of the bf16 GEMM (cpu/gemm_bf16_amx*.{hpp,cpp}):
//  1. the emulated tiles (cpu/amx_tiles.hpp) against hand-worked SDM cases: tdpbf16ps keeps the even
//     and odd products of the pairs in two fp32 sums (bits differ from one vdpbf16ps-style chain), DAZ,
//     FTZ, tileloadd zero-fill, tilestored writing colsb bytes per row only;
//  2. the kernel (bf16_amx::ukernel16) on emulated tiles, called directly on 16-row panels built here (no
//     AVX-512 needed; tiles configured per call, and inside one bf16_amx::TileScope), against float64
//     sums of the same bf16 values: every ragged mr (1..32, one or two A panels), nr, kp (ragged last
//     chunk), alpha/beta, with C outside [mr, nr] untouched;
//  3. the driver with QLORA_AMX=emulate (A packed, re-laid, 2 x 2 tiles) on odd M, N, K (several depth
//     blocks) for nt / nn / tn against the scalar oracle, both drivers (same bits), 1 and 2 threads;
//     needs AVX512-BF16 (the packers);
//  4. the same with the real AMX kernel, only where bf16_amx::amx_usable() (never on a CPU without AMX:
//     the test says so), plus the count of elements where real and emulated tiles differ in bits
//     (printed; 0 on Emerald Rapids).
// Bound (fp32 accumulation of exact bf16 products, any order): |C - C64| <= (K + 4) eps32 sum|a b| (+ the
// beta term), C64 the float64 result on the bf16-rounded operands; a wrong pair, row or column exceeds it
// by orders of magnitude.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "cpu/amx_tiles.hpp"
#include "cpu/features.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/gemm_bf16_amx.hpp"
#include "cpu/gemm_bf16_kernels.hpp"
#include "cpu/threads.hpp"

using namespace qlora;
using namespace qlora::cpu;
using Tiles = cpu::amx::EmulatedTiles;

namespace {

constexpr int R = bf16_amx::kMR16, NR = bf16_k::kNR;  // rows of an AMX A panel, columns of a B panel
constexpr double kEps32 = 1.1920928955078125e-07;

uint16_t bf(float x) {  // bf16 bits of a bf16-representable float
  uint32_t w;
  std::memcpy(&w, &x, 4);
  return static_cast<uint16_t>(w >> 16);
}
uint32_t pair(float even, float odd) { return bf(even) | (static_cast<uint32_t>(bf(odd)) << 16); }
uint32_t pair_bits(uint16_t even, uint16_t odd) { return even | (static_cast<uint32_t>(odd) << 16); }
float f32(uint32_t w) {
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

// One tdpbf16ps of C[1 x 1] += A[1 x kp pairs] · B[kp pairs x 1] on emulated tiles.
float dp1(const uint32_t* a, const uint32_t* b, int kp, float c_in = 0.0f) {
  cpu::amx::TileConfig cfg;
  cfg.rows[0] = 1, cfg.colsb[0] = 4;                // C: 1 x 1 fp32
  cfg.rows[1] = 1, cfg.colsb[1] = 4 * kp;           // A: 1 x kp pairs
  cfg.rows[2] = kp, cfg.colsb[2] = 4;               // B: kp pairs x 1
  Tiles::config(&cfg);
  Tiles::load<0>(&c_in, 4);
  Tiles::load<1>(a, 64);
  Tiles::load<2>(b, 4);
  Tiles::dp<0, 1, 2>();
  float c = -1.0f;
  Tiles::store<0>(&c, 4);
  Tiles::release();
  return c;
}

void test_emulated_tiles() {
  // Even and odd sums kept apart: pairs (1, 2^-24), (0, 2^-24) against (1, 1): even 1, odd 2^-23 (exact),
  // so C = 1 + 2^-23. One running sum (odd then even per pair, vdpbf16ps) ties 1 + 2^-24 to 1 twice.
  const float t24 = std::ldexp(1.0f, -24);
  const uint32_t a[2] = {pair(1.0f, t24), pair(0.0f, t24)}, b[2] = {pair(1.0f, 1.0f), pair(1.0f, 1.0f)};
  const float c = dp1(a, b, 2);
  CHECK(c == 1.0f + std::ldexp(1.0f, -23), "even/odd sums: got %a", c);
  float seq = 0.0f;
  for (int p = 0; p < 2; ++p) seq = std::fma(f32(b[p] & 0xFFFF0000u), f32(a[p] & 0xFFFF0000u), seq),
                              seq = std::fma(f32(b[p] << 16), f32(a[p] << 16), seq);
  CHECK(seq == 1.0f && seq != c, "one chain should differ: %a", seq);
  // FTZ: 2^-100 * 2^-40 = 2^-140 is an fp32 denormal -> +0.
  const uint32_t a2[1] = {pair(std::ldexp(1.0f, -100), 0.0f)}, b2[1] = {pair(std::ldexp(1.0f, -40), 0.0f)};
  const float c2 = dp1(a2, b2, 1);
  CHECK(c2 == 0.0f && !std::signbit(c2), "FTZ: got %a", c2);
  // DAZ: bf16 denormal 0x0001 (2^-133) * 2^100 -> 0 (not 2^-33).
  const uint32_t a3[1] = {pair_bits(0x0001, 0)}, b3[1] = {pair(std::ldexp(1.0f, 100), 0.0f)};
  CHECK(dp1(a3, b3, 1) == 0.0f, "DAZ");
  // FTZ on the add into C: 1.25 * 2^-126 + (-2^-126) = 2^-128 (denormal) -> +0.
  const uint32_t a4[1] = {pair(-std::ldexp(1.0f, -63), 0.0f)}, b4[1] = {pair(std::ldexp(1.0f, -63), 0.0f)};
  const float c4 = dp1(a4, b4, 1, std::ldexp(1.25f, -126));
  CHECK(c4 == 0.0f && !std::signbit(c4), "FTZ on C: got %a", c4);
  // tileloadd zero-fills past colsb; tilestored writes colsb bytes of each configured row only.
  cpu::amx::TileConfig cfg;
  cfg.rows[0] = 2, cfg.colsb[0] = 8;
  Tiles::config(&cfg);
  uint8_t src[2][16], dst[3][16];
  for (int r = 0; r < 2; ++r)
    for (int i = 0; i < 16; ++i) src[r][i] = static_cast<uint8_t>(1 + r * 16 + i);
  std::memset(dst, 0xEE, sizeof(dst));
  Tiles::load<0>(src, 16);
  Tiles::store<0>(dst, 16);
  bool ok = true;
  for (int r = 0; r < 3; ++r)
    for (int i = 0; i < 16; ++i) ok &= dst[r][i] == (r < 2 && i < 8 ? src[r][i] : 0xEE);
  CHECK(ok, "tileloadd / tilestored bytes");
  CHECK(Tiles::st().t[0][0][8] == 0 && Tiles::st().t[0][2][0] == 0, "tileloadd zero-fill");
  Tiles::release();
}

using Ukernel = void (*)(int64_t, const uint32_t*, const uint32_t*, float*, int64_t, float, float, int, int);

// The kernel alone: A [mr, K], B [K, nr] random bf16 values, panels built here as the packers lay them
// ([kp][R] per 16 rows, then relayout_a; B [kp][kNR]), C with ldc > nr and sentinels around.
int kernel_case(Ukernel uk, std::mt19937& g, int mr, int nr, int64_t K, float alpha, float beta) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t kp = (K + 1) / 2;
  std::vector<float> A(mr * K), B(K * nr);
  for (auto& v : A) v = bf16_round(nd(g));
  for (auto& v : B) v = bf16_round(nd(g));
  auto a_at = [&](int i, int64_t k) { return i < mr && k < K ? A[i * K + k] : 0.0f; };
  auto b_at = [&](int64_t k, int j) { return j < nr && k < K ? B[k * nr + j] : 0.0f; };
  std::vector<uint32_t> Ap(2 * R * kp), Bp(NR * kp);
  for (int pnl = 0; pnl < 2; ++pnl) {
    uint32_t* P = Ap.data() + pnl * R * kp;
    for (int64_t p = 0; p < kp; ++p)
      for (int i = 0; i < R; ++i) P[p * R + i] = pair(a_at(pnl * R + i, 2 * p), a_at(pnl * R + i, 2 * p + 1));
    bf16_amx::relayout_a(P, kp, R);
  }
  for (int64_t p = 0; p < kp; ++p)
    for (int j = 0; j < NR; ++j) Bp[p * NR + j] = pair(b_at(2 * p, j), b_at(2 * p + 1, j));
  const int64_t ldc = nr + 3;
  const float sentinel = 12345.0f;
  std::vector<float> C((mr + 1) * ldc, sentinel), C0;
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) C[i * ldc + j] = nd(g);
  C0 = C;
  uk(kp, Ap.data(), Bp.data(), C.data(), ldc, alpha, beta, mr, nr);
  int bad = 0;
  for (int i = 0; i <= mr; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      const float got = C[i * ldc + j];
      if (i == mr || j >= nr) {
        bad += got != sentinel;
        continue;
      }
      double ref = 0.0, scale = 0.0;
      for (int64_t k = 0; k < K; ++k) ref += double(A[i * K + k]) * B[k * nr + j], scale += std::fabs(double(A[i * K + k]) * B[k * nr + j]);
      const double c0 = C0[i * ldc + j];
      ref = alpha * ref + (beta != 0.0f ? beta * c0 : 0.0);
      scale = std::fabs(alpha) * scale + std::fabs(beta) * std::fabs(c0);
      if (!(std::fabs(got - ref) <= (K + 4) * kEps32 * scale + 1e-30)) {
        if (bad < 3) std::fprintf(stderr, "  mr %d nr %d K %lld [%d,%lld] got %g want %g\n", mr, nr, (long long)K, i, (long long)j, got, ref);
        ++bad;
      }
    }
  return bad;
}

void test_kernel(Ukernel uk, const char* name) {
  std::mt19937 g(7);
  int cases = 0, failed = 0;
  for (int64_t K : {1, 2, 13, 31, 32, 33, 64, 95, 200})
    for (int mr : {1, 5, 13, 14, 15, 16, 17, 22, 27, 28, 31, 32})
      for (int nr : {1, 15, 16, 17, 32}) {
        const float alpha = (cases % 3 == 0) ? -0.5f : 1.0f, beta = (cases % 2 == 0) ? 0.0f : 0.75f;
        const int bad = kernel_case(uk, g, mr, nr, K, alpha, beta);
        ++cases;
        failed += bad != 0;
        CHECK(bad == 0, "%s kernel: mr %d nr %d K %lld alpha %g beta %g: %d bad elements", name, mr, nr,
              (long long)K, alpha, beta, bad);
      }
  std::printf("%s kernel: %d cases, %d failed\n", name, cases, failed);
}

// ukernel16 configuring the tiles per call, then with the tiles configured once by a TileScope around
// all calls (the drivers' way: ukernel16 then neither configures nor releases); a nested scope must
// leave the outer one's tiles alone.
bf16_amx::Kernel g_kernel;
void test_kernel_and_scoped(bf16_amx::Kernel k, const char* name) {
  g_kernel = k;
  const auto k16 = [](int64_t kp, const uint32_t* A, const uint32_t* B, float* C, int64_t ldc, float al, float be,
                      int mr, int nr) { bf16_amx::ukernel16(g_kernel, kp, A, B, C, ldc, al, be, mr, nr); };
  const std::string n(name);
  test_kernel(k16, n.c_str());
  const bf16_amx::TileScope scope(k);
  { const bf16_amx::TileScope nested(k); }
  test_kernel(k16, (n + ", one tile scope").c_str());
}

// Driver: op(A) [M, K] · op(B) [K, N] through gemm_*_bf16 at the avx512 level vs the scalar oracle.
struct Shape {
  int64_t M, N, K;
};

enum class Op { NT, NN, TN };

std::vector<float> run_op(Op op, SimdLevel lvl, const Shape& s, const std::vector<float>& A,
                          const std::vector<float>& B, const std::vector<float>& C0, float alpha, float beta) {
  std::vector<float> C = C0;
  const int64_t ldc = s.N + 1;
  switch (op) {
    case Op::NT: gemm_nt_bf16(lvl, s.M, s.N, s.K, alpha, A.data(), s.K + 2, B.data(), s.K + 1, beta, C.data(), ldc); break;
    case Op::NN: gemm_nn_bf16(lvl, s.M, s.N, s.K, alpha, A.data(), s.K + 2, B.data(), s.N + 1, beta, C.data(), ldc); break;
    case Op::TN: gemm_tn_bf16(lvl, s.M, s.N, s.K, alpha, A.data(), s.M + 2, B.data(), s.N + 1, beta, C.data(), ldc); break;
  }
  return C;
}

void set_env(const char* k, const char* v) {
  if (v) setenv(k, v, 1);
  else unsetenv(k);
}

// The bound against the oracle (itself float64 sums of the same rounded operands), per element.
int check_bound(Op op, const Shape& s, const std::vector<float>& A, const std::vector<float>& B,
                const std::vector<float>& C0, const std::vector<float>& got, const std::vector<float>& want,
                float alpha, float beta) {
  const int64_t ldc = s.N + 1;
  int bad = 0;
  for (int64_t i = 0; i < s.M; ++i)
    for (int64_t j = 0; j < s.N; ++j) {
      double scale = 0.0;
      for (int64_t k = 0; k < s.K; ++k) {
        const float a = op == Op::TN ? A[k * (s.M + 2) + i] : A[i * (s.K + 2) + k];
        const float b = op == Op::NT ? B[j * (s.K + 1) + k] : B[k * (s.N + 1) + j];
        scale += std::fabs(double(bf16_round(a)) * bf16_round(b));
      }
      scale = std::fabs(alpha) * scale + std::fabs(beta) * std::fabs(C0[i * ldc + j]);
      const double d = std::fabs(double(got[i * ldc + j]) - want[i * ldc + j]);
      if (!(d <= (s.K + 4) * kEps32 * scale + 1e-30)) ++bad;
    }
  return bad;
}

std::vector<std::vector<float>> test_driver(const char* amx_env, const char* name) {
  std::vector<std::vector<float>> outs;
  std::mt19937 g(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const Shape shapes[] = {{1, 1, 1}, {29, 33, 31}, {28, 32, 32}, {57, 70, 95}, {15, 100, 2500}, {43, 17, 4097}};
  int cases = 0, failed = 0;
  for (const Shape& s : shapes)
    for (Op op : {Op::NT, Op::NN, Op::TN}) {
      const size_t na = op == Op::TN ? s.K * (s.M + 2) : s.M * (s.K + 2);
      const size_t nb = op == Op::NT ? s.N * (s.K + 1) : s.K * (s.N + 1);
      std::vector<float> A(na), B(nb), C0(s.M * (s.N + 1));
      for (auto& v : A) v = nd(g);
      for (auto& v : B) v = nd(g);
      for (auto& v : C0) v = nd(g);
      const float alpha = 0.75f, beta = (cases % 2) ? 0.5f : 0.0f;
      const std::vector<float> want = run_op(op, SimdLevel::Scalar, s, A, B, C0, alpha, beta);
      set_env("QLORA_AMX", amx_env);
      std::vector<float> first;
      for (const char* drv : {"tasks", "shared"})
        for (int th : {1, 2}) {
          set_num_threads(th);
          set_env("QLORA_BF16_GEMM", drv);
          const std::vector<float> got = run_op(op, SimdLevel::AVX512, s, A, B, C0, alpha, beta);
          const int bad = check_bound(op, s, A, B, C0, got, want, alpha, beta);
          ++cases;
          failed += bad != 0;
          CHECK(bad == 0, "%s driver op %d M %lld N %lld K %lld %s %d threads: %d elements past the bound", name,
                static_cast<int>(op), (long long)s.M, (long long)s.N, (long long)s.K, drv, th, bad);
          if (first.empty()) first = got;
          CHECK(std::memcmp(first.data(), got.data(), got.size() * 4) == 0,
                "%s driver op %d M %lld: bits differ between drivers / thread counts", name, static_cast<int>(op),
                (long long)s.M);
        }
      set_env("QLORA_BF16_GEMM", nullptr);
      set_env("QLORA_AMX", nullptr);
      outs.push_back(first);
    }
  std::printf("%s driver: %d cases, %d failed\n", name, cases, failed);
  return outs;
}

// Elements whose bits differ between two test_driver runs (the AMX and AVX512-BF16 kernels sum in
// different orders: some must differ, or the AMX path did not run).
size_t bits_differ(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  size_t n = 0;
  for (size_t c = 0; c < a.size() && c < b.size(); ++c)
    for (size_t i = 0; i < a[c].size() && i < b[c].size(); ++i) n += std::memcmp(&a[c][i], &b[c][i], 4) != 0;
  return n;
}

// Real tiles vs emulated tiles on the same panels: elements whose bits differ (information: the SDM
// pseudo-code is what the emulation follows; the bound holds either way).
void compare_real_emulated() {
  std::mt19937 g(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t kp = 100;
  std::vector<uint32_t> Ap(2 * R * kp), Bp(NR * kp);
  for (auto& w : Ap) w = pair(bf16_round(nd(g)), bf16_round(nd(g)));
  for (auto& w : Bp) w = pair(bf16_round(nd(g)), bf16_round(nd(g)));
  std::vector<float> c1(2 * R * NR), c2(2 * R * NR);
  bf16_amx::ukernel16(bf16_amx::Kernel::Amx, kp, Ap.data(), Bp.data(), c1.data(), NR, 1.0f, 0.0f, 2 * R, NR);
  bf16_amx::ukernel16(bf16_amx::Kernel::AmxEmulated, kp, Ap.data(), Bp.data(), c2.data(), NR, 1.0f, 0.0f, 2 * R, NR);
  int diff = 0;
  for (size_t i = 0; i < c1.size(); ++i) diff += std::memcmp(&c1[i], &c2[i], 4) != 0;
  std::printf("real vs emulated tiles: %d of %zu elements differ in bits (kp 100)\n", diff, c1.size());
}

}  // namespace

int main() {
  test_emulated_tiles();
  test_kernel_and_scoped(bf16_amx::Kernel::AmxEmulated, "emulated AMX");

  // kernel_choice: the switch.
  set_env("QLORA_AMX", "0");
  CHECK(bf16_amx::kernel_choice() == bf16_amx::Kernel::Avx512Bf16, "QLORA_AMX=0");
  set_env("QLORA_AMX", "emulate");
  CHECK(bf16_amx::kernel_choice() == bf16_amx::Kernel::AmxEmulated, "QLORA_AMX=emulate");
  set_env("QLORA_AMX", nullptr);
  CHECK((bf16_amx::kernel_choice() == bf16_amx::Kernel::Amx) == bf16_amx::amx_usable(), "default choice");

  if (bf16_compute_available(SimdLevel::AVX512)) {
    const auto emu = test_driver("emulate", "emulated AMX");
    const auto avx = test_driver("0", "AVX512-BF16");
    const size_t d = bits_differ(emu, avx);
    std::printf("emulated AMX vs AVX512-BF16: %zu elements differ in bits (k order)\n", d);
    CHECK(d > 0, "QLORA_AMX=emulate gave the AVX512-BF16 kernel's bits everywhere: the AMX path did not run");
  } else {
    std::printf("SKIP driver tests: no AVX512-BF16 here (the bf16 packers need it)\n");
  }
  if (bf16_amx::amx_usable()) {
    test_kernel_and_scoped(bf16_amx::Kernel::Amx, "real AMX");
    test_driver(nullptr, "real AMX");
    compare_real_emulated();
  } else {
    std::printf("SKIP real AMX-BF16 kernel: never run here (cpu_has_amx_bf16 %d; the OS permission is asked only "
                "where the CPU has it)\n",
                static_cast<int>(cpu_has_amx_bf16()));
  }
  std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "ok", g_failures);
  return g_failures ? 1 : 0;
}
