// Backend::fill_zero / copy (gradient zeroing and LoRA A/B packing without host staging) and the
// default q8_0_gemm_nn: on cpu and cpu:devsim against plain host loops, and the defaults (uploads /
// downloads) on a backend that overrides neither, counting that the default fill uploads zeros
// while the CPU override uploads nothing.
#include <cmath>
#include <cstring>
#include <vector>

#include "backend.hpp"
#include "check.hpp"
#include "cpu/q8_0.hpp"

using namespace qlora;

namespace {

// Forwards to the CPU backend but keeps Backend's fill_zero / copy defaults; counts transfers.
class Plain final : public Backend {
 public:
  explicit Plain(Backend& c) : c_(c) {}
  std::string name() const override { return "plain"; }
  bool host_memory() const override { return false; }
  void* alloc(size_t b) override { return c_.alloc(b); }
  void free(void* p) override { c_.free(p); }
  void upload(void* d, const void* s, size_t b) override { ++uploads, c_.upload(d, s, b); }
  void download(void* d, const void* s, size_t b) override { ++downloads, c_.download(d, s, b); }
  void synchronize() override {}
  void gemm_nt(int64_t M, int64_t N, int64_t K, float a, const float* A, int64_t lda, const float* B, int64_t ldb,
               float b, float* C, int64_t ldc) override {
    c_.gemm_nt(M, N, K, a, A, lda, B, ldb, b, C, ldc);
  }
  void gemm_nn(int64_t M, int64_t N, int64_t K, float a, const float* A, int64_t lda, const float* B, int64_t ldb,
               float b, float* C, int64_t ldc) override {
    c_.gemm_nn(M, N, K, a, A, lda, B, ldb, b, C, ldc);
  }
  void gemm_tn(int64_t M, int64_t N, int64_t K, float a, const float* A, int64_t lda, const float* B, int64_t ldb,
               float b, float* C, int64_t ldc) override {
    c_.gemm_tn(M, N, K, a, A, lda, B, ldb, b, C, ldc);
  }
  void nf4_gemm_nt(int64_t, float, const float*, int64_t, const Nf4Ref&, float, float*, int64_t) override {}
  void nf4_gemm_nn(int64_t, float, const float*, int64_t, const Nf4Ref&, float, float*, int64_t) override {}
  void nf4_dequantize(const Nf4Ref&, float*) override {}
  void q8_0_rows(int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) override {
    c_.q8_0_rows(M, K, W, ids, out);
  }
  int uploads = 0, downloads = 0;

 private:
  Backend& c_;
};

void check_fill_copy(Backend& be, const char* name) {
  const size_t n = (size_t{3} << 20) + 5;  // bytes: more than one zero block of the default
  std::vector<unsigned char> h(n), back(n);
  for (size_t i = 0; i < n; ++i) h[i] = static_cast<unsigned char>(i * 131 + 7) | 1;  // no zero byte
  void* a = be.alloc(n);
  void* b = be.alloc(n);
  be.upload(a, h.data(), n);
  be.copy(b, a, n);
  be.download(back.data(), b, n);
  CHECK(std::memcmp(back.data(), h.data(), n) == 0, "%s: copy differs", name);
  be.fill_zero(static_cast<char*>(a) + 3, n - 4);  // an unaligned range: the bytes around it stay
  be.download(back.data(), a, n);
  bool ok = back[0] == h[0] && back[1] == h[1] && back[2] == h[2] && back[n - 1] == h[n - 1];
  for (size_t i = 3; i < n - 1; ++i) ok = ok && back[i] == 0;
  CHECK(ok, "%s: fill_zero wrote the wrong range", name);
  be.fill_zero(a, 0);
  be.copy(b, a, 0);
  be.free(a);
  be.free(b);
}

}  // namespace

int main() {
  Backend& cpu = get_backend("cpu");
  check_fill_copy(cpu, "cpu");
  check_fill_copy(get_backend("cpu:devsim"), "cpu:devsim");
  Plain plain(cpu);
  check_fill_copy(plain, "defaults");
  CHECK(plain.uploads >= 4 && plain.downloads >= 1, "defaults: %d uploads, %d downloads", plain.uploads,
        plain.downloads);

  // q8_0_gemm_nn (the default, chunked over N) against a double loop on the dequantized rows.
  const int64_t M = 3, N = 2 * Backend::kQ8_0GemmNnChunk + 17, K = 64;
  std::vector<float> w(static_cast<size_t>(N * K)), dy(static_cast<size_t>(M * N)), dx(static_cast<size_t>(M * K), 1.0f);
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.37f * static_cast<float>(i));
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = std::cos(0.11f * static_cast<float>(i)) / static_cast<float>(N);
  std::vector<uint8_t> q(static_cast<size_t>(N * K / 32 * 34));
  cpu::q8_0_quantize_rows(w.data(), N, K, q.data());
  std::vector<float> deq(static_cast<size_t>(K));
  std::vector<double> ref(static_cast<size_t>(M * K), 0.0), mag(static_cast<size_t>(M * K), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < K / 32; ++b) {
      const uint8_t* blk = q.data() + (n * (K / 32) + b) * 34;
      const float d = cpu::q8_0_half_to_float(static_cast<uint16_t>(blk[0] | (blk[1] << 8)));
      for (int j = 0; j < 32; ++j) deq[b * 32 + j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        ref[m * K + k] += static_cast<double>(dy[m * N + n]) * deq[k];
        mag[m * K + k] += std::fabs(static_cast<double>(dy[m * N + n]) * deq[k]);
      }
  }
  for (Backend* be : {&cpu, static_cast<Backend*>(&plain)}) {
    std::vector<float> out = dx;
    be->q8_0_gemm_nn(M, N, K, 2.0f, dy.data(), N, q.data(), 0.5f, out.data(), K);  // plain: host memory too
    // fp32 bound: a sum of N products (and the chunk sums) each off by <= (N + 2) eps of the magnitudes.
    const double eps = std::ldexp(1.0, -24);
    int bad = 0;
    for (int64_t i = 0; i < M * K; ++i)
      bad += std::fabs(out[i] - (2.0 * ref[i] + 0.5 * dx[i])) > 2.0 * (N + 2) * eps * (2.0 * mag[i] + 0.5 * std::fabs(dx[i]));
    CHECK(bad == 0, "%s: q8_0_gemm_nn: %d elements outside the fp32 bound", be->name().c_str(), bad);
    double moved = 0.0;  // the result is not the untouched input
    for (int64_t i = 0; i < M * K; ++i) moved = std::fmax(moved, std::fabs(out[i] - dx[i]));
    CHECK(moved > 1e-3, "%s: q8_0_gemm_nn left dX unchanged", be->name().c_str());
  }
  if (g_failures == 0) std::printf("test_backend_fill_copy: ok\n");
  return g_failures ? 1 : 0;
}
