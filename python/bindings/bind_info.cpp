#include <pybind11/stl.h>

#include "backend.hpp"
#include "bindings.hpp"
#include "cpu/features.hpp"
#include "cpu/threads.hpp"

#ifndef QLORA_VERSION
#define QLORA_VERSION "0.0.0+dev"
#endif

namespace qlora::py_bind {

void bind_info(py::module_& m) {
  m.attr("__version__") = QLORA_VERSION;
  m.def("num_threads", &cpu::num_threads, "Threads used by the CPU kernels.");
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("n"), "Set the threads used by the CPU kernels (>= 1).");
  m.def("physical_cores", &cpu::physical_cores);
  m.def("simd_level", [] { return std::string(cpu::simd_level_name(cpu::active_simd_level())); },
        "SIMD level the CPU kernels use now.");
  m.def("set_simd_level", [](const std::string& name) { cpu::set_active_simd_level(cpu::simd_level_from_name(name)); },
        py::arg("level"), "Force a SIMD level (scalar, generic, avx2, avx512) for the 'cpu' backend.");
  m.def("best_simd_level", [] { return std::string(cpu::simd_level_name(cpu::best_simd_level())); });
  m.def("supported_simd_levels", [] {
    std::vector<std::string> out;
    for (auto l : cpu::supported_simd_levels()) out.emplace_back(cpu::simd_level_name(l));
    return out;
  });
  m.def("available_backends", &available_backends);
  m.def("check_backend", [](const std::string& name) { return get_backend(name).name(); }, py::arg("name"),
        "Resolve a backend by name; raises ValueError saying why it is unavailable.");
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_device_summary", &cuda_device_summary);
}

}  // namespace qlora::py_bind
