#include "model/weights.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "common/error.hpp"
#include "cpu/half_rows.hpp"
#include "cpu/q8_0.hpp"

namespace qlora::model {

namespace {
std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}
}  // namespace

void LlamaWeights::add(const std::string& name, Kind k, int64_t layer, Linear* lin, std::vector<int64_t> shape) {
  expected_.push_back({name, shape});
  slots_[name] = Slot{k, layer, lin, std::move(shape)};
}

LlamaWeights::LlamaWeights(Backend& backend, const LlamaConfig& c, const QuantSpec& q)
    : be(backend), cfg(c), quant(q), layers(c.num_layers) {
  cfg.validate();
  const int64_t V = c.vocab_size, D = c.hidden_size, I = c.intermediate_size;
  add("model.embed_tokens.weight", Kind::Embed, -1, nullptr, {V, D});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights& L = layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", Kind::InNorm, l, nullptr, {D});
    add(p + "post_attention_layernorm.weight", Kind::PostNorm, l, nullptr, {D});
    struct P { const char* name; Linear* lin; int64_t out, in; bool bias; };
    const P projs[] = {
        {"self_attn.q_proj", &L.q, c.q_dim(), D, c.qkv_bias},  {"self_attn.k_proj", &L.k, c.kv_dim(), D, c.qkv_bias},
        {"self_attn.v_proj", &L.v, c.kv_dim(), D, c.qkv_bias}, {"self_attn.o_proj", &L.o, D, c.q_dim(), c.o_bias},
        {"mlp.gate_proj", &L.gate, I, D, false},               {"mlp.up_proj", &L.up, I, D, false},
        {"mlp.down_proj", &L.down, D, I, false},
    };
    for (const P& pr : projs) {
      pr.lin->out = pr.out, pr.lin->in = pr.in;
      add(p + pr.name + ".weight", Kind::Weight, l, pr.lin, {pr.out, pr.in});
      if (pr.bias) add(p + pr.name + ".bias", Kind::Bias, l, pr.lin, {pr.out});
    }
  }
  add("model.norm.weight", Kind::Norm, -1, nullptr, {D});
  if (!c.tie_word_embeddings) add("lm_head.weight", Kind::LmHead, -1, nullptr, {V, D});
  // Nothing is loaded yet: these only check (the ops, Q8_0's D % 32) and set how tables load.
  if (q.head == HeadFormat::Q8_0) set_head_q8_0();
  if (q.head == HeadFormat::F16 || q.head == HeadFormat::BF16)
    set_head_half(q.head == HeadFormat::BF16 ? Backend::HalfType::BF16 : Backend::HalfType::F16);
}

bool LlamaWeights::ignorable(const std::string& name) const {
  if (cfg.tie_word_embeddings && name == "lm_head.weight") return true;  // HF ties it anyway
  // Old checkpoints store the (recomputed) RoPE table as a buffer.
  const std::string suffix = ".rotary_emb.inv_freq";
  return name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void LlamaWeights::load(const std::string& name, const void* data, DType dtype, const std::vector<int64_t>& shape) {
  auto it = slots_.find(name);
  check_arg(it != slots_.end(), "unexpected tensor '" + name + "' for this " + cfg.arch + " config");
  const Slot& s = it->second;
  check_arg(shape == s.shape, "tensor '" + name + "' has shape " + shape_str(shape) + ", expected " +
                                  shape_str(s.shape));
  check_arg(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16,
            "tensor '" + name + "' has dtype " + dtype_name(dtype) + ", expected F32, F16 or BF16");
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  try {
    switch (s.kind) {
      case Kind::Embed:
        if (head_half_) {  // rounded on the host: no fp32 table on the device
          const std::vector<uint16_t> h = host_half(data, dtype, n, 0, s.shape[1], name);
          embed_h = DeviceBuffer(be, h.size() * 2);
          be.upload(embed_h.data(), h.data(), h.size() * 2);
          be.synchronize();  // before `h` goes
          break;
        }
        embed = to_device_f32(be, data, dtype, n);
        if (head_q8_) embed_q8 = quantize_q8_0(embed, s.shape[0]), embed = DeviceBuffer();
        break;
      case Kind::Norm: norm = to_device_f32(be, data, dtype, n); break;
      case Kind::LmHead:
        if (head_half_) {
          const std::vector<uint16_t> h = host_half(data, dtype, n, 0, s.shape[1], name);
          lm_head_h = DeviceBuffer(be, h.size() * 2);
          be.upload(lm_head_h.data(), h.data(), h.size() * 2);
          be.synchronize();  // before `h` goes
          break;
        }
        lm_head = to_device_f32(be, data, dtype, n);
        if (head_q8_) lm_head_q8 = quantize_q8_0(lm_head, s.shape[0]), lm_head = DeviceBuffer();
        break;
      case Kind::InNorm: layers[s.layer].input_norm = to_device_f32(be, data, dtype, n); break;
      case Kind::PostNorm: layers[s.layer].post_norm = to_device_f32(be, data, dtype, n); break;
      case Kind::Weight: s.lin->set_weight(be, data, dtype, quant); break;
      case Kind::Bias: s.lin->set_bias(be, data, dtype); break;
    }
  } catch (const ValueError& e) {
    throw ValueError("tensor '" + name + "': " + e.what());
  }
  loaded_[name] = true;
}

void LlamaWeights::load_nf4(const std::string& name, const Nf4Ref& host) {
  auto it = slots_.find(name);
  check_arg(it != slots_.end() && it->second.kind == Kind::Weight,
            "tensor '" + name + "' is not a projection weight of this model");
  const Slot& s = it->second;
  check_arg(host.rows == s.shape[0] && host.cols == s.shape[1],
            "tensor '" + name + "' has shape " + shape_str({host.rows, host.cols}) + ", expected " +
                shape_str(s.shape));
  s.lin->set_nf4(be, host);
  loaded_[name] = true;
}

void LlamaWeights::load_rows(const std::string& name, int64_t row0, int64_t nrows, int64_t ncols, const float* data) {
  auto it = slots_.find(name);
  check_arg(it != slots_.end() && (it->second.kind == Kind::Embed || it->second.kind == Kind::LmHead),
            "load_rows: '" + name + "' is not an embedding or lm_head of this model");
  const Slot& s = it->second;
  const int64_t rows = s.shape[0], cols = s.shape[1];
  check_arg(ncols == cols, "load_rows: '" + name + "' has " + std::to_string(cols) + " columns, got " +
                               std::to_string(ncols));
  check_arg(nrows >= 1 && row0 >= 0 && row0 + nrows <= rows,
            "load_rows: rows [" + std::to_string(row0) + ", " + std::to_string(row0 + nrows) + ") outside '" + name +
                "' with " + std::to_string(rows) + " rows");
  // head_format q8_0: each slab is quantized on the host and only its Q8_0 rows are uploaded
  // (f16 / bf16: rounded on the host likewise).
  const bool emb = s.kind == Kind::Embed;
  DeviceBuffer& buf = head_q8_ ? (emb ? embed_q8 : lm_head_q8) : head_half_ ? (emb ? embed_h : lm_head_h) : (emb ? embed : lm_head);
  const size_t row_bytes = head_q8_     ? static_cast<size_t>(cols / cpu::kQ8_0Block * cpu::kQ8_0BlockBytes)
                           : head_half_ ? sizeof(uint16_t) * static_cast<size_t>(cols)
                                        : sizeof(float) * static_cast<size_t>(cols);
  if (row0 == 0) {
    buf = DeviceBuffer(be, row_bytes * rows);
    if (head_q8_ || head_half_) (emb ? embed : lm_head) = DeviceBuffer();
    rows_loaded_[name] = 0;
    loaded_.erase(name);
  }
  check_arg(rows_loaded_.count(name) && rows_loaded_[name] == row0,
            "load_rows: rows of '" + name + "' must arrive in order from row 0");
  for (int64_t i = 0; i < nrows * cols; ++i)
    if (!std::isfinite(data[i]))  // the message is built only on failure
      throw ValueError("tensor '" + name + "': weights contain NaN or inf (row " + std::to_string(row0 + i / cols) +
                       ")");
  if (head_half_) {
    const std::vector<uint16_t> h = host_half(data, DType::F32, nrows * cols, row0, cols, name);
    be.upload(buf.data<uint8_t>() + row_bytes * row0, h.data(), h.size() * 2);
    be.synchronize();  // before `h` goes
  } else if (head_q8_) {
    std::vector<uint8_t> q(row_bytes * static_cast<size_t>(nrows));
    cpu::q8_0_quantize_rows(data, nrows, cols, q.data());
    be.upload(buf.data<uint8_t>() + row_bytes * row0, q.data(), q.size());
    be.synchronize();  // before `q` goes
  } else {
    be.upload(buf.data<float>() + row0 * cols, data, sizeof(float) * nrows * cols);
  }
  rows_loaded_[name] = row0 + nrows;
  if (row0 + nrows == rows) loaded_[name] = true;
}

void LlamaWeights::load_embed_q8_0(const uint8_t* data, size_t bytes) {
  const int64_t V = cfg.vocab_size, D = cfg.hidden_size;
  check_arg(!head_half_, "Q8_0 embedding: the model's head_format is 16-bit; load it before setting head_format");
  be.require_ops(cfg.tie_word_embeddings ? std::vector<std::string>{"q8_0_rows", "q8_0_gemm_nt"}
                                         : std::vector<std::string>{"q8_0_rows"},
                 "Q8_0 embedding");
  check_arg(D % 32 == 0, "Q8_0 embedding: hidden_size must be a multiple of 32, got " + std::to_string(D));
  const size_t want = static_cast<size_t>(V) * static_cast<size_t>(D / 32) * 34;
  check_arg(bytes == want, "Q8_0 embedding: expected " + std::to_string(want) + " bytes for [" + std::to_string(V) +
                               ", " + std::to_string(D) + "], got " + std::to_string(bytes));
  for (size_t b = 0; b < want; b += 34) {  // every block scale must be a finite fp16
    const uint16_t h = static_cast<uint16_t>(data[b] | (data[b + 1] << 8));
    if ((h & 0x7C00) == 0x7C00)
      throw ValueError("tensor 'model.embed_tokens.weight': Q8_0 scale is NaN or inf (row " +
                       std::to_string(b / 34 / (D / 32)) + ")");
  }
  embed_q8 = DeviceBuffer(be, want);
  be.upload(embed_q8.data(), data, want);
  embed = DeviceBuffer();
  loaded_["model.embed_tokens.weight"] = true;
}

const float* LlamaWeights::embed_f32() {
  if (embed.empty() && !embed_h.empty()) embed = widen_half(embed_h, cfg.vocab_size);
  if (embed.empty() && embed_is_q8_0()) embed = widen_q8_0(embed_q8, cfg.vocab_size);
  return embed.f32();
}

const float* LlamaWeights::lm_head_f32() {
  if (cfg.tie_word_embeddings) return embed_f32();
  if (lm_head.empty() && !lm_head_h.empty()) lm_head = widen_half(lm_head_h, cfg.vocab_size);
  if (lm_head.empty() && !lm_head_q8.empty()) lm_head = widen_q8_0(lm_head_q8, cfg.vocab_size);
  return lm_head.f32();
}

DeviceBuffer LlamaWeights::quantize_q8_0(const DeviceBuffer& f32, int64_t rows) {
  const int64_t D = cfg.hidden_size;
  const size_t row_bytes = static_cast<size_t>(D / cpu::kQ8_0Block * cpu::kQ8_0BlockBytes);
  DeviceBuffer out(be, row_bytes * static_cast<size_t>(rows));
  const int64_t slab = std::max<int64_t>(1, (int64_t{1} << 22) / D);  // 16 MiB of fp32 rows at a time
  std::vector<float> x;
  std::vector<uint8_t> q;
  for (int64_t r0 = 0; r0 < rows; r0 += slab) {
    const int64_t n = std::min(slab, rows - r0);
    x.resize(static_cast<size_t>(n * D));
    q.resize(row_bytes * static_cast<size_t>(n));
    be.download(x.data(), f32.f32() + r0 * D, sizeof(float) * x.size());
    cpu::q8_0_quantize_rows(x.data(), n, D, q.data());
    be.upload(out.data<uint8_t>() + row_bytes * r0, q.data(), q.size());
    be.synchronize();  // before `q` is reused
  }
  return out;
}

void LlamaWeights::set_head_q8_0() {
  if (head_q8_) return;
  check_arg(!head_half_, std::string("head_format is '") + (half_t_ == Backend::HalfType::BF16 ? "bf16" : "f16") +
                             "' already and cannot change (reload the model)");
  const int64_t V = cfg.vocab_size, D = cfg.hidden_size;
  check_arg(D % 32 == 0, "head_format 'q8_0' needs hidden_size to be a multiple of 32, got " + std::to_string(D));
  be.require_ops({"q8_0_rows", "q8_0_gemm_nt"}, "head_format 'q8_0'");
  // Converted one tensor at a time (the fp32 one is freed before the next is converted).
  // A GGUF's Q8_0 embedding is kept as stored (not requantized from its dequantized copy).
  if (embed_q8.empty() && !embed.empty() && loaded_.count("model.embed_tokens.weight"))
    embed_q8 = quantize_q8_0(embed, V);
  if (!embed_q8.empty()) embed = DeviceBuffer();
  if (!cfg.tie_word_embeddings && !lm_head.empty() && loaded_.count("lm_head.weight"))
    lm_head_q8 = quantize_q8_0(lm_head, V), lm_head = DeviceBuffer();
  rows_loaded_.clear();  // a row-wise load in progress restarts (its rows were fp32)
  for (const char* n : {"model.embed_tokens.weight", "lm_head.weight"})
    if (loaded_.count(n) == 0) (std::string(n) == "lm_head.weight" ? lm_head : embed) = DeviceBuffer();
  head_q8_ = true;
}

std::vector<uint16_t> LlamaWeights::host_half(const void* data, DType dtype, int64_t n, int64_t row0, int64_t cols,
                                              const std::string& name) const {
  const bool bf = half_t_ == Backend::HalfType::BF16;
  const char* fmt = bf ? "bf16" : "f16";
  std::vector<uint16_t> out(static_cast<size_t>(n));
  // A checkpoint tensor already in the head's format is kept bit for bit (no widening and rounding).
  const bool same = dtype == (bf ? DType::BF16 : DType::F16);
  check_arg(same || dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16,
            "tensor '" + name + "' has dtype " + dtype_name(dtype) + ", expected F32, F16 or BF16");
  for (int64_t i = 0; i < n; ++i) {
    float f;
    if (dtype == DType::F32) std::memcpy(&f, static_cast<const float*>(data) + i, 4);
    else f = cpu::half_to_f32(dtype == DType::BF16, static_cast<const uint16_t*>(data)[i]);
    if (!std::isfinite(f))  // the message is built only on failure
      throw ValueError("tensor '" + name + "': weights contain NaN or inf (row " + std::to_string(row0 + i / cols) + ")");
    out[i] = same ? static_cast<const uint16_t*>(data)[i] : cpu::f32_to_half(bf, f);
    if (!std::isfinite(cpu::half_to_f32(bf, out[i])))
      throw ValueError("tensor '" + name + "': weight " + std::to_string(f) + " (row " + std::to_string(row0 + i / cols) +
                       ") is beyond the range of head_format '" + fmt + "'");
  }
  return out;
}

DeviceBuffer LlamaWeights::to_half(const DeviceBuffer& f32, int64_t rows, const std::string& name) {
  const int64_t D = cfg.hidden_size;
  DeviceBuffer out(be, sizeof(uint16_t) * static_cast<size_t>(rows * D));
  const int64_t slab = std::max<int64_t>(1, (int64_t{1} << 22) / D);  // 16 MiB of fp32 rows at a time
  std::vector<float> x;
  for (int64_t r0 = 0; r0 < rows; r0 += slab) {
    const int64_t n = std::min(slab, rows - r0);
    x.resize(static_cast<size_t>(n * D));
    be.download(x.data(), f32.f32() + r0 * D, sizeof(float) * x.size());
    const std::vector<uint16_t> h = host_half(x.data(), DType::F32, n * D, r0, D, name);
    be.upload(out.data<uint16_t>() + r0 * D, h.data(), h.size() * 2);
    be.synchronize();  // before `h` goes
  }
  return out;
}

DeviceBuffer LlamaWeights::widen_rows(int64_t rows,
                                      const std::function<void(const int32_t* ids, float* out)>& gather) {
  const int64_t D = cfg.hidden_size;
  std::vector<int32_t> ids(static_cast<size_t>(rows));  // every row, in order
  for (int64_t i = 0; i < rows; ++i) ids[i] = static_cast<int32_t>(i);
  DeviceBuffer ids_d(be, sizeof(int32_t) * rows);
  be.upload(ids_d.data(), ids.data(), sizeof(int32_t) * rows);
  DeviceBuffer out(be, sizeof(float) * rows * D);  // [rows, D]
  gather(ids_d.data<int32_t>(), out.f32());
  be.synchronize();  // before `ids` goes
  return out;
}

DeviceBuffer LlamaWeights::widen_half(const DeviceBuffer& h, int64_t rows) {
  return widen_rows(rows, [&](const int32_t* ids, float* out) {
    be.half_rows(half_t_, rows, cfg.hidden_size, h.data(), ids, out);
  });
}

DeviceBuffer LlamaWeights::widen_q8_0(const DeviceBuffer& q8, int64_t rows) {
  return widen_rows(rows, [&](const int32_t* ids, float* out) {
    be.q8_0_rows(rows, cfg.hidden_size, q8.data(), ids, out);
  });
}

void LlamaWeights::set_head_half(Backend::HalfType t) {
  const char* fmt = t == Backend::HalfType::BF16 ? "bf16" : "f16";
  if (head_half_ && half_t_ == t) return;
  check_arg(!head_half_, std::string("head_format is '") + (half_t_ == Backend::HalfType::BF16 ? "bf16" : "f16") +
                             "' already and cannot change (reload the model)");
  check_arg(!head_q8_, "head_format is 'q8_0' already and cannot change (reload the model)");
  be.require_ops({"half_rows", "half_gemm_nt"}, std::string("head_format '") + fmt + "'");
  const int64_t V = cfg.vocab_size;
  const Backend::HalfType prev = half_t_;
  half_t_ = t;
  // The fp32 tables are freed only once both converted, so a failure (a weight beyond fp16's
  // range, out of memory) leaves the model as it was. A GGUF's Q8_0 embedding is widened first (its
  // values are exact in fp32), then rounded.
  DeviceBuffer eh, lh;
  try {
    if (loaded_.count("model.embed_tokens.weight")) {
      embed_f32();
      eh = to_half(embed, V, "model.embed_tokens.weight");
    }
    if (!cfg.tie_word_embeddings && loaded_.count("lm_head.weight")) {
      lm_head_f32();
      lh = to_half(lm_head, V, "lm_head.weight");
    }
  } catch (...) {
    half_t_ = prev;
    throw;
  }
  if (!eh.empty()) embed_h = std::move(eh), embed = DeviceBuffer(), embed_q8 = DeviceBuffer();
  if (!lh.empty()) lm_head_h = std::move(lh), lm_head = DeviceBuffer(), lm_head_q8 = DeviceBuffer();
  rows_loaded_.clear();  // a row-wise load in progress restarts (its rows were fp32)
  for (const char* n : {"model.embed_tokens.weight", "lm_head.weight"})
    if (loaded_.count(n) == 0) (std::string(n) == "lm_head.weight" ? lm_head : embed) = DeviceBuffer();
  head_half_ = true;
}

std::vector<std::string> LlamaWeights::missing() const {
  std::vector<std::string> out;
  for (const auto& t : expected_)
    if (!loaded_.count(t.name)) out.push_back(t.name);
  return out;
}

Linear* LlamaWeights::linear(const std::string& prefix) {
  auto it = slots_.find(prefix + ".weight");
  return it != slots_.end() && it->second.kind == Kind::Weight ? it->second.lin : nullptr;
}

}  // namespace qlora::model
