// The training pass's op requirements (model/train_ops.hpp): a backend lacking a training op is
// refused with a ValueError naming every missing op; cpu, cpu:devsim (which mirrors the CUDA
// table) and the CUDA table itself have every op a training step needs.
#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "backend.hpp"
#include "check.hpp"
#include "common/error.hpp"
#include "fake_backend.hpp"
#include "model/train_ops.hpp"

using namespace qlora;
using qlora::test::FakeBackend;

namespace {

std::string refusal(const Backend& be, const model::LlamaConfig& c, bool backward, bool dropout) {
  return test::refusal_of([&] { model::require_training_ops(be, c, backward, dropout); });
}

}  // namespace

int main() {
  model::LlamaConfig c;
  // The forward ops of inference only (the table CUDA had before its training kernels).
  FakeBackend fwd({"embedding", "rmsnorm", "rope", "kv_write", "attention", "add_inplace", "swiglu", "rope_backward",
                   "cross_entropy_rows"});
  const std::string msg = refusal(fwd, c, true, true);
  CHECK(contains(msg.c_str(), "training: backend 'fake' does not implement ops"), "%s", msg.c_str());
  for (const char* op : {"attention_train", "attention_train_backward", "rmsnorm_backward", "swiglu_backward",
                         "lora_dropout", "lora_dropout_backward"})
    CHECK(contains(msg.c_str(), op), "missing %s in: %s", op, msg.c_str());
  CHECK(!contains(msg.c_str(), "rope_backward") && !contains(msg.c_str(), "add_bias"), "%s", msg.c_str());
  // eval_loss needs no backward op and no dropout.
  const std::string ev = refusal(fwd, c, false, false);
  CHECK(contains(ev.c_str(), "does not implement op attention_train") && !contains(ev.c_str(), "backward"), "%s",
        ev.c_str());

  // Every backend that can train: all training ops, with and without dropout, biases on.
  model::LlamaConfig cb = c;
  cb.qkv_bias = cb.o_bias = true;
  for (const char* name : {"cpu", "cpu:devsim"}) {
    const std::string r = refusal(get_backend(name), cb, true, true);
    CHECK(r.empty(), "%s refused: %s", name, r.c_str());
  }
  // The CUDA backend's table (known without a GPU): every training op.
  if (cuda_compiled()) {
    const std::vector<std::string> cu = cuda_supported_ops();
    for (const std::string& op : model::training_ops(cb, true, true))
      CHECK(std::find(cu.begin(), cu.end(), op) != cu.end(), "cuda lacks training op %s", op.c_str());
  }
  if (g_failures) std::fprintf(stderr, "%d failures\n", g_failures);
  return g_failures ? 1 : 0;
}
