// Builds an Nf4Ref (host pointers) from any Python object with the NF4 attribute protocol
// (qlora_native.nf4.NF4Tensor has it):
//   packed        uint8 array, (n+1)//2 bytes (any shape, C-contiguous)
//   absmax        uint8 [n_blocks] codes if double_quant, else float32 [n_blocks]
//   nested_absmax float32 [ceil(n_blocks/256)] or None (double_quant only)
//   nested_map    float32 [256] or None (None: bitsandbytes' dynamic map)
//   offset        float (double_quant only)
//   shape         (rows, cols); blocksize int; double_quant bool
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "common/error.hpp"
#include "nf4/nf4_codec.hpp"
#include "tensor_types.hpp"

namespace qlora::py_bind {
namespace py = pybind11;

// Holds the arrays alive for as long as the view is used.
struct PyNf4 {
  Nf4Ref ref;
  py::array packed, absmax, nested_absmax, nested_map;
};

inline py::array nf4_attr_array(py::handle obj, const char* name, py::dtype want, int64_t min_count) {
  // Messages are built only on failure: this runs on every decode-time GEMV call.
  py::object v = obj.attr(name);
  if (!py::isinstance<py::array>(v)) throw ValueError(std::string("NF4 weight: .") + name + " must be a numpy array");
  py::array a = v.cast<py::array>();
  if (!a.dtype().is(want))
    throw ValueError(std::string("NF4 weight: .") + name + " has dtype " + std::string(py::str(a.dtype())) +
                     ", expected " + std::string(py::str(want)));
  if (!(a.flags() & py::array::c_style)) throw ValueError(std::string("NF4 weight: .") + name + " must be C-contiguous");
  if (a.size() < min_count)
    throw ValueError(std::string("NF4 weight: .") + name + " has " + std::to_string(a.size()) +
                     " elements, expected at least " + std::to_string(min_count));
  return a;
}

inline PyNf4 nf4_from_py(py::handle obj) {
  PyNf4 w;
  py::tuple shape = py::tuple(obj.attr("shape"));
  check_arg(shape.size() == 2, "NF4 weight must be 2-D [out, in] for a GEMM");
  w.ref.rows = shape[0].cast<int64_t>();
  w.ref.cols = shape[1].cast<int64_t>();
  w.ref.blocksize = obj.attr("blocksize").cast<int>();
  w.ref.double_quant = obj.attr("double_quant").cast<bool>();
  check_arg(w.ref.rows >= 1 && w.ref.cols >= 1, "NF4 weight shape must be positive");
  check_arg(w.ref.blocksize >= 32 && w.ref.blocksize <= 4096 && (w.ref.blocksize & (w.ref.blocksize - 1)) == 0,
            "NF4 blocksize must be a power of two in [32, 4096]");
  const int64_t n = w.ref.numel(), nb = w.ref.n_blocks();
  w.packed = nf4_attr_array(obj, "packed", py::dtype::of<uint8_t>(), (n + 1) / 2);
  w.ref.packed = static_cast<const uint8_t*>(w.packed.data());
  if (w.ref.double_quant) {
    w.absmax = nf4_attr_array(obj, "absmax", py::dtype::of<uint8_t>(), nb);
    w.nested_absmax = nf4_attr_array(obj, "nested_absmax", py::dtype::of<float>(), (nb + 255) / 256);
    w.ref.nested_absmax = static_cast<const float*>(w.nested_absmax.data());
    py::object map = obj.attr("nested_map");
    if (map.is_none()) {
      w.ref.nested_map = nf4::kDynamicMap;
    } else {
      w.nested_map = nf4_attr_array(obj, "nested_map", py::dtype::of<float>(), 256);
      w.ref.nested_map = static_cast<const float*>(w.nested_map.data());
    }
    w.ref.offset = obj.attr("offset").cast<float>();
  } else {
    w.absmax = nf4_attr_array(obj, "absmax", py::dtype::of<float>(), nb);
  }
  w.ref.absmax = w.absmax.data();
  return w;
}

}  // namespace qlora::py_bind
