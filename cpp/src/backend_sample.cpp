// Backend::sample_rows default: the host sampling rule (model/sampler.cpp) on the listed rows,
// read in place on host-memory backends and downloaded first on others (a backend with a kernel,
// CUDA, overrides it so only token ids leave the device).
#include <vector>

#include "backend.hpp"
#include "common/error.hpp"
#include "model/sampler.hpp"

namespace qlora {

void Backend::sample_rows(int64_t n, int64_t V, const float* logits, int64_t ldl, const int32_t* rows,
                          const int32_t* const* histories, const int64_t* n_hists, const SamplingParams& p,
                          const double* u, int32_t* out) {
  p.validate();
  check_arg(n >= 0 && V >= 0 && ldl >= V, "sample_rows: bad shape (n, V >= 0, ldl >= V)");
  if (n == 0) return;
  check_arg(V >= 1, "sample: empty logits");
  for (int64_t i = 0; i < n; ++i) check_arg(rows[i] >= 0, "sample_rows: negative row index");
  if (host_memory()) {
    model::sample_rows_host(logits, ldl, V, rows, n, histories, n_hists, p, u, out);
    return;
  }
  std::vector<float> host(static_cast<size_t>(n * V));  // [n, V]: the listed rows only
  std::vector<int32_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    download(host.data() + i * V, logits + static_cast<int64_t>(rows[i]) * ldl, sizeof(float) * V);
    idx[i] = static_cast<int32_t>(i);
  }
  synchronize();
  model::sample_rows_host(host.data(), V, V, idx.data(), n, histories, n_hists, p, u, out);
}

}  // namespace qlora
