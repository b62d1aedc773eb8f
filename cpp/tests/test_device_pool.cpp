// ctest for the device caching allocator (cpp/src/device_pool.hpp) over a fake raw device that
// records every raw call: size classes, steady-state reuse without raw calls, arenas isolated
// per queue, idle-arena recycling, blocks outliving their arena, the out-of-memory release and
// retry, the growth bound, invalid frees, concurrent arenas; and Backend::ExecScope on cpu:devsim.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <thread>
#include <vector>

#include "backend.hpp"
#include "check.hpp"
#include "device_pool.hpp"

using namespace qlora;

namespace {

struct FakeRaw final : RawDevice {
  std::mutex mu;
  std::map<void*, size_t> live;  // raw blocks held
  size_t limit = SIZE_MAX, used = 0;
  int allocs = 0, frees = 0, queues = 0, queues_destroyed = 0, queue_syncs = 0, device_syncs = 0;
  std::set<void*> queue_set;
  void* raw_alloc(size_t bytes) override {
    std::lock_guard<std::mutex> lk(mu);
    ++allocs;
    if (used + bytes > limit) return nullptr;
    void* p = std::malloc(bytes);
    live[p] = bytes;
    used += bytes;
    return p;
  }
  bool raw_free(void* p) noexcept override {
    std::lock_guard<std::mutex> lk(mu);
    ++frees;
    auto it = live.find(p);
    if (it == live.end()) return false;
    used -= it->second;
    live.erase(it);
    std::free(p);
    return true;
  }
  void* new_queue() override {
    std::lock_guard<std::mutex> lk(mu);
    ++queues;
    void* q = new char;
    queue_set.insert(q);
    return q;
  }
  void destroy_queue(void* q) noexcept override {
    std::lock_guard<std::mutex> lk(mu);
    ++queues_destroyed;
    queue_set.erase(q);
    delete static_cast<char*>(q);
  }
  void sync_queue(void*) override { ++queue_syncs; }
  void sync_device() override { ++device_syncs; }
};

char g_default_queue;

void test_size_class() {
  CHECK(DevicePool::size_class(1) == 512, "1");
  CHECK(DevicePool::size_class(512) == 512, "512");
  CHECK(DevicePool::size_class(513) == 1024, "513");
  CHECK(DevicePool::size_class(4096) == 4096, "4096");
  CHECK(DevicePool::size_class(4097) == 4608, "4097");
  CHECK(DevicePool::size_class((size_t{1} << 30) + 1) == (size_t{1} << 30) + (size_t{2} << 20), "1 GiB + 1");
  CHECK(DevicePool::size_class(SIZE_MAX - 5) == 0, "overflow");
  for (size_t n = 1; n < (size_t{1} << 26); n = n * 3 / 2 + 7) {
    const size_t c = DevicePool::size_class(n);
    CHECK(c >= n && c - n <= n / 8 + 512 && c % 512 == 0, "class of %zu is %zu", n, c);
    CHECK(DevicePool::size_class(c) == c, "class of a class");
  }
}

void test_steady_state() {
  FakeRaw raw;
  {
    DevicePool pool(raw, &g_default_queue);
    DevicePool::Arena* a = pool.default_arena();
    const size_t sizes[] = {100, 5000, 70000, 70000, 3 << 20};
    for (int step = 0; step < 5; ++step) {
      std::vector<void*> ps;
      for (size_t s : sizes) ps.push_back(pool.alloc(a, s));
      std::set<void*> distinct(ps.begin(), ps.end());
      CHECK(distinct.size() == ps.size(), "live blocks are distinct");
      for (void* p : ps) pool.free(p);
      const Backend::DeviceStats st = pool.stats();
      CHECK(st.raw_allocs == 5 && st.raw_frees == 0, "step %d: raw allocs %lld", step, (long long)st.raw_allocs);
      CHECK(st.cache_hits == 5 * step, "hits %lld", (long long)st.cache_hits);
      CHECK(st.live_bytes == 0 && st.reserved_bytes == st.cached_bytes && st.reserved_bytes > 0, "bytes");
    }
    CHECK(raw.allocs == 5, "raw allocs %d", raw.allocs);
    CHECK(pool.alloc(a, 0) == nullptr, "zero bytes");
    pool.free(nullptr);
    int x;
    pool.free(&x);
    CHECK(pool.stats().invalid_frees == 1, "invalid free counted");
  }
  CHECK(raw.live.empty(), "destructor frees the cache (%zu left)", raw.live.size());
}

void test_arenas() {
  FakeRaw raw;
  DevicePool pool(raw, &g_default_queue);
  DevicePool::Arena* d = pool.default_arena();
  DevicePool::Arena* a = pool.open_arena();
  CHECK(raw.queues == 1 && DevicePool::queue(a) != &g_default_queue, "a new queue");
  void* p = pool.alloc(d, 1000);
  pool.free(p);
  void* q = pool.alloc(a, 1000);  // another queue: never the block freed by the default arena
  CHECK(q != p, "blocks stay with their arena");
  pool.free(q);
  CHECK(pool.alloc(a, 1000) == q, "reused within the arena");
  pool.free(q);
  pool.close_arena(a);
  CHECK(raw.queue_syncs >= 1, "close waits for the queue");
  Backend::DeviceStats st = pool.stats();
  CHECK(st.execs_open == 0 && st.execs_idle == 1, "kept idle");
  DevicePool::Arena* b = pool.open_arena();
  CHECK(b == a && raw.queues == 1, "recycled: no new queue");
  const int allocs = raw.allocs;
  CHECK(pool.alloc(b, 1000) == q && raw.allocs == allocs, "recycled with its cache");
  // A second arena open at once: a new queue; closing both keeps at most the peak (2) idle.
  DevicePool::Arena* c = pool.open_arena();
  CHECK(c != b && raw.queues == 2, "second queue");
  pool.close_arena(c);
  // b closes with a live block: its cache and queue go, the block is raw-freed when freed.
  pool.close_arena(b);
  st = pool.stats();
  CHECK(st.execs_idle == 1 && raw.queues_destroyed == 1, "closed with a live block: not idle");
  const int syncs = raw.device_syncs;
  pool.free(q);
  CHECK(raw.device_syncs == syncs + 1 && !raw.live.count(q), "raw-freed after a device sync");
  st = pool.stats();
  CHECK(st.live_bytes == 0 && st.reserved_bytes == st.cached_bytes, "accounting");
  pool.release_cached();
  st = pool.stats();
  CHECK(st.reserved_bytes == 0 && st.execs_idle == 0 && raw.live.empty(), "release_cached gives everything back");
  CHECK(raw.queue_set.empty(), "every queue destroyed (%zu left)", raw.queue_set.size());
  CHECK(st.raw_frees == raw.frees, "raw_frees %lld vs %d", (long long)st.raw_frees, raw.frees);
}

void test_out_of_memory() {
  FakeRaw raw;
  raw.limit = 3 << 20;
  DevicePool pool(raw, &g_default_queue);
  DevicePool::Arena* a = pool.open_arena();
  void* p = pool.alloc(a, 2 << 20);
  pool.free(p);  // cached in a
  const int syncs = raw.device_syncs;
  void* q = pool.alloc(pool.default_arena(), 2 << 20);  // does not fit beside the cached block
  CHECK(q != nullptr && raw.device_syncs == syncs + 1, "cache released, device synced, retried");
  Backend::DeviceStats st = pool.stats();
  CHECK(st.raw_alloc_failures == 1 && st.raw_allocs == 3, "failures %lld allocs %lld",
        (long long)st.raw_alloc_failures, (long long)st.raw_allocs);
  bool threw = false;
  try {
    pool.alloc(a, 2 << 20);
  } catch (const std::bad_alloc& e) {
    threw = contains(e.what(), "out of device memory");
  }
  CHECK(threw, "OutOfDeviceMemory with a message");
  threw = false;
  try {
    pool.alloc(a, SIZE_MAX - 100);
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  CHECK(threw, "huge request");
  pool.free(q);
  pool.close_arena(a);
}

void test_growth_bound() {
  FakeRaw raw;
  DevicePool pool(raw, &g_default_queue);
  DevicePool::Arena* a = pool.open_arena();
  size_t peak = 0;
  for (size_t n = 1000; n < (size_t{40} << 20); n = n * 5 / 4) {  // every pass a new shape
    void* p = pool.alloc(a, n);
    void* q = pool.alloc(a, n / 3 + 1);
    pool.free(p);
    pool.free(q);
    peak = std::max(peak, DevicePool::size_class(n) + DevicePool::size_class(n / 3 + 1));
    const Backend::DeviceStats st = pool.stats();
    CHECK(static_cast<size_t>(st.reserved_bytes) <= 2 * peak, "reserved %lld > 2 x peak %zu",
          (long long)st.reserved_bytes, peak);
  }
  pool.close_arena(a);
}

void test_threads() {
  FakeRaw raw;
  DevicePool pool(raw, &g_default_queue);
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&pool, t] {
      for (int round = 0; round < 20; ++round) {
        DevicePool::Arena* a = pool.open_arena();
        std::vector<void*> ps;
        for (int i = 0; i < 30; ++i) ps.push_back(pool.alloc(a, 100 + 977 * ((i + t) % 7)));
        for (void* p : ps) pool.free(p);
        pool.close_arena(a);
      }
    });
  for (auto& t : ts) t.join();
  const Backend::DeviceStats st = pool.stats();
  CHECK(st.live_bytes == 0 && st.execs_open == 0 && st.execs_idle <= 4 && st.invalid_frees == 0, "threads");
  CHECK(st.queues_created <= 4 * 20 && raw.queues == st.queues_created, "queues");
}

// Backend::ExecScope binds per thread, nests, and cpu:devsim allocates from the bound arena.
void test_exec_scope() {
  Backend& be = get_backend("cpu:devsim");
  Backend& cpu = get_backend("cpu");
  CHECK(cpu.new_exec() == nullptr, "host backends have no Exec");
  { Backend::ExecScope none(cpu, nullptr); }
  const Backend::DeviceStats s0 = be.device_stats();
  std::unique_ptr<Backend::Exec> e1 = be.new_exec(), e2 = be.new_exec();
  CHECK(e1 && e2 && be.current_exec() == nullptr, "no scope");
  CHECK(be.device_stats().execs_open == s0.execs_open + 2, "two open");
  void* in_default = be.alloc(3000);
  be.free(in_default);
  {
    Backend::ExecScope s1(be, e1.get());
    CHECK(be.current_exec() == e1.get() && cpu.current_exec() == nullptr, "bound to its backend only");
    void* p = be.alloc(3000);
    CHECK(p != in_default, "the Exec's arena, not the default one");
    be.free(p);
    {
      Backend::ExecScope s2(be, e2.get());
      CHECK(be.current_exec() == e2.get(), "nested");
    }
    CHECK(be.current_exec() == e1.get(), "restored");
    std::thread([&] { CHECK(be.current_exec() == nullptr, "per thread"); }).join();
    void* p2 = be.alloc(3000);
    CHECK(p2 == p, "the arena's own block again");
    be.free(p2);
  }
  CHECK(be.current_exec() == nullptr, "unbound");
  bool threw = false;
  try {
    Backend::ExecScope bad(cpu, e1.get());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "an Exec of another backend is refused");
  e1.reset(), e2.reset();
  const Backend::DeviceStats s1 = be.device_stats();
  CHECK(s1.execs_open == s0.execs_open && s1.invalid_frees == 0, "closed");
}

}  // namespace

int main() {
  test_size_class();
  test_steady_state();
  test_arenas();
  test_out_of_memory();
  test_growth_bound();
  test_threads();
  test_exec_scope();
  if (g_failures) std::fprintf(stderr, "%d failures\n", g_failures);
  return g_failures ? 1 : 0;
}
