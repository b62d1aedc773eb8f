// qlora_native._core.model: the Llama-family model (config, weight loading, forward, KV-cache
// generation steps) and the sampler. python/qlora_native/model.py is the user-facing wrapper.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "bind_lora.hpp"
#include "bindings.hpp"
#include "common/checked.hpp"
#include "common/error.hpp"
#include "model/llama.hpp"
#include "model/sampler.hpp"
#include "nf4_ref_from_py.hpp"

namespace qlora::py_bind {

namespace {
using model::LlamaConfig;
using model::LlamaModel;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

std::pair<int64_t, int64_t> batch_shape(const py::array& a, const char* what) {
  check_arg(a.ndim() == 2, std::string(what) + " must be 2-D [batch, seq], got " + std::to_string(a.ndim()) + "-D");
  check_arg(a.shape(0) >= 1 && a.shape(1) >= 1, std::string(what) + " must not be empty");
  return {a.shape(0), a.shape(1)};
}

// Checks the optional mask against ids and returns its data (null = all ones).
const int32_t* mask_ptr(const std::optional<I32Array>& mask, int64_t B, int64_t T) {
  if (!mask) return nullptr;
  auto [mb, mt] = batch_shape(*mask, "attention_mask");
  check_arg(mb == B && mt == T, "attention_mask shape must equal input_ids shape");
  const int32_t* m = mask->data();
  for (int64_t i = 0; i < B * T; ++i) check_arg(m[i] == 0 || m[i] == 1, "attention_mask must hold only 0 and 1");
  return m;
}

// The adapter of one request: None = the model's active adapter, "__base__" = none (PEFT's
// convention), else the named adapter (ValueError naming the loaded ones when unknown).
model::AdapterUse request_adapter(LlamaModel& self, const std::optional<std::string>& name) {
  if (!name) return self.active_use();
  if (*name == "__base__") return {};
  const std::vector<std::string> names = self.adapter_names();
  if (std::find(names.begin(), names.end(), *name) == names.end()) {
    std::string have;
    for (const auto& n : names) have += (have.empty() ? "'" : ", '") + n + "'";
    throw ValueError("adapter_name: no adapter named '" + *name + "' (loaded: " + (have.empty() ? "none" : have) +
                     "; '__base__' = no adapter)");
  }
  return self.use(*name);  // adapter + scale now; may still raise if it was deleted meanwhile
}

// The adapters of one request: adapter_names (one per row, checked by the Python layer; resolved
// under one lock) or else the single `adapter`.
model::AdapterSet request_set(LlamaModel& self, const std::optional<std::string>& adapter,
                              const std::optional<std::vector<std::string>>& names, int64_t B) {
  if (!names) return {request_adapter(self, adapter)};
  check_arg(!adapter, "give adapter_name or adapter_names, not both");
  check_arg(static_cast<int64_t>(names->size()) == B, "adapter_names has " + std::to_string(names->size()) +
                                                          " names for a batch of " + std::to_string(B) +
                                                          " rows (one per row)");
  return self.uses(*names);
}

// A Python handle on a GenerationContext; close() (or garbage collection) frees its cache. The
// Python object keeps its model alive (keep_alive in new_context).
struct PyContext {
  std::unique_ptr<model::GenerationContext> ctx;
  int64_t vocab = 0;
  model::GenerationContext& get() {
    check_arg(ctx != nullptr, "context is closed");
    return *ctx;
  }
};

template <class T>
py::array_t<T> download_array(Backend& be, const void* src, std::vector<py::ssize_t> shape, size_t bytes) {
  py::array_t<T> out(shape);
  be.download(out.mutable_data(), src, bytes);
  return out;
}
}  // namespace

void bind_model(py::module_& m) {
  py::module_ mm = m.def_submodule("model", "Llama-family model engine");

  py::enum_<model::RopeType>(mm, "RopeType")
      .value("default", model::RopeType::Default)
      .value("linear", model::RopeType::Linear)
      .value("llama3", model::RopeType::Llama3);

  py::class_<LlamaConfig>(mm, "LlamaConfig")
      .def(py::init<>())
      .def_readwrite("arch", &LlamaConfig::arch)
      .def_readwrite("vocab_size", &LlamaConfig::vocab_size)
      .def_readwrite("hidden_size", &LlamaConfig::hidden_size)
      .def_readwrite("intermediate_size", &LlamaConfig::intermediate_size)
      .def_readwrite("num_layers", &LlamaConfig::num_layers)
      .def_readwrite("num_heads", &LlamaConfig::num_heads)
      .def_readwrite("num_kv_heads", &LlamaConfig::num_kv_heads)
      .def_readwrite("head_dim", &LlamaConfig::head_dim)
      .def_readwrite("rms_norm_eps", &LlamaConfig::rms_norm_eps)
      .def_readwrite("rope_theta", &LlamaConfig::rope_theta)
      .def_readwrite("rope_type", &LlamaConfig::rope_type)
      .def_readwrite("rope_factor", &LlamaConfig::rope_factor)
      .def_readwrite("rope_low_freq_factor", &LlamaConfig::rope_low_freq_factor)
      .def_readwrite("rope_high_freq_factor", &LlamaConfig::rope_high_freq_factor)
      .def_readwrite("rope_original_max_pos", &LlamaConfig::rope_original_max_pos)
      .def_readwrite("tie_word_embeddings", &LlamaConfig::tie_word_embeddings)
      .def_readwrite("max_position_embeddings", &LlamaConfig::max_position_embeddings)
      .def_readwrite("qkv_bias", &LlamaConfig::qkv_bias)
      .def_readwrite("o_bias", &LlamaConfig::o_bias)
      .def_readwrite("sliding_window", &LlamaConfig::sliding_window)
      .def("validate", &LlamaConfig::validate)
      .def("rope_inv_freq", [](const LlamaConfig& c) { return model::rope_inv_freq(c); });

  py::class_<PyContext>(mm, "GenerationContext",
                        "One generation request (KV cache + the adapter it started with); feed from one thread "
                        "at a time, different contexts of one model from several threads at once.")
      .def(
          "feed",
          [](PyContext& self, const I32Array& ids, const std::optional<I32Array>& mask) {
            model::GenerationContext& c = self.get();
            auto [B, T] = batch_shape(ids, "input_ids");
            check_arg(B == c.batch(), "feed: batch differs from the context's");
            const int32_t* mp = mask_ptr(mask, B, T);
            py::array_t<float> out({B, self.vocab});
            float* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              c.feed(ids.data(), mp, T, o);
            }
            return out;
          },
          py::arg("input_ids"), py::arg("attention_mask") = py::none())
      .def(
          "feed_sample",
          [](PyContext& self, const I32Array& ids, const std::optional<I32Array>& mask, model::Sampler& sampler,
             const I32Array& rows, const py::list& histories, float temperature, int64_t top_k, float top_p,
             float repetition_penalty) {
            model::GenerationContext& c = self.get();
            auto [B, T] = batch_shape(ids, "input_ids");
            check_arg(B == c.batch(), "feed_sample: batch differs from the context's");
            const int32_t* mp = mask_ptr(mask, B, T);
            check_arg(rows.ndim() == 1, "feed_sample: rows must be a 1-D array of row indices");
            const int64_t n = rows.size();
            check_arg(static_cast<int64_t>(histories.size()) == n, "feed_sample: one history per row");
            for (int64_t i = 0; i < n; ++i)
              check_arg(rows.data()[i] >= 0 && rows.data()[i] < B, "feed_sample: row index out of range");
            std::vector<I32Array> hist;  // keeps the converted arrays alive
            std::vector<const int32_t*> hp(n);
            std::vector<int64_t> hn(n);
            for (int64_t i = 0; i < n; ++i) hist.push_back(py::cast<I32Array>(histories[i]));
            for (int64_t i = 0; i < n; ++i) {
              hp[i] = hist[i].data();
              hn[i] = hist[i].size();
            }
            model::SamplingParams p{temperature, top_k, top_p, repetition_penalty};
            p.validate();
            py::array_t<int32_t> out(n);
            int32_t* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              c.feed_sample(ids.data(), mp, T, sampler, p, rows.data(), n, hp.data(), hn.data(), o);
            }
            return out;
          },
          py::arg("input_ids"), py::arg("attention_mask"), py::arg("sampler"), py::arg("rows"), py::arg("histories"),
          py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
          py::arg("repetition_penalty") = 1.0f,
          "Feeds like feed() and returns the next token of each listed row (int32 [len(rows)]), chosen on the "
          "backend (sample_rows: only token ids leave a GPU); the same tokens as feed() + Sampler.sample_rows.")
      .def("close", [](PyContext& self) { self.ctx.reset(); }, "Frees the KV cache now (idempotent).")
      .def_property_readonly("closed", [](PyContext& self) { return self.ctx == nullptr; })
      .def_property_readonly("batch", [](PyContext& self) { return self.get().batch(); })
      .def_property_readonly("used", [](PyContext& self) { return self.get().cache().used(); })
      .def_property_readonly("capacity", [](PyContext& self) { return self.get().cache().capacity(); });

  py::class_<LlamaModel> llama_cls(mm, "LlamaModel");
  bind_lora_methods(llama_cls);
  llama_cls
      .def(py::init([](const LlamaConfig& cfg, const std::string& backend, bool nf4, int blocksize, bool dq) {
             model::QuantSpec q{nf4, blocksize, dq};
             if (nf4) nf4::sizes(1, blocksize, dq);  // validates blocksize early
             return std::make_unique<LlamaModel>(get_backend(backend), cfg, q);
           }),
           py::arg("config"), py::arg("backend") = "cpu", py::arg("nf4") = false, py::arg("blocksize") = 64,
           py::arg("double_quant") = true)
      .def_property_readonly("backend", [](LlamaModel& self) { return self.backend().name(); })
      .def("expected_tensors",
           [](LlamaModel& self) {
             std::vector<std::pair<std::string, std::vector<int64_t>>> out;
             for (const auto& t : self.weights().expected()) out.emplace_back(t.name, t.shape);
             return out;
           })
      .def("ignorable", [](LlamaModel& self, const std::string& n) { return self.weights().ignorable(n); })
      .def("missing", [](LlamaModel& self) { return self.weights().missing(); })
      .def("check_complete", &LlamaModel::check_complete)
      .def(
          "load_tensor",
          [](LlamaModel& self, const std::string& name, const py::array& raw, const std::string& dtype,
             std::vector<int64_t> shape) {
            // raw: the tensor's bytes (any C-contiguous array, e.g. a uint8 view of an mmap).
            check_arg(raw.flags() & py::array::c_style, "tensor '" + name + "': data must be C-contiguous");
            const DType dt = dtype_from_name(dtype);
            int64_t n = static_cast<int64_t>(dtype_size(dt));
            for (int64_t d : shape) n = checked_mul({n, d}, "tensor '" + name + "' shape");
            const int64_t have = static_cast<int64_t>(raw.nbytes());
            const void* ptr = raw.data();
            check_arg(have == n,
                      "tensor '" + name + "': " + std::to_string(have) + " bytes do not match shape and dtype " +
                          dtype);
            py::gil_scoped_release nogil;
            self.weights().load(name, ptr, dt, shape);
          },
          py::arg("name"), py::arg("data"), py::arg("dtype"), py::arg("shape"))
      .def(
          "load_tensor_rows",
          [](LlamaModel& self, const std::string& name, int64_t row0,
             const py::array_t<float, py::array::c_style>& rows) {
            check_arg(rows.ndim() == 2, "load_tensor_rows: rows must be 2-D float32 [n, cols]");
            py::gil_scoped_release nogil;
            self.weights().load_rows(name, row0, rows.shape(0), rows.shape(1), rows.data());
          },
          py::arg("name"), py::arg("row0"), py::arg("rows"))
      .def(
          "load_embed_q8_0",
          [](LlamaModel& self, const py::array_t<uint8_t, py::array::c_style>& raw) {
            // A GGUF's Q8_0 token_embd as stored ([V, D/32 * 34] bytes), kept 8-bit.
            py::gil_scoped_release nogil;
            self.weights().load_embed_q8_0(raw.data(), static_cast<size_t>(raw.size()));
          },
          py::arg("raw"))
      .def("embed_is_q8_0", [](LlamaModel& self) { return self.weights().embed_is_q8_0(); })
      .def("tied_q8_0_unwidened", [](LlamaModel& self) { return self.weights().tied_q8_0_unwidened(); })
      .def(
          "set_head_q8_0",
          [](LlamaModel& self) {
            py::gil_scoped_release nogil;
            self.set_head_q8_0();
          },
          "Keep the embedding and lm_head as Q8_0 on the device (head_format 'q8_0'); loads after it "
          "quantize on arrival.")
      .def_property_readonly("head_q8_0", [](LlamaModel& self) { return self.weights().head_q8_0(); })
      .def(
          "set_head_half",
          [](LlamaModel& self, bool bf16) {
            py::gil_scoped_release nogil;
            self.set_head_half(bf16 ? Backend::HalfType::BF16 : Backend::HalfType::F16);
          },
          py::arg("bf16"),
          "Keep the embedding and lm_head as 16-bit rows on the device (head_format 'bf16' when bf16, else "
          "'f16'); loads after it are rounded on arrival.")
      .def_property_readonly("head_half",
                             [](LlamaModel& self) -> py::object {
                               const model::LlamaWeights& w = self.weights();
                               if (!w.head_half()) return py::none();
                               return py::str(w.half_type() == Backend::HalfType::BF16 ? "bf16" : "f16");
                             })
      .def(
          "load_nf4",
          [](LlamaModel& self, const std::string& name, py::handle obj) {
            PyNf4 w = nf4_from_py(obj);
            self.weights().load_nf4(name, w.ref);
          },
          py::arg("name"), py::arg("nf4"))
      .def(
          "forward",
          [](LlamaModel& self, const I32Array& ids, const std::optional<I32Array>& mask,
             const std::optional<std::string>& adapter, const std::optional<std::vector<std::string>>& names) {
            auto [B, T] = batch_shape(ids, "input_ids");
            const int32_t* mp = mask_ptr(mask, B, T);
            const int64_t V = self.config().vocab_size;
            const model::AdapterSet ad = request_set(self, adapter, names, B);  // held to the end of the pass
            py::array_t<float> out({B, T, V});
            float* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              self.forward(ad, ids.data(), mp, B, T, o);
            }
            return out;
          },
          py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("adapter") = py::none(),
          py::arg("adapter_names") = py::none())
      .def(
          "new_context",
          [](LlamaModel& self, int64_t batch, int64_t capacity, const std::optional<std::string>& adapter,
             const std::optional<std::vector<std::string>>& names) {
            model::AdapterSet ad = request_set(self, adapter, names, batch);
            PyContext c;
            c.vocab = self.config().vocab_size;
            {
              py::gil_scoped_release nogil;  // allocating a large cache can take a while
              c.ctx = self.new_context(batch, capacity, std::move(ad));
            }
            return c;
          },
          py::keep_alive<0, 1>(), py::arg("batch"), py::arg("capacity"), py::arg("adapter") = py::none(),
          py::arg("adapter_names") = py::none())
      .def_property_readonly("open_contexts", &LlamaModel::open_contexts)
      .def("start", &LlamaModel::start, py::arg("batch"), py::arg("capacity"))
      .def(
          "feed",
          [](LlamaModel& self, const I32Array& ids, const std::optional<I32Array>& mask) {
            check_arg(self.cache() != nullptr, "feed: no generation started (call start first)");
            auto [B, T] = batch_shape(ids, "input_ids");
            check_arg(B == self.cache()->batch(), "feed: batch differs from the started generation");
            const int32_t* mp = mask_ptr(mask, B, T);
            py::array_t<float> out({B, self.config().vocab_size});
            float* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              self.feed(ids.data(), mp, T, o);
            }
            return out;
          },
          py::arg("input_ids"), py::arg("attention_mask") = py::none())
      .def("stop", &LlamaModel::stop)
      .def_property_readonly("cache_used", [](LlamaModel& self) { return self.cache() ? self.cache()->used() : 0; })
      .def("memory_footprint", &LlamaModel::memory_footprint)
      // compute_dtype="bfloat16" of the training passes (requested; bf16_compute_active: in use,
      // false when the backend has no bf16 units and fp32 runs instead).
      .def_property("compute_bf16", &LlamaModel::compute_bf16_requested, &LlamaModel::set_compute_bf16)
      .def_property_readonly("bf16_compute_active", &LlamaModel::compute_bf16)
      // adapter_dtype of inference passes: "auto", "float32", "bfloat16" (LlamaModel::AdapterDtype);
      // adapter_bf16_active: whether a pass starting now would use the bf16 copies.
      .def_property(
          "adapter_dtype",
          [](const LlamaModel& self) {
            const LlamaModel::AdapterDtype d = self.adapter_dtype();
            return std::string(d == LlamaModel::AdapterDtype::F32 ? "float32"
                               : d == LlamaModel::AdapterDtype::BF16 ? "bfloat16" : "auto");
          },
          [](LlamaModel& self, const std::string& v) {
            if (v == "auto") self.set_adapter_dtype(LlamaModel::AdapterDtype::Auto);
            else if (v == "float32") self.set_adapter_dtype(LlamaModel::AdapterDtype::F32);
            else if (v == "bfloat16") self.set_adapter_dtype(LlamaModel::AdapterDtype::BF16);
            else throw ValueError("adapter_dtype must be 'auto', 'float32' or 'bfloat16', got '" + v + "'");
          })
      .def_property_readonly("adapter_bf16_active",
                             [](const LlamaModel& self) { return self.adapter_bf16(self.compute_bf16()); })
      .def(
          "linear_nf4",
          [](LlamaModel& self, const std::string& prefix) -> py::object {
            model::Linear* lin = self.weights().linear(prefix);
            check_arg(lin != nullptr, "no projection named '" + prefix + "'");
            if (!lin->is_nf4) return py::none();
            Backend& be = self.backend();
            const Nf4Ref& r = lin->nf4;
            py::dict d;
            d["packed"] = download_array<uint8_t>(be, r.packed, {(py::ssize_t)lin->packed.bytes()}, lin->packed.bytes());
            if (r.double_quant) {
              d["absmax"] = download_array<uint8_t>(be, r.absmax, {(py::ssize_t)r.n_blocks()}, r.n_blocks());
              const size_t nn = lin->nested_absmax.bytes() / sizeof(float);
              d["nested_absmax"] = download_array<float>(be, r.nested_absmax, {(py::ssize_t)nn}, nn * sizeof(float));
              d["nested_map"] = download_array<float>(be, r.nested_map, {256}, 256 * sizeof(float));
            } else {
              d["absmax"] = download_array<float>(be, r.absmax, {(py::ssize_t)r.n_blocks()}, r.n_blocks() * 4);
              d["nested_absmax"] = py::none();
              d["nested_map"] = py::none();
            }
            d["offset"] = r.offset;
            d["shape"] = py::make_tuple(r.rows, r.cols);
            d["blocksize"] = r.blocksize;
            d["double_quant"] = r.double_quant;
            return std::move(d);
          },
          py::arg("prefix"), "NF4 storage of a projection as host arrays (None when it is fp32).")
      .def(
          "get_tensor",
          [](LlamaModel& self, const std::string& name) -> py::array_t<float> {
            // A full-precision tensor by HF name (host float32 copy), for export (save_pretrained).
            model::LlamaWeights& w = self.weights();
            const model::DeviceBuffer* buf = nullptr;
            if (name == "model.embed_tokens.weight") {
              w.embed_f32();  // a Q8_0 embedding is dequantized (and kept) for export
              buf = &w.embed;
            }
            else if (name == "model.norm.weight") buf = &w.norm;
            else if (name == "lm_head.weight" && !w.cfg.tie_word_embeddings) {
              w.lm_head_f32();  // a Q8_0 / 16-bit lm_head (head_format) is widened (and kept) for export
              buf = &w.lm_head;
            }
            else if (name.rfind("model.layers.", 0) == 0) {
              const size_t dot = name.find('.', 13);
              const int64_t layer = std::stoll(name.substr(13, dot - 13));
              check_arg(layer >= 0 && layer < (int64_t)w.layers.size(), "no tensor named '" + name + "'");
              const std::string rest = name.substr(dot + 1);
              model::LayerWeights& L = w.layers[layer];
              if (rest == "input_layernorm.weight") buf = &L.input_norm;
              else if (rest == "post_attention_layernorm.weight") buf = &L.post_norm;
              else {
                const bool is_bias = rest.size() > 5 && rest.compare(rest.size() - 5, 5, ".bias") == 0;
                const std::string prefix = name.substr(0, name.rfind('.'));
                model::Linear* lin = w.linear(prefix);
                check_arg(lin != nullptr, "no tensor named '" + name + "'");
                check_arg(is_bias || !lin->is_nf4, "'" + name + "' is stored NF4: use linear_nf4");
                buf = is_bias ? &lin->bias : &lin->weight;
              }
            }
            check_arg(buf != nullptr && !buf->empty(), "no tensor named '" + name + "'");
            const size_t n = buf->bytes() / sizeof(float);
            return download_array<float>(self.backend(), buf->data(), {(py::ssize_t)n}, buf->bytes());
          },
          py::arg("name"), "A full-precision tensor by HF name as a flat host float32 array.");

  py::class_<model::Sampler>(mm, "Sampler")
      .def(py::init<uint64_t>(), py::arg("seed") = 0)
      .def(
          "sample",
          [](model::Sampler& self, py::array_t<float, py::array::c_style | py::array::forcecast> logits,
             const I32Array& history, float temperature, int64_t top_k, float top_p, float repetition_penalty) {
            check_arg(logits.ndim() == 1, "sample: logits must be 1-D [vocab]");
            model::SamplingParams p{temperature, top_k, top_p, repetition_penalty};
            p.validate();
            std::vector<float> l(logits.data(), logits.data() + logits.size());  // the caller's array stays intact
            return self.sample(l.data(), static_cast<int64_t>(l.size()), history.data(), history.size(), p);
          },
          py::arg("logits"), py::arg("history"), py::arg("temperature") = 0.0f, py::arg("top_k") = 0,
          py::arg("top_p") = 1.0f, py::arg("repetition_penalty") = 1.0f)
      .def(
          "sample_rows",
          [](model::Sampler& self, py::array_t<float, py::array::c_style | py::array::forcecast> logits,
             const I32Array& rows, const py::list& histories, float temperature, int64_t top_k, float top_p,
             float repetition_penalty) {
            check_arg(logits.ndim() == 2, "sample_rows: logits must be 2-D [batch, vocab]");
            const int64_t B = logits.shape(0), V = logits.shape(1), n = rows.size();
            check_arg(static_cast<int64_t>(histories.size()) == n, "sample_rows: one history per row");
            std::vector<I32Array> hist;  // keeps the converted arrays alive
            std::vector<const int32_t*> hp(n);
            std::vector<int64_t> hn(n);
            for (int64_t i = 0; i < n; ++i) {
              check_arg(rows.data()[i] >= 0 && rows.data()[i] < B, "sample_rows: row index out of range");
              hist.push_back(py::cast<I32Array>(histories[i]));
            }
            for (int64_t i = 0; i < n; ++i) {
              hp[i] = hist[i].data();
              hn[i] = hist[i].size();
            }
            model::SamplingParams p{temperature, top_k, top_p, repetition_penalty};
            py::array_t<int32_t> out(n);
            int32_t* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              self.sample_rows(logits.data(), V, V, rows.data(), n, hp.data(), hn.data(), p, o);
            }
            return out;
          },
          py::arg("logits"), py::arg("rows"), py::arg("histories"), py::arg("temperature") = 0.0f,
          py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("repetition_penalty") = 1.0f,
          "One token per listed row of logits [B, V] (rows: int32 indices, histories: one int32 array "
          "each); same tokens as calling sample() row after row.");
}

}  // namespace qlora::py_bind
