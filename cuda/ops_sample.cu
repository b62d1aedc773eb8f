// Device sampling: one block per row. Greedy: the first maximum (block argmax). Sampling: the
// host rule of model/sampler.cpp step for step on the tokens in descending order (lower id first
// on ties). Tokens are ordered by a unique 64-bit key (the logit's bits made monotone, -0 as +0,
// then the complemented id); a chunk of the kSampleChunk largest keys below a bound is found by an
// 8-bit radix select (8 counting passes, integer shared-memory histograms: deterministic),
// gathered, bitonic-sorted in shared memory, given its weights w = exp(z - z_max) in double, and
// walked by one thread with the host's sequential double arithmetic (totals, top-p cumulation,
// r = u * total, r -= w). The kept total for top-k above one chunk (or none) is a fixed-order
// block reduction instead of the host's running sum; with exp's last bit (CUDA's exp vs glibc's)
// it may differ from the host's in the last bits, which changes a token only when the draw falls
// within that rounding of a boundary.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.hpp"
#include "ops_common.cuh"
#include "ops_sample.cuh"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kC = kSampleChunk;
static_assert((kC & (kC - 1)) == 0, "bitonic sort needs a power of two");

__device__ __forceinline__ bool is_nan_bits(float v) { return (__float_as_uint(v) & 0x7FFFFFFFu) > 0x7F800000u; }

// Descending order of keys = descending logit, then ascending id (unique per token).
__device__ __forceinline__ uint64_t order_key(float l, int64_t i) {
  uint32_t b = __float_as_uint(l);
  if ((b & 0x7FFFFFFFu) == 0) b = 0;  // -0 ties with +0, as the host's comparisons
  const uint32_t o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(o) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}
__device__ __forceinline__ int64_t key_id(uint64_t c) { return 0xFFFFFFFFu - static_cast<uint32_t>(c & 0xFFFFFFFFu); }

struct Shared {
  uint64_t key[kC];  // the chunk's keys, descending (0: padding; no token has key 0)
  double w[kC];      // their weights
  unsigned hist[256];
  double dred[32];
  float fred[32];
  long long ired[32];
  unsigned bin, rem;
  int cnt, done;
  double acc;
  long long tok;
};

// (v, i) better than (bv, bi): the larger value, the lower index on ties; i < 0 is "none".
__device__ __forceinline__ bool better(float v, long long i, float bv, long long bi) {
  return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

// The first maximum of row[V] (std::max_element) into (mv, mi) for every thread; returns true
// (for every thread) when the row holds NaN.
__device__ bool block_argmax(const float* row, int64_t V, Shared& S, float& mv, long long& mi) {
  float bv = -INFINITY;
  long long bi = -1;
  int nan = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = row[i];
    if (is_nan_bits(v)) nan = 1;
    else if (bi < 0 || v > bv) bv = v, bi = i;  // ascending i: ties keep the first
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const long long oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  if (lane == 0) S.fred[warp] = bv, S.ired[warp] = bi;
  const bool any_nan = __syncthreads_or(nan) != 0;  // also the barrier for fred / ired
  bv = lane < nw ? S.fred[lane] : -INFINITY;
  bi = lane < nw ? S.ired[lane] : -1;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const long long oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __syncthreads();  // fred / ired may be reused
  mv = bv;
  mi = bi;
  return any_nan;
}

// The k-th largest key below c_hi (1 <= k <= the number of keys below c_hi): MSB-first radix
// select, 8 bits per pass.
__device__ uint64_t kth_key(const float* row, int64_t V, uint64_t c_hi, unsigned k, Shared& S) {
  uint64_t prefix = 0;
  unsigned rem = k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) S.hist[b] = 0;
    __syncthreads();
    const uint64_t hi_mask = shift == 56 ? 0 : ~uint64_t{0} << (shift + 8);
    // Warp-aggregated counts: logits crowd into few bins of the high bytes, and 32 lanes adding to
    // one shared counter would serialize. Every lane runs every round (i0 is block-uniform).
    const int lane = threadIdx.x % 32;
    for (int64_t i0 = 0; i0 < V; i0 += blockDim.x) {
      const int64_t i = i0 + threadIdx.x;
      unsigned bin = 256;  // none
      if (i < V) {
        const uint64_t c = order_key(row[i], i);
        if (c < c_hi && (c & hi_mask) == prefix) bin = static_cast<unsigned>((c >> shift) & 255u);
      }
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (bin < 256 && __ffs(peers) - 1 == lane) atomicAdd(&S.hist[bin], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned cum = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (cum + S.hist[b] >= rem) break;
        cum += S.hist[b];
      }
      S.bin = static_cast<unsigned>(b);
      S.rem = rem - cum;
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(S.bin) << shift;
    rem = S.rem;
    __syncthreads();  // bin / rem / hist are rewritten by the next pass
  }
  return prefix;
}

// S.key[0, k) = the k largest keys below c_hi, descending; S.w[j] = their weights.
__device__ void select_chunk(const float* row, int64_t V, uint64_t c_hi, unsigned k, double T, double mx,
                             Shared& S) {
  const uint64_t theta = kth_key(row, V, c_hi, k, S);
  for (int j = threadIdx.x; j < kC; j += blockDim.x) S.key[j] = 0;
  if (threadIdx.x == 0) S.cnt = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const uint64_t c = order_key(row[i], i);
    if (c >= theta && c < c_hi) S.key[atomicAdd(&S.cnt, 1)] = c;  // exactly k keys (keys are unique)
  }
  __syncthreads();
  for (int size = 2; size <= kC; size <<= 1) {  // bitonic sort, descending
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < kC; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t a = S.key[i], b = S.key[j];
          if ((i & size) == 0 ? a < b : a > b) S.key[i] = b, S.key[j] = a;
        }
      }
      __syncthreads();
    }
  }
  for (unsigned j = threadIdx.x; j < k; j += blockDim.x)
    S.w[j] = exp(static_cast<double>(row[key_id(S.key[j])]) / T - mx);
  __syncthreads();
}

// Block-uniform record of the chunk held in shared memory.
struct Held {
  int64_t base = -1;  // order position of its first token (-1: none)
};

// Walks the tokens in descending order from position 0 while position < limit, calling
// step(pos, id, w) on thread 0 until it returns true. Chunks are selected as needed (the one held
// is reused when the walk starts there again). Called by every thread of the block.
template <class Step>
__device__ void walk(const float* row, int64_t V, double T, double mx, int64_t limit, Shared& S, Held& held,
                     Step step) {
  int64_t base = 0;
  uint64_t c_hi = ~uint64_t{0};  // every key is below it (the largest is +inf's)
  for (;;) {
    const int64_t want = V - base < kC ? V - base : kC;
    if (held.base != base) {
      select_chunk(row, V, c_hi, static_cast<unsigned>(want), T, mx, S);
      held.base = base;
    }
    if (threadIdx.x == 0) {
      const int64_t m = limit - base < want ? limit - base : want;
      bool done = false;
      for (int64_t j = 0; j < m && !done; ++j) done = step(base + j, key_id(S.key[j]), S.w[j]);
      S.done = done || base + want >= limit;
    }
    __syncthreads();
    const bool fin = S.done != 0;
    const uint64_t last = S.key[want - 1];
    __syncthreads();  // S.done is rewritten by the next round
    if (fin) return;
    base += want;
    c_hi = last;
  }
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(int64_t V, const float* __restrict__ base, const int64_t* __restrict__ off,
                  const double* __restrict__ u, float temperature, int64_t top_k, float top_p,
                  int32_t* __restrict__ out) {
  __shared__ Shared S;
  const int64_t r = blockIdx.x;
  const float* row = base + off[r];
  float mv;
  long long mi;
  if (block_argmax(row, V, S, mv, mi)) {  // uniform
    if (threadIdx.x == 0) out[r] = -1;
    return;
  }
  const double T = temperature;
  const double mx = static_cast<double>(mv) / T;  // z of the first maximum
  if (!isfinite(mx)) {  // +inf logit (or all -inf): the first maximum, no draw
    if (threadIdx.x == 0) out[r] = static_cast<int32_t>(mi);
    return;
  }
  const int64_t K = top_k > 0 && top_k < V ? top_k : V;
  Held held;
  // Total weight of the kept (top-k) tokens.
  double total = 0;
  if (K <= kC) {
    walk(row, V, T, mx, K, S, held, [&](int64_t, int64_t, double w) {
      total += w;
      return false;
    });
  } else {
    const uint64_t theta = K == V ? 0 : kth_key(row, V, ~uint64_t{0}, static_cast<unsigned>(K), S);
    double acc = 0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
      if (order_key(row[i], i) >= theta) acc += exp(static_cast<double>(row[i]) / T - mx);
    total = block_sum(acc, S.dred);
  }
  if (threadIdx.x == 0) S.acc = total;
  __syncthreads();
  total = S.acc;
  int64_t keep = K;
  if (top_p < 1.0f) {  // the shortest prefix reaching mass top_p (at least one token)
    double cum = 0, kept = 0;
    int64_t n = 0;
    walk(row, V, T, mx, K, S, held, [&](int64_t, int64_t, double w) {
      cum += w / total;
      kept += w;
      ++n;
      return cum >= static_cast<double>(top_p);
    });
    if (threadIdx.x == 0) S.acc = kept, S.tok = n;
    __syncthreads();
    total = S.acc;
    keep = S.tok > 0 ? S.tok : 1;
    __syncthreads();
  }
  double rr = u[r] * total;
  long long tok = -1;
  walk(row, V, T, mx, keep, S, held, [&](int64_t pos, int64_t id, double w) {
    if (rr < w || pos == keep - 1) {  // the host returns order[keep - 1] when the walk runs out
      tok = id;
      return true;
    }
    rr -= w;
    return false;
  });
  if (threadIdx.x == 0) out[r] = static_cast<int32_t>(tok);
}

__global__ void __launch_bounds__(kThreads)
    greedy_kernel(int64_t V, const float* __restrict__ base, const int64_t* __restrict__ off,
                  int32_t* __restrict__ out) {
  __shared__ Shared S;
  const int64_t r = blockIdx.x;
  float mv;
  long long mi;
  const bool nan = block_argmax(base + off[r], V, S, mv, mi);
  if (threadIdx.x == 0) out[r] = nan ? -1 : static_cast<int32_t>(mi);
}

__global__ void __launch_bounds__(kOpThreads)
    penalize_kernel(int64_t V, const float* __restrict__ logits, const int64_t* __restrict__ src_off,
                    const int32_t* __restrict__ pen_off, const int32_t* __restrict__ pen_tok, float penalty,
                    float* __restrict__ work) {
  const int64_t r = blockIdx.x;
  const float* src = logits + src_off[r];
  float* dst = work + r * V;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) dst[i] = src[i];
  __syncthreads();  // the block's copies are visible to the block
  for (int32_t j = pen_off[r] + static_cast<int32_t>(threadIdx.x); j < pen_off[r + 1]; j += blockDim.x) {
    const int32_t t = pen_tok[j];
    const float l = dst[t];
    dst[t] = l < 0 ? __fmul_rn(l, penalty) : __fdiv_rn(l, penalty);  // IEEE, not --use_fast_math's
  }
}

}  // namespace

void sample_penalize(cudaStream_t stream, int64_t n, int64_t V, const float* logits, const int64_t* src_off,
                     const int32_t* pen_off, const int32_t* pen_tok, float penalty, float* work) {
  if (n <= 0 || V <= 0) return;
  penalize_kernel<<<static_cast<unsigned>(n), kOpThreads, 0, stream>>>(V, logits, src_off, pen_off, pen_tok, penalty,
                                                                       work);
  QLORA_CUDA_CHECK_LAUNCH("sample_rows");
}

void sample_rows(cudaStream_t stream, int64_t n, int64_t V, const float* base, const int64_t* off, const double* u,
                 float temperature, int64_t top_k, float top_p, int32_t* out) {
  if (n <= 0 || V <= 0) return;
  if (temperature == 0.0f)
    greedy_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(V, base, off, out);
  else
    sample_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(V, base, off, u, temperature, top_k, top_p, out);
  QLORA_CUDA_CHECK_LAUNCH("sample_rows");
}

}  // namespace qlora::cuda
