#include "train/grad_utils.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "common/error.hpp"
#include "cpu/threads.hpp"

namespace qlora::train {

namespace {

constexpr int64_t kChunk = int64_t{1} << 15;       // fixed split: results independent of threads
constexpr int64_t kParallelMin = int64_t{1} << 16;  // fewer elements: calling thread only

struct Chunk {
  size_t tensor;
  int64_t begin, end;
};

template <class Ref>
std::vector<Chunk> make_chunks(const std::vector<Ref>& ts, int64_t* total) {
  std::vector<Chunk> out;
  *total = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    check_arg(ts[i].numel >= 0 && (ts[i].numel == 0 || ts[i].data != nullptr),
              "gradient " + std::to_string(i) + " has no data or a negative size");
    for (int64_t b = 0; b < ts[i].numel; b += kChunk) out.push_back({i, b, std::min(ts[i].numel, b + kChunk)});
    *total += ts[i].numel;
  }
  return out;
}

template <class Fn>
void run_chunks(int64_t n_chunks, int64_t total, const Fn& fn) {
  if (total < kParallelMin) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(c);
  } else {
    cpu::parallel_for(n_chunks, fn);
  }
}

// Sum of squares in double with four interleaved partial sums (a fixed order, so deterministic).
double sum_squares(const float* x, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const double a = x[i], b = x[i + 1], c = x[i + 2], d = x[i + 3];
    s0 += a * a;
    s1 += b * b;
    s2 += c * c;
    s3 += d * d;
  }
  for (; i < n; ++i) s0 += static_cast<double>(x[i]) * x[i];
  return (s0 + s1) + (s2 + s3);
}

}  // namespace

double global_grad_norm(const std::vector<GradRef>& grads) {
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(grads, &total);
  std::vector<double> partial(chunks.size(), 0.0);  // [n_chunks]
  run_chunks(static_cast<int64_t>(chunks.size()), total, [&](int64_t c) {
    const Chunk& k = chunks[static_cast<size_t>(c)];
    partial[static_cast<size_t>(c)] = sum_squares(grads[k.tensor].data + k.begin, k.end - k.begin);
  });
  double sum = 0.0;
  for (double p : partial) sum += p;
  return std::sqrt(sum);
}

static_assert(kNormChunk == kChunk, "the flat norm must split exactly as global_grad_norm");

std::vector<int64_t> norm_chunk_bounds(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> b{0};
  int64_t off = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    check_arg(sizes[i] >= 0, "tensor " + std::to_string(i) + " has a negative size");
    for (int64_t s = 0; s < sizes[i]; s += kChunk) b.push_back(off + std::min(sizes[i], s + kChunk));
    off += sizes[i];
  }
  return b;
}

void sum_squares_chunks(int64_t n_chunks, const int64_t* bounds, const float* x, double* partial, double* out) {
  check_arg(n_chunks >= 0, "sum_squares: negative chunk count");
  const int64_t total = n_chunks > 0 ? bounds[n_chunks] - bounds[0] : 0;
  run_chunks(n_chunks, total, [&](int64_t c) { partial[c] = sum_squares(x + bounds[c], bounds[c + 1] - bounds[c]); });
  double sum = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) sum += partial[c];
  *out = sum;
}

void scale_flat(int64_t n, float* x, float s) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  run_chunks(n_chunks, n, [&](int64_t c) {
    float* p = x + c * kChunk;
    const int64_t m = std::min(kChunk, n - c * kChunk);
    for (int64_t i = 0; i < m; ++i) p[i] *= s;
  });
}

int64_t first_nonfinite(int64_t n, const float* x) {
  const NonFinite r = find_nonfinite({GradRef{x, n}});
  return r.found() ? r.index : -1;
}

double clip_grad_norm(const std::vector<ParamRef>& grads, double max_norm) {
  check_arg(!std::isnan(max_norm) && max_norm > 0.0, "clip_grad_norm: max_norm must be > 0, got " + std::to_string(max_norm));
  std::vector<GradRef> views;
  views.reserve(grads.size());
  for (const ParamRef& g : grads) views.push_back({g.data, g.numel});
  const double norm = global_grad_norm(views);
  if (!std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return norm;
  const float scale = static_cast<float>(coef);
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(grads, &total);
  run_chunks(static_cast<int64_t>(chunks.size()), total, [&](int64_t c) {
    const Chunk& k = chunks[static_cast<size_t>(c)];
    float* x = grads[k.tensor].data + k.begin;
    const int64_t n = k.end - k.begin;
    for (int64_t i = 0; i < n; ++i) x[i] *= scale;
  });
  return norm;
}

NonFinite find_nonfinite(const std::vector<GradRef>& grads) {
  NonFinite r;
  for (size_t t = 0; t < grads.size(); ++t) {
    check_arg(grads[t].numel >= 0 && (grads[t].numel == 0 || grads[t].data != nullptr),
              "gradient " + std::to_string(t) + " has no data or a negative size");
    const float* x = grads[t].data;
    const int64_t n = grads[t].numel;
    // Branch-free scan per block (vectorizes); the exact element is looked up only on a hit.
    constexpr int64_t kBlock = 4096;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t e = std::min(n, b + kBlock);
      int bad = 0;
      for (int64_t i = b; i < e; ++i) bad |= !(std::fabs(x[i]) <= 3.4028234663852886e38f);
      if (!bad) continue;
      for (int64_t i = b; i < e; ++i) {
        if (!std::isfinite(x[i])) {
          r.tensor = static_cast<int64_t>(t);
          r.index = i;
          r.value = x[i];
          return r;
        }
      }
    }
  }
  return r;
}

}  // namespace qlora::train
