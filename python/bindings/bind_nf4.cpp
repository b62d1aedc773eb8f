// qlora_native._core.nf4: the NF4 + double-quant codec on numpy arrays (nf4/nf4_codec.hpp).
// The Python face (qlora_native.nf4) wraps these into NF4Tensor.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "bindings.hpp"
#include "common/error.hpp"
#include "cpu/features.hpp"
#include "nf4/nf4_codec.hpp"

namespace qlora::py_bind {

namespace {

cpu::SimdLevel level_or_active(const std::optional<std::string>& level) {
  return level ? cpu::simd_level_from_name(*level) : cpu::active_simd_level();
}

// A C-contiguous array of the given numpy dtype and exactly `count` elements.
py::array checked(const py::object& obj, const char* name, py::dtype want, int64_t count) {
  check_arg(py::isinstance<py::array>(obj), std::string("nf4: ") + name + " must be a numpy array");
  py::array a = obj.cast<py::array>();
  check_arg(a.dtype().is(want), std::string("nf4: ") + name + " has dtype " + std::string(py::str(a.dtype())) +
                                    ", expected " + std::string(py::str(want)));
  check_arg(a.flags() & py::array::c_style, std::string("nf4: ") + name + " must be C-contiguous");
  check_arg(a.size() == count, std::string("nf4: ") + name + " has " + std::to_string(a.size()) +
                                   " elements, expected " + std::to_string(count));
  return a;
}

py::tuple quantize(const py::array& x, const std::string& src_dtype, int blocksize, bool double_quant,
                   const std::optional<std::string>& level) {
  DType dt;
  py::dtype want;
  if (src_dtype == "float32") {
    dt = DType::F32, want = py::dtype::of<float>();
  } else if (src_dtype == "float16") {
    dt = DType::F16, want = py::dtype("float16");
  } else if (src_dtype == "bfloat16") {
    dt = DType::BF16, want = py::dtype::of<uint16_t>();  // raw bf16 bits
  } else {
    throw ValueError("nf4: src_dtype must be float32, float16 or bfloat16, got '" + src_dtype + "'");
  }
  const cpu::SimdLevel lvl = level_or_active(level);
  const int64_t n = static_cast<int64_t>(x.size());
  const nf4::Sizes s = nf4::sizes(n, blocksize, double_quant);
  py::array xa = checked(x, "x", want, n);
  py::array_t<uint8_t> packed(s.packed_bytes);  // [(n+1)/2]
  py::array absmax = double_quant ? py::array(py::array_t<uint8_t>(s.n_blocks))  // [n_blocks] codes
                                  : py::array(py::array_t<float>(s.n_blocks));   // [n_blocks] float32
  py::object nested = py::none();
  float offset = 0.0f;
  float* nested_ptr = nullptr;
  if (double_quant) {
    py::array_t<float> na(s.n_nested);  // [n_nested]
    nested_ptr = na.mutable_data();
    nested = na;
  }
  const void* xp = xa.data();
  uint8_t* pp = packed.mutable_data();
  void* ap = absmax.mutable_data();
  {
    py::gil_scoped_release release;
    nf4::quantize(lvl, xp, dt, n, blocksize, double_quant, pp, ap, nested_ptr, &offset);
  }
  py::object off = double_quant ? py::object(py::float_(offset)) : py::object(py::none());
  return py::make_tuple(packed, absmax, nested, off);
}

py::array_t<float> dequantize(const py::object& packed, const py::object& absmax, const py::object& nested_absmax,
                              const py::object& nested_map, float offset, int64_t n, int blocksize,
                              bool double_quant, const std::optional<std::string>& level) {
  const cpu::SimdLevel lvl = level_or_active(level);
  const nf4::Sizes s = nf4::sizes(n, blocksize, double_quant);
  Nf4Ref W;
  W.rows = 1, W.cols = n, W.blocksize = blocksize, W.double_quant = double_quant, W.offset = offset;
  py::array p = checked(packed, "packed", py::dtype::of<uint8_t>(), s.packed_bytes);
  W.packed = static_cast<const uint8_t*>(p.data());
  py::array a, na, nm;
  if (double_quant) {
    a = checked(absmax, "absmax", py::dtype::of<uint8_t>(), s.n_blocks);
    na = checked(nested_absmax, "nested_absmax", py::dtype::of<float>(), s.n_nested);
    W.nested_absmax = static_cast<const float*>(na.data());
    if (nested_map.is_none()) {
      W.nested_map = nf4::kDynamicMap;
    } else {
      nm = checked(nested_map, "nested_map", py::dtype::of<float>(), 256);
      W.nested_map = static_cast<const float*>(nm.data());
    }
  } else {
    a = checked(absmax, "absmax", py::dtype::of<float>(), s.n_blocks);
  }
  W.absmax = a.data();
  py::array_t<float> out(n);  // [n]
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    nf4::dequantize(lvl, W, op);
  }
  return out;
}

}  // namespace

void bind_nf4(py::module_& m) {
  py::module_ s = m.def_submodule("nf4", "NF4 + double-quant codec (bitsandbytes byte format)");
  s.def("quantize", &quantize, py::arg("x"), py::arg("src_dtype"), py::arg("blocksize") = 64,
        py::arg("double_quant") = true, py::arg("level") = py::none(),
        "Quantize a C-contiguous array (float32, float16, or uint16 holding bfloat16 bits) of any shape.\n"
        "Returns (packed uint8[(n+1)//2], absmax uint8[n_blocks] or float32[n_blocks],\n"
        "nested_absmax float32[ceil(n_blocks/256)] or None, offset float or None).");
  s.def("dequantize", &dequantize, py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"),
        py::arg("nested_map"), py::arg("offset"), py::arg("n"), py::arg("blocksize"), py::arg("double_quant"),
        py::arg("level") = py::none(), "Decode to a flat float32[n] array (nested_map None: the dynamic map).");
  s.def("sizes", [](int64_t n, int blocksize, bool double_quant) {
    nf4::Sizes z = nf4::sizes(n, blocksize, double_quant);
    return py::make_tuple(z.packed_bytes, z.n_blocks, z.n_nested);
  }, py::arg("n"), py::arg("blocksize"), py::arg("double_quant"), "(packed_bytes, n_blocks, n_nested)");
  s.def("dynamic_map", [] {
    py::array_t<float> a(256);
    std::copy(nf4::kDynamicMap, nf4::kDynamicMap + 256, a.mutable_data());
    return a;
  }, "bitsandbytes' signed dynamic 8-bit map, float32[256] (a fresh copy).");
  s.def("nf4_codes", [] {
    py::array_t<float> a(16);
    std::copy(kNf4Codes, kNf4Codes + 16, a.mutable_data());
    return a;
  }, "The 16 NF4 code values, float32[16] (a fresh copy).");
}

}  // namespace qlora::py_bind
