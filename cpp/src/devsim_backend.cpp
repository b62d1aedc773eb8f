#include "devsim_backend.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

#include "device_pool.hpp"

namespace qlora {

const std::vector<std::string>& cuda_kernel_ops() {
  static const std::vector<std::string> ops = {"q8_0_gemm_nt", "q8_0_rows", "half_gemm_nt", "half_rows",
                                               "embedding", "rmsnorm",
                                               "add_inplace", "add_bias", "rope", "swiglu",
                                               "kv_write", "attention", "kv_write_bf16", "attention_kv_bf16",
                                               "rope_backward", "cross_entropy_rows",
                                               "adamw_update", "sum_squares", "scale_inplace", "find_nonfinite",
                                               "rmsnorm_backward", "swiglu_backward", "attention_train",
                                               "attention_train_backward", "lora_dropout", "lora_dropout_backward"};
  return ops;
}

namespace {

// The CPU backend's memory as a "raw device" for the caching pool: queues are tokens (the CPU runs
// each op to its end), so the pool's logic (arenas, reuse, counters) is what CI tests here.
class HostRaw final : public RawDevice {
 public:
  explicit HostRaw(Backend& cpu) : c_(cpu) {}
  void* raw_alloc(size_t bytes) override {
    try {
      return c_.alloc(bytes);
    } catch (const std::bad_alloc&) {
      return nullptr;
    }
  }
  // CpuBackend::free is std::free; called directly because the pool's destructor may run at exit
  // after the "cpu" backend object is gone (both live in the static backend registry).
  bool raw_free(void* p) noexcept override {
    std::free(p);
    return true;
  }
  void* new_queue() override { return new char; }
  void destroy_queue(void* q) noexcept override { delete static_cast<char*>(q); }
  void sync_queue(void*) override {}
  void sync_device() override {}

 private:
  Backend& c_;
};

class DevsimBackend final : public Backend {
 public:
  explicit DevsimBackend(Backend& cpu)
      : c_(cpu), raw_(cpu), pool_(raw_, &default_queue_), host_(host_raw_alloc, host_raw_free, nullptr, "host memory") {}
  std::string name() const override { return "cpu:devsim"; }
  bool host_memory() const override { return false; }
  bool supports_op(const std::string& op) const override {
    const std::vector<std::string>& o = cuda_kernel_ops();
    return is_core_op(op) || std::find(o.begin(), o.end(), op) != o.end();
  }
  // Memory through the same caching pool as the CUDA backend (device_pool.hpp), over host memory.
  void* alloc(size_t bytes) override { return pool_.alloc(current_arena(*this, pool_), bytes); }
  void free(void* p) override { pool_.free(p); }
  std::unique_ptr<Exec> new_exec() override { return std::make_unique<PoolExec>(*this, pool_); }
  DeviceStats device_stats() const override {
    DeviceStats s = pool_.stats();
    host_.add_stats(s);
    return s;
  }
  void reset_peak_memory() override { pool_.reset_peak(); }
  void release_cached_memory() override {
    pool_.release_cached();
    host_.release_cached();
  }
  // Offload staging through the CUDA backend's HostStagingPool (over malloc here, cudaHostAlloc there).
  void* host_alloc(size_t bytes) override { return host_.alloc(bytes); }
  void host_free(void* p) override { host_.free(p); }
  // offload as late as CUDA's copy stream may run it: the copy is made at the next offload, reload
  // or synchronize (Backend::offload's contract), so model code that writes an offloaded buffer
  // too early reads back the wrong data here (the offload tests compare bit for bit), not only on a GPU.
  void offload(void* dst_host, const void* src, size_t bytes) override {
    std::lock_guard<std::mutex> lk(off_mu_);
    flush_offload_locked();
    off_ = {dst_host, src, bytes};
  }
  void reload(void* dst, const void* src_host, size_t bytes) override {
    {
      std::lock_guard<std::mutex> lk(off_mu_);
      flush_offload_locked();
    }
    c_.upload(dst, src_host, bytes);
  }
  void upload(void* dst, const void* src, size_t bytes) override { c_.upload(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { c_.download(dst, src, bytes); }
  void fill_zero(void* p, size_t bytes) override { c_.fill_zero(p, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { c_.copy(dst, src, bytes); }
  void synchronize() override {
    std::lock_guard<std::mutex> lk(off_mu_);
    flush_offload_locked();
  }

  void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
               float beta, float* C, int64_t ldc) override {
    c_.gemm_nt(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
               float beta, float* C, int64_t ldc) override {
    c_.gemm_nn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
               float beta, float* C, int64_t ldc) override {
    c_.gemm_tn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                   int64_t ldy) override {
    c_.nf4_gemm_nt(M, alpha, X, ldx, W, beta, Y, ldy);
  }
  void nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                   int64_t lddx) override {
    c_.nf4_gemm_nn(M, alpha, dY, lddy, W, beta, dX, lddx);
  }
  void nf4_dequantize(const Nf4Ref& W, float* out) override { c_.nf4_dequantize(W, out); }

  // bf16 compute as CUDA sm_80+ has it (the five GEMMs, the bf16 KV cache) where the CPU has it;
  // fp32 by default as on the CPU, so devsim stays bit-identical to "cpu" unless bf16 is asked for.
  bool has_bf16_compute() const override { return c_.has_bf16_compute(); }
  void gemm_nt_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override {
    c_.gemm_nt_bf16(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_nn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override {
    c_.gemm_nn_bf16(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_tn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override {
    c_.gemm_tn_bf16(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void nf4_gemm_nt_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                        int64_t ldy) override {
    c_.nf4_gemm_nt_bf16(M, alpha, X, ldx, W, beta, Y, ldy);
  }
  void nf4_gemm_nn_bf16(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                        int64_t lddx) override {
    c_.nf4_gemm_nn_bf16(M, alpha, dY, lddy, W, beta, dX, lddx);
  }
  void kv_write_bf16(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, uint16_t* cache,
                     int64_t S_cap, int64_t start) override {
    c_.kv_write_bf16(B, T, H, hd, x, ldx, cache, S_cap, start);
  }
  void attention_kv_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                         const uint16_t* k, const uint16_t* v, int64_t S_cap, int64_t start, const int32_t* key_mask,
                         float scale, float* out, int64_t ldo) override {
    c_.attention_kv_bf16(B, T, Hq, Hkv, hd, q, ldq, k, v, S_cap, start, key_mask, scale, out, ldo);
  }

  void q8_0_gemm_nt(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                    int64_t ldy) override {
    c_.q8_0_gemm_nt(M, N, K, X, ldx, W, Y, ldy);
  }
  void q8_0_rows(int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) override {
    c_.q8_0_rows(M, K, W, ids, out);
  }
  void half_gemm_nt(HalfType t, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                    int64_t ldy) override {
    c_.half_gemm_nt(t, M, N, K, X, ldx, W, Y, ldy);
  }
  void half_rows(HalfType t, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) override {
    c_.half_rows(t, M, K, W, ids, out);
  }
  void embedding(int64_t M, int64_t D, const float* table, const int32_t* ids, float* out) override {
    c_.embedding(M, D, table, ids, out);
  }
  void rmsnorm(int64_t M, int64_t D, const float* x, const float* w, float eps, float* out) override {
    c_.rmsnorm(M, D, x, w, eps, out);
  }
  void add_inplace(int64_t n, const float* x, float* y) override { c_.add_inplace(n, x, y); }
  void add_bias(int64_t M, int64_t N, const float* bias, float* y, int64_t ldy) override {
    c_.add_bias(M, N, bias, y, ldy);
  }
  void rope(int64_t M, int64_t H, int64_t hd, float* x, int64_t ldx, const int32_t* pos, const float* inv) override {
    c_.rope(M, H, hd, x, ldx, pos, inv);
  }
  void rope_backward(int64_t M, int64_t H, int64_t hd, float* x, int64_t ldx, const int32_t* pos,
                     const float* inv) override {
    c_.rope_backward(M, H, hd, x, ldx, pos, inv);
  }
  void swiglu(int64_t M, int64_t N, const float* g, int64_t ldg, const float* u, int64_t ldu, float* o,
              int64_t ldo) override {
    c_.swiglu(M, N, g, ldg, u, ldu, o, ldo);
  }
  void kv_write(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache, int64_t S_cap,
                int64_t start) override {
    c_.kv_write(B, T, H, hd, x, ldx, cache, S_cap, start);
  }
  void attention(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                 const float* k, const float* v, int64_t S_cap, int64_t start, const int32_t* key_mask, float scale,
                 float* out, int64_t ldo) override {
    c_.attention(B, T, Hq, Hkv, hd, q, ldq, k, v, S_cap, start, key_mask, scale, out, ldo);
  }
  void cross_entropy_rows(int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels, float grad_scale,
                          bool want_grad, float* loss) override {
    c_.cross_entropy_rows(M, V, logits, ldl, labels, grad_scale, want_grad, loss);
  }
  void rmsnorm_backward(int64_t M, int64_t D, const float* x, const float* w, float eps, const float* dy,
                        float* dx) override {
    c_.rmsnorm_backward(M, D, x, w, eps, dy, dx);
  }
  void swiglu_backward(int64_t M, int64_t N, const float* g, int64_t ldg, const float* u, int64_t ldu, const float* d,
                       int64_t ldd, float* dg, int64_t lddg, float* du, int64_t lddu) override {
    c_.swiglu_backward(M, N, g, ldg, u, ldu, d, ldd, dg, lddg, du, lddu);
  }
  void attention_train(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                       const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask, float scale,
                       float* out, int64_t ldo, float* lse) override {
    c_.attention_train(B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse);
  }
  void attention_train_backward(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                const int32_t* key_mask, float scale, const float* out, int64_t ldo, const float* lse,
                                const float* dout, int64_t lddo, float* dq, int64_t lddq, float* dk, int64_t lddk,
                                float* dv, int64_t lddv) override {
    c_.attention_train_backward(B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, key_mask, scale, out, ldo, lse, dout, lddo,
                                dq, lddq, dk, lddk, dv, lddv);
  }
  void lora_dropout(uint64_t seed, uint64_t offset, float p, int64_t M, int64_t in, const float* x, int64_t ldx,
                    float* out) override {
    c_.lora_dropout(seed, offset, p, M, in, x, ldx, out);
  }
  void lora_dropout_backward(uint64_t seed, uint64_t offset, float p, int64_t M, int64_t in, const float* g, float* dx,
                             int64_t lddx) override {
    c_.lora_dropout_backward(seed, offset, p, M, in, g, dx, lddx);
  }
  void adamw_update(int64_t n, float* p, const float* g, float* m, float* v, const train::AdamWScalars& s) override {
    c_.adamw_update(n, p, g, m, v, s);
  }
  void sum_squares(int64_t n_chunks, const int64_t* bounds, const float* x, double* partial, double* out) override {
    c_.sum_squares(n_chunks, bounds, x, partial, out);
  }
  void scale_inplace(int64_t n, float* x, float s) override { c_.scale_inplace(n, x, s); }
  void find_nonfinite(int64_t n, const float* x, int64_t* out) override { c_.find_nonfinite(n, x, out); }

 private:
  Backend& c_;
  HostRaw raw_;
  static void* host_raw_alloc(size_t bytes, void*) { return std::malloc(bytes); }
  static void host_raw_free(void* p, void*) { std::free(p); }
  char default_queue_ = 0;  // the default arena's queue token
  DevicePool pool_;         // after raw_ (destroyed before it)
  HostStagingPool host_;
  struct PendingOffload {
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;
  };
  void flush_offload_locked() {
    if (off_.bytes) c_.download(off_.dst, off_.src, off_.bytes);
    off_ = {};
  }
  std::mutex off_mu_;
  PendingOffload off_;
};

}  // namespace

std::unique_ptr<Backend> make_devsim_backend(Backend& cpu) { return std::make_unique<DevsimBackend>(cpu); }

}  // namespace qlora
