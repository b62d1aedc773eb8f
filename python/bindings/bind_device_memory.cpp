// qlora_native._core.device_stats / reset_peak_memory / release_cached_memory: the counters of a
// device backend's caching allocator (cpp/src/device_pool.hpp), for tests and tools/device-check.
#include <pybind11/stl.h>

#include "backend.hpp"
#include "bindings.hpp"

namespace qlora::py_bind {

void bind_device_memory(py::module_& m) {
  m.def(
      "device_stats",
      [](const std::string& backend) {
        const Backend::DeviceStats s = get_backend(backend).device_stats();
        py::dict d;
        d["raw_allocs"] = s.raw_allocs, d["raw_alloc_failures"] = s.raw_alloc_failures;
        d["raw_frees"] = s.raw_frees;
        d["reserved_bytes"] = s.reserved_bytes, d["peak_reserved_bytes"] = s.peak_reserved_bytes;
        d["live_bytes"] = s.live_bytes, d["peak_live_bytes"] = s.peak_live_bytes;
        d["cached_bytes"] = s.cached_bytes, d["cache_hits"] = s.cache_hits;
        d["queues_created"] = s.queues_created, d["execs_open"] = s.execs_open, d["execs_idle"] = s.execs_idle;
        d["set_device_calls"] = s.set_device_calls, d["invalid_frees"] = s.invalid_frees;
        d["host_raw_allocs"] = s.host_raw_allocs, d["host_raw_frees"] = s.host_raw_frees;
        d["host_reserved_bytes"] = s.host_reserved_bytes, d["host_cached_bytes"] = s.host_cached_bytes;
        return d;
      },
      py::arg("backend"),
      "Counters of a device backend's caching allocator (cuda, cpu:devsim; zeros on host backends): raw_allocs / "
      "raw_frees (cudaMalloc / cudaFree calls), reserved / live / cached bytes and their peaks, cache_hits, "
      "queues_created (streams), execs_open / execs_idle, set_device_calls; host_raw_allocs / host_raw_frees / "
      "host_reserved_bytes / host_cached_bytes: the pinned host staging of activation offload (cudaHostAlloc).");
  m.def(
      "reset_peak_memory", [](const std::string& backend) { get_backend(backend).reset_peak_memory(); },
      py::arg("backend"), "Set the peak_* counters of device_stats to the current values.");
  m.def(
      "release_cached_memory", [](const std::string& backend) { get_backend(backend).release_cached_memory(); },
      py::arg("backend"), "Give the device memory cached for reuse back to the driver (like torch.cuda.empty_cache).");
}

}  // namespace qlora::py_bind
