// Opt-in per-op timers for finding where a training step's time goes (bench_train.py --breakdown).
// Off by default and then a relaxed atomic load per backend op; on with QLORA_PROFILE=1 or
// profile_enable(true). Only leaf ops are timed (the CpuBackend entry points), each under a part;
// callers that group fp32 GEMMs (LoRA, the lm_head) set a PartContext, so the parts never nest and
// their times add up. Times are wall times of the calling thread (the op's parallel section inside).
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace qlora::prof {

enum class Part : int {
  None = 0,
  Nf4Fwd,       // NF4 base GEMMs X·Wᵀ (forward and checkpoint recompute)
  Nf4Bwd,       // NF4 base GEMMs dY·W (input gradients)
  LoraFwd,      // LoRA shrink/expand in the forward
  LoraBwd,      // LoRA gradients (dA, dB) and the input-gradient term
  AttnFwd,      // training / prefill attention
  AttnBwd,
  LmHead,       // the lm_head GEMMs (logits and dh)
  CrossEntropy, // softmax + loss + dlogits over the vocabulary
  Norm,         // RMSNorm forward and backward
  Rope,         // RoPE forward and backward
  Swiglu,       // SwiGLU forward and backward
  Elementwise,  // residual adds, bias, embedding rows
  GemmOther,    // fp32 GEMMs outside a context (fp32 base weights, ops.gemm_*)
  Other,        // everything else the backend runs (q8_0, KV writes, dequantize)
  kCount
};
const char* part_name(Part p);

extern std::atomic<bool> g_enabled;
inline bool enabled() { return g_enabled.load(std::memory_order_relaxed); }
void set_enabled(bool on);
void reset();

// The part fp32 GEMMs are booked to while this lives (thread-local; innermost wins).
class PartContext {
 public:
  explicit PartContext(Part p);
  ~PartContext();
  PartContext(const PartContext&) = delete;
  PartContext& operator=(const PartContext&) = delete;

 private:
  Part prev_;
};
Part context_part();  // Part::None outside any context

// Times one op: part (or, for Part::GemmOther, the current context's part), its FLOPs and the
// bytes it must move at least, and a shape label for the detail table.
class Scope {
 public:
  Scope(Part p, const char* op, double flops, double bytes, int64_t a = 0, int64_t b = 0, int64_t c = 0) {
    if (enabled()) start(p, op, flops, bytes, a, b, c);
  }
  ~Scope() {
    if (on_) stop();
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  void start(Part p, const char* op, double flops, double bytes, int64_t a, int64_t b, int64_t c);
  void stop();
  bool on_ = false;
  bool outer_ = false;
  Part part_ = Part::None;
  const char* op_ = nullptr;
  double flops_ = 0, bytes_ = 0;
  int64_t dims_[3] = {0, 0, 0};
  std::chrono::steady_clock::time_point t0_;
};

struct Row {
  std::string part, op;
  int64_t dims[3];
  int64_t calls;
  double seconds, flops, bytes;
};
// One row per (part, op, shape), in first-seen order.
std::vector<Row> report();

}  // namespace qlora::prof
