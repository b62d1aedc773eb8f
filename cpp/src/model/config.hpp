// Llama-family model configuration as plain fields (python/qlora_native/config.py parses and
// validates config.json; C++ re-checks consistency) and the RoPE inverse frequencies.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qlora::model {

enum class RopeType : int { Default = 0, Linear = 1, Llama3 = 2 };

struct LlamaConfig {
  std::string arch = "llama";  // "llama" | "mistral" | "qwen2" (naming only; the math is shared)
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  RopeType rope_type = RopeType::Default;
  float rope_factor = 1.0f;  // linear and llama3
  float rope_low_freq_factor = 1.0f, rope_high_freq_factor = 4.0f;  // llama3
  int64_t rope_original_max_pos = 8192;                              // llama3
  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 2048;
  bool qkv_bias = false;     // Qwen2, or Llama attention_bias
  bool o_bias = false;       // Llama attention_bias
  int64_t sliding_window = 0;  // 0: none; else sequences longer than this are refused

  // Throws ValueError naming the first inconsistent field.
  void validate() const;
  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
};

// inv_freq[head_dim / 2] exactly as transformers computes it in fp32 (default, linear, llama3).
std::vector<float> rope_inv_freq(const LlamaConfig& c);

}  // namespace qlora::model
