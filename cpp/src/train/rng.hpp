// A small deterministic, serializable RNG for training (dropout masks, LoRA init, shuffling):
// Philox4x32-10 (Salmon et al., SC'11; the generator of Random123 and of torch's CUDA RNG),
// counter-based: the k-th 32-bit output is word k%4 of Philox(counter = {k/4 lo, k/4 hi, 0, 0},
// key = {seed lo, seed hi}). The whole state is (seed, position); any output can be computed
// independently, so fills are threaded (and can run on a GPU) with identical results.
#pragma once
#include <array>
#include <cstdint>

namespace qlora::train {

// One Philox4x32-10 block (exposed for known-answer tests).
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

struct RngState {
  uint64_t seed = 0;
  uint64_t position = 0;  // 32-bit outputs consumed so far
};

class Philox {
 public:
  explicit Philox(uint64_t seed = 0) : s_{seed, 0} {}

  RngState state() const { return s_; }
  void set_state(RngState s) { s_ = s; }

  uint32_t next_u32();
  uint64_t next_u64();           // two outputs: low word first
  uint64_t below(uint64_t n);    // uniform in [0, n), unbiased (rejection); n >= 1
  double uniform_double();       // [0, 1), 53 bits from next_u64()

  // Bulk fills: element i uses outputs from position + c*i (c = 1, or 2 for normal), then the
  // position advances by c*n. So fill(a) then fill(b) equals fill(a + b).
  void fill_uniform(float* out, int64_t n, float lo = 0.0f, float hi = 1.0f);  // [n] lo + (hi-lo)*u, u = (x>>8)*2^-24
  void fill_normal(float* out, int64_t n, float mean = 0.0f, float std = 1.0f);  // [n] Box-Muller (cos branch) in double
  void fill_bernoulli(uint8_t* out, int64_t n, double p);  // [n] 1 with probability p: x*2^-32 < p; 0 <= p <= 1
  void permutation(int64_t* out, int64_t n);               // [n] Fisher-Yates shuffle of 0..n-1 via below()

 private:
  uint32_t at(uint64_t k) const;  // the k-th output
  RngState s_;
};

}  // namespace qlora::train
