// parallel/nccl.hpp with NCCL: libnccl.so.2 is dlopen'ed at first use (never linked, so the module
// imports and runs without it) and called through pointers typed by nccl.h's own declarations.
// Communicators are non-blocking (ncclConfig_t.blocking = 0): every wait is a poll of
// ncclCommGetAsyncError (and of the stream), so a peer that fails surfaces as an error and a
// timeout can abort instead of hanging in a blocking NCCL call. Compiled only with QLORA_NCCL.
#ifdef QLORA_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend.hpp"
#include "common/error.hpp"
#include "cuda_backend.hpp"
#include "cuda_check.hpp"
#include "parallel/nccl.hpp"

namespace qlora::dist {

namespace {

// The functions used, typed from nccl.h (a prototype change there is a compile error here).
struct Api {
  decltype(&ncclGetVersion) GetVersion = nullptr;
  decltype(&ncclGetUniqueId) GetUniqueId = nullptr;
  decltype(&ncclCommInitRankConfig) CommInitRankConfig = nullptr;
  decltype(&ncclAllReduce) AllReduce = nullptr;
  decltype(&ncclCommGetAsyncError) CommGetAsyncError = nullptr;
  decltype(&ncclCommFinalize) CommFinalize = nullptr;
  decltype(&ncclCommDestroy) CommDestroy = nullptr;
  decltype(&ncclCommAbort) CommAbort = nullptr;
  decltype(&ncclGetErrorString) GetErrorString = nullptr;
  decltype(&ncclGetLastError) GetLastError = nullptr;
};

constexpr int kMinVersion = 21400;  // 2.14: non-blocking communicators, ncclCommFinalize

std::mutex g_mu;
Api g_api;
NcclLibrary g_lib;
bool g_loaded = false;

template <class F>
bool sym(void* h, const char* name, F& out, std::string& missing) {
  dlerror();
  out = reinterpret_cast<F>(dlsym(h, name));
  if (!out) missing += (missing.empty() ? "" : ", ") + std::string(name);
  return out != nullptr;
}

// Loads one candidate into `api` or says why not.
bool try_load(const std::string& path, Api& api, int& version, std::string& why) {
  dlerror();
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    why = e ? e : "dlopen failed";
    return false;
  }
  Api a;
  std::string missing;
  sym(h, "ncclGetVersion", a.GetVersion, missing);
  sym(h, "ncclGetUniqueId", a.GetUniqueId, missing);
  sym(h, "ncclCommInitRankConfig", a.CommInitRankConfig, missing);
  sym(h, "ncclAllReduce", a.AllReduce, missing);
  sym(h, "ncclCommGetAsyncError", a.CommGetAsyncError, missing);
  sym(h, "ncclCommFinalize", a.CommFinalize, missing);
  sym(h, "ncclCommDestroy", a.CommDestroy, missing);
  sym(h, "ncclCommAbort", a.CommAbort, missing);
  sym(h, "ncclGetErrorString", a.GetErrorString, missing);
  sym(h, "ncclGetLastError", a.GetLastError, missing);
  if (!missing.empty()) {
    why = "not an NCCL 2.14+ library (missing " + missing + ")";
    dlclose(h);
    return false;
  }
  int v = 0;
  if (a.GetVersion(&v) != ncclSuccess || v < kMinVersion || v / 10000 != NCCL_MAJOR) {
    why = "NCCL version " + std::to_string(v) + " is not supported (need 2.14 or newer within major version " +
          std::to_string(NCCL_MAJOR) + ")";
    dlclose(h);
    return false;
  }
  // Kept loaded for the process (NCCL runs threads of its own; never dlclose'd once in use).
  api = a, version = v;
  return true;
}

const Api& api() {
  nccl_load();
  return g_api;
}

std::string nccl_message(ncclResult_t r, ncclComm_t comm) {
  const Api& a = g_api;
  std::string s = a.GetErrorString ? a.GetErrorString(r) : ("NCCL error " + std::to_string(static_cast<int>(r)));
  const char* last = a.GetLastError ? a.GetLastError(comm) : nullptr;
  if (last && *last) s += ": " + std::string(last);
  return s;
}

[[noreturn]] void throw_nccl(const char* what, ncclResult_t r, ncclComm_t comm) {
  throw std::runtime_error(std::string("NCCL ") + what + " failed: " + nccl_message(r, comm));
}

using Clock = std::chrono::steady_clock;

}  // namespace

bool nccl_compiled() { return true; }

NcclLibrary nccl_load(const std::vector<std::string>& candidates) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_loaded) return g_lib;
  std::vector<std::string> tries = candidates;
  if (tries.empty()) {
    const char* env = std::getenv("QLORA_NCCL_LIBRARY");
    tries.push_back(env && *env ? env : "libnccl.so.2");
  }
  std::string why_all;
  for (const std::string& path : tries) {
    Api a;
    int v = 0;
    std::string why;
    if (try_load(path, a, v, why)) {
      g_api = a, g_lib = {path, v}, g_loaded = true;
      return g_lib;
    }
    why_all += "\n  " + path + ": " + why;
  }
  throw NcclUnavailable(std::string("NCCL (libnccl.so.2) could not be loaded; GPU data-parallel training needs it. "
                                    "Install it with: ") +
                        kNcclInstall + ", or set QLORA_NCCL_LIBRARY to the library's path. Tried:" + why_all);
}

bool nccl_loaded() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_loaded;
}

size_t nccl_unique_id_bytes() { return sizeof(ncclUniqueId); }

std::string nccl_unique_id() {
  const Api& a = api();
  ncclUniqueId id;
  const ncclResult_t r = a.GetUniqueId(&id);
  if (r != ncclSuccess) throw_nccl("ncclGetUniqueId", r, nullptr);
  return std::string(id.internal, sizeof(id.internal));
}

struct NcclComm::State {
  ncclComm_t comm = nullptr;
  bool broken = false;  // aborted after an error or a timeout: every later call raises
};

namespace {

// Polls the communicator until its pending operation (init, enqueue, finalize) is no longer in
// progress and, when `stream` is given, until the stream's work is done too. An NCCL error or the
// timeout aborts the communicator and raises.
void wait_comm(const Api& a, NcclComm::State& st, cudaStream_t stream, bool wait_stream, double timeout_s,
               const char* what, int rank, int size) {
  const Clock::time_point t0 = Clock::now();
  int spins = 0;
  for (;;) {
    ncclResult_t async = ncclSuccess;
    ncclResult_t r = a.CommGetAsyncError(st.comm, &async);
    if (r == ncclSuccess) r = async;
    if (r != ncclSuccess && r != ncclInProgress) {
      const std::string msg = nccl_message(r, st.comm);
      a.CommAbort(st.comm);
      st.comm = nullptr, st.broken = true;
      throw std::runtime_error(std::string("NCCL ") + what + " failed on rank " + std::to_string(rank) + " of " +
                               std::to_string(size) + ": " + msg + " (the communicator is aborted)");
    }
    if (r == ncclSuccess) {
      if (!wait_stream) return;
      const cudaError_t q = cudaStreamQuery(stream);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) {
        a.CommAbort(st.comm);
        st.comm = nullptr, st.broken = true;
        cuda::throw_cuda_error(q, what, "cudaStreamQuery");
      }
    }
    const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
    if (timeout_s > 0 && waited > timeout_s) {
      a.CommAbort(st.comm);
      st.comm = nullptr, st.broken = true;
      throw std::runtime_error(std::string("NCCL ") + what + " on rank " + std::to_string(rank) + " of " +
                               std::to_string(size) + " did not finish in " + std::to_string(timeout_s) +
                               " s (a peer rank is gone or stuck; QLORA_NCCL_TIMEOUT sets the limit): the "
                               "communicator is aborted");
    }
    // Spin briefly (an all-reduce of a few MB takes microseconds to milliseconds), then back off.
    if (++spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(spins > 20000 ? 1000 : 50));
  }
}

}  // namespace

NcclComm::NcclComm(Backend& be, const std::string& unique_id, int rank, int size, double timeout_s)
    : be_(be), rank_(rank), size_(size), timeout_s_(timeout_s), st_(std::make_unique<State>()) {
  device_ = cuda::device_of(be);
  check_arg(device_ >= 0, "NCCL communicator: backend '" + be.name() + "' is not a CUDA backend");
  check_arg(size >= 1 && rank >= 0 && rank < size,
            "NCCL communicator: rank " + std::to_string(rank) + " out of range for size " + std::to_string(size));
  check_arg(unique_id.size() == sizeof(ncclUniqueId),
            "NCCL communicator: the unique id must be " + std::to_string(sizeof(ncclUniqueId)) + " bytes, got " +
                std::to_string(unique_id.size()));
  check_arg(!(timeout_s < 0) && timeout_s == timeout_s, "NCCL communicator: timeout must be >= 0 (0: none)");
  const Api& a = api();
  cuda::current_stream(be);  // makes the backend's device current: NCCL binds the communicator to it
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  const ncclResult_t r = a.CommInitRankConfig(&st_->comm, size, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    const std::string msg = nccl_message(r, st_->comm);
    if (st_->comm) a.CommAbort(st_->comm);
    st_->comm = nullptr;
    throw std::runtime_error("NCCL ncclCommInitRankConfig failed on rank " + std::to_string(rank) + " of " +
                             std::to_string(size) + ": " + msg);
  }
  wait_comm(a, *st_, nullptr, false, timeout_s_, "communicator init", rank_, size_);
}

NcclComm::~NcclComm() { abort(); }

bool NcclComm::open() const { return st_ && st_->comm != nullptr; }

void NcclComm::all_reduce_sum(float* g, int64_t n) {
  if (!st_->comm)
    throw std::runtime_error(st_->broken ? "NCCL communicator was aborted after an error" : "NCCL communicator is closed");
  check_arg(n >= 0, "NCCL all-reduce: negative element count");
  if (n == 0) return;
  check_arg(g != nullptr, "NCCL all-reduce: null buffer");
  const Api& a = g_api;
  const Clock::time_point t0 = Clock::now();
  cudaStream_t s = cuda::current_stream(be_);
  const ncclResult_t r = a.AllReduce(g, g, static_cast<size_t>(n), ncclFloat32, ncclSum, st_->comm, s);
  if (r != ncclSuccess && r != ncclInProgress) {
    const std::string msg = nccl_message(r, st_->comm);
    a.CommAbort(st_->comm);
    st_->comm = nullptr, st_->broken = true;
    throw std::runtime_error("NCCL ncclAllReduce failed on rank " + std::to_string(rank_) + ": " + msg);
  }
  wait_comm(a, *st_, s, true, timeout_s_, "all-reduce", rank_, size_);
  ++calls, bytes += n * static_cast<int64_t>(sizeof(float));
  seconds += std::chrono::duration<double>(Clock::now() - t0).count();
}

void NcclComm::close() {
  if (!st_->comm) return;
  const Api& a = g_api;
  cuda::current_stream(be_);
  const ncclResult_t r = a.CommFinalize(st_->comm);
  if (r != ncclSuccess && r != ncclInProgress) {
    const std::string msg = nccl_message(r, st_->comm);
    abort();
    throw std::runtime_error("NCCL ncclCommFinalize failed: " + msg);
  }
  wait_comm(a, *st_, nullptr, false, timeout_s_, "finalize", rank_, size_);
  a.CommDestroy(st_->comm);
  st_->comm = nullptr;
}

void NcclComm::abort() noexcept {
  if (!st_ || !st_->comm) return;
  g_api.CommAbort(st_->comm);
  st_->comm = nullptr;
}

}  // namespace qlora::dist

#endif  // QLORA_HAVE_NCCL
