#include "model/lora_check.hpp"

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <vector>

#include "backend.hpp"
#include "common/error.hpp"
#include "model/lora.hpp"

namespace qlora::model {

namespace {

// Largest absolute row sum of X [rows, cols] (+Inf or NaN when X holds a non-finite element or a
// sum overflows float: both are refused). 8 independent float sums: vectorizes without -ffast-math.
double max_abs_row_sum(const float* X, int64_t rows, int64_t cols) {
  double best = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const float* x = X + i * cols;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8)
      for (int k = 0; k < 8; ++k) acc[k] += std::fabs(x[j + k]);
    double s = 0.0;
    for (float a : acc) s += a;
    for (; j < cols; ++j) s += std::fabs(x[j]);
    if (std::isnan(s)) return s;  // a NaN element
    if (s > best) best = s;
  }
  return best;
}

bool all_finite(const float* X, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(X[i]);  // branch-free: vectorizes
  return finite;
}

float max_abs(const float* X, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::fmax(m, std::fabs(X[i]));
  return m;
}

std::string g(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

// check_lora_factors with the scaling in double (a scaling times a runtime scale may exceed float)
// and named in the message as `s_name`.
void check_factors(int64_t r, int64_t in, int64_t out, double scaling, const float* A, const float* B,
                   const std::string& what, const std::string& a_name, const std::string& b_name,
                   const char* s_name) {
  const double na = max_abs_row_sum(A, r, in), nb = max_abs_row_sum(B, out, r);
  if (!std::isfinite(na) && !all_finite(A, r * in)) throw ValueError(what + ": " + a_name + " contains NaN or Inf");
  if (!std::isfinite(nb) && !all_finite(B, out * r)) throw ValueError(what + ": " + b_name + " contains NaN or Inf");
  const double s = std::fabs(scaling);
  const char* stage = nullptr;
  double gain = 0.0;
  if (!(na <= kLoraMaxGain)) stage = "A alone", gain = na;
  else if (!(s * nb <= kLoraMaxGain)) stage = "scaling * B alone", gain = s * nb;
  else if (!(s * nb * na <= kLoraMaxGain)) stage = "scaling * B * A", gain = s * nb * na;
  if (stage)
    throw ValueError(what + ": " + a_name + " / " + b_name + " are too large for float32: " + stage +
                     " can turn an input bounded by 1 into an output of " + g(gain) +
                     " (largest |element| of " + a_name + " " + g(max_abs(A, r * in)) + ", of " + b_name + " " +
                     g(max_abs(B, out * r)) + ", " + s_name + " " + g(scaling) +
                     "); the limit is 2^32 = 4.29e+09, beyond which the model's float32 activations overflow to "
                     "Inf / NaN");
}

}  // namespace

void check_lora_factors(int64_t r, int64_t in, int64_t out, float scaling, const float* A, const float* B,
                        const std::string& what, const std::string& a_name, const std::string& b_name) {
  check_factors(r, in, out, scaling, A, B, what, a_name, b_name, "scaling");
}

void check_lora_scale(Backend& be, const LoraAdapter& a, double scale, const std::string& what) {
  // FLT_MAX: the scale is kept as a float; a larger one would become Inf (and Inf * a zero B, NaN).
  const std::string at = what + ": scale " + g(scale);
  if (!(std::fabs(scale) <= FLT_MAX)) throw ValueError(at + " is not finite as a float32 number");
  if (std::fabs(scale) <= 1.0) return;
  std::vector<float> A, B;
  for (size_t k = 0; k < a.modules.size(); ++k) {
    const LoraModule* m = a.modules[k].get();
    if (!m) continue;
    const std::string mod = at + ": layer " + std::to_string(k / kNumProj) + " " + proj_name(static_cast<int>(k % kNumProj));
    const double s = static_cast<double>(m->scaling) * scale;
    if (!(std::fabs(s) <= FLT_MAX))  // the passes form scaling * scale in float: Inf, and Inf * a zero B is NaN
      throw ValueError(mod + ": scaling " + g(m->scaling) + " * scale overflows float32");
    A.resize(static_cast<size_t>(m->r * m->in)), B.resize(static_cast<size_t>(m->out * m->r));
    be.download(A.data(), m->A.data(), sizeof(float) * A.size());
    be.download(B.data(), m->B.data(), sizeof(float) * B.size());
    check_factors(m->r, m->in, m->out, s, A.data(), B.data(), mod, "A", "B", "scaling * scale");
  }
}

}  // namespace qlora::model
