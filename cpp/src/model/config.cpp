#include "model/config.hpp"

#include <cmath>

#include "common/error.hpp"

namespace qlora::model {

void LlamaConfig::validate() const {
  auto pos = [](int64_t v, const char* f) {
    check_arg(v >= 1, std::string("model config: ") + f + " must be >= 1, got " + std::to_string(v));
  };
  pos(vocab_size, "vocab_size");
  pos(hidden_size, "hidden_size");
  pos(intermediate_size, "intermediate_size");
  pos(num_layers, "num_hidden_layers");
  pos(num_heads, "num_attention_heads");
  pos(num_kv_heads, "num_key_value_heads");
  pos(head_dim, "head_dim");
  pos(max_position_embeddings, "max_position_embeddings");
  check_arg(vocab_size < (int64_t(1) << 31), "model config: vocab_size does not fit int32 token ids");
  check_arg(num_heads % num_kv_heads == 0, "model config: num_attention_heads (" + std::to_string(num_heads) +
                                               ") must be a multiple of num_key_value_heads (" +
                                               std::to_string(num_kv_heads) + ")");
  check_arg(head_dim % 2 == 0, "model config: head_dim must be even for RoPE, got " + std::to_string(head_dim));
  check_arg(rms_norm_eps > 0 && std::isfinite(rms_norm_eps), "model config: rms_norm_eps must be positive");
  check_arg(rope_theta > 0 && std::isfinite(rope_theta), "model config: rope_theta must be positive");
  check_arg(sliding_window >= 0, "model config: sliding_window must be >= 0");
  if (rope_type != RopeType::Default)
    check_arg(rope_factor > 0 && std::isfinite(rope_factor), "model config: rope_scaling.factor must be positive");
  if (rope_type == RopeType::Llama3) {
    check_arg(rope_high_freq_factor > rope_low_freq_factor && rope_low_freq_factor > 0,
              "model config: llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor");
    pos(rope_original_max_pos, "rope_scaling.original_max_position_embeddings");
  }
}

std::vector<float> rope_inv_freq(const LlamaConfig& c) {
  const int64_t half = c.head_dim / 2;
  std::vector<float> inv(half);
  const float dim = static_cast<float>(c.head_dim);
  for (int64_t i = 0; i < half; ++i) {
    // 1.0 / (base ** (arange(0, dim, 2).float() / dim)), every step in fp32 as torch does it.
    const float e = static_cast<float>(2 * i) / dim;
    const float p = static_cast<float>(std::pow(static_cast<double>(c.rope_theta), static_cast<double>(e)));
    inv[i] = 1.0f / p;
  }
  if (c.rope_type == RopeType::Linear) {
    for (auto& v : inv) v /= c.rope_factor;
  } else if (c.rope_type == RopeType::Llama3) {
    const float factor = c.rope_factor, lo = c.rope_low_freq_factor, hi = c.rope_high_freq_factor;
    const float old_ctx = static_cast<float>(c.rope_original_max_pos);
    // Python-float scalars become fp32 when combined with the fp32 inv_freq tensor.
    const float low_wavelen = static_cast<float>(static_cast<double>(c.rope_original_max_pos) / lo);
    const float high_wavelen = static_cast<float>(static_cast<double>(c.rope_original_max_pos) / hi);
    const float two_pi = static_cast<float>(2 * M_PI);
    for (auto& v : inv) {
      const float wavelen = two_pi / v;
      float llama = wavelen > low_wavelen ? v / factor : v;
      const float smooth = (old_ctx / wavelen - lo) / (hi - lo);
      const float smoothed = (1.0f - smooth) * llama / factor + smooth * llama;
      const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      v = medium ? smoothed : llama;
    }
  }
  return inv;
}

}  // namespace qlora::model
