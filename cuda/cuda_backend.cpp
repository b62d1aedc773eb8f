// The CUDA backend: qlora::Backend on one device. Host code only; kernels live in cuda/*.cu. Every
// op validates its arguments (ValueError), then launches asynchronously on the calling thread's
// stream: the stream of the Exec an ExecScope binds (a generation context's own), else the
// backend's default stream. Memory comes from the caching pool (device_pool.hpp, cuda_memory.hpp):
// no cudaMalloc / cudaFree, cudaPointerGetAttributes or cudaSetDevice per op in a steady state
// (operand pointers are the backend's own allocations; only null is checked).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <initializer_list>
#include <mutex>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "cuda_backend.hpp"
#include "cuda_check.hpp"
#include "cuda_memory.hpp"
#include "device_pool.hpp"
#include "devsim_backend.hpp"
#include "gemm.cuh"
#include "gemm_tc.cuh"
#include "nf4_dequant.cuh"
#include "nf4_gemm.cuh"
#include "nf4_gemv.cuh"
#include "ops_adamw.cuh"
#include "ops_add_bias.cuh"
#include "ops_add_inplace.cuh"
#include "ops_attention.cuh"
#include "ops_attention_train.cuh"
#include "ops_attention_train_backward.cuh"
#include "ops_cross_entropy.cuh"
#include "ops_embedding.cuh"
#include "ops_grad_norm.cuh"
#include "ops_half_gemm.cuh"
#include "ops_half_rows.cuh"
#include "ops_kv_write.cuh"
#include "ops_lora_sgmv.cuh"
#include "ops_lora_dropout.cuh"
#include "ops_q8_0_gemm.cuh"
#include "ops_q8_0_rows.cuh"
#include "ops_rmsnorm.cuh"
#include "ops_rmsnorm_backward.cuh"
#include "ops_rope.cuh"
#include "ops_sample.cuh"
#include "ops_swiglu.cuh"
#include "ops_swiglu_backward.cuh"

namespace qlora::cuda {

namespace {

// Operands are allocations of this backend (the model and the bindings upload host data first), so
// only null is checked: no cudaPointerGetAttributes per op.
void require_device_ptr(const void* p, const char* op, const char* what) {
  if (!p) throw ValueError(std::string("cuda backend: ") + op + ": " + what + " is null");
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

// The optional ops (Backend::all_ops beyond the core) that have CUDA kernels: the table lives
// in devsim_backend.cpp, shared with the cpu:devsim test backend that mirrors it.
const std::vector<std::string>& cuda_optional_ops() { return cuda_kernel_ops(); }

// Transformer-op argument checks: dimensions non-negative, row strides at least a row.
void check_dims(const char* op, std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) check_arg(d >= 0, std::string("cuda backend: ") + op + ": negative dimension");
}
void check_ld(const char* op, int64_t ld, int64_t row) {
  check_arg(ld >= row, std::string("cuda backend: ") + op + ": leading dimension smaller than a row");
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    QLORA_CUDA_CHECK(cudaSetDevice(device_), "init");
    QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_), "init");
    QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major_, cudaDevAttrComputeCapabilityMajor, device_), "init");
    size_t free_b = 0, total_b = 0;
    QLORA_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b), "init");
    total_mem_ = static_cast<int64_t>(total_b);
    default_q_ = static_cast<CudaQueue*>(raw_.new_queue());
    pool_ = std::make_unique<DevicePool>(raw_, default_q_);
  }
  ~CudaBackend() override {
    // Errors ignored (by the pool and the queue): this may run at process exit, after the runtime
    // has begun to unload.
    pool_.reset();
    host_.release_cached();
    if (off_.copy) {
      if (cudaStreamDestroy(off_.copy) != cudaSuccess) cudaGetLastError();
      if (cudaEventDestroy(off_.ready) != cudaSuccess) cudaGetLastError();
      if (cudaEventDestroy(off_.done) != cudaSuccess) cudaGetLastError();
    }
    raw_.destroy_queue(default_q_);
  }

  std::string name() const override { return device_ == 0 ? "cuda" : "cuda:" + std::to_string(device_); }
  bool host_memory() const override { return false; }
  int device() const { return device_; }
  // cuda::current_stream: the calling thread's stream, its device made current.
  cudaStream_t stream_for_library() {
    use_device("stream");
    return stream();
  }
  int64_t memory_bytes() const override { return total_mem_; }
  std::string memory_name() const override { return "the memory of GPU " + std::to_string(device_); }
  bool supports_op(const std::string& op) const override {
    const std::vector<std::string>& o = cuda_optional_ops();
    return is_core_op(op) || std::find(o.begin(), o.end(), op) != o.end();
  }

  // ---- memory: the calling thread's arena of the caching pool (cudaMalloc only on a miss). A freed
  // block is reused only by its arena's stream, after the work queued on it before the free.
  void* alloc(size_t bytes) override { return pool_->alloc(current_arena(*this, *pool_), bytes); }
  void free(void* p) override { pool_->free(p); }
  std::unique_ptr<Exec> new_exec() override { return std::make_unique<PoolExec>(*this, *pool_); }
  DeviceStats device_stats() const override {
    DeviceStats s = pool_->stats();
    s.set_device_calls = raw_.set_device_calls();
    host_.add_stats(s);
    return s;
  }
  void reset_peak_memory() override { pool_->reset_peak(); }
  void release_cached_memory() override {
    pool_->release_cached();
    host_.release_cached();
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
  // Activation offload (LlamaModel::set_offload_checkpoints). Staging: pinned host memory from a
  // HostStagingPool (cudaHostAlloc only on a miss: it is slow and synchronizes the device; a training
  // step in steady state makes none). Copies: the device-to-host copies run on a copy stream of
  // their own, so layer l's offload overlaps layer l's compute; ordered by events, the host never
  // waits:
  //  - offload: the compute stream first waits for the previous offload (its source may be
  //    overwritten by work queued after this call: the Backend contract), then the copy stream
  //    waits for the compute queued so far (the source is written) and copies; its end is recorded;
  //  - reload: the compute stream waits for the last offload (the host data it reads, and a device
  //    buffer an offload may still be reading), then copies on the compute stream (the next op reads
  //    dst; with no spare device buffer to prefetch into, there is nothing to overlap);
  //  - synchronize: the compute stream and the copy stream.
  void* host_alloc(size_t bytes) override {
    use_device("host_alloc");
    return host_.alloc(bytes);
  }
  void host_free(void* p) override { host_.free(p); }  // back to the pool: never throws
  void offload(void* dst_host, const void* src, size_t bytes) override {
    if (!bytes) return;
    use_device("offload");
    std::lock_guard<std::mutex> lk(off_mu_);
    if (!off_.copy) {  // once per backend
      QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&off_.copy, cudaStreamNonBlocking), "offload");
      QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&off_.ready, cudaEventDisableTiming), "offload");
      QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&off_.done, cudaEventDisableTiming), "offload");
    }
    const cudaStream_t s = stream_;
    if (off_.pending) QLORA_CUDA_CHECK(cudaStreamWaitEvent(s, off_.done, 0), "offload");
    QLORA_CUDA_CHECK(cudaEventRecord(off_.ready, s), "offload");
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(off_.copy, off_.ready, 0), "offload");
    QLORA_CUDA_CHECK(cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDeviceToHost, off_.copy), "offload");
    QLORA_CUDA_CHECK(cudaEventRecord(off_.done, off_.copy), "offload");
    off_.pending = true;
  }
  void reload(void* dst, const void* src_host, size_t bytes) override {
    if (!bytes) return;
    use_device("reload");
    const cudaStream_t s = stream_;
    {
      std::lock_guard<std::mutex> lk(off_mu_);
      if (off_.pending) QLORA_CUDA_CHECK(cudaStreamWaitEvent(s, off_.done, 0), "reload");
    }
    QLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyHostToDevice, s), "reload");
  }
  void fill_zero(void* p, size_t bytes) override {
    if (!bytes) return;
    use_device("fill_zero");
    QLORA_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_), "fill_zero");
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (!bytes) return;
    use_device("copy");
    QLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
  }
  void synchronize() override {
    use_device("synchronize");
    QLORA_CUDA_CHECK(cudaStreamSynchronize(stream_), "synchronize");
    std::lock_guard<std::mutex> lk(off_mu_);
    if (off_.pending) {  // offloads queued on the copy stream: their host data is valid after this
      QLORA_CUDA_CHECK(cudaStreamSynchronize(off_.copy), "synchronize");
      off_.pending = false;
    }
  }

 protected:
  // Binding an Exec: its stream waits (on the device, the host does not block) for the work queued
  // on the default stream so far, the uploads of weights and adapters it reads.
  void exec_enter(Exec* e) override {
    use_device("exec");
    CudaQueue* q = queue_of(e);
    QLORA_CUDA_CHECK(cudaEventRecord(q->ready, default_q_->stream), "exec");
    QLORA_CUDA_CHECK(cudaStreamWaitEvent(q->stream, q->ready, 0), "exec");
  }
  // A pass that threw may have left work queued: wait for it, so the memory the unwinding frees
  // (and weights or adapters freed after it) are idle. Errors ignored: already unwinding.
  void exec_leave(Exec* e, bool failed) noexcept override {
    if (!failed) return;
    if (cudaStreamSynchronize(queue_of(e)->stream) != cudaSuccess) cudaGetLastError();
  }

 public:

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
  // ---- bf16 compute (gemm_tc.cu, nf4_gemm_tc.cu: mma.sync bf16 tensor cores, sm_80+); below
  // sm_80 has_bf16_compute() is false and these run the fp32 kernels (the Backend contract).
  bool has_bf16_compute() const override { return cc_major_ >= kTcMinMajor; }
  // bf16 is the default compute dtype where the tensor cores have it (bnb_4bit_compute_dtype=bf16).
  bool default_compute_bf16() const override { return has_bf16_compute(); }
  // The training loss's lm_head runs the ops alone (no panels; a Q8_0 table is widened by the model).
  LmHeadExtras lm_head_extras(const LmHeadCall&) const override { return {}; }
  void gemm_nt_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override {
    check_gemm_args("gemm_nt_bf16", M, N, K, K, lda, K, ldb, ldc);
    gemm_any(GemmLayout::NT, true, "gemm_nt_bf16", M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_nn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override {
    check_gemm_args("gemm_nn_bf16", M, N, K, K, lda, N, ldb, ldc);
    gemm_any(GemmLayout::NN, true, "gemm_nn_bf16", M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_tn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override {
    check_gemm_args("gemm_tn_bf16", M, N, K, M, lda, N, ldb, ldc);
    gemm_any(GemmLayout::TN, true, "gemm_tn_bf16", M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void nf4_gemm_nt_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                        int64_t ldy) override {
    if (!has_bf16_compute()) return nf4_gemm_nt(M, alpha, X, ldx, W, beta, Y, ldy);
    check_gemm_args("nf4_gemm_nt_bf16", M, W.rows, W.cols, W.cols, ldx, 0, 0, ldy);
    check_nf4("nf4_gemm_nt_bf16", W);
    if (M == 0) return;
    require_device_ptr(X, "nf4_gemm_nt_bf16", "X");
    require_device_ptr(Y, "nf4_gemm_nt_bf16", "Y");
    use_device("nf4_gemm_nt_bf16");
    nf4_gemm_nt_bf16_tc(stream_, sm_count_, M, alpha, X, ldx, W, beta, Y, ldy);  // every M: one rounding contract
  }
  void nf4_gemm_nn_bf16(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                        int64_t lddx) override {
    if (!has_bf16_compute()) return nf4_gemm_nn(M, alpha, dY, lddy, W, beta, dX, lddx);
    check_gemm_args("nf4_gemm_nn_bf16", M, W.cols, W.rows, W.rows, lddy, 0, 0, lddx);
    check_nf4("nf4_gemm_nn_bf16", W);
    if (M == 0) return;
    require_device_ptr(dY, "nf4_gemm_nn_bf16", "dY");
    require_device_ptr(dX, "nf4_gemm_nn_bf16", "dX");
    use_device("nf4_gemm_nn_bf16");
    nf4_gemm_nn_bf16_tc(stream_, sm_count_, M, alpha, dY, lddy, W, beta, dX, lddx);
  }

  void nf4_dequantize(const Nf4Ref& W, float* out) override {
    check_nf4("nf4_dequantize", W);
    require_device_ptr(out, "nf4_dequantize", "out");
    use_device("nf4_dequantize");
    cuda::nf4_dequantize(stream_, sm_count_, W, out);
  }

  // ---- transformer ops (ops_*.cu). Operands are device memory the model allocated through this
  // backend; only shapes are checked here (no per-op pointer queries on the decode path).
  void embedding(int64_t M, int64_t D, const float* table, const int32_t* ids, float* out) override {
    check_dims("embedding", {M, D});
    use_device("embedding");
    cuda::embedding(stream_, M, D, table, ids, out);
  }
  void q8_0_rows(int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) override {
    check_dims("q8_0_rows", {M, K});
    check_arg(K % 32 == 0, "cuda backend: q8_0_rows: K must be a multiple of 32");
    use_device("q8_0_rows");
    cuda::q8_0_rows(stream_, M, K, W, ids, out);
  }
  void q8_0_gemm_nt(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                    int64_t ldy) override {
    check_dims("q8_0_gemm_nt", {M, N, K});
    check_arg(K % 32 == 0, "cuda backend: q8_0_gemm_nt: K must be a multiple of 32");
    check_ld("q8_0_gemm_nt", ldx, K);
    check_ld("q8_0_gemm_nt", ldy, N);
    check_arg((N + 7) / 8 <= 0x7fffffffLL, "cuda backend: q8_0_gemm_nt: N too large for one launch");
    use_device("q8_0_gemm_nt");
    cuda::q8_0_gemm_nt(stream_, M, N, K, X, ldx, W, Y, ldy);
  }
  // 16-bit rows (head_format f16 / bf16); half_gemm_nn / half_gemm_nt_bf16 are the chunked
  // defaults (backend_half.cpp: half_rows, then the GEMMs; bf16 compute on the tensor cores).
  void half_rows(HalfType t, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) override {
    check_dims("half_rows", {M, K});
    use_device("half_rows");
    cuda::half_rows(stream_, t == HalfType::BF16, M, K, W, ids, out);
  }
  void half_gemm_nt(HalfType t, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                    int64_t ldy) override {
    check_dims("half_gemm_nt", {M, N, K});
    check_ld("half_gemm_nt", ldx, K);
    check_ld("half_gemm_nt", ldy, N);
    check_arg((N + 7) / 8 <= 0x7fffffffLL, "cuda backend: half_gemm_nt: N too large for one launch");
    use_device("half_gemm_nt");
    cuda::half_gemm_nt(stream_, t == HalfType::BF16, M, N, K, X, ldx, W, Y, ldy);
  }
  void rmsnorm(int64_t M, int64_t D, const float* x, const float* w, float eps, float* out) override {
    check_dims("rmsnorm", {M, D});
    check_arg(M <= 0x7fffffff, "cuda backend: rmsnorm: too many rows for one launch");
    use_device("rmsnorm");
    cuda::rmsnorm(stream_, M, D, x, w, eps, out);
  }
  void add_inplace(int64_t n, const float* x, float* y) override {
    check_dims("add_inplace", {n});
    use_device("add_inplace");
    cuda::add_inplace(stream_, n, x, y);
  }
  void add_bias(int64_t M, int64_t N, const float* bias, float* y, int64_t ldy) override {
    check_dims("add_bias", {M, N});
    check_ld("add_bias", ldy, N);
    use_device("add_bias");
    cuda::add_bias(stream_, M, N, bias, y, ldy);
  }
  void rope(int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
            const float* inv_freq) override {
    rope_any("rope", M, n_heads, head_dim, x, ldx, pos, inv_freq, false);
  }
  void rope_backward(int64_t M, int64_t n_heads, int64_t head_dim, float* dx, int64_t ldx, const int32_t* pos,
                     const float* inv_freq) override {
    rope_any("rope_backward", M, n_heads, head_dim, dx, ldx, pos, inv_freq, true);
  }
  void swiglu(int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out,
              int64_t ldo) override {
    check_dims("swiglu", {M, N});
    check_ld("swiglu", ldg, N), check_ld("swiglu", ldu, N), check_ld("swiglu", ldo, N);
    use_device("swiglu");
    cuda::swiglu(stream_, M, N, gate, ldg, up, ldu, out, ldo);
  }
  void kv_write(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache, int64_t S_cap,
                int64_t start) override {
    check_dims("kv_write", {B, T, H, hd, start});
    check_ld("kv_write", ldx, H * hd);
    check_arg(start + T <= S_cap, "cuda backend: kv_write: start + T exceeds the cache capacity");
    use_device("kv_write");
    cuda::kv_write(stream_, B, T, H, hd, x, ldx, cache, S_cap, start);
  }
  void attention(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                 const float* k_cache, const float* v_cache, int64_t S_cap, int64_t start, const int32_t* key_mask,
                 float scale, float* out, int64_t ldo) override {
    check_dims("attention", {B, T, Hq, Hkv, hd, start});
    check_arg(Hkv >= 1 && Hq % Hkv == 0, "cuda backend: attention: Hq must be a multiple of Hkv");
    check_arg(hd <= kAttentionMaxHeadDim, "cuda backend: attention: head_dim " + std::to_string(hd) + " > " +
                                              std::to_string(kAttentionMaxHeadDim) + " is not implemented");
    check_arg(start + T <= S_cap, "cuda backend: attention: start + T exceeds the cache capacity");
    check_arg(B * T <= 0x7fffffff && B <= 65535 && Hq <= 65535, "cuda backend: attention: grid too large");
    check_ld("attention", ldq, Hq * hd), check_ld("attention", ldo, Hq * hd);
    use_device("attention");
    cuda::attention(stream_, B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out, ldo);
  }
  // The bf16 KV cache (compute_dtype="bfloat16"): same checks, bf16 storage.
  void kv_write_bf16(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, uint16_t* cache,
                     int64_t S_cap, int64_t start) override {
    check_dims("kv_write_bf16", {B, T, H, hd, start});
    check_ld("kv_write_bf16", ldx, H * hd);
    check_arg(start + T <= S_cap, "cuda backend: kv_write_bf16: start + T exceeds the cache capacity");
    use_device("kv_write_bf16");
    cuda::kv_write_bf16(stream_, B, T, H, hd, x, ldx, cache, S_cap, start);
  }
  void attention_kv_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                         const uint16_t* k_cache, const uint16_t* v_cache, int64_t S_cap, int64_t start,
                         const int32_t* key_mask, float scale, float* out, int64_t ldo) override {
    check_dims("attention_kv_bf16", {B, T, Hq, Hkv, hd, start});
    check_arg(Hkv >= 1 && Hq % Hkv == 0, "cuda backend: attention_kv_bf16: Hq must be a multiple of Hkv");
    check_arg(hd <= kAttentionMaxHeadDim, "cuda backend: attention_kv_bf16: head_dim " + std::to_string(hd) + " > " +
                                              std::to_string(kAttentionMaxHeadDim) + " is not implemented");
    check_arg(start + T <= S_cap, "cuda backend: attention_kv_bf16: start + T exceeds the cache capacity");
    check_arg(B * T <= 0x7fffffff && B <= 65535 && Hq <= 65535, "cuda backend: attention_kv_bf16: grid too large");
    check_ld("attention_kv_bf16", ldq, Hq * hd), check_ld("attention_kv_bf16", ldo, Hq * hd);
    use_device("attention_kv_bf16");
    cuda::attention_kv_bf16(stream_, B, T, Hq, Hkv, hd, q, ldq, k_cache, v_cache, S_cap, start, key_mask, scale, out,
                            ldo);
  }
  void cross_entropy_rows(int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels, float grad_scale,
                          bool want_grad, float* loss) override {
    check_dims("cross_entropy_rows", {M, V});
    check_ld("cross_entropy_rows", ldl, V);
    check_arg(M <= 0x7fffffff, "cuda backend: cross_entropy_rows: too many rows for one launch");
    use_device("cross_entropy_rows");
    cuda::cross_entropy_rows(stream_, M, V, logits, ldl, labels, grad_scale, want_grad, loss);
  }
  // Sampling on the device (ops_sample.cu): only the n token ids come back.
  void sample_rows(int64_t n, int64_t V, const float* logits, int64_t ldl, const int32_t* rows,
                   const int32_t* const* histories, const int64_t* n_hists, const SamplingParams& p, const double* u,
                   int32_t* out) override {
    use_device("sample_rows");
    cuda::sample_rows_op(*this, stream_, n, V, logits, ldl, rows, histories, n_hists, p, u, out);
  }
  // Mixed-adapter LoRA (ops_lora_sgmv.cu): short segments as SGMV shrink/expand launches, long
  // ones as two GEMMs.
  void lora_segments(int64_t in, int64_t out, const float* x, int64_t ldx, int64_t n, const LoraSegment* seg, float* y,
                     int64_t ldy, float* t) override {
    const LoraProblem p{in, out, x, ldx, n, seg, y, ldy};
    lora_segments_many(1, &p, t);
  }
  void lora_segments_many(int64_t np, const LoraProblem* p, float* t) override {
    use_device("lora_segments_many");
    cuda::lora_segments_many_op(*this, stream_, np, p, t);
  }

  // ---- training ops (ops_*_backward.cu, ops_attention_train*.cu, ops_lora_dropout.cu)
  void rmsnorm_backward(int64_t M, int64_t D, const float* x, const float* w, float eps, const float* dy,
                        float* dx) override {
    check_dims("rmsnorm_backward", {M, D});
    check_arg(M <= 0x7fffffff, "cuda backend: rmsnorm_backward: too many rows for one launch");
    use_device("rmsnorm_backward");
    cuda::rmsnorm_backward(stream_, M, D, x, w, eps, dy, dx);
  }
  void swiglu_backward(int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
                       const float* dout, int64_t ldd, float* dgate, int64_t lddg, float* dup, int64_t lddu) override {
    const char* op = "swiglu_backward";
    check_dims(op, {M, N});
    check_ld(op, ldg, N), check_ld(op, ldu, N), check_ld(op, ldd, N), check_ld(op, lddg, N), check_ld(op, lddu, N);
    use_device(op);
    cuda::swiglu_backward(stream_, M, N, gate, ldg, up, ldu, dout, ldd, dgate, lddg, dup, lddu);
  }
  void attention_train(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                       const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask, float scale,
                       float* out, int64_t ldo, float* lse) override {
    const char* op = "attention_train";
    check_train_attention(op, B, T, Hq, Hkv, hd);
    check_ld(op, ldq, Hq * hd), check_ld(op, ldk, Hkv * hd), check_ld(op, ldv, Hkv * hd), check_ld(op, ldo, Hq * hd);
    use_device(op);
    cuda::attention_train(stream_, B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse);
  }
  void attention_train_backward(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                const int32_t* key_mask, float scale, const float* out, int64_t ldo, const float* lse,
                                const float* dout, int64_t lddo, float* dq, int64_t lddq, float* dk, int64_t lddk,
                                float* dv, int64_t lddv) override {
    attention_backward_any("attention_train_backward", false, B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask,
                           scale, out, ldo, lse, dout, lddo, dq, lddq, dk, lddk, dv, lddv);
  }
  // bf16 compute: the tiled kernels' products on bf16 tensor cores (sm_80+; fp32 below, the contract).
  void attention_train_backward_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                     int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                     const int32_t* key_mask, float scale, const float* out, int64_t ldo,
                                     const float* lse, const float* dout, int64_t lddo, float* dq, int64_t lddq,
                                     float* dk, int64_t lddk, float* dv, int64_t lddv) override {
    attention_backward_any("attention_train_backward_bf16", has_bf16_compute(), B, T, Hq, Hkv, hd, q, ldq, k, ldk, v,
                           ldv, key_mask, scale, out, ldo, lse, dout, lddo, dq, lddq, dk, lddk, dv, lddv);
  }
  void attention_backward_any(const char* op, bool bf16, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                              const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                              const int32_t* key_mask, float scale, const float* out, int64_t ldo, const float* lse,
                              const float* dout, int64_t lddo, float* dq, int64_t lddq, float* dk, int64_t lddk,
                              float* dv, int64_t lddv) {
    check_train_attention(op, B, T, Hq, Hkv, hd);
    check_ld(op, ldq, Hq * hd), check_ld(op, ldk, Hkv * hd), check_ld(op, ldv, Hkv * hd), check_ld(op, ldo, Hq * hd);
    check_ld(op, lddo, Hq * hd), check_ld(op, lddq, Hq * hd), check_ld(op, lddk, Hkv * hd), check_ld(op, lddv, Hkv * hd);
    if (B == 0 || T == 0 || Hq == 0 || hd == 0) return;
    use_device(op);
    // delta[B, Hq, T] = dO·O per query row: scratch freed right after the launches, without
    // waiting: the pool hands the block out again only to this stream's arena (DevicePool), so
    // any later user runs after these kernels in stream order.
    struct Scratch {
      Backend* be;
      void* p;
      ~Scratch() { be->free(p); }
    } delta{this, alloc(sizeof(float) * static_cast<size_t>(B * Hq * T))};
    cuda::attention_train_backward(stream_, B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse,
                                   dout, lddo, dq, lddq, dk, lddk, dv, lddv, static_cast<float*>(delta.p), bf16);
  }
  void lora_dropout(uint64_t seed, uint64_t offset, float p, int64_t M, int64_t in, const float* x, int64_t ldx,
                    float* out) override {
    check_dropout("lora_dropout", p, M, in);
    check_ld("lora_dropout", ldx, in);
    use_device("lora_dropout");
    cuda::lora_dropout(stream_, seed, offset, 1.0 - static_cast<double>(p), 1.0f / (1.0f - p), M, in, x, ldx, out);
  }
  void lora_dropout_backward(uint64_t seed, uint64_t offset, float p, int64_t M, int64_t in, const float* g, float* dx,
                             int64_t lddx) override {
    check_dropout("lora_dropout_backward", p, M, in);
    check_ld("lora_dropout_backward", lddx, in);
    use_device("lora_dropout_backward");
    cuda::lora_dropout_backward(stream_, seed, offset, 1.0 - static_cast<double>(p), 1.0f / (1.0f - p), M, in, g, dx,
                                lddx);
  }
  // ---- optimizer ops (ops_adamw.cu, ops_grad_norm.cu) on the adapter's contiguous buffers
  void adamw_update(int64_t n, float* p, const float* g, float* m, float* v, const train::AdamWScalars& s) override {
    check_dims("adamw_update", {n});
    use_device("adamw_update");
    cuda::adamw_update(stream_, n, p, g, m, v, s);
  }
  void sum_squares(int64_t n_chunks, const int64_t* bounds, const float* x, double* partial, double* out) override {
    check_dims("sum_squares", {n_chunks});
    check_arg(n_chunks <= 0x7fffffff, "cuda backend: sum_squares: too many chunks for one launch");
    use_device("sum_squares");
    cuda::sum_squares(stream_, n_chunks, bounds, x, partial, out);
  }
  void scale_inplace(int64_t n, float* x, float s) override {
    check_dims("scale_inplace", {n});
    use_device("scale_inplace");
    cuda::scale_inplace(stream_, n, x, s);
  }
  void find_nonfinite(int64_t n, const float* x, int64_t* out) override {
    check_dims("find_nonfinite", {n});
    use_device("find_nonfinite");
    cuda::find_nonfinite(stream_, n, x, out);
  }

 private:
  void rope_any(const char* op, int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx,
                const int32_t* pos, const float* inv_freq, bool inverse) {
    check_dims(op, {M, n_heads, head_dim});
    check_arg(head_dim % 2 == 0, std::string("cuda backend: ") + op + ": head_dim must be even");
    check_ld(op, ldx, n_heads * head_dim);
    use_device(op);
    cuda::rope(stream_, M, n_heads, head_dim, x, ldx, pos, inv_freq, inverse);
  }
  void check_train_attention(const char* op, int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd) const {
    const std::string pre = std::string("cuda backend: ") + op + ": ";
    check_dims(op, {B, T, Hq, Hkv, hd});
    check_arg(Hkv >= 1 && Hq % Hkv == 0, pre + "Hq must be a multiple of Hkv");
    check_arg(hd <= kAttentionTrainMaxHeadDim, pre + "head_dim " + std::to_string(hd) + " > " +
                                                   std::to_string(kAttentionTrainMaxHeadDim) + " is not implemented");
    check_arg(B * T <= 0x7fffffff && Hq <= 65535 && B * T * Hq <= (int64_t{1} << 33), pre + "grid too large");
  }
  void check_dropout(const char* op, float p, int64_t M, int64_t in) const {
    check_dims(op, {M, in});
    check_arg(p >= 0.0f && p < 1.0f, std::string("cuda backend: ") + op + ": p must be in [0, 1)");
  }
  // The current device is per host thread: made current before every call that allocates or
  // launches, with cudaSetDevice only when it differs (CudaRaw::ensure_device).
  void use_device(const char* op) const { raw_.ensure_device(op); }
  static CudaQueue* queue_of(Exec* e) {
    return static_cast<CudaQueue*>(DevicePool::queue(static_cast<PoolExec*>(e)->arena()));
  }
  // The calling thread's stream: its bound Exec's, else the default one.
  cudaStream_t stream() const { return static_cast<CudaQueue*>(DevicePool::queue(current_arena(*this, *pool_)))->stream; }
  // `stream_` in the op methods reads the calling thread's stream on each use (a conversion, so
  // every launcher call site passes the current stream explicitly and cannot keep a stale one).
  struct CurrentStream {
    const CudaBackend* be;
    operator cudaStream_t() const { return be->stream(); }
  };

  void gemm(GemmLayout layout, const char* op, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
            int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    gemm_any(layout, false, op, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  // bf16: the tensor-core kernel where the device has bf16 mma (else fp32, the Backend contract).
  void gemm_any(GemmLayout layout, bool bf16, const char* op, int64_t M, int64_t N, int64_t K, float alpha,
                const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    if (K > 0) {
      require_device_ptr(A, op, "A");
      require_device_ptr(B, op, "B");
    }
    require_device_ptr(C, op, "C");
    use_device(op);
    if (bf16 && has_bf16_compute())
      gemm_bf16_tc(stream_, sm_count_, layout, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else
      gemm_f32(stream_, sm_count_, layout, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  int device_;
  int sm_count_ = 0;
  int cc_major_ = 0;  // compute capability major (8: sm_80+, bf16 mma.sync)
  int64_t total_mem_ = 0;
  mutable CudaRaw raw_{device_};         // cudaMalloc / cudaFree / streams; counts cudaSetDevice
  CudaQueue* default_q_ = nullptr;        // the default stream (work outside any Exec)
  std::unique_ptr<DevicePool> pool_;      // destroyed before default_q_ (the destructor resets it first)
  const CurrentStream stream_{this};
  // offload staging (pinned) and the copy stream of offload(); see host_alloc above
  static void* pinned_alloc(size_t bytes, void* self) {
    void* p = nullptr;
    const cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocDefault);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      return nullptr;  // the pool releases its cache and retries, then raises MemoryError
    }
    QLORA_CUDA_CHECK(e, "host_alloc");
    (void)self;
    return p;
  }
  static void pinned_free(void* p, void*) {
    if (cudaFreeHost(p) != cudaSuccess) cudaGetLastError();  // may run while unwinding: never throws
  }
  HostStagingPool host_{pinned_alloc, pinned_free, this, "pinned host memory"};
  struct OffloadStreams {
    cudaStream_t copy = nullptr;
    cudaEvent_t ready = nullptr, done = nullptr;
    bool pending = false;  // an offload was queued since the last synchronize
  };
  std::mutex off_mu_;
  OffloadStreams off_;
};

}  // namespace

std::vector<std::string> supported_ops() {
  std::vector<std::string> out;
  const std::vector<std::string>& o = cuda_optional_ops();
  for (const std::string& op : Backend::all_ops())
    if (Backend::is_core_op(op) || std::find(o.begin(), o.end(), op) != o.end()) out.push_back(op);
  return out;
}

int device_of(const Backend& be) {
  const auto* c = dynamic_cast<const CudaBackend*>(&be);
  return c ? c->device() : -1;
}

cudaStream_t current_stream(Backend& be) {
  auto* c = dynamic_cast<CudaBackend*>(&be);
  check_arg(c != nullptr, "backend '" + be.name() + "' is not a CUDA backend");
  return c->stream_for_library();
}

std::unique_ptr<Backend> make_backend(int device) {
  const int n = device_count();
  check_arg(n > 0, "backend 'cuda' unavailable: " + device_summary());
  check_arg(device >= 0 && device < n, "cuda device " + std::to_string(device) + " does not exist (" +
                                           std::to_string(n) + " visible)");
  return std::make_unique<CudaBackend>(device);
}

}  // namespace qlora::cuda
