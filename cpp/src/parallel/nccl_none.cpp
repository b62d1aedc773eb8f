// parallel/nccl.hpp without NCCL support compiled in (no CUDA, or QLORA_NCCL=OFF / no nccl.h at build
// time): every call says so. With it, cuda/nccl_comm.cpp implements the interface.
#include "parallel/nccl.hpp"

#ifndef QLORA_HAVE_NCCL

namespace qlora::dist {

namespace {
[[noreturn]] void not_compiled() {
  throw NcclUnavailable(
      "NCCL support is not compiled into qlora_native (it needs the CUDA backend and nccl.h at build time: "
      "install nvidia-nccl-cu13 and rebuild with CUDA, CMake option QLORA_NCCL=ON)");
}
}  // namespace

bool nccl_compiled() { return false; }
NcclLibrary nccl_load(const std::vector<std::string>&) { not_compiled(); }
bool nccl_loaded() { return false; }
std::string nccl_unique_id() { not_compiled(); }
size_t nccl_unique_id_bytes() { return 128; }

struct NcclComm::State {};
NcclComm::NcclComm(Backend& be, const std::string&, int rank, int size, double timeout_s)
    : be_(be), rank_(rank), size_(size), timeout_s_(timeout_s) {
  not_compiled();
}
NcclComm::~NcclComm() = default;
void NcclComm::all_reduce_sum(float*, int64_t) { not_compiled(); }
void NcclComm::close() {}
void NcclComm::abort() noexcept {}
bool NcclComm::open() const { return false; }

}  // namespace qlora::dist

#endif  // QLORA_HAVE_NCCL
