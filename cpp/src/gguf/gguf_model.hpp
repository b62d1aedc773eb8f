// Llama-architecture GGUF files (llama.cpp) as models: the HF-style config from the GGUF
// metadata, GGUF tensor names mapped to the HF names, and the weights loaded tensor by tensor
// from the mmap (dequantized with our own kernels, Q/K rows un-permuted back to HF's rotate-half
// layout, a Q8_0 token embedding kept as stored, the [vocab, hidden] tensors in row slabs).
// The Python face (Model.from_pretrained on a .gguf) and the C API (qlora_model_load) both call it.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "io/gguf_read.hpp"
#include "json/json.hpp"
#include "model/hf_loader.hpp"
#include "model/llama.hpp"

namespace qlora::gguf {

// GGUF architectures that are the Llama network (Mistral GGUFs say "llama" too).
bool is_llama_arch(const std::string& arch);

// An HF config.json-style object (architectures, model_type, sizes, rope, token ids) read from the
// metadata with every field typed and range-checked; FormatError / ValueError naming the file and
// the key. Also refuses unexpected tensor names and tensor types we cannot dequantize.
json::Value hf_config(const File& f);

// The HF name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"),
// "" for tensors that are skipped (rope_freqs.weight); ValueError for a name a llama model lacks.
std::string hf_name(const File& f, const std::string& gguf_name);
// The name tables: GGUF suffix after "blk.N." -> HF suffix after "model.layers.N.", and globals.
const std::vector<std::pair<std::string, std::string>>& layer_names();
const std::vector<std::pair<std::string, std::string>>& global_names();

// Undoes llama.cpp's convert_hf_to_gguf permutation of Q/K rows (interleaved -> rotate-half):
// dst[rows, cols] from src (cols = 1 for a bias). ValueError when rows do not split into n_head
// heads of even size.
void unpermute_rows(const float* src, float* dst, int64_t rows, int64_t cols, int64_t n_head, const std::string& name);

// A tensor as float32 in HF layout (dequantized; Q/K rows un-permuted for llama-arch files) into
// `out` (`scratch`: reused temporary).
void tensor_f32(const TensorInfo& t, const model::LlamaConfig& cfg, std::vector<float>& out,
                std::vector<float>& scratch);

// Loads every tensor `m` expects from `f` (config made by hf_config(f)); ValueError naming the
// tensor for an unexpected, missing or misshapen one, before anything is dequantized.
void load_weights(const File& f, model::LlamaModel& m);

// The whole load: open + validate `path`, config, model, weights. Errors name the file. `info`
// gets the parsed config (token ids included); `hf` the config object.
std::unique_ptr<model::LlamaModel> load_model(const std::string& path, Backend& be, const model::QuantSpec& quant,
                                              model::HfConfig* info = nullptr, json::Value* hf = nullptr);
// The same from an open file.
std::unique_ptr<model::LlamaModel> load_model(const File& f, Backend& be, const model::QuantSpec& quant,
                                              model::HfConfig* info = nullptr, json::Value* hf = nullptr);

}  // namespace qlora::gguf
