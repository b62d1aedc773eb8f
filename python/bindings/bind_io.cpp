// qlora_native._core.io: safetensors (zero-copy mmap views, atomic writes) and the JSON codec.
// python/qlora_native/io.py is the public face (dtype mapping, bfloat16 views, argument checks).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstring>

#include "api/peft_adapter.hpp"
#include "bindings.hpp"
#include "fs_path.hpp"
#include "common/error.hpp"
#include "io/adapter_write.hpp"
#include "io/atomic_dir.hpp"
#include "io/mapped_file.hpp"
#include "io/safetensors.hpp"
#include "json/json.hpp"
#include "model/checkpoint_source.hpp"
#include "model/lora_check.hpp"
#include "model/peft_config.hpp"

namespace qlora::py_bind {

// A parsed JSON value as Python (dict / list / str / int / float / bool / None); declared in bindings.hpp.
py::object json_to_python(const json::Value& v) {
  switch (v.type()) {
    case json::Type::Null: return py::none();
    case json::Type::Bool: return py::bool_(v.as_bool());
    case json::Type::Int: return py::int_(v.as_int());
    case json::Type::Double: return py::float_(v.as_double());
    case json::Type::String: return py::str(v.as_string());
    case json::Type::Array: {
      py::list out;
      for (const auto& x : v.as_array()) out.append(json_to_python(x));
      return std::move(out);
    }
    case json::Type::Object: {
      py::dict out;
      for (const auto& [k, x] : v.as_object()) out[py::str(k)] = json_to_python(x);
      return std::move(out);
    }
  }
  return py::none();
}

namespace {

using io::SafetensorsFile;

// numpy dtype of a stored tensor; BF16 comes back as its raw uint16 bits (io.py views it).
py::dtype numpy_dtype(DType t) {
  switch (t) {
    case DType::F32: return py::dtype("float32");
    case DType::F16: return py::dtype("float16");
    case DType::BF16: return py::dtype("uint16");
    case DType::U8: return py::dtype("uint8");
    case DType::I8: return py::dtype("int8");
    case DType::I32: return py::dtype("int32");
    case DType::I64: return py::dtype("int64");
    case DType::BOOL: return py::dtype("bool");
    case DType::F64: return py::dtype("float64");
    case DType::I16: return py::dtype("int16");
    case DType::U16: return py::dtype("uint16");
    case DType::U32: return py::dtype("uint32");
    case DType::U64: return py::dtype("uint64");
  }
  throw std::logic_error("unhandled dtype");
}

// A read-only array over the mapping; `owner` (the Python SafetensorsFile) is its base, so the
// mapping outlives every array taken from it.
py::array tensor_view(const io::TensorInfo& t, py::handle owner) {
  std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
  py::array a(numpy_dtype(t.dtype), shape, t.data, owner);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

// ---------------------------------------------------------------- JSON <-> Python

// str -> UTF-8; a str holding lone surrogates raises UnicodeEncodeError (a ValueError).
std::string utf8(py::handle s) {
  Py_ssize_t n = 0;
  const char* p = PyUnicode_AsUTF8AndSize(s.ptr(), &n);
  if (!p) throw py::error_already_set();
  return std::string(p, static_cast<size_t>(n));
}

std::string text_arg(py::handle text) {
  if (py::isinstance<py::bytes>(text)) return text.cast<std::string>();
  if (py::isinstance<py::str>(text)) return utf8(text);
  throw ValueError("json_loads: expected str or bytes");
}

constexpr size_t kMaxDepth = 512;


json::Value from_python(py::handle o, size_t depth) {
  check_arg(depth <= kMaxDepth, "json_dumps: nesting deeper than 512 (or a circular reference)");
  if (o.is_none()) return json::Value();
  if (py::isinstance<py::bool_>(o)) return json::Value(o.cast<bool>());
  if (py::isinstance<py::int_>(o)) {
    int overflow = 0;
    const long long i = PyLong_AsLongLongAndOverflow(o.ptr(), &overflow);
    check_arg(overflow == 0, "json_dumps: integer outside the int64 range");
    if (i == -1 && PyErr_Occurred()) throw py::error_already_set();
    return json::Value(static_cast<int64_t>(i));
  }
  if (py::isinstance<py::float_>(o)) return json::Value(o.cast<double>());
  if (py::isinstance<py::str>(o)) return json::Value(utf8(o));
  if (py::isinstance<py::list>(o) || py::isinstance<py::tuple>(o)) {
    json::Array a;
    for (py::handle x : o) a.push_back(from_python(x, depth + 1));
    return json::Value(std::move(a));
  }
  if (py::isinstance<py::dict>(o)) {
    json::Object obj;
    for (auto item : o.cast<py::dict>()) {
      check_arg(py::isinstance<py::str>(item.first), "json_dumps: object keys must be str, got " +
                                                         std::string(py::str(py::type::handle_of(item.first).attr("__name__"))));
      obj.set(utf8(item.first), from_python(item.second, depth + 1));
    }
    return json::Value(std::move(obj));
  }
  throw ValueError("json_dumps: cannot encode an object of type " +
                   std::string(py::str(py::type::handle_of(o).attr("__name__"))));
}

// [(name, dtype name, shape, uint8 C-contiguous array)] -> TensorToWrite; `keep` owns the buffers.
std::vector<io::TensorToWrite> tensors_from_py(py::list tensors, const std::string& api, std::vector<py::array>& keep) {
  std::vector<io::TensorToWrite> ts;
  for (py::handle item : tensors) {
    auto tup = item.cast<py::tuple>();
    check_arg(tup.size() == 4, api + ": expected (name, dtype, shape, uint8 array) tuples");
    io::TensorToWrite t;
    t.name = tup[0].cast<std::string>();
    try {
      t.dtype = dtype_from_name(tup[1].cast<std::string>());
    } catch (const FormatError& e) {
      throw ValueError(std::string(api + ": ") + e.what());
    }
    t.shape = tup[2].cast<std::vector<int64_t>>();
    py::array a = tup[3].cast<py::array>();
    check_arg(a.dtype().is(py::dtype::of<uint8_t>()) && (a.flags() & py::array::c_style),
              api + ": data must be a C-contiguous uint8 array");
    t.data = a.data();
    t.nbytes = static_cast<size_t>(a.nbytes());
    keep.push_back(std::move(a));
    ts.push_back(std::move(t));
  }
  return ts;
}

}  // namespace

void bind_io(py::module_& m) {
  py::module_ io = m.def_submodule("io", "safetensors and JSON I/O");

  // OS errors -> OSError(errno, strerror, path): FileNotFoundError, PermissionError, ...
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const io::FileError& e) {
      py::object exc = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.err, e.reason, fs_text(e.path));
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    }
  });

  py::class_<SafetensorsFile, std::shared_ptr<SafetensorsFile>>(io, "SafetensorsFile",
                                                                "A memory-mapped, validated safetensors file.")
      .def(py::init([](const FsPath& path) {
             py::gil_scoped_release nogil;
             return SafetensorsFile::open(path);
           }),
           py::arg("path"))
      .def("names", &SafetensorsFile::names, "Tensor names in data-offset (file) order.")
      .def("metadata",
           [](const SafetensorsFile& f) {
             py::dict d;
             for (const auto& [k, v] : f.metadata()) d[py::str(k)] = py::str(v);
             return d;
           })
      .def("__contains__", [](const SafetensorsFile& f, const std::string& n) { return f.find(n) != nullptr; })
      .def("__len__", [](const SafetensorsFile& f) { return f.tensors().size(); })
      .def("dtype_name", [](const SafetensorsFile& f, const std::string& n) { return std::string(dtype_name(f.at(n).dtype)); })
      .def("shape",
           [](const SafetensorsFile& f, const std::string& n) {
             py::tuple t(f.at(n).shape.size());
             for (size_t i = 0; i < f.at(n).shape.size(); ++i) t[i] = py::int_(f.at(n).shape[i]);
             return t;
           })
      .def("nbytes", [](const SafetensorsFile& f, const std::string& n) { return f.at(n).nbytes; })
      .def("get", [](py::object self, const std::string& n) { return tensor_view(self.cast<const SafetensorsFile&>().at(n), self); },
           py::arg("name"), "Read-only array viewing the mapping (BF16 as raw uint16 bits).")
      .def_property_readonly("header_size", &SafetensorsFile::header_size)
      .def_property_readonly("path", [](const SafetensorsFile& f) { return fs_text(f.path()); });

  io.def(
      "open_checkpoint",
      [](const FsPath& dir) {
        model::CheckpointSource src;
        try {
          py::gil_scoped_release nogil;
          src = model::open_checkpoint(dir);
        } catch (const io::FileError& e) {
          if (e.err != ENOENT || e.path != dir.bytes) throw;
          // OSError's (errno, strerror, filename), saying what is missing in the directory.
          py::object exc = py::reinterpret_borrow<py::object>(PyExc_FileNotFoundError)(
              e.err, "no model.safetensors or model.safetensors.index.json in", fs_text(e.path));
          PyErr_SetObject(PyExc_FileNotFoundError, exc.ptr());
          throw py::error_already_set();
        }
        py::list files;  // [(shard name, SafetensorsFile)]
        py::dict where;  // tensor name -> shard name, shard by shard in file order
        for (size_t i = 0; i < src.files.size(); ++i) {
          files.append(py::make_tuple(fs_text(src.shard_names[i]), src.files[i]));
          for (const io::TensorInfo& t : src.files[i]->tensors()) where[py::str(t.name)] = fs_text(src.shard_names[i]);
        }
        return py::make_tuple(files, where);
      },
      py::arg("dir"),
      "An HF checkpoint directory by the C++ loader's rule (model/checkpoint_source.hpp): (files, where), files a "
      "list of (shard name, SafetensorsFile), where a dict tensor name -> shard name in file order.");

  io.def(
      "save_safetensors",
      [](const FsPath& path, py::list tensors, py::dict metadata) {
        std::vector<py::array> keep;  // holds the buffers while the GIL is released
        const std::vector<io::TensorToWrite> ts = tensors_from_py(tensors, "save_safetensors", keep);
        io::Metadata meta;
        for (auto kv : metadata) {
          check_arg(py::isinstance<py::str>(kv.first) && py::isinstance<py::str>(kv.second),
                    "save_safetensors: metadata keys and values must be str");
          meta.emplace_back(kv.first.cast<std::string>(), kv.second.cast<std::string>());
        }
        py::gil_scoped_release nogil;
        io::write_safetensors(path, ts, meta);
      },
      py::arg("path"), py::arg("tensors"), py::arg("metadata"),
      "Atomic write of [(name, dtype name, shape, uint8 C-contiguous bytes)].");
  io.def(
      "check_lora_factors",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> A,
         py::array_t<float, py::array::c_style | py::array::forcecast> B, float scaling, const std::string& where,
         const std::string& a_name, const std::string& b_name) {
        check_arg(A.ndim() == 2 && B.ndim() == 2 && B.shape(1) == A.shape(0),
                  where + ": " + a_name + " / " + b_name + " must be [r, in] and [out, r]");
        py::gil_scoped_release nogil;
        model::check_lora_factors(A.shape(0), A.shape(1), B.shape(0), scaling, A.data(), B.data(), where, a_name,
                                  b_name);
      },
      py::arg("A"), py::arg("B"), py::arg("scaling"), py::arg("where"), py::arg("a_name"), py::arg("b_name"),
      "The engine's one rule for LoRA factors (model/lora_check.hpp, what loading applies): raises "
      "ValueError when A [r, in] / B [out, r] hold NaN / Inf or the update exceeds 2^32 for scaling.");
  io.def(
      "write_peft_adapter",
      [](const FsPath& dir, py::list tensors, const std::string& config_json) {
        std::vector<py::array> keep;  // holds the buffers while the GIL is released
        const std::vector<io::TensorToWrite> ts = tensors_from_py(tensors, "save_adapter", keep);
        py::gil_scoped_release nogil;
        io::write_peft_adapter(dir, ts, config_json);
      },
      py::arg("dir"), py::arg("tensors"), py::arg("config_json"),
      "The one PEFT adapter writer (qlora_adapter_save's): dir/adapter_model.safetensors from "
      "[(name, dtype name, shape, uint8 bytes)] and dir/adapter_config.json = config_json, saved as a unit.");

  // The process's one registry of saves in progress (io/atomic_dir.hpp): atomic_io.py's saves register
  // their temporaries here, so the engine's cleanups keep them, and atomic_io's cleanups read it.
  io.def("register_inflight", [](const FsPath& p) { io::register_inflight(p); }, py::arg("abs_path"),
         "Mark a temporary (absolute path) as a save in progress in this process.");
  io.def("unregister_inflight", [](const FsPath& p) { io::unregister_inflight(p); }, py::arg("abs_path"));
  io.def("is_inflight", [](const FsPath& p) { return io::is_inflight(p); }, py::arg("abs_path"),
         "True while a save of this process (Python's or the engine's) holds this temporary.");
  io.def("check_replaceable", [](const FsPath& p, const std::string& what) { io::check_replaceable(p, what.c_str()); },
         py::arg("path"), py::arg("what") = "cannot save",
         "ValueError when path is a device, fifo or socket (an atomic save would replace it with a file).");

  io.def(
      "json_loads",
      [](py::handle text, size_t max_depth, bool allow_duplicate_keys) {
        const std::string s = text_arg(text);
        json::ParseOptions opt;
        opt.max_depth = max_depth;
        opt.allow_duplicate_keys = allow_duplicate_keys;
        json::Value v;
        {
          py::gil_scoped_release nogil;
          v = json::parse(s, opt);
        }
        return json_to_python(v);
      },
      py::arg("text"), py::arg("max_depth") = 512, py::arg("allow_duplicate_keys") = false,
      "Parse JSON (str or UTF-8 bytes) with the engine's strict parser; raises FormatError.");
  io.def(
      "json_load_file",
      [](const FsPath& path) {
        json::Value v;
        {
          py::gil_scoped_release nogil;
          v = json::parse_file(path);
        }
        return json_to_python(v);
      },
      py::arg("path"), "Read and parse a JSON file (errors name the path).");
  io.def(
      "json_dumps",
      [](py::handle obj, py::object indent) {
        const int ind = indent.is_none() ? -1 : indent.cast<int>();
        check_arg(ind >= -1 && ind <= 64, "json_dumps: indent must be None or in [0, 64]");
        return json::dump(from_python(obj, 0), ind);
      },
      py::arg("obj"), py::arg("indent") = py::none(),
      "Serialize None/bool/int/float/str/list/tuple/dict with the engine's JSON writer.");
  io.def(
      "peft_config_json",
      [](py::handle fields) { return model::peft_config_json(model::peft_config_fields(from_python(fields, 0))); },
      py::arg("fields"),
      "adapter_config.json text (model/peft_config.cpp, the C API's qlora_adapter_save builder) for a dict of "
      "LoraConfig fields: PEFT's full field set, sorted keys, indent 2, ASCII, trailing newline.");

  io.def(
      "resolve_peft_config",
      [](py::handle config, int64_t num_layers, py::object matcher) {
        capi::PatternMatcher re;
        if (!matcher.is_none())
          re = [matcher](const std::string& pat, const char* kind, const std::string& what, const std::string& key) {
            return matcher(pat, kind, what, key).cast<int64_t>();
          };
        py::list out;
        for (const auto& m : capi::resolve_peft_config(from_python(config, 0), num_layers, "", re))
          out.append(py::make_tuple(m.layer, model::proj_name(m.p), m.r, m.alpha, m.scaling));
        return out;
      },
      py::arg("config"), py::arg("num_layers"), py::arg("matcher") = py::none(),
      "LoraConfig.resolve in C++ (peft_adapter.cpp, the rules the adapter reader and the C API use): "
      "[(layer, proj, r, alpha, scaling)] for a PEFT config dict.");
  io.def(
      "read_peft_adapter",
      [](const FsPath& dir, int64_t num_layers, py::dict module_shapes, py::object matcher,
         const std::string& api) {
        capi::PeftReadOptions opt;
        opt.api = api;
        opt.num_layers = num_layers;
        for (auto kv : module_shapes) {
          const std::string proj = py::str(kv.first);
          const int p = model::proj_index(proj);
          check_arg(p >= 0, api + ": module_shapes key '" + proj +
                                "' is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
          const auto oi = kv.second.cast<std::pair<int64_t, int64_t>>();
          opt.module_shapes[p] = oi;
        }
        if (!matcher.is_none())  // Python's time-bounded re matcher (lora_config.py); runs with the GIL held
          opt.re = [matcher](const std::string& pat, const char* kind, const std::string& what, const std::string& key) {
            return matcher(pat, kind, what, key).cast<int64_t>();
          };
        capi::PeftRead r;
        try {
          r = capi::read_peft_adapter(dir, opt);
        } catch (const io::FileError& e) {
          // OSError(errno, message, path) -> FileNotFoundError / NotADirectoryError with the reader's words
          std::string msg = e.what();
          const std::string tail = " '" + e.path + "': " + e.reason;
          if (msg.size() > tail.size() && msg.compare(msg.size() - tail.size(), tail.size(), tail) == 0)
            msg.resize(msg.size() - tail.size());
          const bool named = msg.find("'" + e.path + "'") != std::string::npos;  // else OSError appends it
          py::object exc = named ? py::reinterpret_borrow<py::object>(PyExc_OSError)(e.err, fs_text(msg))
                                 : py::reinterpret_borrow<py::object>(PyExc_OSError)(e.err, fs_text(msg), fs_text(e.path));
          PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
          throw py::error_already_set();
        }
        py::list mods;
        for (const auto& m : r.modules) {
          py::array_t<float> a({m.r, m.in}), b({m.out, m.r});
          std::memcpy(a.mutable_data(), m.a, sizeof(float) * m.r * m.in);
          std::memcpy(b.mutable_data(), m.b, sizeof(float) * m.out * m.r);
          mods.append(py::make_tuple(m.layer, model::proj_name(m.p), m.r, m.scaling, a, b));
        }
        return py::make_tuple(json_to_python(r.config), mods);
      },
      py::arg("dir"), py::arg("num_layers") = 0, py::arg("module_shapes") = py::dict(),
      py::arg("matcher") = py::none(), py::arg("api") = "load_adapter",
      "The C++ PEFT adapter reader (the C API's): (adapter_config.json as read, [(layer, proj, r, scaling, "
      "A float32 [r, in], B float32 [out, r])]). matcher(pattern, kind, what, key) -> -1 / 0 / layer index "
      "matches the config's regexes (None: only plain names are read).");

  // Test hook for the C++ accessors the loaders use (json::Value::get_or / at / as_*).
  io.def("_json_access", [](const std::string& text, const std::string& key, const std::string& kind,
                            py::object def) -> py::object {
    const json::Value v = json::parse(text);
    if (kind == "bool") return py::bool_(v.get_or(key, def.cast<bool>()));
    if (kind == "int") return py::int_(v.get_or(key, def.cast<int64_t>()));
    if (kind == "double") return py::float_(v.get_or(key, def.cast<double>()));
    if (kind == "string") return py::str(v.get_or(key, def.cast<std::string>()));
    if (kind == "at_int") return py::int_(v.at(key).as_int());
    if (kind == "at_double") return py::float_(v.at(key).as_double());
    if (kind == "at_string") return py::str(v.at(key).as_string());
    if (kind == "at_bool") return py::bool_(v.at(key).as_bool());
    if (kind == "index") return py::int_(v.at(static_cast<size_t>(std::stoul(key))).as_int());
    if (kind == "size") return py::int_(v.at(key).size());
    throw ValueError("unknown kind");
  });
}

}  // namespace qlora::py_bind
