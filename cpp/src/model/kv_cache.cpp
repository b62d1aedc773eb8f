#include "model/kv_cache.hpp"

#include "common/error.hpp"

namespace qlora::model {

KvCache::KvCache(Backend& be, const LlamaConfig& cfg, int64_t batch, int64_t capacity)
    : be_(be), B_(batch), cap_(capacity), key_mask_(batch * capacity, 0), n_real_(batch, 0) {
  check_arg(batch >= 1 && capacity >= 1, "KV cache: batch and capacity must be >= 1");
  per_layer_ = batch * cfg.num_kv_heads * capacity * cfg.head_dim;
  // One allocation for every layer's K and V: large enough for the CPU backend's huge pages
  // (decode streams the whole cache once per step; per-layer 1 MB buffers missed the TLB).
  store_ = DeviceBuffer(be, sizeof(float) * 2 * cfg.num_layers * per_layer_);
  key_mask_dev_ = DeviceBuffer(be, sizeof(int32_t) * key_mask_.size());
  be.upload(key_mask_dev_.data(), key_mask_.data(), sizeof(int32_t) * key_mask_.size());
}

int64_t KvCache::append(const int32_t* mask, int64_t T, std::vector<int32_t>& pos) {
  check_arg(used_ + T <= cap_, "KV cache full: " + std::to_string(used_) + " + " + std::to_string(T) +
                                   " tokens exceed its capacity " + std::to_string(cap_));
  const int64_t start = used_;
  pos.assign(B_ * T, 0);
  for (int64_t b = 0; b < B_; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const bool real = mask[b * T + t] != 0;
      key_mask_[b * cap_ + start + t] = real ? 1 : 0;
      // transformers: position_ids = cumsum(mask) - 1, padding positions set to 1 (never attended).
      pos[b * T + t] = real ? static_cast<int32_t>(n_real_[b]) : 1;
      if (real) ++n_real_[b];
    }
  }
  used_ += T;
  be_.upload(key_mask_dev_.data(), key_mask_.data(), sizeof(int32_t) * key_mask_.size());
  return start;
}

size_t KvCache::bytes() const {
  size_t n = key_mask_dev_.bytes();
  return n + store_.bytes();
}

}  // namespace qlora::model
