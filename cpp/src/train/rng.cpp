#include "train/rng.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "common/error.hpp"
#include "cpu/threads.hpp"
#include "train/philox_block.hpp"

namespace qlora::train {

namespace {
constexpr double kPi = 3.141592653589793;  // M_PI is not standard C++

constexpr int64_t kParallelMin = int64_t{1} << 16;        // fills smaller than this stay on one thread
constexpr int64_t kGrain = int64_t{1} << 14;

inline std::array<uint32_t, 4> block(uint64_t index, uint64_t seed) {
  return philox4x32_10({static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u},
                       {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
}

// Runs fn(begin, end) over [0, n): threaded for large n; the values never depend on the split.
template <class Fn>
void for_range(int64_t n, const Fn& fn) {
  if (n < kParallelMin) {
    fn(int64_t{0}, n);
  } else {
    cpu::parallel_range(n, kGrain, fn);
  }
}

// Outputs [first, first + count) into dst (block by block).
void outputs(uint64_t seed, uint64_t first, int64_t count, uint32_t* dst) {
  int64_t i = 0;
  while (i < count) {
    const uint64_t k = first + static_cast<uint64_t>(i);
    const std::array<uint32_t, 4> b = block(k >> 2, seed);
    for (unsigned lane = static_cast<unsigned>(k & 3); lane < 4 && i < count; ++lane) dst[i++] = b[lane];
  }
}

// out[i] = f(output first + i) for i in [0, n), 256 outputs at a time; threaded, the values never
// depend on the split.
template <class T, class F>
void fill_each(uint64_t seed, uint64_t first, T* out, int64_t n, const F& f) {
  for_range(n, [&](int64_t b, int64_t e) {
    uint32_t buf[256];
    for (int64_t i = b; i < e; i += 256) {
      const int64_t c = std::min<int64_t>(256, e - i);
      outputs(seed, first + static_cast<uint64_t>(i), c, buf);
      for (int64_t j = 0; j < c; ++j) out[i + j] = f(buf[j]);
    }
  });
}

}  // namespace

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> key) {
  philox4x32_10_block(c.data(), key[0], key[1]);  // the block the CUDA dropout kernel runs too
  return c;
}

uint32_t Philox::at(uint64_t k) const { return block(k >> 2, s_.seed)[k & 3]; }

uint32_t Philox::next_u32() { return at(s_.position++); }

uint64_t Philox::next_u64() {
  const uint64_t lo = next_u32();
  const uint64_t hi = next_u32();
  return (hi << 32) | lo;
}

uint64_t Philox::below(uint64_t n) {
  check_arg(n >= 1, "Philox.below: n must be >= 1");
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: values under it would bias the modulo
  for (;;) {
    const uint64_t r = next_u64();
    if (r >= threshold) return r % n;
  }
}

double Philox::uniform_double() { return static_cast<double>(next_u64() >> 11) * 0x1p-53; }

void Philox::fill_uniform(float* out, int64_t n, float lo, float hi) {
  check_arg(n >= 0 && (n == 0 || out), "Philox.fill_uniform: bad output buffer");
  check_arg(std::isfinite(lo) && std::isfinite(hi) && lo <= hi, "Philox.fill_uniform: need finite lo <= hi");
  fill_each(s_.seed, s_.position, out, n,
            [=](uint32_t u) { return lo + (hi - lo) * (static_cast<float>(u >> 8) * 0x1p-24f); });
  s_.position += static_cast<uint64_t>(n);
}

void Philox::fill_normal(float* out, int64_t n, float mean, float std) {
  check_arg(n >= 0 && (n == 0 || out), "Philox.fill_normal: bad output buffer");
  check_arg(std::isfinite(mean) && std::isfinite(std) && std >= 0.0f, "Philox.fill_normal: need finite mean and std >= 0");
  const uint64_t seed = s_.seed, first = s_.position;
  for_range(n, [&](int64_t b, int64_t e) {
    uint32_t buf[256];
    for (int64_t i = b; i < e; i += 128) {
      const int64_t c = std::min<int64_t>(128, e - i);
      outputs(seed, first + 2 * static_cast<uint64_t>(i), 2 * c, buf);
      for (int64_t j = 0; j < c; ++j) {
        const double u1 = (static_cast<double>(buf[2 * j]) + 1.0) * 0x1p-32;  // (0, 1]: log is finite
        const double u2 = static_cast<double>(buf[2 * j + 1]) * 0x1p-32;      // [0, 1)
        const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * kPi * u2);
        out[i + j] = static_cast<float>(mean + std * z);
      }
    }
  });
  s_.position += 2 * static_cast<uint64_t>(n);
}

void Philox::fill_bernoulli(uint8_t* out, int64_t n, double p) {
  check_arg(n >= 0 && (n == 0 || out), "Philox.fill_bernoulli: bad output buffer");
  check_arg(p >= 0.0 && p <= 1.0, "Philox.fill_bernoulli: p must be in [0, 1], got " + std::to_string(p));
  fill_each(s_.seed, s_.position, out, n,
            [=](uint32_t u) { return static_cast<uint8_t>(bernoulli_keep(u, p) ? 1 : 0); });
  s_.position += static_cast<uint64_t>(n);
}

void Philox::permutation(int64_t* out, int64_t n) {
  check_arg(n >= 0 && (n == 0 || out), "Philox.permutation: bad output buffer");
  for (int64_t i = 0; i < n; ++i) out[i] = i;
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(below(static_cast<uint64_t>(i) + 1));
    std::swap(out[i], out[j]);
  }
}

}  // namespace qlora::train
