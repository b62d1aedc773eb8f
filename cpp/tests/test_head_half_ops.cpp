// head_format "f16" / "bf16" on a backend without the 16-bit-row ops: refused naming every missing op
// before anything is allocated or uploaded; with the ops it gets past the check.
#include <cstdio>
#include <stdexcept>
#include <string>

#include "backend.hpp"
#include "check.hpp"
#include "common/error.hpp"
#include "fake_backend.hpp"
#include "model/weights.hpp"

using namespace qlora;
using qlora::test::FakeBackend;

namespace {

std::string refusal(FakeBackend& be, Backend::HalfType t) {
  model::LlamaConfig c;
  c.vocab_size = 64, c.hidden_size = 40, c.intermediate_size = 64, c.num_layers = 1;
  c.num_heads = 4, c.num_kv_heads = 2, c.head_dim = 10;
  try {
    model::LlamaWeights w(be, c, model::QuantSpec{});
    w.set_head_half(t);
  } catch (const ValueError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("wrong exception: ") + e.what();
  }
  return "";
}

}  // namespace

int main() {
  FakeBackend bare({});
  const std::string msg = refusal(bare, Backend::HalfType::BF16);
  CHECK(contains(msg.c_str(), "head_format 'bf16': backend 'fake' does not implement ops half_rows, half_gemm_nt"),
        "%s", msg.c_str());
  CHECK(bare.allocs == 0, "%d allocations before the refusal", bare.allocs);
  FakeBackend one({"half_rows"});
  const std::string m1 = refusal(one, Backend::HalfType::F16);
  CHECK(contains(m1.c_str(), "head_format 'f16'") && contains(m1.c_str(), "does not implement op half_gemm_nt"), "%s",
        m1.c_str());
  FakeBackend both({"half_rows", "half_gemm_nt"});  // nothing loaded yet: nothing to convert, no allocation
  const std::string ok = refusal(both, Backend::HalfType::F16);
  CHECK(ok.empty(), "%s", ok.c_str());
  CHECK(get_backend("cpu").supports_op("half_rows") && get_backend("cpu").supports_op("half_gemm_nt"), "cpu lacks ops");
  if (g_failures) std::fprintf(stderr, "%d failures\n", g_failures);
  return g_failures ? 1 : 0;
}
