#include "model/config.hpp"

#include <unistd.h>

#include <climits>
#include <cmath>
#include <cstdio>

#include "common/error.hpp"

namespace qlora::model {

namespace {
// Physical memory of the machine in bytes (0: unknown).
double physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0.0;
}

std::string gib(double bytes) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / double(1u << 30));
  return buf;
}
}  // namespace

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
  // Sizes come from config.json or a GGUF header: each is bounded (far above any real model) so
  // that no product of them overflows int64, and the weights they imply must fit the machine's
  // memory, all before anything is allocated (a huge value was a bare std::bad_alloc).
  auto at_most = [](int64_t v, int64_t hi, const char* f) {
    check_arg(v <= hi, std::string("model config: ") + f + " must be <= " + std::to_string(hi) + ", got " +
                           std::to_string(v));
  };
  at_most(hidden_size, int64_t(1) << 24, "hidden_size");
  at_most(intermediate_size, int64_t(1) << 24, "intermediate_size");
  at_most(num_layers, int64_t(1) << 16, "num_hidden_layers");
  at_most(num_heads, int64_t(1) << 16, "num_attention_heads");
  at_most(num_kv_heads, int64_t(1) << 16, "num_key_value_heads");
  at_most(head_dim, int64_t(1) << 16, "head_dim");
  at_most(max_position_embeddings, INT32_MAX, "max_position_embeddings");
  at_most(sliding_window, INT32_MAX, "sliding_window");
  {
    // Parameters, in double (exact enough, cannot wrap). At least 4 bits a weight are held
    // (NF4 projections; embeddings and norms take more), plus per-layer bookkeeping.
    const double V = double(vocab_size), D = double(hidden_size), I = double(intermediate_size);
    const double q = double(num_heads) * double(head_dim), kv = double(num_kv_heads) * double(head_dim);
    const double per_layer = D * (2 * q + 2 * kv) + 3 * D * I + 2 * D + q + 2 * kv;
    const double params = V * D * (tie_word_embeddings ? 1 : 2) + D + double(num_layers) * per_layer;
    const double need = params / 2 + double(num_layers) * 4096;
    const double ram = physical_memory_bytes();
    check_arg(ram == 0 || need <= ram,
              "model config: the weights need at least " + gib(need) + " even at 4 bits a weight (vocab_size=" +
                  std::to_string(vocab_size) + ", hidden_size=" + std::to_string(hidden_size) +
                  ", intermediate_size=" + std::to_string(intermediate_size) +
                  ", num_hidden_layers=" + std::to_string(num_layers) + ", num_attention_heads=" +
                  std::to_string(num_heads) + ", num_key_value_heads=" + std::to_string(num_kv_heads) +
                  ", head_dim=" + std::to_string(head_dim) + "), more than this machine's memory (" + gib(ram) + ")");
  }
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
    at_most(rope_original_max_pos, INT32_MAX, "rope_scaling.original_max_position_embeddings");
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
