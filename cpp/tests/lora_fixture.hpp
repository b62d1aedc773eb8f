// Shared setup of the LoRA ctest programs (test_lora_group, test_lora_bf16): deterministic inputs,
// a device buffer holding a host vector, and a one-layer adapter with q, k, v adapted.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend.hpp"
#include "model/lora.hpp"

namespace lora_fixture {

// s * sin(f i + 0.3) * (1 + ripple * (i mod 7)): smooth, sign-changing, no two rows alike.
inline std::vector<float> wave(size_t n, float f, float s, float ripple = 0.0f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = s * std::sin(f * static_cast<float>(i) + 0.3f) * (1.0f + ripple * (i % 7));
  return v;
}

inline std::vector<float> down(qlora::Backend& be, const float* p, size_t n) {
  std::vector<float> h(n);
  be.download(h.data(), p, sizeof(float) * n);
  be.synchronize();
  return h;
}

// n floats on the backend, uploaded from a host vector; freed on destruction.
struct Dev {
  qlora::Backend& be;
  void* p;
  size_t n;
  Dev(qlora::Backend& b, const std::vector<float>& h) : be(b), p(b.alloc(sizeof(float) * h.size())), n(h.size()) {
    be.upload(p, h.data(), sizeof(float) * n);
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  ~Dev() { be.free(p); }
  float* f() const { return static_cast<float*>(p); }
  std::vector<float> get() const { return down(be, f(), n); }
};

// max |a - b| <= tol * max |b| (and b not all zero).
inline bool close(const std::vector<float>& a, const std::vector<float>& b, double tol) {
  double err = 0.0, mag = 0.0;
  for (size_t i = 0; i < a.size(); ++i) err = std::fmax(err, std::fabs(a[i] - b[i])), mag = std::fmax(mag, std::fabs(b[i]));
  return mag > 0.0 && err <= tol * mag;
}

// One layer with q, k, v adapted (o..down not): input width D, output widths out[i], ranks rank[i],
// factors from wave(.., ripple); not packed.
inline std::unique_ptr<qlora::model::LoraAdapter> make_qkv_adapter(qlora::Backend& be, int64_t D, const int64_t out[3],
                                                                   const int64_t rank[3], float ripple = 0.0f) {
  auto a = std::make_unique<qlora::model::LoraAdapter>();
  a->modules.resize(qlora::model::kNumProj);
  for (int i = 0; i < 3; ++i) {
    const auto A = wave(static_cast<size_t>(rank[i] * D), 0.7f + 0.1f * i, 0.3f, ripple);
    const auto B = wave(static_cast<size_t>(out[i] * rank[i]), 0.4f + 0.2f * i, 0.5f, ripple);
    a->modules[i] = qlora::model::make_lora_module(be, rank[i], D, out[i], 1.5f + 0.25f * i, A.data(), B.data());
  }
  return a;
}

}  // namespace lora_fixture
