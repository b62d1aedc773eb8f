#include "cuda_memory.hpp"

#include <memory>

#include "cuda_check.hpp"

namespace qlora::cuda {

void CudaRaw::ensure_device(const char* op) {
  int cur = -1;
  const cudaError_t e = cudaGetDevice(&cur);
  if (e == cudaSuccess && cur == device_) return;
  if (e != cudaSuccess) cudaGetLastError();  // cleared: launch checks read the last error
  set_device_calls_.fetch_add(1, std::memory_order_relaxed);
  QLORA_CUDA_CHECK(cudaSetDevice(device_), op);
}

bool CudaRaw::ensure_device_noexcept() noexcept {
  try {
    ensure_device("free");
    return true;
  } catch (...) {
    return false;
  }
}

void* CudaRaw::raw_alloc(size_t bytes) {
  ensure_device("alloc");
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e == cudaSuccess) return p;
  cudaGetLastError();  // out of memory is not sticky: clear it so a later launch check does not report it
  if (e == cudaErrorMemoryAllocation) return nullptr;
  throw_cuda_error(e, "alloc", "cudaMalloc");
}

bool CudaRaw::raw_free(void* p) noexcept {
  if (!ensure_device_noexcept()) return false;
  if (cudaFree(p) == cudaSuccess) return true;
  cudaGetLastError();
  return false;
}

void* CudaRaw::new_queue() {
  ensure_device("new_exec");
  auto q = std::make_unique<CudaQueue>();
  QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&q->stream, cudaStreamNonBlocking), "new_exec");
  const cudaError_t e = cudaEventCreateWithFlags(&q->ready, cudaEventDisableTiming);
  if (e != cudaSuccess) {
    cudaStreamDestroy(q->stream);
    cudaGetLastError();
    throw_cuda_error(e, "new_exec", "cudaEventCreateWithFlags(&q->ready, cudaEventDisableTiming)");
  }
  return q.release();
}

void CudaRaw::destroy_queue(void* q) noexcept {
  auto* c = static_cast<CudaQueue*>(q);
  if (!c) return;
  if (ensure_device_noexcept()) {  // errors ignored: this may run at exit, after the runtime began to unload
    cudaEventDestroy(c->ready);
    cudaStreamDestroy(c->stream);
    cudaGetLastError();
  }
  delete c;
}

void CudaRaw::sync_queue(void* q) {
  QLORA_CUDA_CHECK(cudaStreamSynchronize(static_cast<CudaQueue*>(q)->stream), "synchronize");
}

void CudaRaw::sync_device() {
  ensure_device("synchronize");
  QLORA_CUDA_CHECK(cudaDeviceSynchronize(), "synchronize");
}

}  // namespace qlora::cuda
