// qlora_native._core.Tokenizer: the C++ tokenizers (cpp/src/tokenizer) for tests and benchmarks,
// plus the C API's tokenizer symbols kept in the module for ctypes (tests/test_tokenizer_cpp*.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.hpp"
#include "fs_path.hpp"
#include "common/error.hpp"
#include "qlora/qlora.h"
#include "tokenizer/tokenizer.hpp"
#include "tokenizer/unicode.hpp"

namespace qlora::py_bind {
namespace {
namespace tk = qlora::tok;

using Fn = void (*)();
__attribute__((used)) const Fn kTokenizerCapiSymbols[] = {
    reinterpret_cast<Fn>(&qlora_tokenizer_load),   reinterpret_cast<Fn>(&qlora_tokenizer_free),
    reinterpret_cast<Fn>(&qlora_tokenize),         reinterpret_cast<Fn>(&qlora_detokenize),
    reinterpret_cast<Fn>(&qlora_token_to_piece),   reinterpret_cast<Fn>(&qlora_tokenizer_n_vocab),
    reinterpret_cast<Fn>(&qlora_token_bos),        reinterpret_cast<Fn>(&qlora_token_eos),
    reinterpret_cast<Fn>(&qlora_token_pad),        reinterpret_cast<Fn>(&qlora_token_unk),
    reinterpret_cast<Fn>(&qlora_tokenizer_eos_tokens), reinterpret_cast<Fn>(&qlora_token_is_special),
    reinterpret_cast<Fn>(&qlora_model_get_tokenizer),
};

// str -> UTF-8 (a lone surrogate is a ValueError, as the Python face says); bytes as they are.
std::string text_bytes(const py::handle& text, const char* fn) {
  if (PyUnicode_Check(text.ptr())) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(text.ptr(), &n);
    if (!s) {
      PyErr_Clear();
      throw ValueError(std::string(fn) + ": the text has a lone surrogate (not valid Unicode)");
    }
    return std::string(s, static_cast<size_t>(n));
  }
  if (PyBytes_Check(text.ptr())) return std::string(PyBytes_AS_STRING(text.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(text.ptr())));
  throw py::type_error(std::string(fn) + " expects str or bytes, got " + std::string(py::str(py::type::of(text).attr("__name__"))));
}

py::list to_list(const std::vector<int32_t>& v) {
  py::list out(v.size());
  for (size_t i = 0; i < v.size(); ++i) PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), PyLong_FromLong(v[i]));
  return out;
}

std::vector<int32_t> ids_from(const py::handle& ids, const tk::Tokenizer& t) {
  std::vector<int32_t> out;
  if (PyUnicode_Check(ids.ptr()) || PyBytes_Check(ids.ptr()) || !py::hasattr(ids, "__iter__"))
    throw ValueError("token ids must be a sequence of integers");
  size_t k = 0;
  for (py::handle x : ids) {
    if (PyBool_Check(x.ptr()) || !PyIndex_Check(x.ptr()))
      throw ValueError("token ids must be integers: ids[" + std::to_string(k) + "] = " + std::string(py::repr(x)));
    long long v = PyLong_AsLongLong(py::reinterpret_steal<py::object>(PyNumber_Index(x.ptr())).ptr());
    if (v == -1 && PyErr_Occurred()) { PyErr_Clear(); v = -1; }
    if (v < 0 || v >= t.n_vocab())
      throw ValueError("token id " + std::to_string(v) + " at index " + std::to_string(k) + " out of range [0, " + std::to_string(t.n_vocab()) + ")");
    out.push_back(static_cast<int32_t>(v));
    ++k;
  }
  return out;
}

py::object opt_id(int32_t v) { return v < 0 ? py::object(py::none()) : py::object(py::int_(v)); }
}  // namespace

void bind_tokenizer(py::module_& m) {
  py::class_<tk::Tokenizer>(m, "Tokenizer",
                            "The C++ tokenizer of a model source (a .gguf file or an HF directory with tokenizer.json); "
                            "same ids as qlora_native.Tokenizer.")
      .def(py::init([](const FsPath& path) {
             py::gil_scoped_release nogil;
             return tk::Tokenizer::load(path);
           }),
           py::arg("path"))
      .def_static(
          "from_gguf_metadata",
          [](const std::string& model, std::vector<std::string> tokens, std::vector<int32_t> types,
             std::optional<std::vector<float>> scores, std::optional<std::vector<std::string>> merges, const std::string& pre,
             int32_t bos, int32_t eos, int32_t pad, int32_t unk, int32_t eot, int32_t eom, int add_bos, int add_eos,
             int add_space_prefix, const std::string& source) {
            tk::GgufVocab v;
            v.source = source;
            v.model = model;
            v.pre = pre;
            v.tokens = std::move(tokens);
            v.types = std::move(types);
            if (!v.types.empty() && v.types.size() != v.tokens.size())
              throw FormatError(source + ": token_type/scores length differs from the tokens");
            v.has_scores = scores.has_value();
            if (scores) v.scores = std::move(*scores);
            v.has_merges = merges.has_value();
            if (merges) v.merges = std::move(*merges);
            v.bos = bos, v.eos = eos, v.pad = pad, v.unk = unk, v.eot = eot, v.eom = eom;
            v.add_bos = add_bos, v.add_eos = add_eos, v.add_space_prefix = add_space_prefix;
            return std::make_unique<tk::Tokenizer>(tk::desc_from_gguf_vocab(v));
          },
          py::arg("model"), py::arg("tokens"), py::arg("token_types"), py::arg("scores") = py::none(),
          py::arg("merges") = py::none(), py::arg("pre") = "", py::arg("bos") = -1, py::arg("eos") = -1,
          py::arg("pad") = -1, py::arg("unk") = -1, py::arg("eot") = -1, py::arg("eom") = -1, py::arg("add_bos") = -1,
          py::arg("add_eos") = -1, py::arg("add_space_prefix") = -1, py::arg("source") = "GGUF",
          "Build from GGUF tokenizer metadata already read (ids: -1 = none; add_*: -1 = key absent).")
      .def(
          "encode",
          [](const tk::Tokenizer& t, py::handle text, bool add_special, bool parse_special) {
            std::string s = text_bytes(text, "encode");
            std::vector<int32_t> ids;
            {
              py::gil_scoped_release nogil;
              t.encode(s, add_special, parse_special, ids);
            }
            return to_list(ids);
          },
          py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = true,
          "Token ids of a str (UTF-8) or bytes (invalid UTF-8 read as U+FFFD, as bytes.decode(errors='replace')).")
      .def(
          "encode_batch",
          [](const tk::Tokenizer& t, py::iterable texts, bool add_special, bool parse_special) {
            if (PyUnicode_Check(texts.ptr())) throw py::type_error("encode_batch expects a list of strings, got a single str");
            std::vector<std::string> in;
            for (py::handle x : texts) in.push_back(text_bytes(x, "encode_batch"));
            std::vector<std::vector<int32_t>> out(in.size());
            {
              py::gil_scoped_release nogil;
              for (size_t i = 0; i < in.size(); ++i) t.encode(in[i], add_special, parse_special, out[i]);
            }
            py::list l(out.size());
            for (size_t i = 0; i < out.size(); ++i) PyList_SET_ITEM(l.ptr(), static_cast<Py_ssize_t>(i), to_list(out[i]).release().ptr());
            return l;
          },
          py::arg("texts"), py::arg("add_special") = true, py::arg("parse_special") = true)
      .def(
          "decode",
          [](const tk::Tokenizer& t, py::handle ids, bool skip_special) {
            std::vector<int32_t> v = ids_from(ids, t);
            std::string s;
            {
              py::gil_scoped_release nogil;
              s = t.decode(v.data(), v.size(), skip_special);
            }
            return py::str(s);
          },
          py::arg("ids"), py::arg("skip_special") = false)
      .def(
          "token_to_piece",
          [](const tk::Tokenizer& t, int64_t id) {
            check_arg(id >= 0 && id < t.n_vocab(), "token id " + std::to_string(id) + " out of range [0, " + std::to_string(t.n_vocab()) + ")");
            return py::bytes(t.piece(static_cast<int32_t>(id)));
          },
          py::arg("id"))
      .def(
          "id_to_token",
          [](const tk::Tokenizer& t, int64_t id) {
            check_arg(id >= 0 && id < t.n_vocab(), "token id " + std::to_string(id) + " out of range [0, " + std::to_string(t.n_vocab()) + ")");
            return t.token(static_cast<int32_t>(id));
          },
          py::arg("id"))
      .def("token_to_id", [](const tk::Tokenizer& t, const std::string& s) { return opt_id(t.token_to_id(s)); }, py::arg("token"))
      .def("is_special", [](const tk::Tokenizer& t, int64_t id) { return id >= 0 && id < t.n_vocab() && t.is_special(static_cast<int32_t>(id)); })
      .def_property_readonly("vocab_size", &tk::Tokenizer::n_vocab)
      .def_property_readonly("bos_token_id", [](const tk::Tokenizer& t) { return opt_id(t.desc().bos_id); })
      .def_property_readonly("eos_token_id", [](const tk::Tokenizer& t) { return opt_id(t.desc().eos_id); })
      .def_property_readonly("pad_token_id", [](const tk::Tokenizer& t) { return opt_id(t.desc().pad_id); })
      .def_property_readonly("unk_token_id", [](const tk::Tokenizer& t) { return opt_id(t.desc().unk_id); })
      .def_property_readonly("eos_token_ids", [](const tk::Tokenizer& t) {
        py::set s;
        for (int32_t x : t.desc().eos_ids) s.add(py::int_(x));
        return py::frozenset(s);
      })
      .def_property_readonly("source", [](const tk::Tokenizer& t) { return fs_text(t.desc().source); });
  m.attr("tokenizer_unicode_version") = tk::kUnicodeVersion;
  m.def(
      "tokenizer_nfc",
      [](const std::string& s) {
        std::string buf;
        std::string_view v = tk::sanitize_utf8(s, buf);
        std::string out;
        tk::nfc(v, out);
        return out;
      },
      py::arg("text"), "Unicode NFC as the C++ tokenizers apply it (tokenizer.json normalizer NFC).");
  m.def(
      "tokenizer_unicode_flags",
      [](uint32_t first, uint32_t last) {
        check_arg(first <= last && last <= 0x110000, "tokenizer_unicode_flags: need 0 <= first <= last <= 0x110000");
        std::string out(last - first, '\0');
        for (uint32_t c = first; c < last; ++c) out[c - first] = static_cast<char>(tk::cpt_flags(c));
        return py::bytes(out);
      },
      py::arg("first") = 0, py::arg("last") = 0x110000,
      "Class flags of code points [first, last) as the pre-tokenizers see them (1 letter, 2 number, 4 punctuation, "
      "8 White_Space, 16 assigned, 0x80 valid).");
}

}  // namespace qlora::py_bind
