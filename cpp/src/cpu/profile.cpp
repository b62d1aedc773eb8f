#include "cpu/profile.hpp"

#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

namespace qlora::prof {

namespace {
bool env_on() {
  const char* e = std::getenv("QLORA_PROFILE");
  return e && *e && std::strcmp(e, "0") != 0;
}

thread_local Part t_context = Part::None;
thread_local int t_depth = 0;  // timed ops open on this thread (a backend op calling another is booked once)

using Key = std::tuple<int, std::string, int64_t, int64_t, int64_t>;
struct Table {
  std::mutex mu;
  std::map<Key, size_t> index;
  std::vector<Row> rows;
};
Table& table() {
  static Table t;
  return t;
}
}  // namespace

std::atomic<bool> g_enabled{env_on()};

const char* part_name(Part p) {
  switch (p) {
    case Part::None: return "none";
    case Part::Nf4Fwd: return "nf4_gemm_fwd";
    case Part::Nf4Bwd: return "nf4_gemm_bwd";
    case Part::LoraFwd: return "lora_fwd";
    case Part::LoraBwd: return "lora_bwd";
    case Part::AttnFwd: return "attention_fwd";
    case Part::AttnBwd: return "attention_bwd";
    case Part::LmHead: return "lm_head_gemm";
    case Part::CrossEntropy: return "cross_entropy";
    case Part::Norm: return "rmsnorm";
    case Part::Rope: return "rope";
    case Part::Swiglu: return "swiglu";
    case Part::Elementwise: return "elementwise";
    case Part::GemmOther: return "gemm_other";
    case Part::Other: return "other";
    case Part::kCount: break;
  }
  return "?";
}

void set_enabled(bool on) { g_enabled.store(on, std::memory_order_relaxed); }

void reset() {
  Table& t = table();
  std::lock_guard<std::mutex> lk(t.mu);
  t.index.clear();
  t.rows.clear();
}

PartContext::PartContext(Part p) : prev_(t_context) { t_context = p; }
PartContext::~PartContext() { t_context = prev_; }
Part context_part() { return t_context; }

namespace {
// QLORA_PROFILE_CLOCK=thread: each outer scope books the calling thread's CPU time instead of wall
// time, so 1-thread part timings hold on a busy machine (a preempted op is not charged for the wait).
// Only meaningful at 1 thread (QLORA_THREADS=1: the pool runs every job on the calling thread).
bool thread_clock() {
  static const bool on = [] {
    const char* e = std::getenv("QLORA_PROFILE_CLOCK");
    return e && std::string(e) == "thread";
  }();
  return on;
}
double thread_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
thread_local double t_cpu0 = 0.0;  // the outer scope's start (only one outer scope per thread at a time)
}  // namespace

void Scope::start(Part p, const char* op, double flops, double bytes, int64_t a, int64_t b, int64_t c) {
  on_ = true;
  outer_ = t_depth++ == 0;
  if (!outer_) return;
  part_ = (p == Part::GemmOther && t_context != Part::None) ? t_context : p;
  op_ = op;
  flops_ = flops, bytes_ = bytes;
  dims_[0] = a, dims_[1] = b, dims_[2] = c;
  t0_ = std::chrono::steady_clock::now();
  if (thread_clock()) t_cpu0 = thread_cpu_s();
}

void Scope::stop() {
  --t_depth;
  if (!outer_) return;
  const double s = thread_clock() ? thread_cpu_s() - t_cpu0
                                  : std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  Table& t = table();
  std::lock_guard<std::mutex> lk(t.mu);
  const Key key{static_cast<int>(part_), op_, dims_[0], dims_[1], dims_[2]};
  auto it = t.index.find(key);
  if (it == t.index.end()) {
    it = t.index.emplace(key, t.rows.size()).first;
    t.rows.push_back(Row{part_name(part_), op_, {dims_[0], dims_[1], dims_[2]}, 0, 0.0, 0.0, 0.0});
  }
  Row& r = t.rows[it->second];
  ++r.calls;
  r.seconds += s;
  r.flops += flops_;
  r.bytes += bytes_;
}

std::vector<Row> report() {
  Table& t = table();
  std::lock_guard<std::mutex> lk(t.mu);
  return t.rows;
}

}  // namespace qlora::prof
