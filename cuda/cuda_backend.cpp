// The CUDA backend: qlora::Backend on one device and one stream. Host code only; kernels live in
// gemm.cu, nf4_gemm.cu, nf4_gemv.cu, nf4_dequant.cu. Every op validates its arguments (ValueError),
// checks that operand pointers are device memory (a host pointer would otherwise fault and poison
// the CUDA context for the rest of the process), then launches asynchronously on the stream.
#include <cuda_runtime_api.h>

#include <string>

#include "common/error.hpp"
#include "cuda_backend.hpp"
#include "cuda_check.hpp"
#include "gemm.cuh"
#include "nf4_dequant.cuh"
#include "nf4_gemm.cuh"
#include "nf4_gemv.cuh"

namespace qlora::cuda {

namespace {

// Throws ValueError unless p is memory the device can address (device, managed, or mapped host).
void require_device_ptr(const void* p, const char* op, const char* what) {
  check_arg(p != nullptr, std::string("cuda backend: ") + op + ": " + what + " is null");
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // an unknown pointer is not a sticky error; clear it
    throw ValueError(std::string("cuda backend: ") + op + ": " + what + " is not device memory");
  }
  const bool ok = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ||
                  (attr.type == cudaMemoryTypeHost && attr.devicePointer == p);
  check_arg(ok, std::string("cuda backend: ") + op + ": " + what +
                    " is not device memory (allocate with the backend and upload the data first)");
}

void check_gemm_args(const char* op, int64_t M, int64_t N, int64_t K, int64_t lda_min, int64_t lda, int64_t ldb_min,
                     int64_t ldb, int64_t ldc) {
  const std::string pre = std::string("cuda backend: ") + op + ": ";
  check_arg(M >= 0 && N >= 0 && K >= 0, pre + "negative dimension");
  check_arg(lda >= lda_min && ldb >= ldb_min && ldc >= N, pre + "leading dimension smaller than a row");
  check_arg(gemm_f32_fits(M, N), pre + "matrix too large for one launch");
}

void check_nf4(const char* op, const Nf4Ref& W) {
  const std::string pre = std::string("cuda backend: ") + op + ": ";
  check_arg(W.rows >= 1 && W.cols >= 1, pre + "NF4 weight shape must be positive");
  check_arg(W.blocksize >= 32 && W.blocksize <= 4096 && (W.blocksize & (W.blocksize - 1)) == 0,
            pre + "NF4 blocksize must be a power of two in [32, 4096]");
  require_device_ptr(W.packed, op, "NF4 packed");
  require_device_ptr(W.absmax, op, "NF4 absmax");
  if (W.double_quant) {
    require_device_ptr(W.nested_absmax, op, "NF4 nested_absmax");
    require_device_ptr(W.nested_map, op, "NF4 nested_map");
  }
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    QLORA_CUDA_CHECK(cudaSetDevice(device_), "init");
    QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_), "init");
    QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "init");
  }
  ~CudaBackend() override {
    // Errors ignored: this may run at process exit, after the runtime has begun to unload.
    if (cudaSetDevice(device_) == cudaSuccess) cudaStreamDestroy(stream_);
    cudaGetLastError();
  }

  std::string name() const override { return device_ == 0 ? "cuda" : "cuda:" + std::to_string(device_); }
  bool host_memory() const override { return false; }

  // ---- memory
  void* alloc(size_t bytes) override {
    use_device("alloc");
    void* p = nullptr;
    QLORA_CUDA_CHECK(cudaMalloc(&p, bytes), "alloc");
    return p;
  }
  void free(void* p) override {
    if (!p) return;
    use_device("free");
    QLORA_CUDA_CHECK(cudaFree(p), "free");  // implicitly waits for work using p
  }
  // Ordered on the stream. From pageable memory (numpy) the call returns once the source has been
  // staged, so the caller may reuse it; from pinned memory the caller must synchronize() first.
  void upload(void* dst, const void* src_host, size_t bytes) override {
    if (!bytes) return;
    use_device("upload");
    QLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyHostToDevice, stream_), "upload");
  }
  void download(void* dst_host, const void* src, size_t bytes) override {
    if (!bytes) return;
    use_device("download");
    QLORA_CUDA_CHECK(cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
    QLORA_CUDA_CHECK(cudaStreamSynchronize(stream_), "download");
  }
  void synchronize() override {
    use_device("synchronize");
    QLORA_CUDA_CHECK(cudaStreamSynchronize(stream_), "synchronize");
  }

  // ---- fp32 GEMM
  void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override {
    check_gemm_args("gemm_nt", M, N, K, K, lda, K, ldb, ldc);  // A[M,K], B[N,K]
    gemm(GemmLayout::NT, "gemm_nt", M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override {
    check_gemm_args("gemm_nn", M, N, K, K, lda, N, ldb, ldc);  // A[M,K], B[K,N]
    gemm(GemmLayout::NN, "gemm_nn", M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override {
    check_gemm_args("gemm_tn", M, N, K, M, lda, N, ldb, ldc);  // A[K,M], B[K,N]
    gemm(GemmLayout::TN, "gemm_tn", M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  // ---- NF4
  void nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                   int64_t ldy) override {
    check_gemm_args("nf4_gemm_nt", M, W.rows, W.cols, W.cols, ldx, 0, 0, ldy);  // X[M, cols] -> Y[M, rows]
    check_nf4("nf4_gemm_nt", W);
    if (M == 0) return;
    require_device_ptr(X, "nf4_gemm_nt", "X");
    require_device_ptr(Y, "nf4_gemm_nt", "Y");
    use_device("nf4_gemm_nt");
    if (M <= kNf4GemvMaxM)
      nf4_gemv_nt(stream_, M, alpha, X, ldx, W, beta, Y, ldy);
    else
      nf4_gemm_nt_tiled(stream_, sm_count_, M, alpha, X, ldx, W, beta, Y, ldy);
  }
  void nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                   int64_t lddx) override {
    check_gemm_args("nf4_gemm_nn", M, W.cols, W.rows, W.rows, lddy, 0, 0, lddx);  // dY[M, rows] -> dX[M, cols]
    check_nf4("nf4_gemm_nn", W);
    if (M == 0) return;
    require_device_ptr(dY, "nf4_gemm_nn", "dY");
    require_device_ptr(dX, "nf4_gemm_nn", "dX");
    use_device("nf4_gemm_nn");
    if (M <= kNf4GemvMaxM)
      nf4_gemv_nn(stream_, M, alpha, dY, lddy, W, beta, dX, lddx);
    else
      nf4_gemm_nn_tiled(stream_, sm_count_, M, alpha, dY, lddy, W, beta, dX, lddx);
  }
  void nf4_dequantize(const Nf4Ref& W, float* out) override {
    check_nf4("nf4_dequantize", W);
    require_device_ptr(out, "nf4_dequantize", "out");
    use_device("nf4_dequantize");
    cuda::nf4_dequantize(stream_, sm_count_, W, out);
  }

 private:
  // The current device is per host thread: set it before every call that allocates or launches.
  void use_device(const char* op) const { QLORA_CUDA_CHECK(cudaSetDevice(device_), op); }

  void gemm(GemmLayout layout, const char* op, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
            int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    if (K > 0) {
      require_device_ptr(A, op, "A");
      require_device_ptr(B, op, "B");
    }
    require_device_ptr(C, op, "C");
    use_device(op);
    gemm_f32(stream_, sm_count_, layout, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  int device_;
  int sm_count_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace

std::unique_ptr<Backend> make_backend(int device) {
  const int n = device_count();
  check_arg(n > 0, "backend 'cuda' unavailable: " + device_summary());
  check_arg(device >= 0 && device < n, "cuda device " + std::to_string(device) + " does not exist (" +
                                           std::to_string(n) + " visible)");
  return std::make_unique<CudaBackend>(device);
}

}  // namespace qlora::cuda
