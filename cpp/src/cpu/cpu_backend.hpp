#pragma once
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "backend.hpp"
#include "cpu/features.hpp"

namespace qlora::cpu {

class CpuBackend final : public Backend {
 public:
  // follow_active: use whatever active_simd_level() is at call time (the "cpu" backend).
  CpuBackend(SimdLevel level, bool follow_active);
  SimdLevel level() const;

  std::string name() const override;
  bool host_memory() const override { return true; }
  bool supports_op(const std::string& op) const override {  // every op, at every SIMD level
    const std::vector<std::string>& all = all_ops();
    return std::find(all.begin(), all.end(), op) != all.end();
  }
  int64_t memory_bytes() const override {  // the machine's physical memory (0: unknown)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : 0;
  }
  void* host_output_begin(void* dst_host, size_t) override { return dst_host; }  // computed in place
  void host_output_end(void*, void*, size_t, bool) override {}
  void* alloc(size_t bytes) override;
  void free(void* p) override;
  void upload(void* dst, const void* src_host, size_t bytes) override;
  void download(void* dst_host, const void* src, size_t bytes) override;
  void fill_zero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void synchronize() override {}

  void gemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override;
  void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override;
  void gemm_tn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
               int64_t ldb, float beta, float* C, int64_t ldc) override;
  void nf4_gemm_nt(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                   int64_t ldy) override;
  void nf4_gemm_nt_many(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W, float* const* Y,
                        const int64_t* ldy) override;
  // Multi-adapter LoRA terms (cpu/lora_sgmv.hpp); the scalar level runs Backend's reference.
  void lora_segments(int64_t in, int64_t out, const float* x, int64_t ldx, int64_t n, const LoraSegment* seg, float* y,
                     int64_t ldy, float* t) override;
  void nf4_gemm_nt_many_lora(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                             float* const* Y, const int64_t* ldy, const LoraProblem* lora, float* t) override;
  void lora_segments_many(int64_t np, const LoraProblem* p, float* t) override;
  // bf16 inference copies of LoRA factors (cpu_backend_lora_bf16.cpp): made where
  // cpu::lora_bf16_available(level()) (AVX512-BF16 units, or the scalar oracle).
  size_t lora_bf16_bytes(int64_t r, int64_t in, int64_t out) const override;
  void lora_pack_bf16(int64_t r, int64_t in, int64_t out, const float* A, const float* B, void* dst) override;
  void nf4_gemm_nn(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                   int64_t lddx) override;
  void nf4_dequantize(const Nf4Ref& W, float* out) override;
  // bf16 compute (cpu/gemm_bf16.hpp): AVX512-BF16 kernels at the avx512 level, the emulating
  // oracle at scalar, the fp32 kernels elsewhere.
  bool has_bf16_compute() const override;
  void gemm_nt_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override;
  void gemm_nn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override;
  void gemm_tn_bf16(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float beta, float* C, int64_t ldc) override;
  void nf4_gemm_nt_bf16(int64_t M, float alpha, const float* X, int64_t ldx, const Nf4Ref& W, float beta, float* Y,
                        int64_t ldy) override;
  void nf4_gemm_nt_many_bf16(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                             float* const* Y, const int64_t* ldy) override;
  // Decode with LoRA in bf16 compute: one job for the bf16 GEMV and the LoRA terms
  // (cpu_backend_lora_fused.cpp).
  void nf4_gemm_nt_many_lora_bf16(int64_t M, const float* X, int64_t ldx, int64_t n, const Nf4Ref* const* W,
                                  float* const* Y, const int64_t* ldy, const LoraProblem* lora, float* t) override;
  void nf4_gemm_nn_bf16(int64_t M, float alpha, const float* dY, int64_t lddy, const Nf4Ref& W, float beta, float* dX,
                        int64_t lddx) override;
  void attention_train_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                            const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask,
                            float scale, float* out, int64_t ldo, float* lse) override;
  void attention_train_backward_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                     int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                     const int32_t* key_mask, float scale, const float* out, int64_t ldo,
                                     const float* lse, const float* dout, int64_t lddo, float* dq, int64_t lddq,
                                     float* dk, int64_t lddk, float* dv, int64_t lddv) override;
  void q8_0_gemm_nt(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                    int64_t ldy) override;
  void q8_0_rows(int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) override;
  void half_gemm_nt(HalfType t, int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const void* W, float* Y,
                    int64_t ldy) override;  // cpu_backend_half.cpp
  void half_rows(HalfType t, int64_t M, int64_t K, const void* W, const int32_t* ids, float* out) override;

  // Transformer ops (cpu/ops_model.hpp).
  void embedding(int64_t M, int64_t D, const float* table, const int32_t* ids, float* out) override;
  void rmsnorm(int64_t M, int64_t D, const float* x, const float* w, float eps, float* out) override;
  void add_inplace(int64_t n, const float* x, float* y) override;
  void add_bias(int64_t M, int64_t N, const float* bias, float* y, int64_t ldy) override;
  void rope(int64_t M, int64_t n_heads, int64_t head_dim, float* x, int64_t ldx, const int32_t* pos,
            const float* inv_freq) override;
  void swiglu(int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out,
              int64_t ldo) override;
  void kv_write(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, float* cache,
                int64_t S_cap, int64_t start) override;
  void attention(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                 const float* k_cache, const float* v_cache, int64_t S_cap, int64_t start, const int32_t* key_mask,
                 float scale, float* out, int64_t ldo) override;
  // The bf16 KV cache (cpu_backend_bf16.cpp), at every SIMD level.
  void kv_write_bf16(int64_t B, int64_t T, int64_t H, int64_t hd, const float* x, int64_t ldx, uint16_t* cache,
                     int64_t S_cap, int64_t start) override;
  void attention_kv_bf16(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                         const uint16_t* k_cache, const uint16_t* v_cache, int64_t S_cap, int64_t start,
                         const int32_t* key_mask, float scale, float* out, int64_t ldo) override;

  // Training ops (cpu/ops_backward.hpp).
  void rmsnorm_backward(int64_t M, int64_t D, const float* x, const float* w, float eps, const float* dy,
                        float* dx) override;
  void rope_backward(int64_t M, int64_t n_heads, int64_t head_dim, float* dx, int64_t ldx, const int32_t* pos,
                     const float* inv_freq) override;
  void swiglu_backward(int64_t M, int64_t N, const float* gate, int64_t ldg, const float* up, int64_t ldu,
                       const float* dout, int64_t ldd, float* dgate, int64_t lddg, float* dup, int64_t lddu) override;
  void attention_train(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q, int64_t ldq,
                       const float* k, int64_t ldk, const float* v, int64_t ldv, const int32_t* key_mask, float scale,
                       float* out, int64_t ldo, float* lse) override;
  void attention_train_backward(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t hd, const float* q,
                                int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                const int32_t* key_mask, float scale, const float* out, int64_t ldo, const float* lse,
                                const float* dout, int64_t lddo, float* dq, int64_t lddq, float* dk, int64_t lddk,
                                float* dv, int64_t lddv) override;
  void cross_entropy_rows(int64_t M, int64_t V, float* logits, int64_t ldl, const int32_t* labels, float grad_scale,
                          bool want_grad, float* loss) override;
  // The loss's lm_head at level() (cpu_backend_lm_head.cpp: cpu/lm_head_bf16.hpp's panels,
  // cpu/q8_0_head.hpp's fp32 GEMMs).
  LmHeadExtras lm_head_extras(const LmHeadCall& c) const override;
  std::unique_ptr<LmHead> lm_head_begin(const LmHeadCall& c, const void* E, bool q8_0_rows) override;
  // LoRA dropout (cpu_backend_dropout.cpp: the Philox mask code model/lora.cpp ran before)
  void lora_dropout(uint64_t seed, uint64_t offset, float p, int64_t M, int64_t in, const float* x, int64_t ldx,
                    float* out) override;
  void lora_dropout_backward(uint64_t seed, uint64_t offset, float p, int64_t M, int64_t in, const float* g, float* dx,
                             int64_t lddx) override;
  // optimizer ops (cpu_backend_train.cpp: train/optimizer.cpp and grad_utils.cpp code)
  void adamw_update(int64_t n, float* p, const float* g, float* m, float* v, const train::AdamWScalars& s) override;
  void sum_squares(int64_t n_chunks, const int64_t* bounds, const float* x, double* partial, double* out) override;
  void scale_inplace(int64_t n, float* x, float s) override;
  void find_nonfinite(int64_t n, const float* x, int64_t* out) override;

 private:
  SimdLevel level_;
  bool follow_active_;
};

}  // namespace qlora::cpu
