#include "model/train_ops.hpp"

namespace qlora::model {

std::vector<std::string> training_ops(const LlamaConfig& cfg, bool backward, bool dropout) {
  // The forward of the training pass (llama_train.cpp Pass::layer_forward) and the chunked loss
  // (lm_cross_entropy: gemm_nt, cross_entropy_rows, gemm_nn).
  std::vector<std::string> ops = {"embedding", "rmsnorm", "gemm_nt", "gemm_nn", "nf4_gemm_nt", "rope",
                                  "attention_train", "add_inplace", "swiglu", "cross_entropy_rows"};
  if (cfg.qkv_bias || cfg.o_bias) ops.push_back("add_bias");
  if (backward) {  // Pass::layer_backward, Linear::backward_input, lora_backward
    for (const char* op : {"gemm_tn", "nf4_gemm_nn", "rmsnorm_backward", "rope_backward", "swiglu_backward",
                           "attention_train_backward"})
      ops.push_back(op);
  }
  if (dropout) ops.push_back("lora_dropout"), ops.push_back("lora_dropout_backward");
  return ops;
}

void require_training_ops(const Backend& be, const LlamaConfig& cfg, bool backward, bool dropout) {
  be.require_ops(training_ops(cfg, backward, dropout), "training");
}

}  // namespace qlora::model
