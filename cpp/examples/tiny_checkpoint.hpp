// Writes a tiny random Llama checkpoint (config.json + model.safetensors, HF names and layout)
// for the example's --selftest and cpp/tests/test_capi.cpp. Uses engine internals (JSON and
// safetensors writers); an embedding app needs only qlora/qlora.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "io/safetensors.hpp"
#include "json/json.hpp"

namespace tiny {

struct Spec {
  int64_t vocab = 97, hidden = 64, inter = 96, layers = 2, heads = 4, kv_heads = 2;
  uint32_t seed = 1234;
};

// Writes text to `path` atomically (temp name, then rename).
inline void write_text(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << text;
    if (!f) throw std::runtime_error("cannot write " + tmp);
  }
  std::filesystem::rename(tmp, path);
}

// Creates `dir` holding a random checkpoint: weights ~ U(-1/sqrt(in), 1/sqrt(in)), norms
// ~ 1 + U(-0.1, 0.1), embeddings ~ U(-1, 1) so logits spread out well beyond rounding.
inline void write_checkpoint(const std::string& dir, const Spec& s = {}) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  qlora::json::Value cfg = qlora::json::Value::object();
  cfg.set("architectures", qlora::json::Array{qlora::json::Value("LlamaForCausalLM")});
  cfg.set("model_type", "llama");
  cfg.set("vocab_size", s.vocab);
  cfg.set("hidden_size", s.hidden);
  cfg.set("intermediate_size", s.inter);
  cfg.set("num_hidden_layers", s.layers);
  cfg.set("num_attention_heads", s.heads);
  cfg.set("num_key_value_heads", s.kv_heads);
  cfg.set("max_position_embeddings", int64_t(256));
  cfg.set("rms_norm_eps", 1e-5);
  cfg.set("rope_theta", 10000.0);
  cfg.set("hidden_act", "silu");
  cfg.set("tie_word_embeddings", false);
  cfg.set("bos_token_id", int64_t(1));
  cfg.set("eos_token_id", int64_t(2));
  write_text((fs::path(dir) / "config.json").string(), qlora::json::dump(cfg, 2));

  const int64_t D = s.hidden, hd = s.hidden / s.heads, Q = s.heads * hd, KV = s.kv_heads * hd;
  std::mt19937 g(s.seed);
  std::vector<std::pair<std::string, std::vector<int64_t>>> specs = {
      {"model.embed_tokens.weight", {s.vocab, D}}, {"model.norm.weight", {D}}, {"lm_head.weight", {s.vocab, D}}};
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    specs.push_back({p + "input_layernorm.weight", {D}});
    specs.push_back({p + "post_attention_layernorm.weight", {D}});
    specs.push_back({p + "self_attn.q_proj.weight", {Q, D}});
    specs.push_back({p + "self_attn.k_proj.weight", {KV, D}});
    specs.push_back({p + "self_attn.v_proj.weight", {KV, D}});
    specs.push_back({p + "self_attn.o_proj.weight", {D, Q}});
    specs.push_back({p + "mlp.gate_proj.weight", {s.inter, D}});
    specs.push_back({p + "mlp.up_proj.weight", {s.inter, D}});
    specs.push_back({p + "mlp.down_proj.weight", {D, s.inter}});
  }
  std::vector<std::vector<float>> data;  // keeps the bytes alive until written
  std::vector<qlora::io::TensorToWrite> out;
  for (const auto& [name, shape] : specs) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const bool norm = shape.size() == 1, embed = name.find("embed") != std::string::npos;
    const float a = norm ? 0.1f : embed ? 1.0f : 1.0f / std::sqrt(static_cast<float>(shape[1]));
    std::uniform_real_distribution<float> u(-a, a);
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = (norm ? 1.0f : 0.0f) + u(g);
    data.push_back(std::move(v));
    out.push_back({name, qlora::DType::F32, shape, data.back().data(), data.back().size() * sizeof(float)});
  }
  qlora::io::write_safetensors((fs::path(dir) / "model.safetensors").string(), out, {{"format", "pt"}});
}

}  // namespace tiny
