// qlora_native._core.nccl: the NCCL communicator of GPU data-parallel training (parallel/nccl.hpp).
// qlora_native.distributed bootstraps it over MPI; Model.train_step hands a comm whose `nccl`
// attribute is a Comm to lora_train_step (bind_lora.cpp), which all-reduces the gradient buffer
// on the device through it without the GIL. NcclUnavailable -> ImportError.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <vector>

#include "backend.hpp"
#include "bindings.hpp"
#include "fs_path.hpp"
#include "common/error.hpp"
#include "parallel/nccl.hpp"

namespace qlora::py_bind {

void bind_nccl(py::module_& m) {
  auto n = m.def_submodule("nccl", "NCCL for GPU data-parallel training, loaded at first use (dlopen)");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const dist::NcclUnavailable& e) {
      set_error_fs(PyExc_ImportError, e.what());  // may name a library path
    }
  });
  n.attr("INSTALL") = dist::kNcclInstall;
  n.def("compiled", &dist::nccl_compiled, "True when built with nccl.h (CMake QLORA_NCCL)");
  n.def("loaded", &dist::nccl_loaded, "True once libnccl is loaded in this process");
  n.def(
      "load",
      [](const std::vector<FsPath>& paths) {
        const std::vector<std::string> candidates(paths.begin(), paths.end());
        dist::NcclLibrary lib;
        {
          py::gil_scoped_release nogil;
          lib = dist::nccl_load(candidates);
        }
        return py::make_tuple(fs_text(lib.path), lib.version);  // the path as os.fsdecode gives it
      },
      py::arg("candidates") = std::vector<FsPath>{},
      "Load libnccl (first call): the first of `candidates` (paths or a soname) that loads; empty: "
      "$QLORA_NCCL_LIBRARY, else libnccl.so.2. Returns (path, version); ImportError naming every try.");
  n.def("unique_id", [] { return py::bytes(dist::nccl_unique_id()); }, "ncclGetUniqueId's bytes (rank 0)");
  n.def("unique_id_bytes", &dist::nccl_unique_id_bytes);

  py::class_<dist::NcclComm>(n, "Comm",
                             "One rank's NCCL communicator on a CUDA backend's GPU (non-blocking NCCL, errors "
                             "and timeouts raise instead of hanging)")
      .def(py::init([](const std::string& backend, const py::bytes& unique_id, int rank, int size, double timeout) {
             Backend& be = get_backend(backend);
             std::string id = unique_id;
             py::gil_scoped_release nogil;  // waits for every rank to join
             return std::make_unique<dist::NcclComm>(be, id, rank, size, timeout);
           }),
           py::arg("backend"), py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("timeout") = 0.0)
      .def(
          "all_reduce_host",
          [](dist::NcclComm& c, const py::array_t<float, py::array::c_style | py::array::forcecast>& x) {
            // Test helper: upload, all-reduce-sum on the device, download (the training step reduces
            // the adapter's gradient buffer in place instead).
            py::array_t<float> out(x.size());
            const size_t bytes = sizeof(float) * static_cast<size_t>(x.size());
            Backend& be = c.backend();
            std::vector<float> host(x.data(), x.data() + x.size());
            {
              py::gil_scoped_release nogil;
              float* d = static_cast<float*>(be.alloc(bytes ? bytes : 4));
              try {
                be.upload(d, host.data(), bytes);
                c.all_reduce_sum(d, static_cast<int64_t>(host.size()));
                be.download(host.data(), d, bytes);
                be.synchronize();
              } catch (...) {
                be.free(d);
                throw;
              }
              be.free(d);
            }
            std::copy(host.begin(), host.end(), out.mutable_data());
            return out.reshape(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
          },
          py::arg("x"))
      .def("close", [](dist::NcclComm& c) {
        py::gil_scoped_release nogil;
        c.close();
      })
      .def("abort", &dist::NcclComm::abort)
      .def_property_readonly("open", &dist::NcclComm::open)
      .def_property_readonly("rank", &dist::NcclComm::rank)
      .def_property_readonly("size", &dist::NcclComm::size)
      .def_property_readonly("device", &dist::NcclComm::device)
      .def_property_readonly("backend", [](const dist::NcclComm& c) { return c.backend().name(); })
      .def_readonly("calls", &dist::NcclComm::calls)
      .def_readonly("bytes", &dist::NcclComm::bytes)
      .def_readonly("seconds", &dist::NcclComm::seconds);
}

}  // namespace qlora::py_bind
