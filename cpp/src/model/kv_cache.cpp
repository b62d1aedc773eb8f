#include "model/kv_cache.hpp"

#include <cstdio>

#include "common/checked.hpp"
#include "common/error.hpp"

namespace qlora::model {

namespace {
std::string gib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", static_cast<double>(bytes) / (1u << 30));
  return buf;
}
}  // namespace

int64_t KvCache::bytes_needed(const LlamaConfig& cfg, int64_t batch, int64_t capacity, bool bf16) {
  const std::string what = "KV cache of batch " + std::to_string(batch) + " x capacity " + std::to_string(capacity);
  check_arg(batch >= 1 && capacity >= 1, what + ": batch and capacity must be >= 1");
  const int64_t store = checked_mul({bf16 ? int64_t{sizeof(uint16_t)} : int64_t{sizeof(float)}, 2, cfg.num_layers, batch, cfg.num_kv_heads, capacity,
                                     cfg.head_dim},
                                    what);
  const int64_t mask = checked_mul({int64_t{sizeof(int32_t)} * 2, batch, capacity}, what);  // host + device copy
  int64_t total = 0;
  if (__builtin_add_overflow(store, mask, &total)) throw ValueError(what + ": size overflows 64-bit integers");
  return total;
}

KvCache::KvCache(Backend& be, const LlamaConfig& cfg, int64_t batch, int64_t capacity, bool bf16)
    : be_(be), B_(batch), cap_(capacity), bf16_(bf16) {
  // Checked before any allocation: batch and capacity come from the caller (prompt count,
  // prompt length + max_new_tokens); a wrapped product would give a tiny cache written past.
  const int64_t need = bytes_needed(cfg, batch, capacity, bf16);
  const int64_t ram = be.memory_bytes();
  check_arg(ram == 0 || need <= ram, "KV cache of batch " + std::to_string(batch) + " x capacity " +
                                         std::to_string(capacity) + " tokens needs " + gib(need) +
                                         ", more than " + be.memory_name() + " (" + gib(ram) +
                                         "): lower the batch or the number of tokens");
  key_mask_.assign(static_cast<size_t>(batch * capacity), 0);
  n_real_.assign(static_cast<size_t>(batch), 0);
  per_layer_ = batch * cfg.num_kv_heads * capacity * cfg.head_dim;
  exec_ = be.new_exec();
  Backend::ExecScope scope(be, exec_.get());
  // One allocation for every layer's K and V: large enough for the CPU backend's huge pages
  // (decode streams the whole cache once per step; per-layer 1 MB buffers missed the TLB).
  store_ = DeviceBuffer(be, (bf16 ? sizeof(uint16_t) : sizeof(float)) * 2 * cfg.num_layers * per_layer_);
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
