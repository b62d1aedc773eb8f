// A small persistent thread pool for the CPU kernels (no OpenMP: nothing to bundle in a wheel,
// no clash with another OpenMP runtime loaded in the same process, e.g. by torch in tests).
#pragma once
#include <cstdint>
#include <functional>

namespace qlora::cpu {

int physical_cores();          // physical cores of the machine (SMT siblings counted once)
int num_threads();             // threads the kernels use (default: physical_cores(), env QLORA_NUM_THREADS)
int max_threads();             // the most set_num_threads accepts: max(64, 4 x logical CPUs)
// 1 <= n <= max_threads(), else ValueError; std::runtime_error when the system refuses to start
// the threads (the pool then keeps its previous size, or one thread).
void set_num_threads(int n);

// Runs fn(task) for every task in [0, n_tasks), spread over num_threads() threads; the calling
// thread takes part. Returns when all tasks are done. Tasks are claimed dynamically, so give it
// more tasks than threads when they are uneven. A nested call (from inside a task) runs serially
// on the calling thread. The first exception thrown by a task is rethrown here.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t task)>& fn);

// Splits [0, n) into contiguous chunks of at least `grain` items (about one per thread, or more
// for balance) and runs fn(begin, end) on each.
void parallel_range(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& fn);

}  // namespace qlora::cpu
