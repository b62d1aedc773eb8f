// The pybind11 module qlora_native._core: the thin bridge to the C++ engine.
#include <pybind11/pybind11.h>

#include "bindings.hpp"
#include "common/error.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "qlora_native C++ engine";
  // Python exception classes for the engine's exception types (see common/error.hpp).
  static py::exception<qlora::FormatError> format_error(m, "FormatError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const qlora::FormatError& e) {
      py::set_error(format_error, e.what());
    } catch (const qlora::ValueError& e) {
      py::set_error(PyExc_ValueError, e.what());
    }
  });
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
