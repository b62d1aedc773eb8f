// qlora_native._core.gguf: the C++ GGUF reader, dequantization and model loader.
// python/qlora_native/gguf_check.py (layout), gguf_source.py (tensors) and model.py
// (Model.from_pretrained on a .gguf) are the Python faces.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.hpp"
#include "fs_path.hpp"
#include "backend.hpp"
#include "common/error.hpp"
#include "gguf/dequant.hpp"
#include "gguf/gguf_model.hpp"
#include "io/gguf_read.hpp"
#include "model/hf_loader.hpp"

#include <cmath>

namespace qlora::py_bind {

namespace {
using gguf::File;
using gguf::VType;

// A scalar or string metadata value as Python (arrays: None; their contents via array()).
py::object value_to_py(const gguf::Value& v) {
  if (v.is_int()) return v.is_signed() ? py::int_(v.i) : py::int_(v.u);
  if (v.is_float()) return py::float_(v.f);
  if (v.type == VType::BOOL) return py::bool_(v.u != 0);
  if (v.type == VType::STRING) return py::str(v.str);
  return py::none();
}

// A Python config dict as JSON, the way the engine's parser reads a config.json: integers beyond
// int64 become doubles (as in a file), non-str keys their str(); other objects their repr() as a
// string, so the field check names them instead of failing here.
json::Value py_to_json(py::handle o, int depth) {
  check_arg(depth <= 512, "config: nesting deeper than 512 (or a circular reference)");
  if (o.is_none()) return json::Value();
  if (py::isinstance<py::bool_>(o)) return json::Value(o.cast<bool>());
  if (py::isinstance<py::int_>(o)) {
    int overflow = 0;
    const long long i = PyLong_AsLongLongAndOverflow(o.ptr(), &overflow);
    if (overflow == 0 && !(i == -1 && PyErr_Occurred())) return json::Value(static_cast<int64_t>(i));
    PyErr_Clear();
    const double d = PyLong_AsDouble(o.ptr());
    if (d == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return json::Value(overflow < 0 ? -HUGE_VAL : HUGE_VAL);
    }
    return json::Value(d);
  }
  if (py::isinstance<py::float_>(o)) return json::Value(o.cast<double>());
  if (py::isinstance<py::str>(o)) return json::Value(o.cast<std::string>());
  if (py::isinstance<py::list>(o) || py::isinstance<py::tuple>(o)) {
    json::Array a;
    for (py::handle x : o) a.push_back(py_to_json(x, depth + 1));
    return json::Value(std::move(a));
  }
  if (py::isinstance<py::dict>(o)) {
    json::Value obj = json::Value::object();
    for (auto item : o.cast<py::dict>()) obj.set(py::str(item.first).cast<std::string>(), py_to_json(item.second, depth + 1));
    return obj;
  }
  return json::Value(py::repr(o).cast<std::string>());
}

const gguf::Value& key_at(const File& f, const std::string& key) {
  const gguf::Value* v = f.find(key);
  if (!v) throw py::key_error(key);
  return *v;
}

// head_format of a loader call (Model.from_pretrained(head_format=...)): applied before any tensor loads.
model::HeadFormat head_format_arg(const std::string& s) {
  if (s == "float32") return model::HeadFormat::F32;
  if (s == "bf16") return model::HeadFormat::BF16;
  if (s == "f16") return model::HeadFormat::F16;
  if (s == "q8_0") return model::HeadFormat::Q8_0;
  throw ValueError("head_format must be one of 'float32', 'bf16', 'f16', 'q8_0', got '" + s + "'");
}
}  // namespace

void bind_gguf(py::module_& m) {
  // qlora_native._core.config: config.json rules, one implementation for Python and the C API.
  py::module_ cm = m.def_submodule("config", "config.json parsing and validation (hf_loader.cpp)");
  cm.def(
      "parse_hf_config",
      [](py::handle d) {
        const model::HfConfig h = model::parse_hf_config(py_to_json(d, 0));
        const model::LlamaConfig& c = h.cfg;
        py::dict out;
        out["arch"] = c.arch;
        out["vocab_size"] = c.vocab_size;
        out["hidden_size"] = c.hidden_size;
        out["intermediate_size"] = c.intermediate_size;
        out["num_hidden_layers"] = c.num_layers;
        out["num_attention_heads"] = c.num_heads;
        out["num_key_value_heads"] = c.num_kv_heads;
        out["head_dim"] = c.head_dim;
        out["rms_norm_eps"] = h.rms_norm_eps;
        out["rope_theta"] = h.rope_theta;
        out["rope_scaling"] = json_to_python(h.rope_scaling);
        out["tie_word_embeddings"] = c.tie_word_embeddings;
        out["max_position_embeddings"] = c.max_position_embeddings;
        out["qkv_bias"] = c.qkv_bias;
        out["o_bias"] = c.o_bias;
        out["sliding_window"] = c.sliding_window ? py::object(py::int_(c.sliding_window)) : py::object(py::none());
        out["prequantized"] = h.prequantized;
        out["core"] = c;
        return out;
      },
      py::arg("config"),
      "Parses and validates a config.json dict with the engine's rules (ValueError / FormatError naming the "
      "field, as the C API loader); returns the normalized fields and the core LlamaConfig.");
  cm.def(
      "load_hf_model",
      [](const FsPath& dir, const std::string& backend, bool nf4, int blocksize, bool double_quant,
         const std::string& head_format) {
        Backend& be = get_backend(backend);
        model::QuantSpec q{nf4, blocksize, double_quant, head_format_arg(head_format)};
        std::unique_ptr<model::LlamaModel> core;
        {
          py::gil_scoped_release nogil;
          core = model::load_hf_model(dir, be, q);
        }
        return core;
      },
      py::arg("dir"), py::arg("backend") = "cpu", py::arg("nf4") = true, py::arg("blocksize") = 64,
      py::arg("double_quant") = true, py::arg("head_format") = "float32",
      "LlamaModel loaded from an HF checkpoint directory (config.json + safetensors, single or sharded, "
      "full precision or pre-quantized bitsandbytes NF4) tensor by tensor, as the C API loads it.");

  py::module_ g = m.def_submodule("gguf", "GGUF reader, dequantization and model loading");
  g.attr("MAX_TENSORS") = gguf::kMaxTensors;
  g.attr("MAX_ARRAY_ELEMENTS") = gguf::kMaxArrayElements;
  g.attr("MAX_DIMS") = gguf::kMaxDims;
  g.attr("MAX_TENSOR_NAME") = gguf::kMaxTensorName;
  g.attr("MAX_ALIGNMENT") = gguf::kMaxAlignment;

  py::class_<File, std::shared_ptr<File>>(g, "GGUFFile", "A memory-mapped, validated GGUF file.")
      .def(py::init([](const FsPath& path) {
             py::gil_scoped_release nogil;
             return File::open(path);
           }),
           py::arg("path"))
      .def_property_readonly("path", [](const File& f) { return fs_text(f.path()); })
      .def_property_readonly("size", &File::size)
      .def_property_readonly("version", &File::version)
      .def_property_readonly("byte_order", [](const File& f) { return f.big_endian() ? ">" : "<"; })
      .def_property_readonly("alignment", &File::alignment)
      .def_property_readonly("data_offset", &File::data_offset)
      .def(
          "kv",
          [](const File& f) {
            // (key, type, value, item_type, count) in file order; value None for arrays.
            py::list out;
            for (const auto& [k, v] : f.kv()) {
              const bool arr = v.type == VType::ARRAY;
              out.append(py::make_tuple(k, static_cast<uint32_t>(v.type), value_to_py(v),
                                        arr ? py::object(py::int_(static_cast<uint32_t>(v.elem))) : py::object(py::none()),
                                        v.count));
            }
            return out;
          },
          "[(key, value type, value (None for arrays), element type (arrays) or None, count)]")
      .def(
          "array",
          [](const File& f, const std::string& key) -> py::object {
            const gguf::Value& v = key_at(f, key);
            check_arg(v.type == VType::ARRAY, f.path() + ": GGUF metadata " + key + " is " + v.type_name() + ", not an array");
            if (v.elem == VType::STRING) {
              py::list out;
              for (std::string_view s : f.strings(v)) out.append(py::str(s.data(), s.size()));
              return std::move(out);
            }
            if (v.elem == VType::F32 || v.elem == VType::F64) return py::cast(f.floats(v));
            if (v.elem == VType::BOOL) {
              py::list out;
              for (uint8_t b : f.bools(v)) out.append(py::bool_(b != 0));
              return std::move(out);
            }
            if (v.elem == VType::U64) return py::cast(f.uints(v));
            return py::cast(f.ints(v));
          },
          py::arg("key"), "Contents of a metadata array as a list.")
      .def(
          "tensors",
          [](const File& f) {
            py::list out;  // (name, dims fastest-first, ggml type, absolute offset, nbytes)
            for (const auto& t : f.tensors()) {
              py::tuple dims(t.dims.size());
              for (size_t i = 0; i < t.dims.size(); ++i) dims[i] = py::int_(t.dims[i]);
              out.append(py::make_tuple(t.name, dims, t.type, t.offset, t.nbytes));
            }
            return out;
          })
      .def("hf_config", [](const File& f) { return json_to_python(gguf::hf_config(f)); },
           "The HF config.json-style dict the model is built from (every field checked).")
      .def("hf_name", [](const File& f, const std::string& n) { return gguf::hf_name(f, n); }, py::arg("gguf_name"))
      .def(
          "hf_tensor",
          [](const File& f, const std::string& name, const model::LlamaConfig& cfg) {
            const gguf::TensorInfo* t = f.tensor(name);
            check_arg(t != nullptr, f.path() + ": no tensor " + name);
            std::vector<float> out, scratch;
            {
              py::gil_scoped_release nogil;
              gguf::tensor_f32(*t, cfg, out, scratch);
            }
            const std::vector<int64_t> shape = t->shape();
            py::array_t<float> a(std::vector<py::ssize_t>(shape.begin(), shape.end()));
            std::copy(out.begin(), out.end(), a.mutable_data());
            return a;
          },
          py::arg("name"), py::arg("config"),
          "A tensor as float32 in HF layout (dequantized; Q/K un-permuted for llama-arch files).");

  g.def("dequantize",
        [](uint32_t type, const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& raw, int64_t n) {
          int64_t block = 0, size = 0;
          check_arg(gguf::gtype_traits(type, &block, &size), "dequantize: unknown GGML type " + std::to_string(type));
          check_arg(n >= 0 && n % block == 0, "dequantize: n must be a multiple of the block size " + std::to_string(block));
          check_arg(raw.size() == n / block * size, "dequantize: " + std::to_string(n) + " values of " +
                                                        gguf::gtype_name(type) + " need " +
                                                        std::to_string(n / block * size) + " bytes, got " +
                                                        std::to_string(raw.size()));
          py::array_t<float> out(n);
          float* o = out.mutable_data();
          const uint8_t* p = raw.data();
          {
            py::gil_scoped_release nogil;
            gguf::dequantize(type, p, o, n);
          }
          return out;
        },
        py::arg("type"), py::arg("data"), py::arg("n"), "float32[n] decoded from GGML blocks of `type`.");
  g.def("dequant_supported", &gguf::dequant_supported, py::arg("type"));
  g.def("type_name", &gguf::gtype_name, py::arg("type"));
  g.def("type_traits", [](uint32_t type) -> py::object {
    int64_t block = 0, size = 0;
    if (!gguf::gtype_traits(type, &block, &size)) return py::none();
    return py::make_tuple(block, size);
  }, py::arg("type"), "(block size, bytes per block) or None for an unknown type.");
  g.def("unpermute_rows",
        [](const py::array_t<float, py::array::c_style | py::array::forcecast>& w, int64_t n_head, const std::string& name) {
          check_arg(w.ndim() >= 1, "unpermute_rows: need at least 1 dimension");
          const int64_t rows = w.shape(0), cols = rows ? w.size() / rows : 0;
          py::array_t<float> out(std::vector<py::ssize_t>(w.shape(), w.shape() + w.ndim()));
          gguf::unpermute_rows(w.data(), out.mutable_data(), rows, cols, n_head, name);
          return out;
        },
        py::arg("w"), py::arg("n_head"), py::arg("name") = "", "Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half).");
  g.def("layer_names", &gguf::layer_names);
  g.def("global_names", &gguf::global_names);
  g.def(
      "load_model",
      [](std::shared_ptr<File> f, const std::string& backend, bool nf4, int blocksize, bool double_quant,
         const std::string& head_format) {
        Backend& be = get_backend(backend);
        model::QuantSpec q{nf4, blocksize, double_quant, head_format_arg(head_format)};
        json::Value hf;
        std::unique_ptr<model::LlamaModel> core;
        {
          py::gil_scoped_release nogil;
          core = gguf::load_model(*f, be, q, nullptr, &hf);
        }
        return py::make_tuple(py::cast(std::move(core)), json_to_python(hf));
      },
      py::arg("file"), py::arg("backend") = "cpu", py::arg("nf4") = true, py::arg("blocksize") = 64,
      py::arg("double_quant") = true, py::arg("head_format") = "float32",
      "(LlamaModel, HF-style config dict) loaded tensor by tensor from an open GGUFFile.");
}

}  // namespace qlora::py_bind
