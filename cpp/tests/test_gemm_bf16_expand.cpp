// ctest for cpu::nf4_gemm_nt_many_expand_bf16 (the fp32 LoRA expand in the bf16 NF4 GEMM's
// epilogue): bit for bit equal to the two calls it replaces, nf4_gemm_nt_many_bf16 then
// gemm_nt(M, rows, r, s, t, ldt, B, r, 1, Y) per output, on ragged shapes (M not a multiple of 14,
// rows not of 32), ranks 1..128, outputs without an expand, K over one depth block (the expand must
// run after the last one only), small row super-blocks (QLORA_BF16_SHARED_BYTES), 1 and 2 threads,
// padded leading dimensions (the padding must stay untouched). Plus: the expand changed the output
// (so equality is not base == base), and nf4_expand_fusable's refusals (small M, r over a depth
// block, QLORA_BF16_LORA_EPILOGUE=0).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "cpu/features.hpp"
#include "cpu/gemm.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/threads.hpp"
#include "tensor_types.hpp"

using namespace qlora;

namespace {

struct Weight {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  Nf4Ref ref;
};

Weight random_weight(std::mt19937& g, int64_t rows, int64_t cols, int bs) {
  Weight w;
  const int64_t n = rows * cols, nb = (n + bs - 1) / bs;
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  w.packed.resize((n + 1) / 2);
  for (auto& b : w.packed) b = static_cast<uint8_t>(byte(g));
  w.absmax.resize(nb);
  for (auto& v : w.absmax) v = u(g);
  w.ref.packed = w.packed.data();
  w.ref.absmax = w.absmax.data();
  w.ref.rows = rows, w.ref.cols = cols, w.ref.blocksize = bs, w.ref.double_quant = false;
  return w;
}

constexpr float kSentinel = 12345.0f;

// n outputs of rows[i] each (r[i] == 0: no expand) over X [M, K].
void check_case(std::mt19937& g, int64_t M, int64_t K, int bs, std::vector<int64_t> rows, std::vector<int64_t> r) {
  const cpu::SimdLevel lv = cpu::SimdLevel::AVX512;
  const int64_t n = static_cast<int64_t>(rows.size());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<Weight> w;
  std::vector<const Nf4Ref*> wp;
  for (int64_t i = 0; i < n; ++i) w.push_back(random_weight(g, rows[i], K, bs));
  for (auto& x : w) wp.push_back(&x.ref);
  const int64_t ldx = K + 3;
  std::vector<float> X(M * ldx);
  for (auto& v : X) v = nd(g);
  int64_t R = 0;
  for (auto v : r) R += v;
  const int64_t ldt = R + 2;  // the grouped shrink's [M, R] (plus padding)
  std::vector<float> T(M * ldt);
  for (auto& v : T) v = nd(g);
  std::vector<std::vector<float>> Bs(n), Y(n), Yref(n);
  std::vector<int64_t> ldy(n);
  std::vector<float*> yp(n), yrp(n);
  std::vector<cpu::Nf4Expand> ex(n);
  for (int64_t i = 0, off = 0; i < n; ++i) {
    ldy[i] = rows[i] + 5;
    Y[i].assign(M * ldy[i], kSentinel);
    Yref[i].assign(M * ldy[i], kSentinel);
    yp[i] = Y[i].data(), yrp[i] = Yref[i].data();
    if (r[i] == 0) continue;
    Bs[i].resize(rows[i] * r[i]);
    for (auto& v : Bs[i]) v = 0.25f * nd(g);
    ex[i] = cpu::Nf4Expand{T.data() + off, ldt, Bs[i].data(), r[i], 0.5f + 0.25f * static_cast<float>(i)};
    off += r[i];
  }
  const bool fusable = cpu::nf4_expand_fusable(lv, M, n, wp.data(), ex.data());
  CHECK(fusable, "M=%lld K=%lld n=%lld: expected fusable", (long long)M, (long long)K, (long long)n);
  if (!fusable) return;
  cpu::nf4_gemm_nt_many_expand_bf16(lv, M, X.data(), ldx, n, wp.data(), yp.data(), ldy.data(), ex.data());
  cpu::nf4_gemm_nt_many_bf16(lv, M, X.data(), ldx, n, wp.data(), yrp.data(), ldy.data());
  std::vector<float> base = Yref[0];
  for (int64_t i = 0; i < n; ++i)
    if (ex[i].t)
      cpu::gemm_nt(lv, M, rows[i], r[i], ex[i].s, ex[i].t, ldt, ex[i].B, r[i], 1.0f, Yref[i].data(), ldy[i]);
  for (int64_t i = 0; i < n; ++i) {
    int64_t bad = 0;
    for (size_t e = 0; e < Y[i].size(); ++e) bad += std::memcmp(&Y[i][e], &Yref[i][e], 4) != 0;
    CHECK(bad == 0, "M=%lld K=%lld output %lld (rows %lld, r %lld): %lld elements differ from the two calls",
          (long long)M, (long long)K, (long long)i, (long long)rows[i], (long long)r[i], (long long)bad);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = rows[i]; j < ldy[i]; ++j)
        CHECK(Y[i][m * ldy[i] + j] == kSentinel, "padding written at (%lld, %lld)", (long long)m, (long long)j);
  }
  if (r[0] > 0) {  // the expand is there at all
    int64_t changed = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < rows[0]; ++j) changed += Y[0][m * ldy[0] + j] != base[m * ldy[0] + j];
    CHECK(changed > M * rows[0] / 2, "the expand changed only %lld of %lld outputs", (long long)changed,
          (long long)(M * rows[0]));
  }
}

double thread_ms() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// `test_gemm_bf16_expand bench [M N K r reps]`: 1 thread, thread CPU time, fused vs the two calls
// interleaved (default: the gate projection of the SmolLM2 bench, 1024 x 1536 x 576, r 16).
int bench(int argc, char** argv) {
  const int64_t M = argc > 2 ? std::atoll(argv[2]) : 1024, N = argc > 3 ? std::atoll(argv[3]) : 1536;
  const int64_t K = argc > 4 ? std::atoll(argv[4]) : 576, r = argc > 5 ? std::atoll(argv[5]) : 16;
  const int reps = argc > 6 ? std::atoi(argv[6]) : 15;
  cpu::set_num_threads(1);
  std::mt19937 g(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Weight w = random_weight(g, N, K, 64);
  const Nf4Ref* wp = &w.ref;
  std::vector<float> X(M * K), T(M * r), B(N * r), Y(M * N);
  for (auto* v : {&X, &T, &B})
    for (auto& e : *v) e = nd(g);
  const cpu::SimdLevel lv = cpu::SimdLevel::AVX512;
  cpu::Nf4Expand ex{T.data(), r, B.data(), r, 0.5f};
  float* yp = Y.data();
  const int64_t ldy = N;
  std::vector<double> fused, base, expand;
  for (int i = 0; i < reps; ++i) {
    double t0 = thread_ms();
    cpu::nf4_gemm_nt_many_expand_bf16(lv, M, X.data(), K, 1, &wp, &yp, &ldy, &ex);
    double t1 = thread_ms();
    cpu::nf4_gemm_nt_bf16(lv, M, 1.0f, X.data(), K, w.ref, 0.0f, yp, ldy);
    double t2 = thread_ms();
    cpu::gemm_nt(lv, M, N, r, 0.5f, T.data(), r, B.data(), r, 1.0f, yp, ldy);
    double t3 = thread_ms();
    fused.push_back(t1 - t0), base.push_back(t2 - t1), expand.push_back(t3 - t2);
  }
  auto mm = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return std::make_pair(v.front(), v[v.size() / 2]);
  };
  std::vector<double> two(reps);
  for (int i = 0; i < reps; ++i) two[i] = base[i] + expand[i];
  std::printf("M %lld N %lld K %lld r %lld, 1 thread, thread CPU ms (min / median of %d)\n", (long long)M,
              (long long)N, (long long)K, (long long)r, reps);
  std::printf("fused %.3f / %.3f\nbase %.3f / %.3f, expand %.3f / %.3f, sum %.3f / %.3f\n", mm(fused).first,
              mm(fused).second, mm(base).first, mm(base).second, mm(expand).first, mm(expand).second, mm(two).first,
              mm(two).second);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (!cpu::simd_level_supported(cpu::SimdLevel::AVX512) || !cpu::bf16_compute_available(cpu::SimdLevel::AVX512)) {
    std::printf("skipped: no AVX512-BF16\n");
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "bench") == 0) return bench(argc, argv);
  std::mt19937 g(7);
  for (int th : {1, 2}) {
    cpu::set_num_threads(th);
    check_case(g, 256, 576, 64, {576}, {16});                       // o_proj-like
    check_case(g, 131, 576, 64, {192, 64, 200}, {16, 0, 8});        // q/k/v-like: ragged rows, one without LoRA
    check_case(g, 97, 320, 64, {1536, 1536}, {1, 17});              // gate/up-like, odd ranks
    check_case(g, 160, 256, 64, {100}, {128});                     // r = the fp32 depth block's floor
    check_case(g, 200, 4160, 64, {96}, {16});                       // K over one bf16 depth block
    setenv("QLORA_BF16_SHARED_BYTES", "20000", 1);                  // row super-blocks of 14-28 rows
    check_case(g, 150, 1088, 64, {64, 33}, {4, 16});
    unsetenv("QLORA_BF16_SHARED_BYTES");
  }
  // Refusals: the separate expand would take another order (GEMV for M <= 16, a KC split of r), or
  // the switch is off.
  std::mt19937 g2(3);
  Weight w = random_weight(g2, 64, 576, 64);
  const Nf4Ref* wp = &w.ref;
  std::vector<float> t(1000 * 2048), b(64 * 2048);
  cpu::Nf4Expand ex{t.data(), 16, b.data(), 16, 1.0f};
  const cpu::SimdLevel lv = cpu::SimdLevel::AVX512;
  CHECK(cpu::nf4_expand_fusable(lv, 200, 1, &wp, &ex), "plain case");
  CHECK(!cpu::nf4_expand_fusable(lv, 16, 1, &wp, &ex), "M = 16 (the GEMV's)");
  cpu::Nf4Expand big{t.data(), 2048, b.data(), 2048, 1.0f};
  CHECK(!cpu::nf4_expand_fusable(lv, 200, 1, &wp, &big), "r over an fp32 depth block");
  cpu::Nf4Expand none{};
  CHECK(!cpu::nf4_expand_fusable(lv, 200, 1, &wp, &none), "no expand at all");
  setenv("QLORA_BF16_LORA_EPILOGUE", "0", 1);
  CHECK(!cpu::nf4_expand_fusable(lv, 200, 1, &wp, &ex), "switched off");
  unsetenv("QLORA_BF16_LORA_EPILOGUE");
  if (g_failures) {
    std::fprintf(stderr, "%d failures\n", g_failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
