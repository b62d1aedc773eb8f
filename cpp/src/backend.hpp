// The backend interface: every op the model runs, for every device. Model code calls these and
// never branches on the backend. Buffers are row-major fp32 with explicit leading dimensions;
// pointers live in the backend's memory (host for CPU, device for CUDA).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "tensor_types.hpp"
#include "sampling_params.hpp"
#include "train/optimizer.hpp"

namespace qlora {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // True when buffers are ordinary host memory (then callers may pass numpy data directly).
  virtual bool host_memory() const = 0;

  // ---- capabilities. Op names are the method names below ("embedding", "attention", ...).
  // Every op whose default here throws not_implemented is optional: a backend lists those it
  // implements by overriding supports_op. The default answers true for the ops every backend has
  // (pure virtuals and defaults built on them: GEMMs, NF4, lora_segments*, *_bf16, host_output).
  virtual bool supports_op(const std::string& op) const;
  // Every op name, core first, in a fixed order (`qlora-native info`, tests).
  static const std::vector<std::string>& all_ops();
  static bool is_core_op(const std::string& op);
  std::vector<std::string> supported_ops() const;
  // Throws ValueError "<what>: backend '<name>' does not implement op(s) a, b" naming every
  // missing op of `ops` (a model calls it before uploading anything).
  void require_ops(const std::vector<std::string>& ops, const std::string& what) const;

  // ---- the memory the backend's buffers come from: its size in bytes (0: unknown, nothing is
  // checked) and how a message names it. Requests larger than it are refused up front (KV cache).
  virtual int64_t memory_bytes() const { return 0; }
  virtual std::string memory_name() const { return "this machine's memory"; }

  // ---- execution contexts. A generation context owns an Exec (new_exec): while an ExecScope binds
  // it to the calling thread, the backend's ops run on the Exec's queue (CUDA: its own stream) and
  // allocate from its memory arena; without a scope they use the backend's default queue and arena.
  // The binding is per thread, like torch.cuda.stream. Host backends have none: new_exec returns
  // null and a scope over null does nothing, so model code binds scopes and never branches on the
  // backend. Rule the model keeps (device_pool.hpp): every pass ends with its queue synchronized.
  class Exec {
   public:
    explicit Exec(Backend& owner) : owner_(&owner) {}
    virtual ~Exec() = default;
    Exec(const Exec&) = delete;
    Exec& operator=(const Exec&) = delete;
    Backend& owner() const { return *owner_; }

   private:
    Backend* owner_;
  };
  class ExecScope;
  virtual std::unique_ptr<Exec> new_exec() { return nullptr; }
  // The Exec an ExecScope binds to the calling thread for this backend (null: none).
  Exec* current_exec() const;

  // ---- device memory counters of the caching allocator (device_pool.hpp; CUDA and cpu:devsim,
  // zeros on host backends). Steady-state decode / forward makes no raw allocation: tests and
  // tools/device-check compare raw_allocs / raw_frees before and after.
  struct DeviceStats {
    int64_t raw_allocs = 0;         // raw allocator calls (cudaMalloc), failed ones included
    int64_t raw_alloc_failures = 0;  // of them, out of memory
    int64_t raw_frees = 0;          // cudaFree calls
    int64_t reserved_bytes = 0;     // held from the raw allocator: live + cached
    int64_t peak_reserved_bytes = 0;
    int64_t live_bytes = 0;         // handed out and not freed (size-class rounded)
    int64_t peak_live_bytes = 0;
    int64_t cached_bytes = 0;       // freed, kept for reuse
    int64_t cache_hits = 0;         // allocations served from the cache
    int64_t queues_created = 0;     // cudaStreamCreate calls (one per Exec not recycled)
    int64_t execs_open = 0, execs_idle = 0;
    int64_t set_device_calls = 0;   // cudaSetDevice calls (only when a thread's current device differs)
    int64_t invalid_frees = 0;      // free() of a pointer the pool does not know (a bug; ignored)
    // host staging of activation offload (host_alloc: CUDA pinned memory), a HostStagingPool
    int64_t host_raw_allocs = 0;    // cudaHostAlloc calls (devsim: malloc)
    int64_t host_raw_frees = 0;     // cudaFreeHost calls
    int64_t host_reserved_bytes = 0;  // held: handed out + cached
    int64_t host_cached_bytes = 0;    // freed, kept for reuse
  };
  virtual DeviceStats device_stats() const { return {}; }
  virtual void reset_peak_memory() {}          // peak_* = current
  virtual void release_cached_memory() {}      // gives cached blocks back (torch.cuda.empty_cache)

  // ---- results that end in host memory (logits): compute into host_output_begin(dst, bytes)
  // and finish with host_output_end. A host-memory backend returns dst itself (no buffer, no
  // copy); the default stages in a device buffer that end downloads and frees. HostOutput below
  // wraps the pair (frees the staging buffer when an op throws).
  virtual void* host_output_begin(void* /*dst_host*/, size_t bytes) { return alloc(bytes ? bytes : 4); }
  virtual void host_output_end(void* dst_host, void* staged, size_t bytes, bool copy) {
    struct Free {
      Backend* be;
      void* p;
      ~Free() { be->free(p); }
    } f{this, staged};
    if (copy && bytes) {
      download(dst_host, staged, bytes);
      synchronize();
    }
  }

  // ---- memory
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* p) = 0;
  virtual void upload(void* dst, const void* src_host, size_t bytes) = 0;
  virtual void download(void* dst_host, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // p[bytes] = 0, ordered with the backend's work (gradient zeroing each step). Default: uploads of
  // a host block of zeros; CPU memset, CUDA cudaMemsetAsync on the stream.
  virtual void fill_zero(void* p, size_t bytes);
  // dst[bytes] = src[bytes], both in the backend's memory, not overlapping (packing LoRA A/B into the
  // optimizer's buffer). Default: download + upload through host memory; CPU memcpy, CUDA a
  // device-to-device cudaMemcpyAsync on the stream.
  virtual void copy(void* dst, const void* src, size_t bytes);

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

  // ---- multi-adapter LoRA for mixed batches (the SGMV idea of Punica / S-LoRA: shrink x·Aᵀ, then
  // expand ·Bᵀ, per group of rows sharing an adapter). For each segment s, rows
  // [row0, row0 + rows) of x[M, in] (row stride ldx) get y[row, :] (row stride ldy) +=
  // alpha_s * (x[row, :]·A_sᵀ)·B_sᵀ, A_s[r_s, in], B_s[out, r_s] (ranks may differ). Segments do
  // not overlap; several may use the same adapter. t: scratch of at least max_s(rows_s * r_s) floats.
  struct LoraSegment {
    int64_t row0, rows, r;
    const float* A;  // [r, in]
    const float* B;  // [out, r]
    float alpha;     // scale * scaling
    // The module's bf16 inference copy (lora_pack_bf16; null: none). A backend computes the
    // segment from it where it has bf16 LoRA kernels at its current level (operands rounded to
    // bf16, fp32 accumulation), else from A/B, which stay valid.
    const void* AB16 = nullptr;
  };
  // bf16 inference copies of LoRA factors (the serving path's adapter_dtype): bytes of one module's
  // copy (A [r, in], B [out, r]) in this backend's layout, 0 where it has no bf16 LoRA kernels at
  // its current level (then no copy is made). lora_pack_bf16 fills dst (that many bytes, backend
  // memory) from fp32 A and B (backend memory); only called where lora_bf16_bytes is not 0.
  virtual size_t lora_bf16_bytes(int64_t /*r*/, int64_t /*in*/, int64_t /*out*/) const { return 0; }
  virtual void lora_pack_bf16(int64_t /*r*/, int64_t /*in*/, int64_t /*out*/, const float* /*A*/, const float* /*B*/,
                              void* /*dst*/) {
    not_implemented("lora_pack_bf16");
  }
  // Default: the reference, two gemm_nt per segment (valid on every backend). The CPU backend runs
  // segments of few rows as one thread-pool job (cpu/lora_sgmv.hpp).
  virtual void lora_segments(int64_t in, int64_t out, const float* x, int64_t ldx, int64_t n, const LoraSegment* seg,
                             float* y, int64_t ldy, float* t) {
    for (int64_t s = 0; s < n; ++s) {
      const LoraSegment& g = seg[s];
      if (g.rows <= 0 || g.alpha == 0.0f) continue;
      gemm_nt(g.rows, g.r, in, 1.0f, x + g.row0 * ldx, ldx, g.A, in, 0.0f, t, g.r);                 // t = x·Aᵀ
      gemm_nt(g.rows, out, g.r, g.alpha, t, g.r, g.B, g.r, 1.0f, y + g.row0 * ldy, ldy);           // y += a t·Bᵀ
    }
  }
  // The LoRA terms of several projections (q/k/v, gate/up, or one), each a lora_segments call:
  // backends may run them as one job (CPU: one thread-pool job for all shrinks and expands).
  // Problems must not write to each other's x or y ranges. t: scratch of at least
  // max over problems and segments of rows_s * r_s floats. Default: one lora_segments each.
  struct LoraProblem {
    int64_t in, out;
    const float* x;
    int64_t ldx;
    int64_t n;
    const LoraSegment* seg;
    float* y;
    int64_t ldy;
  };
  virtual void lora_segments_many(int64_t np, const LoraProblem* p, float* t) {
    for (int64_t i = 0; i < np; ++i) lora_segments(p[i].in, p[i].out, p[i].x, p[i].ldx, p[i].n, p[i].seg, p[i].y, p[i].ldy, t);
  }

  // ---- NF4 (dequantization fused into the kernel; W is never materialized in fp32)
  // Y[M, W.rows] = alpha * X[M, W.cols] · deq(W)ᵀ + beta * Y
  virtual void nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W,
                           float beta, float* Y, int64_t ldy) = 0;
  // Y_i[M, W_i.rows] = X[M, K] · deq(W_i)ᵀ for n weights sharing X (q/k/v, gate/up): backends may
  // run them as one job (CPU decode: one pass over X, one thread-pool job); default: one call each.
  virtual void nf4_gemm_nt_many(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                                float* const* Y, const int64_t* ldy) {
    for (int64_t i = 0; i < n; ++i) nf4_gemm_nt(M, 1.0f, X, ldx, *W[i], 0.0f, Y[i], ldy[i]);
  }
  // nf4_gemm_nt_many, then each output's LoRA terms: lora[i] (n problems) belongs to output i
  // (x = X, y = Y_i; lora[i].n == 0: none), t as lora_segments_many's. Backends may run both as
  // one job (CPU decode: the LoRA terms ride the NF4 GEMV's thread-pool job, same results).
  virtual void nf4_gemm_nt_many_lora(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                                     float* const* Y, const int64_t* ldy, const LoraProblem* lora, float* t) {
    nf4_gemm_nt_many(M, X, ldx, n, W, Y, ldy);
    lora_segments_many(n, lora, t);
  }
  // ---- Q8_0 (GGUF's 8-bit format, kept as stored for a GGUF's token embedding / lm_head):
  // a row of K weights (K % 32 == 0) is K/32 blocks of 34 bytes {fp16 d (little-endian), int8 q[32]};
  // weight j of a block = float(d) * float(q[j]) (exact in fp32, as gguf's dequantize computes it).
  // W holds N such rows back to back. Y[M, N] = X[M, K] · deq(W)ᵀ.
  virtual void q8_0_gemm_nt(int64_t /*M*/, int64_t /*N*/, int64_t /*K*/, const float* /*X*/, int64_t /*ldx*/,
                            const void* /*W*/, float* /*Y*/, int64_t /*ldy*/) {
    not_implemented("q8_0_gemm_nt");
  }
  // out[M, K] = deq(W)[ids[m], :] (embedding lookup; ids already checked to lie in [0, N)).
  virtual void q8_0_rows(int64_t /*M*/, int64_t /*K*/, const void* /*W*/, const int32_t* /*ids*/, float* /*out*/) {
    not_implemented("q8_0_rows");
  }
  // dX[M, K] = alpha * dY[M, N] (row stride lddy) · deq(W) + beta * dX (row stride lddx): the
  // input gradient through a Q8_0 lm_head. Default (backend_q8.cpp, every backend with q8_0_rows):
  // W dequantized kQ8_0GemmNnChunk rows at a time by q8_0_rows into a scratch buffer
  // (q8_0_gemm_nn_scratch_bytes), each chunk one gemm_nn (bf16: gemm_nn_bf16) accumulated into dX.
  virtual void q8_0_gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* dY, int64_t lddy, const void* W,
                            float beta, float* dX, int64_t lddx, bool bf16 = false);
  static constexpr int64_t kQ8_0GemmNnChunk = 2048;
  static size_t q8_0_gemm_nn_scratch_bytes(int64_t N, int64_t K);
  // q8_0_gemm_nt in bf16 compute (compute_dtype="bfloat16": operands rounded to bf16, fp32
  // accumulation), for the many-row lm_head of the training loss. Default (backend_q8.cpp): the same
  // dequantized chunks as q8_0_gemm_nn (same scratch), each one gemm_nt_bf16 into its columns of Y
  // (CUDA: the tensor-core GEMM instead of the warp-per-column Q8_0 kernel).
  virtual void q8_0_gemm_nt_bf16(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                                 int64_t ldy);
  // ---- 16-bit float rows (head_format "f16" / "bf16": the embedding and lm_head kept as IEEE fp16
  // or bf16, 2 bytes per weight, little-endian; any K). Every weight widens exactly to fp32; products
  // accumulate in fp32. W holds N rows of K values back to back.
  enum class HalfType : int { F16 = 0, BF16 = 1 };
  // Y[M, N] = X[M, K] · wide(W)ᵀ.
  virtual void half_gemm_nt(HalfType /*t*/, int64_t /*M*/, int64_t /*N*/, int64_t /*K*/, const float* /*X*/,
                            int64_t /*ldx*/, const void* /*W*/, float* /*Y*/, int64_t /*ldy*/) {
    not_implemented("half_gemm_nt");
  }
  // out[M, K] = wide(W)[ids[m], :] (embedding lookup; ids already checked to lie in [0, N)).
  virtual void half_rows(HalfType /*t*/, int64_t /*M*/, int64_t /*K*/, const void* /*W*/, const int32_t* /*ids*/,
                         float* /*out*/) {
    not_implemented("half_rows");
  }
  // dX[M, K] = alpha * dY[M, N] · wide(W) + beta * dX, and half_gemm_nt in bf16 compute: defaults
  // (backend_half.cpp, every backend with half_rows) as q8_0_gemm_nn / q8_0_gemm_nt_bf16: W widened
  // kHalfChunk rows at a time by half_rows into scratch (half_chunk_scratch_bytes), each chunk one
  // gemm_nn / gemm_nn_bf16 / gemm_nt_bf16 (CUDA: the tensor-core GEMM in bf16 compute).
  virtual void half_gemm_nn(HalfType t, int64_t M, int64_t N, int64_t K, float alpha, const float* dY, int64_t lddy,
                            const void* W, float beta, float* dX, int64_t lddx, bool bf16 = false);
  virtual void half_gemm_nt_bf16(HalfType t, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx,
                                 const void* W, float* Y, int64_t ldy);
  static constexpr int64_t kHalfChunk = 2048;
  static size_t half_chunk_scratch_bytes(int64_t N, int64_t K);
  // dX[M, W.cols] = alpha * dY[M, W.rows] · deq(W) + beta * dX
  virtual void nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W,
                           float beta, float* dX, int64_t lddx) = 0;
  // out[W.rows * W.cols] = deq(W) (tests, merging, export)
  virtual void nf4_dequantize(const Nf4Ref& W, float* out) = 0;

  // ---- bf16 compute (compute_dtype="bfloat16"): the five GEMMs above with both operands rounded
  // to bf16 (round-to-nearest-even; NF4 decoded, then rounded) and fp32 accumulation. Backends
  // without bf16 units keep has_bf16_compute() false and these defaults run the fp32 ops (the
  // model then warns once and computes in fp32).
  virtual bool has_bf16_compute() const { return false; }
  // The compute dtype a new model on this backend starts with: bf16 where bf16 is the fast path
  // and the usual QLoRA choice (CUDA sm_80+), fp32 elsewhere (CPU: the parity mode stays default).
  virtual bool default_compute_bf16() const { return false; }
  virtual void gemm_nt_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    gemm_nt(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  virtual void gemm_nn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    gemm_nn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  virtual void gemm_tn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
    gemm_tn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  virtual void nf4_gemm_nt_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta,
                                float* Y, int64_t ldy) {
    nf4_gemm_nt(M, alpha, X, ldx, W, beta, Y, ldy);
  }
  // nf4_gemm_nt_many in bf16 compute: each output as nf4_gemm_nt_bf16's (alpha 1, beta 0); backends
  // may round X once for all. Default: one call each.
  virtual void nf4_gemm_nt_many_bf16(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                                     float* const* Y, const int64_t* ldy) {
    for (int64_t i = 0; i < n; ++i) nf4_gemm_nt_bf16(M, 1.0f, X, ldx, *W[i], 0.0f, Y[i], ldy[i]);
  }
  // nf4_gemm_nt_many_lora in bf16 compute (inference): each output as nf4_gemm_nt_bf16's (alpha 1,
  // beta 0), then lora_segments_many(n, lora, t). Default: those calls; backends may run both as one
  // job (CPU decode: the LoRA terms ride the bf16 NF4 GEMV's thread-pool job, same results).
  virtual void nf4_gemm_nt_many_lora_bf16(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                                          float* const* Y, const int64_t* ldy, const LoraProblem* lora, float* t) {
    for (int64_t i = 0; i < n; ++i) nf4_gemm_nt_bf16(M, 1.0f, X, ldx, *W[i], 0.0f, Y[i], ldy[i]);
    lora_segments_many(n, lora, t);
  }
  virtual void nf4_gemm_nn_bf16(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta,
                                float* dX, int64_t lddx) {
    nf4_gemm_nn(M, alpha, dY, lddy, W, beta, dX, lddx);
  }
  // attention_train / attention_train_backward (below) in bf16 compute: the products with v, dout,
  // the probabilities and dS take bf16-rounded operands, fp32 accumulation; the scores q·kᵀ,
  // softmax, lse and the outputs stay fp32. Default: the fp32 ops.
  virtual void attention_train_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                    int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                    const int32_t* key_mask, float scale, float* out, int64_t ldo, float* lse) {
    attention_train(B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse);
  }
  virtual void attention_train_backward_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd,
                                             const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                                             int64_t ldv, const int32_t* key_mask, float scale, const float* out,
                                             int64_t ldo, const float* lse, const float* dout, int64_t lddo, float* dq,
                                             int64_t lddq, float* dk, int64_t lddk, float* dv, int64_t lddv) {
    attention_train_backward(B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse, dout, lddo, dq,
                             lddq, dk, lddk, dv, lddv);
  }

  // ---- transformer ops (cpp/src/model). Defaults throw so a backend can add them one by one.
  // out[M, D] = table[ids[m], :]; ids int32 [M], already checked to lie in [0, V).
  virtual void embedding(int64_t /*M*/, int64_t /*D*/, const float* /*table*/, const int32_t* /*ids*/, float* /*out*/) {
    not_implemented("embedding");
  }
  // out[M, D] = x / sqrt(mean_row(x²) + eps) * w[D]   (out may alias x)
  virtual void rmsnorm(int64_t /*M*/, int64_t /*D*/, const float* /*x*/, const float* /*w*/, float /*eps*/,
                       float* /*out*/) {
    not_implemented("rmsnorm");
  }
  // y[n] += x[n]   (residual connections)
  virtual void add_inplace(int64_t /*n*/, const float* /*x*/, float* /*y*/) { not_implemented("add_inplace"); }
  // y[M, N] (row stride ldy) += bias[N]
  virtual void add_bias(int64_t /*M*/, int64_t /*N*/, const float* /*bias*/, float* /*y*/, int64_t /*ldy*/) {
    not_implemented("add_bias");
  }
  // Rotate-half RoPE in place on x[M, n_heads * head_dim] (row stride ldx): for each head and
  // i < head_dim/2, angle = float(pos[m]) * inv_freq[i] (fp32), (x_i, x_{i+h/2}) rotated by it.
  virtual void rope(int64_t /*M*/, int64_t /*n_heads*/, int64_t /*head_dim*/, float* /*x*/, int64_t /*ldx*/,
                    const int32_t* /*pos*/, const float* /*inv_freq*/) {
    not_implemented("rope");
  }
  // out[M, N] = silu(gate) * up   (SwiGLU)
  virtual void swiglu(int64_t /*M*/, int64_t /*N*/, const float* /*gate*/, int64_t /*ldg*/, const float* /*up*/,
                      int64_t /*ldu*/, float* /*out*/, int64_t /*ldo*/) {
    not_implemented("swiglu");
  }
  // cache[b, h, start + t, :] = x[b*T + t, h*hd : (h+1)*hd]; cache is [B, H, S_cap, hd].
  virtual void kv_write(int64_t /*B*/, int64_t /*T*/, int64_t /*H*/, int64_t /*hd*/, const float* /*x*/,
                        int64_t /*ldx*/, float* /*cache*/, int64_t /*S_cap*/, int64_t /*start*/) {
    not_implemented("kv_write");
  }
  // kv_write into a bf16 cache (uint16 bit patterns, [B, H, S_cap, hd]): each element rounded to
  // bf16 (round-to-nearest-even, as the bf16 GEMMs round). The KV cache of compute_dtype="bfloat16".
  virtual void kv_write_bf16(int64_t /*B*/, int64_t /*T*/, int64_t /*H*/, int64_t /*hd*/, const float* /*x*/,
                             int64_t /*ldx*/, uint16_t* /*cache*/, int64_t /*S_cap*/, int64_t /*start*/) {
    not_implemented("kv_write_bf16");
  }
  // attention (below) over bf16 k/v caches: each cached element widened exactly to fp32 as it is
  // read, everything else (scores, softmax, P·V, output) fp32 as in attention.
  virtual void attention_kv_bf16(int64_t /*B*/, int64_t /*T*/, int64_t /*Hq*/, int64_t /*Hkv*/, int64_t /*hd*/,
                                 const float* /*q*/, int64_t /*ldq*/, const uint16_t* /*k_cache*/,
                                 const uint16_t* /*v_cache*/, int64_t /*S_cap*/, int64_t /*start*/,
                                 const int32_t* /*key_mask*/, float /*scale*/, float* /*out*/, int64_t /*ldo*/) {
    not_implemented("attention_kv_bf16");
  }
  // Causal grouped-query attention over a KV cache. q[B*T, Hq*hd] (row stride ldq); query t of
  // row b sits in slot start+t and attends to slots s <= start+t with key_mask[b*S_cap + s] != 0
  // (int32 [B, S_cap]); query head h reads KV head h / (Hq/Hkv). k/v caches [B, Hkv, S_cap, hd].
  // out[B*T, Hq*hd] = softmax(scale * q·kᵀ) · v; a query with no visible key gets zeros.
  virtual void attention(int64_t /*B*/, int64_t /*T*/, int64_t /*Hq*/, int64_t /*Hkv*/, int64_t /*hd*/,
                         const float* /*q*/, int64_t /*ldq*/, const float* /*k_cache*/, const float* /*v_cache*/,
                         int64_t /*S_cap*/, int64_t /*start*/, const int32_t* /*key_mask*/, float /*scale*/,
                         float* /*out*/, int64_t /*ldo*/) {
    not_implemented("attention");
  }
  // Next-token choice where the logits are, so only token ids come back (generation): row i of
  // logits[*, V] (backend memory, row stride ldl) is row rows[i]; out[i] = the token the rule of
  // model/sampler.hpp (sample_token) picks with histories[i][0, n_hists[i]) for the repetition
  // penalty and draw u[i] in [0, 1) (read only when p.draws(); one per row from the caller's
  // generator, so a seed gives the same tokens on every backend). rows, histories, n_hists, u and
  // out are host memory; logits are left intact. ValueError when a row holds NaN. Default
  // (backend_sample.cpp): the host rule on the rows, downloaded first unless host_memory().
  virtual void sample_rows(int64_t n, int64_t V, const float* logits, int64_t ldl, const int32_t* rows,
                           const int32_t* const* histories, const int64_t* n_hists, const SamplingParams& p,
                           const double* u, int32_t* out);

  // ---- training ops (cpu/ops_backward.hpp): gradients of the ops above, for LoRA training.
  // dx[M, D] = d(rmsnorm(x, w, eps))/dx applied to dy[M, D] (no dw: norms are frozen); dx may alias dy.
  virtual void rmsnorm_backward(int64_t /*M*/, int64_t /*D*/, const float* /*x*/, const float* /*w*/, float /*eps*/,
                                const float* /*dy*/, float* /*dx*/) {
    not_implemented("rmsnorm_backward");
  }
  // In place on dx[M, n_heads * head_dim] (row stride ldx): the inverse (transposed) rotation of
  // rope() for the same pos / inv_freq, turning dL/d(rope(x)) into dL/dx.
  virtual void rope_backward(int64_t /*M*/, int64_t /*n_heads*/, int64_t /*head_dim*/, float* /*dx*/, int64_t /*ldx*/,
                             const int32_t* /*pos*/, const float* /*inv_freq*/) {
    not_implemented("rope_backward");
  }
  // For out = silu(gate) * up [M, N]: dgate = dout * up * silu'(gate), dup = dout * silu(gate).
  // An output may alias an input (same element), not the other output.
  virtual void swiglu_backward(int64_t /*M*/, int64_t /*N*/, const float* /*gate*/, int64_t /*ldg*/,
                               const float* /*up*/, int64_t /*ldu*/, const float* /*dout*/, int64_t /*ldd*/,
                               float* /*dgate*/, int64_t /*lddg*/, float* /*dup*/, int64_t /*lddu*/) {
    not_implemented("swiglu_backward");
  }
  // Training attention: causal GQA self-attention over the sequence itself (no KV cache).
  // q[B*T, Hq*hd], k/v[B*T, Hkv*hd] (row strides ldq/ldk/ldv); query t of row b attends to keys
  // s <= t with key_mask[b*T + s] != 0 (int32 [B, T]); query head h reads KV head h / (Hq/Hkv).
  // out[B*T, Hq*hd] = softmax(scale * q·kᵀ) · v and lse[B, Hq, T] = log Σ exp(scale * q·k) over
  // the visible keys; a query with no visible key gets out = 0 and lse = -inf.
  virtual void attention_train(int64_t /*B*/, int64_t /*T*/, int64_t /*Hq*/, int64_t /*Hkv*/, int64_t /*hd*/,
                               const float* /*q*/, int64_t /*ldq*/, const float* /*k*/, int64_t /*ldk*/,
                               const float* /*v*/, int64_t /*ldv*/, const int32_t* /*key_mask*/, float /*scale*/,
                               float* /*out*/, int64_t /*ldo*/, float* /*lse*/) {
    not_implemented("attention_train");
  }
  // Its backward from the forward's inputs, out and lse, and dout[B*T, Hq*hd]: overwrites
  // dq[B*T, Hq*hd] and dk/dv[B*T, Hkv*hd] (summed over the query heads sharing a KV head).
  // Probabilities are recomputed from q, k and lse; rows with lse = -inf get gradient 0.
  virtual void attention_train_backward(int64_t /*B*/, int64_t /*T*/, int64_t /*Hq*/, int64_t /*Hkv*/, int64_t /*hd*/,
                                        const float* /*q*/, int64_t /*ldq*/, const float* /*k*/, int64_t /*ldk*/,
                                        const float* /*v*/, int64_t /*ldv*/, const int32_t* /*key_mask*/,
                                        float /*scale*/, const float* /*out*/, int64_t /*ldo*/, const float* /*lse*/,
                                        const float* /*dout*/, int64_t /*lddo*/, float* /*dq*/, int64_t /*lddq*/,
                                        float* /*dk*/, int64_t /*lddk*/, float* /*dv*/, int64_t /*lddv*/) {
    not_implemented("attention_train_backward");
  }
  // Softmax cross-entropy per row of logits[M, V] (row stride ldl); labels int32 [M] lie in
  // [0, V) or are -100 (ignored; checked by the caller). loss[M] = logsumexp(row) - row[label]
  // (0 when ignored). With want_grad the row is overwritten by grad_scale * (softmax(row) -
  // onehot(label)), zeros on ignored rows. Driven chunk by chunk by lm_cross_entropy (model/lm_loss.hpp).
  virtual void cross_entropy_rows(int64_t /*M*/, int64_t /*V*/, float* /*logits*/, int64_t /*ldl*/,
                                  const int32_t* /*labels*/, float /*grad_scale*/, bool /*want_grad*/,
                                  float* /*loss*/) {
    not_implemented("cross_entropy_rows");
  }
  // The lm_head of the training loss (model/lm_loss.hpp's lm_cross_entropy*) beyond the ops above:
  // a backend may read an fp32 lm_head [V, D] through a layout of its own made per loss call (CPU: bf16
  // panels packed once for all chunks), and may read a GGUF's tied Q8_0 token_embd in place of its
  // fp32 table (lm_cross_entropy_q8_0_as_f32: the same bits, no V x D fp32 table). The loss, the model
  // and its memory plan (model/train_memory.cpp) ask here instead of branching on the backend.
  struct LmHeadCall {
    int64_t N = 0, D = 0, V = 0, chunk_rows = 0;  // rows of h [N, D], vocabulary, rows per loss chunk
    bool bf16 = false, want_grad = false;          // compute_dtype bfloat16; dh too (a backward)
  };
  struct LmHeadExtras {
    size_t f32_table_bytes = 0;  // what the call allocates over an fp32 table beyond cross_entropy_workspace_bytes
    bool q8_0_rows = false;      // Q8_0 rows can stand in for the fp32 table (lm_cross_entropy_q8_0_as_f32)
    size_t q8_0_rows_bytes = 0;  // what that call allocates beyond cross_entropy_workspace_bytes
  };
  // Default: nothing beyond the ops above (CUDA, cpu:devsim); the CPU backend answers from its level.
  virtual LmHeadExtras lm_head_extras(const LmHeadCall& /*c*/) const { return {}; }
  // The two lm_head GEMMs of one loss call through the backend's own layout; its scratch (exactly
  // what lm_head_extras(c) promised) is freed with it.
  class LmHead {
   public:
    virtual ~LmHead() = default;
    // logits[m, V] (row stride ldl) = h[m, D] (ldh) · Eᵀ, as gemm_nt (bf16: gemm_nt_bf16) over the table.
    virtual void logits(int64_t m, const float* h, int64_t ldh, float* logits, int64_t ldl) = 0;
    // dh[m, D] (lddh) = G[m, V] (ldg) · E, as gemm_nn (bf16: gemm_nn_bf16) over the table.
    virtual void dh(int64_t m, const float* G, int64_t ldg, float* dh, int64_t lddh) = 0;
    size_t bytes = 0;  // the scratch it holds
  };
  // E: the fp32 table [V, D] (q8_0_rows false) or V Q8_0 rows of D standing for it (q8_0_rows true:
  // only where lm_head_extras(c).q8_0_rows). Null: no layout of its own for this call (the default;
  // the loss runs the GEMM ops above; never for q8_0_rows).
  virtual std::unique_ptr<LmHead> lm_head_begin(const LmHeadCall& /*c*/, const void* /*E*/, bool /*q8_0_rows*/) {
    return nullptr;
  }
  // LoRA dropout (inverted, as torch.nn.Dropout), its mask regenerated from a Philox4x32-10
  // stream instead of stored: element i = m*in + j of the [M, in] keep mask is 1 when output
  // offset + i of the stream of `seed` passes train::bernoulli_keep(x, 1 - p)
  // (train/philox_block.hpp), the same rule on every backend, so a seed gives the same masks on CPU
  // and GPU (model/lora.cpp derives seed and offset from adapter seed, step, layer, projection and
  // the pass's first token). 0 <= p < 1. out[M, in] (contiguous) = x * keep / (1 - p), x row stride ldx.
  virtual void lora_dropout(uint64_t /*seed*/, uint64_t /*offset*/, float /*p*/, int64_t /*M*/, int64_t /*in*/,
                            const float* /*x*/, int64_t /*ldx*/, float* /*out*/) {
    not_implemented("lora_dropout");
  }
  // dx[M, in] (row stride lddx) += g[M, in] (contiguous) * keep / (1 - p); dropped elements untouched.
  virtual void lora_dropout_backward(uint64_t /*seed*/, uint64_t /*offset*/, float /*p*/, int64_t /*M*/, int64_t /*in*/,
                                     const float* /*g*/, float* /*dx*/, int64_t /*lddx*/) {
    not_implemented("lora_dropout_backward");
  }

  // ---- optimizer ops on one contiguous fp32 buffer of all LoRA parameters, its gradient buffer
  // and the AdamW moments (train/lora_optimizer.hpp drives them; all pointers in backend memory).
  // AdamW on n elements, in place on p, m, v from g: per element exactly train::adamw_update (the
  // same float operations in the same order, each rounded, no fused multiply-add), so backends
  // agree bit for bit on the same inputs.
  virtual void adamw_update(int64_t /*n*/, float* /*p*/, const float* /*g*/, float* /*m*/, float* /*v*/,
                            const train::AdamWScalars& /*s*/) {
    not_implemented("adamw_update");
  }
  // Sum of squares of x in double over chunks: chunk c = x[bounds[c], bounds[c+1]) (bounds int64
  // [n_chunks + 1], non-decreasing, bounds[0] = 0); partial[c] = the chunk's sum (double
  // [n_chunks]); out[0] = the partials added one by one in chunk order (double). Squares of floats
  // are exact in double; inside a chunk each backend sums in a fixed order (CPU: four interleaved
  // running sums, train/grad_utils; CUDA: a fixed tree), never with atomics: deterministic.
  virtual void sum_squares(int64_t /*n_chunks*/, const int64_t* /*bounds*/, const float* /*x*/, double* /*partial*/,
                           double* /*out*/) {
    not_implemented("sum_squares");
  }
  // x[n] *= s (gradient clipping)
  virtual void scale_inplace(int64_t /*n*/, float* /*x*/, float /*s*/) { not_implemented("scale_inplace"); }
  // out[0] = index of the first NaN or +-inf in x[n], -1 when every element is finite (int64).
  virtual void find_nonfinite(int64_t /*n*/, const float* /*x*/, int64_t* /*out*/) {
    not_implemented("find_nonfinite");
  }

  // ---- host staging for activation offload (gradient checkpointing, offload_checkpoints): host
  // memory the backend copies to and from fastest (CUDA: pinned), and copies ordered with the
  // backend's work. Defaults (every backend): plain host memory, download / upload.
  virtual void* host_alloc(size_t bytes);
  virtual void host_free(void* p);
  // dst_host (from host_alloc) = src[bytes]; may return before the copy is done: the data is
  // valid after the next synchronize(). The copy may run beside later ops (CUDA: a copy stream):
  // src must not be written by ops queued before the next offload, reload or synchronize.
  virtual void offload(void* dst_host, const void* src, size_t bytes) { download(dst_host, src, bytes); }
  // dst[bytes] = src_host (from host_alloc), ordered before later ops on dst.
  virtual void reload(void* dst, const void* src_host, size_t bytes) { upload(dst, src_host, bytes); }

 protected:
  // ExecScope's hooks: enter may throw (nothing is bound then); leave runs when the scope ends,
  // failed when it ends by an exception (CUDA waits for the Exec's queue so no work is left pending).
  virtual void exec_enter(Exec* /*e*/) {}
  virtual void exec_leave(Exec* /*e*/, bool /*failed*/) noexcept {}
  friend class ExecScope;

  [[noreturn]] void not_implemented(const char* op) const {
    throw std::runtime_error(name() + ": op " + op + " not implemented");
  }
};

// Binds exec (of backend be; null: nothing is bound) to the calling thread until the scope ends;
// scopes nest (the previous binding comes back).
class Backend::ExecScope {
 public:
  ExecScope(Backend& be, Exec* exec);
  ~ExecScope();
  ExecScope(const ExecScope&) = delete;
  ExecScope& operator=(const ExecScope&) = delete;

 private:
  Backend& be_;
  Exec* exec_;
  Exec* prev_ = nullptr;
  int uncaught_ = 0;
};

// RAII over Backend::host_output_begin/end: `HostOutput o(be, dst, bytes); op(o.f32()); o.finish();`
class HostOutput {
 public:
  HostOutput(Backend& be, void* dst_host, size_t bytes)
      : be_(be), dst_(dst_host), bytes_(bytes), p_(be.host_output_begin(dst_host, bytes)) {}
  ~HostOutput() {
    if (p_) try {
        be_.host_output_end(dst_, p_, bytes_, false);
      } catch (...) {  // already unwinding from the op's error
      }
  }
  HostOutput(const HostOutput&) = delete;
  HostOutput& operator=(const HostOutput&) = delete;
  float* f32() const { return static_cast<float*>(p_); }
  void finish() {
    void* p = p_;
    p_ = nullptr;
    be_.host_output_end(dst_, p, bytes_, true);
  }

 private:
  Backend& be_;
  void* dst_;
  size_t bytes_;
  void* p_;
};

// Backends by name: "cpu" (best SIMD level, or the one set active), "cpu:scalar" (reference),
// "cpu:generic", "cpu:avx2", "cpu:avx512", "cuda" / "cuda:N". Throws ValueError naming the
// reason when unavailable (unknown name, level unsupported by this CPU, no CUDA build, no GPU).
Backend& get_backend(const std::string& name);
// Names of every backend usable on this machine, e.g. {"cpu:scalar", "cpu:generic", "cpu:avx2", "cuda"}.
std::vector<std::string> available_backends();

// The ops the CUDA backend implements (known without a GPU; empty when not compiled).
std::vector<std::string> cuda_supported_ops();

// CUDA status for `qlora-native info`.
bool cuda_compiled();
int cuda_device_count();          // 0 when not compiled, no driver or no GPU
std::string cuda_device_summary();  // e.g. "NVIDIA H200 (sm_90, 139 GiB)" or the reason there is none

}  // namespace qlora
