// Per-layer key/value cache of a batch being decoded, plus the bookkeeping that turns an
// attention mask into slots, positions and the key mask.
//
// Slot s of row b holds the token fed at step s (all rows advance together); a padding token
// occupies a slot whose key_mask entry is 0. The RoPE position of a real token is the number of
// real tokens before it in its row (cumsum(mask) - 1, as transformers' generate computes it).
//
// A cache owns the Backend::Exec its passes run on (CUDA: its own stream and memory arena; null on
// host backends): its memory is allocated and its key mask uploaded on it, and LlamaModel::run
// binds it for every pass over the cache. So each generation context (and each forward() call, whose
// temporary cache this is too) runs on its own stream; closed Execs are recycled with their cached
// memory (device_pool.hpp), so a steady stream of requests creates no streams and no allocations.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/buffer.hpp"
#include "model/config.hpp"

namespace qlora::model {

class KvCache {
 public:
  // ValueError when batch x capacity overflows or needs more than the machine's memory (host
  // backends), before anything is allocated. bf16: K and V stored in bf16 (the compute dtype of a
  // compute_dtype="bfloat16" pass: Backend::kv_write_bf16 / attention_kv_bf16), half the bytes.
  KvCache(Backend& be, const LlamaConfig& cfg, int64_t batch, int64_t capacity, bool bf16 = false);
  // Bytes of a cache of this size (K, V and the key mask); ValueError on overflow.
  static int64_t bytes_needed(const LlamaConfig& cfg, int64_t batch, int64_t capacity, bool bf16 = false);

  int64_t batch() const { return B_; }
  int64_t capacity() const { return cap_; }
  int64_t used() const { return used_; }  // slots filled so far
  bool bf16() const { return bf16_; }  // the dtype of K and V, fixed at creation
  // fp32 caches (!bf16()):
  float* k(int64_t layer) const { return store_.f32() + 2 * layer * per_layer_; }      // [B, Hkv, cap, hd]
  float* v(int64_t layer) const { return store_.f32() + (2 * layer + 1) * per_layer_; }  // [B, Hkv, cap, hd]
  // bf16 caches (bf16()): bf16 bit patterns, same layout
  uint16_t* k_bf16(int64_t layer) const { return store_.data<uint16_t>() + 2 * layer * per_layer_; }
  uint16_t* v_bf16(int64_t layer) const { return store_.data<uint16_t>() + (2 * layer + 1) * per_layer_; }
  const int32_t* key_mask_device() const { return key_mask_dev_.data<int32_t>(); }  // [B, cap]
  Backend::Exec* exec() const { return exec_.get(); }  // bind with Backend::ExecScope for work on it

  // Registers T new slots per row from mask[B, T] (host; 0 = padding): fills pos[B*T] (host)
  // with RoPE positions, updates and uploads the key mask. Returns the first new slot.
  int64_t append(const int32_t* mask, int64_t T, std::vector<int32_t>& pos);
  size_t bytes() const;

 private:
  Backend& be_;
  int64_t B_, cap_, used_ = 0;
  int64_t per_layer_ = 0;            // elements of one layer's K (or V): B * Hkv * cap * hd
  bool bf16_ = false;
  std::unique_ptr<Backend::Exec> exec_;  // before the buffers: they are freed into its arena first
  DeviceBuffer store_;               // [layers, 2 (K, V), B, Hkv, cap, hd]
  std::vector<int32_t> key_mask_;    // [B, cap] host copy
  DeviceBuffer key_mask_dev_;        // int32 [B, cap]
  std::vector<int64_t> n_real_;      // [B] real tokens seen per row
};

}  // namespace qlora::model
