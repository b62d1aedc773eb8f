// Backend capability table: a model refuses a backend that lacks ops it needs, naming every
// missing op, before it allocates (uploads) anything; the CPU backend supports every op.
#include <cstdio>
#include <stdexcept>

#include "backend.hpp"
#include "check.hpp"
#include "common/error.hpp"
#include "fake_backend.hpp"
#include "model/llama.hpp"

using namespace qlora;
using qlora::test::FakeBackend;

namespace {

model::LlamaConfig tiny(bool bias) {
  model::LlamaConfig c;
  c.vocab_size = 64, c.hidden_size = 32, c.intermediate_size = 64, c.num_layers = 1;
  c.num_heads = 4, c.num_kv_heads = 2, c.head_dim = 8, c.qkv_bias = bias;
  return c;
}

std::string refusal(FakeBackend& be, bool bias) {
  return test::refusal_of([&] { model::LlamaModel m(be, tiny(bias), model::QuantSpec{}); });
}

}  // namespace

int main() {
  // Only core ops: every forward op is named, nothing was allocated.
  FakeBackend bare({});
  const std::string msg = refusal(bare, false);
  CHECK(contains(msg.c_str(), "backend 'fake' does not implement ops"), "%s", msg.c_str());
  for (const char* op : {"embedding", "rmsnorm", "rope", "kv_write", "attention", "add_inplace", "swiglu"})
    CHECK(contains(msg.c_str(), op), "missing %s in: %s", op, msg.c_str());
  CHECK(!contains(msg.c_str(), "gemm_nt,") && !contains(msg.c_str(), "add_bias"), "%s", msg.c_str());
  CHECK(bare.allocs == 0, "%d allocations before the refusal", bare.allocs);

  // All forward ops but add_bias: refused only for a config with biases, naming that one op.
  FakeBackend most({"embedding", "rmsnorm", "rope", "kv_write", "attention", "add_inplace", "swiglu"});
  const std::string one = refusal(most, true);
  CHECK(contains(one.c_str(), "does not implement op add_bias") && !contains(one.c_str(), "rope"), "%s", one.c_str());
  CHECK(most.allocs == 0, "%d allocations before the refusal", most.allocs);
  const std::string passes = refusal(most, false);  // passes the check, then reaches alloc (fake)
  CHECK(contains(passes.c_str(), "alloc must not be reached"), "%s", passes.c_str());

  // The CPU backend: every op; unknown names are not ops.
  Backend& cpu = get_backend("cpu");
  CHECK(cpu.supported_ops() == Backend::all_ops(), "cpu lacks ops");
  CHECK(!cpu.supports_op("no_such_op"), "unknown op reported as supported");
  CHECK(!bare.supports_op("embedding") && bare.supports_op("gemm_nt"), "core/optional split");
  if (g_failures) std::fprintf(stderr, "%d failures\n", g_failures);
  return g_failures ? 1 : 0;
}
