// The backend interface: every op the model runs, for every device. Model code calls these and
// never branches on the backend. Buffers are row-major fp32 with explicit leading dimensions;
// pointers live in the backend's memory (host for CPU, device for CUDA).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensor_types.hpp"

namespace qlora {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // True when buffers are ordinary host memory (then callers may pass numpy data directly).
  virtual bool host_memory() const = 0;

  // ---- memory
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* p) = 0;
  virtual void upload(void* dst, const void* src_host, size_t bytes) = 0;
  virtual void download(void* dst_host, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;

  // ---- fp32 GEMM, C = alpha * op(A) · op(B) + beta * C (beta = 0: C is not read, may be garbage)
  // gemm_nt: A[M,K] · B[N,K]ᵀ  (activations × an [out, in] weight: Y = X·Wᵀ)
  virtual void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                       const float* B, int64_t ldb, float beta, float* C, int64_t ldc) = 0;
  // gemm_nn: A[M,K] · B[K,N]    (dX = dY·W)
  virtual void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                       const float* B, int64_t ldb, float beta, float* C, int64_t ldc) = 0;
  // gemm_tn: A[K,M]ᵀ · B[K,N]   (weight gradients G = Aᵀ·B, K = tokens)
  virtual void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                       const float* B, int64_t ldb, float beta, float* C, int64_t ldc) = 0;

  // ---- NF4 (dequantization fused into the kernel; W is never materialized in fp32)
  // Y[M, W.rows] = alpha * X[M, W.cols] · deq(W)ᵀ + beta * Y
  virtual void nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W,
                           float beta, float* Y, int64_t ldy) = 0;
  // dX[M, W.cols] = alpha * dY[M, W.rows] · deq(W) + beta * dX
  virtual void nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W,
                           float beta, float* dX, int64_t lddx) = 0;
  // out[W.rows * W.cols] = deq(W) (tests, merging, export)
  virtual void nf4_dequantize(const Nf4Ref& W, float* out) = 0;
};

// Backends by name: "cpu" (best SIMD level, or the one set active), "cpu:scalar" (reference),
// "cpu:generic", "cpu:avx2", "cpu:avx512", "cuda" / "cuda:N". Throws ValueError naming the
// reason when unavailable (unknown name, level unsupported by this CPU, no CUDA build, no GPU).
Backend& get_backend(const std::string& name);
// Names of every backend usable on this machine, e.g. {"cpu:scalar", "cpu:generic", "cpu:avx2", "cuda"}.
std::vector<std::string> available_backends();

// CUDA status for `qlora-native info`.
bool cuda_compiled();
int cuda_device_count();          // 0 when not compiled, no driver or no GPU
std::string cuda_device_summary();  // e.g. "NVIDIA H200 (sm_90, 139 GiB)" or the reason there is none

}  // namespace qlora
