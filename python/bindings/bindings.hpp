// One binder per topic; module.cpp calls them all. Each lives in its own bind_*.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace qlora::json {
class Value;
}

namespace qlora::py_bind {
namespace py = pybind11;
// A parsed JSON value as Python objects (bind_io.cpp); shared by the binders that return JSON.
py::object json_to_python(const json::Value& v);
// Text the engine built that may hold a path's bytes (a Linux file name need not be UTF-8) as a str,
// decoded with errors="surrogateescape" as os.fsdecode does: the path in it reads as the str the caller
// passed, and a message is never lost to a UnicodeDecodeError (module.cpp).
py::str fs_text(const std::string& s);
// Raise `type`(fs_text(msg)): PyErr_SetString would decode msg as strict UTF-8 and raise
// UnicodeDecodeError instead of the intended exception when it names such a path.
void set_error_fs(PyObject* type, const char* msg);
// compute_dtype "float32" -> false, "bfloat16" -> true, anything else ValueError (bind_ops.cpp).
bool bf16_arg(const std::string& compute_dtype);
void bind_info(py::module_& m);   // version, SIMD levels, threads, backends, CUDA status
void bind_ops(py::module_& m);    // qlora_native._core.ops: GEMM kernels on numpy arrays
void bind_nf4(py::module_& m);    // qlora_native._core.nf4: NF4 codec
void bind_io(py::module_& m);     // qlora_native._core.io: safetensors + JSON
void bind_model(py::module_& m);  // qlora_native._core.model: Llama-family model + sampler
void bind_train(py::module_& m);  // qlora_native._core.train: AdamW, lr schedules, grad clipping, RNG
void bind_grad_ops(py::module_& m);  // qlora_native._core.grad_ops: training ops (backward, loss)
void bind_tokenizer(py::module_& m);  // qlora_native._core.Tokenizer: the C++ tokenizers
void bind_gguf(py::module_& m);      // qlora_native._core.gguf: GGUF reader, dequantization, model loading
void bind_backend_op(py::module_& m);  // qlora_native._core.backend_op: one Backend op by name (op harness)
void bind_nccl(py::module_& m);  // qlora_native._core.nccl: NCCL communicator (GPU data parallel)
void bind_device_memory(py::module_& m);  // device_stats etc.: the device caching allocator's counters
}  // namespace qlora::py_bind
