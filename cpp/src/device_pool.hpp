// The caching allocator of device backends (cuda/, and cpu:devsim, which runs the same logic over
// host memory so CI tests it without a GPU). Device memory comes from the raw allocator (cudaMalloc)
// in arenas, each tied to one queue (a CUDA stream): a freed block goes back to the cache of the
// arena it came from and is handed out again only by that arena, so stream order alone makes the
// reuse safe (the next user's work queues after the previous user's). A backend's default arena
// serves work outside any Exec (weights, forward(), training); each generation context's Exec
// opens its own arena and queue. In steady state (a decode step, a forward pass of a shape seen
// before) every allocation is a cache hit: no cudaMalloc / cudaFree.
//
// Rules:
//  - Size classes: requests round up to 512 B up to 4 KiB, then to 1/8 of their power of two
//    (at most 2 MiB): a cached block serves requests of exactly its class (waste < 12.5%).
//  - Growth bound: on a miss, an arena whose cache would push it past twice its peak live bytes
//    first gives back least-recently freed blocks (after waiting for its queue).
//  - A closed arena (its Exec ended, queue synchronized) is kept idle with its cache for the next
//    Exec (contexts of a serving loop come and go without cudaMalloc / cudaStreamCreate); at most as
//    many idle arenas as were ever open at once. A block still live when its arena closes is
//    returned to the raw allocator when freed, after a device-wide synchronize.
//  - Out of memory: every arena's cached blocks are released (after a device synchronize) and the
//    allocation retried once; then OutOfDeviceMemory (a std::bad_alloc: Python MemoryError).
//  - Cross-queue use: a block used by another queue than its arena's must not be freed while that
//    queue still has work on it. The model keeps this by ending every pass synchronized (its
//    results are downloaded) and by freeing weights and adapters only outside passes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend.hpp"

namespace qlora {

// The device has no memory left for a request, even after the cache was released.
class OutOfDeviceMemory : public std::bad_alloc {
 public:
  explicit OutOfDeviceMemory(std::string msg) : msg_(std::move(msg)) {}
  const char* what() const noexcept override { return msg_.c_str(); }

 private:
  std::string msg_;
};

// What a DevicePool sits on: the device's raw allocator and its queues.
class RawDevice {
 public:
  virtual ~RawDevice() = default;
  // `bytes` of device memory, or null when the device is out of memory; throws on other errors.
  virtual void* raw_alloc(size_t bytes) = 0;
  // Never throws (called from destructors); false on an error.
  virtual bool raw_free(void* p) noexcept = 0;
  virtual void* new_queue() = 0;                      // throws on error
  virtual void destroy_queue(void* q) noexcept = 0;
  virtual void sync_queue(void* q) = 0;               // waits for the queue's work; throws on error
  virtual void sync_device() = 0;                     // waits for every queue; throws on error
};

class DevicePool {
 public:
  struct Arena;
  // default_queue: the backend's own queue (owned by the backend, never destroyed here).
  DevicePool(RawDevice& raw, void* default_queue);
  ~DevicePool();  // releases cached blocks and idle arenas' queues; live blocks are left to their owners
  DevicePool(const DevicePool&) = delete;
  DevicePool& operator=(const DevicePool&) = delete;

  Arena* default_arena() const { return default_; }
  Arena* open_arena();                     // an idle arena (with its cache) or a new one with a new queue
  void close_arena(Arena* a) noexcept;     // synchronizes its queue, keeps it idle or releases it
  static void* queue(const Arena* a);

  void* alloc(Arena* a, size_t bytes);  // bytes == 0: null
  void free(void* p) noexcept;          // back to the cache of the block's arena; null: nothing
  void release_cached();                // every cached block and idle arena (empty_cache)
  Backend::DeviceStats stats() const;
  void reset_peak();                    // peak_* = current

  static size_t size_class(size_t bytes);

 private:
  struct Block {
    size_t cls;
    Arena* arena;
  };
  struct Taken {  // blocks taken out of the cache under the lock, raw-freed after it
    std::vector<void*> blocks;
    std::vector<void*> queues;  // queues to destroy
  };
  void take_cache_locked(Arena* a, Taken& t);
  void delete_arena_locked(Arena* a);
  void free_taken(Taken& t) noexcept;
  void* raw_alloc_counted(size_t cls);

  RawDevice& raw_;
  mutable std::mutex mu_;
  std::unordered_map<Arena*, std::unique_ptr<Arena>> arenas_;
  Arena* default_ = nullptr;
  std::vector<Arena*> idle_;
  std::unordered_map<void*, Block> live_;
  uint64_t seq_ = 0;     // free order, for least-recently-freed eviction
  int64_t open_ = 0;     // arenas open now (default excluded)
  int64_t peak_open_ = 0;
  Backend::DeviceStats st_;
};

// Host staging for activation offload (Backend::host_alloc / host_free; CUDA: pinned memory from
// cudaHostAlloc, which is slow and synchronizes the device, so never once per step). Freed blocks
// are cached and handed out again to a request they fit (the smallest cached block of at least the
// request and at most twice it); a miss takes a new block of the exact size. On a failed raw
// allocation the cache is released and the allocation retried once, then std::bad_alloc with a
// message. release_cached() (release_cached_memory) gives every cached block back. Thread-safe.
class HostStagingPool {
 public:
  // raw_alloc: `bytes` of host memory or null when there is none; raw_free never throws.
  using RawAlloc = void* (*)(size_t bytes, void* ctx);
  using RawFree = void (*)(void* p, void* ctx);
  HostStagingPool(RawAlloc a, RawFree f, void* ctx, std::string what) : a_(a), f_(f), ctx_(ctx), what_(std::move(what)) {}
  ~HostStagingPool();  // releases the cache; blocks still handed out are left to their owners
  HostStagingPool(const HostStagingPool&) = delete;
  HostStagingPool& operator=(const HostStagingPool&) = delete;

  void* alloc(size_t bytes);
  void free(void* p) noexcept;  // null: nothing; a pointer it did not hand out: counted, ignored
  void release_cached() noexcept;
  // host_raw_allocs, host_raw_frees, host_reserved_bytes, host_cached_bytes of DeviceStats
  void add_stats(Backend::DeviceStats& s) const;

 private:
  RawAlloc a_;
  RawFree f_;
  void* ctx_;
  std::string what_;
  mutable std::mutex mu_;
  std::multimap<size_t, void*> cache_;     // size -> block
  std::unordered_map<void*, size_t> live_;  // handed out: block -> size
  int64_t raw_allocs_ = 0, raw_frees_ = 0, reserved_ = 0, cached_ = 0;
};

// A Backend::Exec over an arena of a DevicePool (the CUDA backend, cpu:devsim).
class PoolExec final : public Backend::Exec {
 public:
  PoolExec(Backend& be, DevicePool& pool) : Exec(be), pool_(pool), arena_(pool.open_arena()) {}
  ~PoolExec() override { pool_.close_arena(arena_); }
  DevicePool::Arena* arena() const { return arena_; }

 private:
  DevicePool& pool_;
  DevicePool::Arena* arena_;
};

// The arena of the Exec bound to the calling thread for `be` (its pool's default arena without one).
inline DevicePool::Arena* current_arena(const Backend& be, const DevicePool& pool) {
  Backend::Exec* e = be.current_exec();
  return e ? static_cast<PoolExec*>(e)->arena() : pool.default_arena();
}

}  // namespace qlora
