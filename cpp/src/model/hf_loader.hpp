// Loading a Hugging Face Llama-family checkpoint directory in C++ (no Python): config.json ->
// LlamaConfig with the same rules and messages as python/qlora_native/config.py, and the
// safetensors tensors (single file or shards of model.safetensors.index.json) handed to
// LlamaWeights one at a time, as python/qlora_native/model.py does. Pre-quantized bitsandbytes
// NF4 checkpoints (quantization_config in config.json) are loaded as stored.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "json/json.hpp"
#include "model/llama.hpp"

namespace qlora::model {

struct HfConfig {
  LlamaConfig cfg;                     // validated
  bool prequantized = false;           // bitsandbytes NF4 4-bit checkpoint
  int64_t bos_token_id = -1;           // -1: none
  std::vector<int64_t> eos_token_ids;  // every stop id of config.json (int or list)
  // The values as config.json states them, in double precision (cfg holds float32 copies), for
  // the Python face's ModelConfig: rms_norm_eps, rope_theta and the normalized rope scaling (null,
  // {"rope_type": "linear", "factor"} or llama3's five fields).
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  json::Value rope_scaling;
};

// Parses a config.json document. ValueError names the offending field (FormatError when the
// document is not an object).
HfConfig parse_hf_config(const json::Value& d);
// Reads <dir>/config.json. FileError when missing, FormatError when not valid JSON.
HfConfig read_hf_config(const std::string& dir);

// Loads <dir> (config.json + safetensors) onto `be`. quant.nf4 quantizes the projections on
// load; a pre-quantized checkpoint requires quant.nf4 (its own blocksize / double quant are
// used). Throws ValueError / FormatError / FileError naming the file or tensor at fault.
std::unique_ptr<LlamaModel> load_hf_model(const std::string& dir, Backend& be, const QuantSpec& quant,
                                          HfConfig* info = nullptr);

// The one front door: a directory is an HF checkpoint (load_hf_model), a file a GGUF
// (gguf::load_model, gguf/gguf_model.hpp). `info` gets the config and token ids of either.
std::unique_ptr<LlamaModel> load_model_from_path(const std::string& path, Backend& be, const QuantSpec& quant,
                                                 HfConfig* info = nullptr);

}  // namespace qlora::model
