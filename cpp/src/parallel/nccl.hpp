// NCCL for GPU data-parallel training (issue 16): one all-reduce of the adapter's contiguous
// gradient buffer per step, on the device (llm.c's scheme: rank 0 makes the unique id, MPI
// broadcasts it, every rank joins with ncclCommInitRank). NCCL is optional and loaded only when
// asked for: the module never links libnccl; nccl_load dlopens libnccl.so.2 at first use and takes
// typed pointers (decltype of nccl.h's own declarations) to the few functions used. The header
// comes from the nvidia-nccl-cu13 wheel or the system at build time (CMake option QLORA_NCCL).
// Implemented in cuda/nccl_comm.cpp; without NCCL support compiled in (nccl_none.cpp) every call
// but nccl_compiled() throws NcclUnavailable saying so.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora {
class Backend;
}

namespace qlora::dist {

// NCCL cannot be used here: not compiled in, or libnccl could not be loaded (the message names every
// path tried, why each failed, and how to install it). Python: ImportError.
struct NcclUnavailable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What the error message tells the user to install.
constexpr const char* kNcclInstall = "pip install nvidia-nccl-cu13 (or the system's NCCL package, e.g. libnccl2)";

bool nccl_compiled();  // built with nccl.h (QLORA_NCCL)

struct NcclLibrary {
  std::string path;  // what was dlopen'ed (a path, or the soname the system loader resolved)
  int version = 0;   // ncclGetVersion: major*10000 + minor*100 + patch
};
// Loads libnccl once per process: tries `candidates` in order (paths, or a bare soname for the system
// loader path); empty: $QLORA_NCCL_LIBRARY when set (then only it), else libnccl.so.2. A candidate
// must export every function used and be version 2.14 or newer (non-blocking communicators).
// Later calls return the library loaded first. NcclUnavailable when none loads.
NcclLibrary nccl_load(const std::vector<std::string>& candidates = {});
bool nccl_loaded();

// ncclGetUniqueId's bytes (NCCL_UNIQUE_ID_BYTES): made by rank 0, broadcast to the others (MPI).
std::string nccl_unique_id();
size_t nccl_unique_id_bytes();

// One rank's communicator on the GPU of a CUDA backend. Non-blocking NCCL underneath: every wait
// polls ncclCommGetAsyncError, so a failed peer or network raises (std::runtime_error naming
// ncclGetErrorString and ncclGetLastError) instead of hanging, and a wait longer than timeout_s
// (<= 0: none) aborts the communicator and raises. After an error the communicator is aborted and
// every later call raises.
class NcclComm {
 public:
  // Joins communicator `unique_id` as `rank` of `size` on be's device; returns once every rank has
  // joined. ValueError: be is not a CUDA backend, a bad rank / size / id length.
  NcclComm(Backend& be, const std::string& unique_id, int rank, int size, double timeout_s);
  ~NcclComm();  // aborts a communicator not closed (never blocks: a peer may be gone)
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // g[n] (device memory of the backend) = the sum of every rank's g[n], in place, on the calling
  // thread's stream of the backend (ordered after the work that produced g); returns when done.
  void all_reduce_sum(float* g, int64_t n);
  // Flushes and frees the communicator (ncclCommFinalize + ncclCommDestroy); idempotent.
  void close();
  // Frees it without waiting for peers (ncclCommAbort); idempotent.
  void abort() noexcept;

  Backend& backend() const { return be_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  bool open() const;
  // Gradient all-reduces so far: calls, bytes, seconds (enqueue to completion).
  int64_t calls = 0, bytes = 0;
  double seconds = 0.0;

  struct State;  // the ncclComm_t (cuda/nccl_comm.cpp)

 private:
  Backend& be_;
  int rank_, size_, device_ = -1;
  double timeout_s_;
  std::unique_ptr<State> st_;
};

}  // namespace qlora::dist
