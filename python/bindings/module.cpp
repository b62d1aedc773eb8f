// The pybind11 module qlora_native._core: the thin bridge to the C++ engine.
#include <pybind11/pybind11.h>

#include <cstring>
#include <new>
#include <stdexcept>

#include "bindings.hpp"
#include "fs_path.hpp"
#include "common/error.hpp"

namespace py = pybind11;

namespace qlora::py_bind {

py::str fs_text(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogateescape");
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

std::string fs_path_bytes(py::handle obj) {
  // os.fspath: str or bytes, else TypeError "expected str, bytes or os.PathLike object, not ..."
  py::object path = py::reinterpret_steal<py::object>(PyOS_FSPath(obj.ptr()));
  if (!path) throw py::error_already_set();
  py::object b = path;
  if (PyUnicode_Check(path.ptr())) {  // os.fsencode: the file system encoding and error handler
    b = py::reinterpret_steal<py::object>(PyUnicode_EncodeFSDefault(path.ptr()));
    if (!b) throw py::error_already_set();
  }
  char* data = nullptr;
  Py_ssize_t n = 0;
  if (PyBytes_AsStringAndSize(b.ptr(), &data, &n) != 0) throw py::error_already_set();
  std::string s(data, static_cast<size_t>(n));
  if (s.find('\0') != std::string::npos)  // repr() escapes surrogates and bytes: the message is ASCII
    throw py::value_error(py::repr(path).cast<std::string>() + ": embedded null byte in a path");
  return s;
}

void set_error_fs(PyObject* type, const char* msg) {
  PyObject* o = PyUnicode_DecodeUTF8(msg, static_cast<Py_ssize_t>(std::strlen(msg)), "surrogateescape");
  if (!o) return;  // MemoryError is set
  PyErr_SetObject(type, o);
  Py_DECREF(o);
}

namespace {
bool valid_utf8(const char* s) {
  PyObject* o = PyUnicode_DecodeUTF8(s, static_cast<Py_ssize_t>(std::strlen(s)), "strict");
  if (!o) {
    PyErr_Clear();
    return false;
  }
  Py_DECREF(o);
  return true;
}
}  // namespace

}  // namespace qlora::py_bind

PYBIND11_MODULE(_core, m) {
  using qlora::py_bind::set_error_fs;
  m.doc() = "qlora_native C++ engine";
  // Python exception classes for the engine's exception types (see common/error.hpp). Messages are
  // decoded with surrogateescape (set_error_fs): one naming a non-UTF-8 path keeps its class.
  static py::exception<qlora::FormatError> format_error(m, "FormatError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const qlora::FormatError& e) {
      set_error_fs(format_error.ptr(), e.what());
    } catch (const qlora::ValueError& e) {
      set_error_fs(PyExc_ValueError, e.what());
    } catch (const py::builtin_exception&) {
      throw;  // pybind11's own (their messages hold no paths)
    } catch (const py::error_already_set&) {
      throw;
    } catch (const std::exception& e) {
      // The standard exceptions pybind11 maps, when the message is not UTF-8 (else its own mapping).
      if (qlora::py_bind::valid_utf8(e.what())) throw;
      PyObject* type = PyExc_RuntimeError;
      if (dynamic_cast<const std::bad_alloc*>(&e)) type = PyExc_MemoryError;
      else if (dynamic_cast<const std::out_of_range*>(&e)) type = PyExc_IndexError;
      else if (dynamic_cast<const std::overflow_error*>(&e)) type = PyExc_OverflowError;
      else if (dynamic_cast<const std::domain_error*>(&e) || dynamic_cast<const std::invalid_argument*>(&e) ||
               dynamic_cast<const std::length_error*>(&e) || dynamic_cast<const std::range_error*>(&e))
        type = PyExc_ValueError;
      set_error_fs(type, e.what());
    }
  });
  m.def(
      "fs_path", [](qlora::py_bind::FsPath p) { return py::bytes(p.bytes); }, py::arg("path"),
      "The bytes the engine opens for `path` (str, bytes or os.PathLike; os.fsencode's rule; TypeError / "
      "ValueError for an embedded NUL): what every _core parameter naming a file does with its argument.");
  qlora::py_bind::bind_info(m);
  qlora::py_bind::bind_ops(m);
  qlora::py_bind::bind_nf4(m);
  qlora::py_bind::bind_io(m);
  qlora::py_bind::bind_model(m);
  qlora::py_bind::bind_train(m);
  qlora::py_bind::bind_grad_ops(m);
  qlora::py_bind::bind_tokenizer(m);
  qlora::py_bind::bind_gguf(m);
  qlora::py_bind::bind_backend_op(m);
  qlora::py_bind::bind_nccl(m);
  qlora::py_bind::bind_device_memory(m);
}
