// The CPU backend's optimizer ops: the host code of train/optimizer.cpp and train/grad_utils.cpp
// (the same functions the host AdamW / global_grad_norm / clip_grad_norm run), so a step through
// the backend ops is bit-identical to the host path.
#include "common/error.hpp"
#include "cpu/cpu_backend.hpp"
#include "train/grad_utils.hpp"
#include "train/optimizer.hpp"

namespace qlora::cpu {

void CpuBackend::adamw_update(int64_t n, float* p, const float* g, float* m, float* v, const train::AdamWScalars& s) {
  check_arg(n >= 0, "adamw_update: negative size");
  train::adamw_update_parallel(p, g, m, v, n, s);
}

void CpuBackend::sum_squares(int64_t n_chunks, const int64_t* bounds, const float* x, double* partial, double* out) {
  train::sum_squares_chunks(n_chunks, bounds, x, partial, out);
}

void CpuBackend::scale_inplace(int64_t n, float* x, float s) {
  check_arg(n >= 0, "scale_inplace: negative size");
  train::scale_flat(n, x, s);
}

void CpuBackend::find_nonfinite(int64_t n, const float* x, int64_t* out) {
  check_arg(n >= 0, "find_nonfinite: negative size");
  *out = train::first_nonfinite(n, x);
}

}  // namespace qlora::cpu
