// The CUDA side of the caching allocator (cpp/src/device_pool.hpp): cudaMalloc / cudaFree (never
// managed memory) and one stream per queue, for the pool's arenas. Host code.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

#include "device_pool.hpp"

namespace qlora::cuda {

// A queue of the pool: a stream, and the event that orders it after the backend's default stream
// when its Exec is bound (weights and adapters are uploaded on the default stream).
struct CudaQueue {
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;
};

class CudaRaw final : public RawDevice {
 public:
  explicit CudaRaw(int device) : device_(device) {}
  // Makes device_ current for the calling thread: cudaGetDevice (a thread-local read in the runtime),
  // and cudaSetDevice only when it differs (counted; zero per op in a steady state).
  void ensure_device(const char* op);
  bool ensure_device_noexcept() noexcept;
  int64_t set_device_calls() const { return set_device_calls_.load(std::memory_order_relaxed); }

  void* raw_alloc(size_t bytes) override;
  bool raw_free(void* p) noexcept override;
  void* new_queue() override;  // a CudaQueue*
  void destroy_queue(void* q) noexcept override;
  void sync_queue(void* q) override;
  void sync_device() override;

 private:
  int device_;
  std::atomic<int64_t> set_device_calls_{0};
};

}  // namespace qlora::cuda
