#include "device_pool.hpp"

#include <algorithm>
#include <limits>

namespace qlora {

struct DevicePool::Arena {
  struct Cached {
    void* p;
    uint64_t seq;  // when it was freed
  };
  void* queue = nullptr;
  bool is_default = false;
  bool closed = false;  // its Exec ended while blocks were live: those go back to the raw allocator
  std::multimap<size_t, Cached> cache;  // size class -> freed block
  size_t cached_bytes = 0, live_bytes = 0, peak_live_bytes = 0;
  int64_t live_blocks = 0;
};

namespace {
constexpr size_t kSmall = 4096, kSmallStep = 512, kMaxStep = size_t{2} << 20;
}  // namespace

size_t DevicePool::size_class(size_t bytes) {
  if (bytes > std::numeric_limits<size_t>::max() / 2) return 0;  // no device has that: alloc reports it
  size_t step = kSmallStep;
  if (bytes > kSmall) {
    int e = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes));  // 2^e <= bytes
    step = std::min(std::max(size_t{1} << (e - 3), kSmallStep), kMaxStep);
  }
  return (bytes + step - 1) / step * step;
}

DevicePool::DevicePool(RawDevice& raw, void* default_queue) : raw_(raw) {
  auto a = std::make_unique<Arena>();
  a->queue = default_queue;
  a->is_default = true;
  default_ = a.get();
  arenas_.emplace(default_, std::move(a));
}

DevicePool::~DevicePool() {
  Taken t;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& kv : arenas_) {
      take_cache_locked(kv.first, t);
      if (!kv.first->is_default && !kv.first->closed) t.queues.push_back(kv.first->queue);  // closed: destroyed
    }
  }
  // Runs at process exit too (backends are static): errors are ignored, nothing may throw here.
  try {
    if (!t.blocks.empty()) raw_.sync_device();
  } catch (...) {
  }
  free_taken(t);
}

void* DevicePool::queue(const Arena* a) { return a->queue; }

void DevicePool::take_cache_locked(Arena* a, Taken& t) {
  for (auto& kv : a->cache) t.blocks.push_back(kv.second.p);
  st_.reserved_bytes -= static_cast<int64_t>(a->cached_bytes);
  st_.raw_frees += static_cast<int64_t>(a->cache.size());
  a->cache.clear();
  a->cached_bytes = 0;
}

void DevicePool::delete_arena_locked(Arena* a) {
  idle_.erase(std::remove(idle_.begin(), idle_.end(), a), idle_.end());
  arenas_.erase(a);
}

void DevicePool::free_taken(Taken& t) noexcept {
  for (void* p : t.blocks) raw_.raw_free(p);
  for (void* q : t.queues) raw_.destroy_queue(q);
  t.blocks.clear();
  t.queues.clear();
}

DevicePool::Arena* DevicePool::open_arena() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!idle_.empty()) {
      Arena* a = idle_.back();
      idle_.pop_back();
      peak_open_ = std::max(peak_open_, ++open_);
      return a;
    }
  }
  void* q = raw_.new_queue();  // outside the lock: it may take a while
  auto a = std::make_unique<Arena>();
  a->queue = q;
  Arena* p = a.get();
  std::lock_guard<std::mutex> lk(mu_);
  arenas_.emplace(p, std::move(a));
  ++st_.queues_created;
  peak_open_ = std::max(peak_open_, ++open_);
  return p;
}

void DevicePool::close_arena(Arena* a) noexcept {
  if (!a) return;
  // Work still queued on it (a pass that threw) finishes before its cache is reused or freed.
  try {
    raw_.sync_queue(a->queue);
  } catch (...) {
  }
  Taken t;
  {
    std::lock_guard<std::mutex> lk(mu_);
    --open_;
    if (a->live_blocks == 0 && static_cast<int64_t>(idle_.size()) < peak_open_) {
      idle_.push_back(a);  // kept with its cache and queue for the next Exec
      return;
    }
    take_cache_locked(a, t);
    t.queues.push_back(a->queue);
    if (a->live_blocks == 0)
      delete_arena_locked(a);
    else
      a->closed = true;  // deleted when its last live block is freed
  }
  free_taken(t);
}

void* DevicePool::raw_alloc_counted(size_t cls) {
  void* p = raw_.raw_alloc(cls);
  std::lock_guard<std::mutex> lk(mu_);
  ++st_.raw_allocs;
  if (!p) ++st_.raw_alloc_failures;
  return p;
}

void* DevicePool::alloc(Arena* a, size_t bytes) {
  if (bytes == 0) return nullptr;
  const size_t cls = size_class(bytes);
  auto oom = [&](const char* why) {
    const Backend::DeviceStats s = stats();
    return OutOfDeviceMemory("out of device memory: " + std::string(why) + " " + std::to_string(bytes) +
                             " bytes (in use " + std::to_string(s.live_bytes) + " bytes, reserved " +
                             std::to_string(s.reserved_bytes) + ")");
  };
  if (cls == 0) throw oom("cannot allocate");
  Taken evict;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = a->cache.find(cls);
    if (it != a->cache.end()) {
      void* p = it->second.p;
      a->cache.erase(it);
      a->cached_bytes -= cls;
      ++st_.cache_hits;
      live_.emplace(p, Block{cls, a});
      a->live_bytes += cls, ++a->live_blocks;
      a->peak_live_bytes = std::max(a->peak_live_bytes, a->live_bytes);
      st_.live_bytes += static_cast<int64_t>(cls);
      st_.peak_live_bytes = std::max(st_.peak_live_bytes, st_.live_bytes);
      return p;
    }
    // A miss: keep the arena within twice its peak live bytes by giving back the blocks freed longest ago.
    const size_t peak = std::max(a->peak_live_bytes, a->live_bytes + cls);
    while (!a->cache.empty() && a->live_bytes + a->cached_bytes + cls > 2 * peak) {
      auto lru = a->cache.begin();
      for (auto j = a->cache.begin(); j != a->cache.end(); ++j)
        if (j->second.seq < lru->second.seq) lru = j;
      evict.blocks.push_back(lru->second.p);
      a->cached_bytes -= lru->first;
      st_.reserved_bytes -= static_cast<int64_t>(lru->first);
      ++st_.raw_frees;
      a->cache.erase(lru);
    }
  }
  if (!evict.blocks.empty()) {
    // Work queued before their free may still use them. A failed wait means the device is in an
    // error state: the blocks are freed anyway and the error reported.
    try {
      raw_.sync_queue(a->queue);
    } catch (...) {
      free_taken(evict);
      throw;
    }
    free_taken(evict);
  }
  void* p = raw_alloc_counted(cls);
  if (!p) {
    release_cached();
    p = raw_alloc_counted(cls);
    if (!p) throw oom("cannot allocate");
  }
  std::lock_guard<std::mutex> lk(mu_);
  live_.emplace(p, Block{cls, a});
  a->live_bytes += cls, ++a->live_blocks;
  a->peak_live_bytes = std::max(a->peak_live_bytes, a->live_bytes);
  st_.reserved_bytes += static_cast<int64_t>(cls);
  st_.peak_reserved_bytes = std::max(st_.peak_reserved_bytes, st_.reserved_bytes);
  st_.live_bytes += static_cast<int64_t>(cls);
  st_.peak_live_bytes = std::max(st_.peak_live_bytes, st_.live_bytes);
  return p;
}

void DevicePool::free(void* p) noexcept {
  if (!p) return;
  Taken t;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) {
      ++st_.invalid_frees;
      return;
    }
    const Block b = it->second;
    live_.erase(it);
    Arena* a = b.arena;
    a->live_bytes -= b.cls, --a->live_blocks;
    st_.live_bytes -= static_cast<int64_t>(b.cls);
    if (!a->closed) {
      a->cache.emplace(b.cls, Arena::Cached{p, ++seq_});
      a->cached_bytes += b.cls;
      return;
    }
    t.blocks.push_back(p);
    st_.reserved_bytes -= static_cast<int64_t>(b.cls);
    ++st_.raw_frees;
    if (a->live_blocks == 0) delete_arena_locked(a);
  }
  // A block of a closed arena: its queue is gone and other queues may have used it; wait for all.
  try {
    raw_.sync_device();
  } catch (...) {
  }
  free_taken(t);
}

void DevicePool::release_cached() {
  Taken t;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& kv : arenas_) take_cache_locked(kv.first, t);
    for (Arena* a : idle_) {
      t.queues.push_back(a->queue);
      arenas_.erase(a);
    }
    idle_.clear();
  }
  if (t.blocks.empty() && t.queues.empty()) return;
  try {
    raw_.sync_device();  // cached blocks may still be in use by work queued before their free
  } catch (...) {
    free_taken(t);
    throw;
  }
  free_taken(t);
}

Backend::DeviceStats DevicePool::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  Backend::DeviceStats s = st_;
  s.cached_bytes = s.reserved_bytes - s.live_bytes;
  s.execs_open = open_;
  s.execs_idle = static_cast<int64_t>(idle_.size());
  return s;
}

void DevicePool::reset_peak() {
  std::lock_guard<std::mutex> lk(mu_);
  st_.peak_live_bytes = st_.live_bytes;
  st_.peak_reserved_bytes = st_.reserved_bytes;
}

// ------------------------------------------------------------------ HostStagingPool
HostStagingPool::~HostStagingPool() { release_cached(); }

void* HostStagingPool::alloc(size_t bytes) {
  if (bytes == 0) bytes = 1;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = cache_.lower_bound(bytes);
    if (it != cache_.end() && it->first / 2 <= bytes) {  // fits, wastes at most half
      void* p = it->second;
      live_.emplace(p, it->first);
      cached_ -= static_cast<int64_t>(it->first);
      cache_.erase(it);
      return p;
    }
  }
  void* p = a_(bytes, ctx_);
  if (!p) {  // the cache may hold what the request needs, in blocks of other sizes
    release_cached();
    p = a_(bytes, ctx_);
  }
  std::lock_guard<std::mutex> lk(mu_);
  ++raw_allocs_;
  if (!p) throw OutOfDeviceMemory("out of " + what_ + ": cannot allocate " + std::to_string(bytes) + " bytes (" +
                                  std::to_string(reserved_) + " bytes held for offload staging)");
  reserved_ += static_cast<int64_t>(bytes);
  live_.emplace(p, bytes);
  return p;
}

void HostStagingPool::free(void* p) noexcept {
  if (!p) return;
  std::lock_guard<std::mutex> lk(mu_);
  auto it = live_.find(p);
  if (it == live_.end()) return;  // not ours: never handed to the raw free
  try {
    cache_.emplace(it->second, p);
  } catch (...) {  // no memory for the cache node: give the block back instead
    f_(p, ctx_);
    ++raw_frees_;
    reserved_ -= static_cast<int64_t>(it->second);
    live_.erase(it);
    return;
  }
  cached_ += static_cast<int64_t>(it->second);
  live_.erase(it);
}

void HostStagingPool::release_cached() noexcept {
  std::multimap<size_t, void*> taken;
  {
    std::lock_guard<std::mutex> lk(mu_);
    taken.swap(cache_);
    raw_frees_ += static_cast<int64_t>(taken.size());
    reserved_ -= cached_;
    cached_ = 0;
  }
  for (auto& [n, p] : taken) f_(p, ctx_);
}

void HostStagingPool::add_stats(Backend::DeviceStats& s) const {
  std::lock_guard<std::mutex> lk(mu_);
  s.host_raw_allocs = raw_allocs_;
  s.host_raw_frees = raw_frees_;
  s.host_reserved_bytes = reserved_;
  s.host_cached_bytes = cached_;
}

}  // namespace qlora
