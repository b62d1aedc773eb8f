#include <pybind11/stl.h>

#include "backend.hpp"
#include "bindings.hpp"
#include "cpu/cache_info.hpp"
#include "cpu/features.hpp"
#include "cpu/gemm_bf16.hpp"
#include "cpu/gemm_bf16_amx.hpp"
#include "cpu/gemm.hpp"
#include "cpu/profile.hpp"
#include "cpu/threads.hpp"
#include "cpu/tuning.hpp"
#include "common/error.hpp"

#ifndef QLORA_VERSION
#define QLORA_VERSION "0.0.0+dev"
#endif

namespace qlora::py_bind {

void bind_info(py::module_& m) {
  m.attr("__version__") = QLORA_VERSION;
  m.def("num_threads", &cpu::num_threads, "Threads used by the CPU kernels.");
  m.def(
      "set_num_threads",
      [](py::handle n) {
        // Any integer (a huge one, a numpy one) gets the range message, not a pybind type error.
        const bool is_int = PyIndex_Check(n.ptr()) && !PyBool_Check(n.ptr());
        check_arg(is_int, "number of threads must be an int, got " + std::string(py::str(py::repr(n))));
        const py::int_ i = py::reinterpret_steal<py::int_>(PyNumber_Index(n.ptr()));
        if (!i) throw py::error_already_set();
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
        const int lim = cpu::max_threads();
        check_arg(!overflow && v >= 1 && v <= lim, "number of threads must be in [1, " + std::to_string(lim) +
                                                       "], got " + std::string(py::str(i)));
        cpu::set_num_threads(static_cast<int>(v));
      },
      py::arg("n"), "Set the threads used by the CPU kernels (1 .. max_threads()).");
  m.def("max_threads", &cpu::max_threads, "The most threads set_num_threads accepts.");
  m.def("physical_cores", &cpu::physical_cores);
  m.def("simd_level", [] { return std::string(cpu::simd_level_name(cpu::active_simd_level())); },
        "SIMD level the CPU kernels use now.");
  m.def("set_simd_level", [](const std::string& name) { cpu::set_active_simd_level(cpu::simd_level_from_name(name)); },
        py::arg("level"), "Force a SIMD level (scalar, generic, avx2, avx512) for the 'cpu' backend.");
  m.def(
      "bf16_gemm_kernel",
      []() -> py::object {
        const cpu::SimdLevel l = cpu::active_simd_level();
        if (l == cpu::SimdLevel::Scalar) return py::str("scalar");
        if (!cpu::bf16_compute_available(l)) return py::none();
        return py::str(cpu::bf16_amx::kernel_name(cpu::bf16_amx::kernel_choice()));
      },
      "Micro-kernel of the CPU's bf16-compute GEMMs now: 'amx-bf16', 'amx-bf16-emulated' (QLORA_AMX=emulate), "
      "'avx512-bf16', 'scalar' (the reference level), or None (no bf16 units: fp32 kernels run).");
  m.def("best_simd_level", [] { return std::string(cpu::simd_level_name(cpu::best_simd_level())); });
  m.def("supported_simd_levels", [] {
    std::vector<std::string> out;
    for (auto l : cpu::supported_simd_levels()) out.emplace_back(cpu::simd_level_name(l));
    return out;
  });
  m.def("available_backends", &available_backends);
  m.def("check_backend", [](const std::string& name) { return get_backend(name).name(); }, py::arg("name"),
        "Resolve a backend by name; raises ValueError saying why it is unavailable.");
  m.def("all_backend_ops", [] { return Backend::all_ops(); }, "Every backend op name.");
  m.def(
      "backend_ops",
      [](const std::string& name) {
        // The CUDA op table is known without a GPU (info lists it on a build machine too).
        if ((name == "cuda" || name.rfind("cuda:", 0) == 0) && cuda_compiled() && cuda_device_count() == 0)
          return cuda_supported_ops();
        return get_backend(name).supported_ops();
      },
      py::arg("name"), "The ops a backend implements (Backend::supports_op).");
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_device_summary", &cuda_device_summary);
  m.def("cache_sizes", [] {
    const cpu::CacheSizes& c = cpu::cache_sizes();
    py::dict d;
    d["l1d"] = c.l1d, d["l2"] = c.l2, d["l3"] = c.l3, d["l3_sharing"] = c.l3_sharing, d["line"] = c.line;
    d["source"] = c.source;
    return d;
  }, "Data cache sizes in bytes the CPU kernels' blocking is derived from (l1d, l2 per core; l3 shared).");
  m.def("gemm_blocking", [](const std::string& level) {
    const cpu::GemmBlocking b = cpu::gemm_blocking_in_use(cpu::simd_level_from_name(level));
    py::dict d;
    d["kc"] = b.kc, d["mc"] = b.mc, d["nc"] = b.nc;
    return d;
  }, py::arg("level"), "GEMM cache blocking (kc, mc, nc) the kernels of a SIMD level use, derived from cache_sizes().");
  m.def("tuning_report", [] {
    py::list out;
    for (const cpu::tuning::Entry& e : cpu::tuning::report()) {
      py::dict d;
      d["key"] = e.key, d["choice"] = e.choice, d["source"] = e.source, d["variants"] = e.names;
      d["best_seconds"] = e.best_seconds;
      out.append(d);
    }
    return out;
  }, "Kernel variants chosen by measurement (cpu/tuning.hpp): one dict per key with the choice, its source "
     "('measured', 'file', 'env', 'default'), the variants and, where measured in this process, each one's best seconds.");
  m.def("tuning_reset", &cpu::tuning::reset, "Forget this process's measured choices (the next use reads the file or measures).");
  m.def("tuning_cache_path", &cpu::tuning::cache_path, "The per-machine choices file now ('' when QLORA_TUNE_CACHE=off).");
  m.def("cpu_signature", &cpu::tuning::cpu_signature, "The CPU's vendor, family, model, stepping and brand string.");
  // Opt-in per-op timers (cpu/profile.hpp; bench/bench_train.py --breakdown).
  m.def("profile_enable", [](bool on) { prof::set_enabled(on); }, py::arg("on") = true,
        "Time every CPU backend op by part (also env QLORA_PROFILE=1); off costs one flag test per op.");
  m.def("profile_enabled", &prof::enabled);
  m.def("profile_reset", &prof::reset, "Clear the accumulated op timings.");
  m.def("profile_report", [] {
    py::list out;
    for (const prof::Row& r : prof::report()) {
      py::dict d;
      d["part"] = r.part, d["op"] = r.op, d["shape"] = py::make_tuple(r.dims[0], r.dims[1], r.dims[2]);
      d["calls"] = r.calls, d["seconds"] = r.seconds, d["flops"] = r.flops, d["bytes"] = r.bytes;
      out.append(d);
    }
    return out;
  }, "Accumulated op timings: one dict per (part, op, shape) with calls, seconds, flops, bytes.");
}

}  // namespace qlora::py_bind
