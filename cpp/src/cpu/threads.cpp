#include "cpu/threads.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <cstdio>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "common/error.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLORA_PAUSE() _mm_pause()
#else
#define QLORA_PAUSE() std::this_thread::yield()
#endif

namespace qlora::cpu {

namespace {

int detect_physical_cores() {
  // Count distinct (package, core) pairs from sysfs; fall back to hardware_concurrency.
  // Read with C stdio, not iostreams: a process whose libstdc++ is older than the one this was
  // built with (e.g. a Python environment shipping its own) crashed in ifstream's locale code.
  auto read_int = [](const std::string& path, int& out) {
    FILE* f = std::fopen(path.c_str(), "r");
    if (!f) return false;
    const bool ok = std::fscanf(f, "%d", &out) == 1;
    std::fclose(f);
    return ok;
  };
  std::set<std::pair<int, int>> cores;
  unsigned n = std::thread::hardware_concurrency();
  for (unsigned cpu = 0; cpu < std::max(n, 1u); ++cpu) {
    std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    int p = -1, c = -1;
    if (!read_int(base + "physical_package_id", p) || !read_int(base + "core_id", c))
      return std::max<int>(1, static_cast<int>(n));
    cores.insert({p, c});
  }
  return std::max<int>(1, static_cast<int>(cores.size()));
}

thread_local bool t_in_pool_task = false;

// One job at a time: workers spin briefly on `generation_` (decode-time GEMVs are tens of
// microseconds, a condvar wake-up alone costs that), then sleep on the condvar.
class Pool {
 public:
  explicit Pool(int n_threads) { resize(n_threads); }
  ~Pool() { stop_workers(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n_threads) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    const int old = size();
    try {
      start_workers(n_threads);
    } catch (const std::system_error& e) {
      // The system refused a thread (limits, memory): back to the previous size if possible.
      std::string kept = "1";
      try {
        start_workers(old);
        kept = std::to_string(old);
      } catch (const std::system_error&) {
        stop_workers();
      }
      throw std::runtime_error("cannot start " + std::to_string(n_threads) + " CPU threads: " + e.what() +
                               "; the kernels keep " + kept + " thread(s)");
    }
  }

  void run(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mu_);  // jobs from several Python threads queue here
    if (workers_.empty() || n_tasks == 1) {
      run_serial(n_tasks, fn);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_.store(0, std::memory_order_relaxed);
      error_ = nullptr;
      open_.store(true, std::memory_order_seq_cst);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    // Every task is claimed. Close the job, then wait only for workers that joined it: a worker
    // the OS has not scheduled yet (the other core busy) must not stall the caller, it will
    // find the job closed when it wakes and never touch fn.
    open_.store(false, std::memory_order_seq_cst);
    while (active_.load(std::memory_order_seq_cst) != 0) QLORA_PAUSE();
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void run_serial(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
    bool prev = t_in_pool_task;
    t_in_pool_task = true;
    try {
      for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    } catch (...) {
      t_in_pool_task = prev;
      throw;
    }
    t_in_pool_task = prev;
  }

  void work() {
    t_in_pool_task = true;
    for (;;) {
      int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= n_tasks_) break;
      try {
        (*fn_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_tasks_, std::memory_order_relaxed);  // abandon the remaining tasks
      }
    }
    t_in_pool_task = false;
  }

  void worker_loop(uint64_t seen) {
    for (;;) {
      // Spin a little, then sleep.
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen && !stop_.load(std::memory_order_acquire)) {
        if (++spins < 20000) {
          QLORA_PAUSE();
        } else {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen || stop_.load(); });
        }
      }
      if (stop_.load(std::memory_order_acquire)) return;
      seen = generation_.load(std::memory_order_acquire);
      // Join (Dekker-style with run(): both sides seq_cst) only while the job is still open.
      active_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst)) work();
      active_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  void start_workers(int n_threads) {
    stop_workers();
    stop_ = false;
    // A worker must start from the generation current now: read inside the new thread, a job
    // posted before the thread first runs would be missed (the caller then waits forever).
    const uint64_t gen = generation_.load(std::memory_order_acquire);
    try {
      for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, gen] { worker_loop(gen); });
    } catch (...) {
      stop_workers();  // joins the ones already started
      throw;
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_, err_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};    // workers inside the current job
  std::atomic<bool> open_{false};  // the current job still accepts workers
  std::atomic<bool> stop_{false};
  int64_t n_tasks_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::exception_ptr error_;
};

int default_threads() {
  if (const char* env = std::getenv("QLORA_NUM_THREADS")) {
    const long n = std::strtol(env, nullptr, 10);
    if (n >= 1) return static_cast<int>(std::min<long>(n, max_threads()));
  }
  return std::min(physical_cores(), max_threads());
}

// Leaked on purpose: joining threads at exit from static dtors can deadlock. A function-local
// static (not a mutex held around the constructor) so no lock is ever taken while the pool's
// run_mu_ is held elsewhere (TSan reported the old g_pool_mu -> run_mu_ order as an inversion).
Pool& pool() {
  static Pool* const p = new Pool(default_threads());
  return *p;
}

}  // namespace

int physical_cores() {
  static const int n = detect_physical_cores();
  return n;
}

int num_threads() { return pool().size(); }

int max_threads() {
  static const int n = std::max(64, 4 * static_cast<int>(std::thread::hardware_concurrency()));
  return n;
}

void set_num_threads(int n) {
  check_arg(n >= 1 && n <= max_threads(), "number of threads must be in [1, " + std::to_string(max_threads()) +
                                              "] (4 x the " + std::to_string(std::thread::hardware_concurrency()) +
                                              " logical CPUs, at least 64), got " + std::to_string(n));
  Pool& p = pool();
  if (p.size() != n) p.resize(n);
}

void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  if (n_tasks <= 0) return;
  if (t_in_pool_task) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  pool().run(n_tasks, fn);
}

void parallel_range(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t max_chunks = (n + grain - 1) / grain;
  int64_t chunks = std::min<int64_t>(max_chunks, static_cast<int64_t>(num_threads()) * 4);
  if (chunks <= 1 || t_in_pool_task) {
    fn(0, n);
    return;
  }
  int64_t per = (n + chunks - 1) / chunks;
  parallel_for(chunks, [&](int64_t c) {
    int64_t b = c * per, e = std::min(n, b + per);
    if (b < e) fn(b, e);
  });
}

}  // namespace qlora::cpu
