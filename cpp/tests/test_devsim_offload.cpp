// ctest: cpu:devsim makes an activation-offload copy as late as Backend::offload's contract lets a
// device run it (CUDA: on a copy stream beside later work): at the next offload, reload or
// synchronize. A source written before then shows up in the host copy, so model code that breaks the
// contract fails the bit-exact offload tests on the CPU CI, not only on a GPU.
#include <cstring>
#include <vector>

#include "backend.hpp"
#include "check.hpp"

int main() {
  qlora::Backend& be = qlora::get_backend("cpu:devsim");
  const size_t n = 64, bytes = n * sizeof(float);
  std::vector<float> a(n, 1.0f), b(n, 2.0f), c(n, 3.0f), back(n, 0.0f);
  float* d = static_cast<float*>(be.alloc(bytes));
  float* d2 = static_cast<float*>(be.alloc(bytes));
  float* h = static_cast<float*>(be.host_alloc(bytes));
  float* h2 = static_cast<float*>(be.host_alloc(bytes));
  std::memset(h, 0, bytes);

  // 1. Offload, then the source is overwritten before any synchronize: the late copy sees it.
  be.upload(d, a.data(), bytes);
  be.offload(h, d, bytes);
  CHECK(h[0] == 0.0f, "copied before the next offload / reload / synchronize: %g", h[0]);
  be.upload(d, b.data(), bytes);
  be.synchronize();
  CHECK(h[0] == 2.0f && h[n - 1] == 2.0f, "synchronize made the copy: %g", h[0]);

  // 2. The next offload makes the previous copy (double buffering: X(l) safe to reuse after it).
  be.upload(d, a.data(), bytes);
  be.offload(h, d, bytes);
  be.upload(d2, c.data(), bytes);
  be.offload(h2, d2, bytes);
  CHECK(h[0] == 1.0f, "the second offload made the first copy: %g", h[0]);
  // 3. A reload makes the pending copy before it reads host memory.
  be.reload(d, h2, bytes);
  be.download(back.data(), d, bytes);
  CHECK(back[0] == 3.0f && h2[n - 1] == 3.0f, "reload after the pending copy: %g", back[0]);
  be.synchronize();

  be.host_free(h);
  be.host_free(h2);
  be.free(d);
  be.free(d2);
  if (g_failures) std::fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
