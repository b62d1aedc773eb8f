// Runs small op kernels under the CPU emulator (emu.hpp) for tests/test_cuda_emu_ops.py, which
// rewrites their sources (static __shared__ -> per-block NaN storage, <<<>>> -> emu::launch) into
// the build folder: cuda/ops_lora_sgmv.cu (shrink + expand launches), ops_rmsnorm.cu,
// ops_rmsnorm_backward.cu, ops_swiglu_backward.cu, ops_cross_entropy.cu, ops_adamw.cu and
// ops_grad_norm.cu, ops_sample.cu, ops_lora_dropout.cu, ops_rope.cu,
// ops_kv_write.cu, ops_half_rows.cu, ops_q8_0_rows.cu, ops_embedding.cu, ops_swiglu.cu, ops_add_bias.cu,
// ops_add_inplace.cu (ieee_ops.cuh with each PTX .rn instruction as the plain C++ operation, built
// with -ffp-contract=off: IEEE binary32 on x86-64, as the CPU optimizer computes).
// Usage: ops_driver MODE IN OUT ARGS...: IN holds the op's input arrays (4-byte elements,
// concatenated in the order each mode reads them), OUT receives its outputs likewise.
#define __grid_constant__
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ops_lora_sgmv.cpp"
#include "ops_rmsnorm.cpp"
#include "ops_rmsnorm_backward.cpp"
#include "ops_swiglu_backward.cpp"
#include "ops_cross_entropy.cpp"

// For ops_grad_norm.cu: the one OS thread runs the fibers one at a time, so plain code is atomic.
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = *p;
  if (v < o) *p = v;
  return o;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
#include "ops_adamw.cpp"
#include "ops_grad_norm.cpp"
// For ops_sample.cu (shared-memory atomics, integer intrinsics, IEEE float ops)
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned o = *p;
  *p = o + v;
  return o;
}
inline int atomicAdd(int* p, int v) {
  const int o = *p;
  *p = o + v;
  return o;
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
#include "ops_sample.cpp"
#include "ops_lora_dropout.cpp"
#include "ops_rope.cpp"
#include "ops_kv_write.cpp"
#include "ops_half_rows.cpp"
#include "ops_q8_0_rows.cpp"
#include "ops_embedding.cpp"
#include "ops_swiglu.cpp"
#include "ops_add_bias.cpp"
#include "ops_add_inplace.cpp"

namespace {
std::vector<float> in;
size_t pos = 0;
std::vector<float> out;
float* take(size_t n) {
  if (pos + n > in.size()) {
    std::fprintf(stderr, "input too short\n");
    std::exit(2);
  }
  float* p = in.data() + pos;
  pos += n;
  return p;
}
void put(const float* p, size_t n) { out.insert(out.end(), p, p + n); }
}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) return 2;
  const std::string mode = argv[1];
  {
    FILE* f = std::fopen(argv[2], "rb");
    if (!f) return 2;
    std::fseek(f, 0, SEEK_END);
    in.resize(static_cast<size_t>(std::ftell(f)) / 4);
    std::fseek(f, 0, SEEK_SET);
    if (std::fread(in.data(), 4, in.size(), f) != in.size()) return 2;
    std::fclose(f);
  }
  int ai = 4;
  auto I = [&]() { return std::atoll(argv[ai++]); };
  auto F = [&]() { return static_cast<float>(std::atof(argv[ai++])); };
  using namespace qlora::cuda;
  if (mode == "sgmv") {
    // nprob, then per problem: in out ldx ldy M nseg, per segment: row0 rows r alpha. IN: per problem
    // x [M, ldx], y [M, ldy], then per segment A [r, in], B [out, r]. The host's packing
    // (ops_lora_sgmv_host.cpp) for segments of <= kSgmvMaxRows rows: batches of kSgmvMaxEntries.
    const int np = static_cast<int>(I());
    std::vector<float*> ys;
    std::vector<size_t> yn;
    std::vector<SgmvEntry> shorts;
    std::vector<std::vector<float>> ts;
    for (int q = 0; q < np; ++q) {
      const int64_t nin = I(), nout = I(), ldx = I(), ldy = I(), M = I(), ns = I();
      float* x = take(M * ldx);
      float* y = take(M * ldy);
      ys.push_back(y), yn.push_back(M * ldy);
      for (int64_t s = 0; s < ns; ++s) {
        const int64_t row0 = I(), rows = I(), r = I();
        const float alpha = F();
        float* A = take(r * nin);
        float* B = take(nout * r);
        if (rows == 0 || r == 0 || alpha == 0.0f || nout == 0 || nin == 0) continue;  // as the host skips them
        if (rows > kSgmvMaxRows || rows * r > kSgmvMaxTile) return 3;                 // the GEMM path: not here
        SgmvEntry e{};
        e.x = x + row0 * ldx, e.y = y + row0 * ldy, e.A = A, e.B = B;
        ts.emplace_back(rows * r, 12345.0f);
        e.t = ts.back().data();
        e.ldx = ldx, e.ldy = ldy, e.in = nin, e.out = nout, e.rows = rows, e.r = r, e.alpha = alpha;
        shorts.push_back(e);
      }
    }
    for (size_t b0 = 0; b0 < shorts.size(); b0 += kSgmvMaxEntries) {
      SgmvBatch batch{};
      int32_t shrink = 0, expand = 0;
      for (size_t k = b0; k < shorts.size() && k < b0 + kSgmvMaxEntries; ++k) {
        SgmvEntry e = shorts[k];
        e.shrink0 = shrink, e.expand0 = expand;
        shrink += e.r;
        expand += (e.out + 255) / 256;
        batch.e[batch.n++] = e;
      }
      batch.shrink_items = shrink, batch.expand_items = expand;
      lora_sgmv(nullptr, batch);
    }
    for (int q = 0; q < np; ++q) put(ys[q], yn[q]);
  } else if (mode == "rmsnorm" || mode == "rmsnorm_backward") {
    // M D eps alias; IN: x [M, D], w [D], (backward: dy [M, D]); OUT: out / dx (aliasing x / dy when alias)
    const int64_t M = I(), D = I();
    const float eps = F();
    const bool alias = I() != 0;
    float* x = take(M * D);
    float* w = take(D);
    if (mode == "rmsnorm") {
      std::vector<float> o(M * D, 7.0f);
      float* dst = alias ? x : o.data();
      rmsnorm(nullptr, M, D, x, w, eps, dst);
      put(dst, M * D);
    } else {
      float* dy = take(M * D);
      std::vector<float> o(M * D, 7.0f);
      float* dst = alias ? dy : o.data();
      rmsnorm_backward(nullptr, M, D, x, w, eps, dy, dst);
      put(dst, M * D);
    }
  } else if (mode == "swiglu_backward") {
    // M N ldg ldu ldd lddg lddu; IN: gate, up, dout, dgate, dup (each [M, ld]); OUT: dgate, dup
    const int64_t M = I(), N = I(), ldg = I(), ldu = I(), ldd = I(), lddg = I(), lddu = I();
    float* g = take(M * ldg);
    float* u = take(M * ldu);
    float* d = take(M * ldd);
    float* dg = take(M * lddg);
    float* du = take(M * lddu);
    swiglu_backward(nullptr, M, N, g, ldg, u, ldu, d, ldd, dg, lddg, du, lddu);
    put(dg, M * lddg), put(du, M * lddu);
  } else if (mode == "cross_entropy") {
    // M V ldl want_grad grad_scale; IN: logits [M, ldl], labels [M] (int32); OUT: logits, loss [M]
    const int64_t M = I(), V = I(), ldl = I();
    const bool want = I() != 0;
    const float gs = F();
    float* l = take(M * ldl);
    int32_t* lab = reinterpret_cast<int32_t*>(take(M));
    std::vector<float> loss(M, 7.0f);
    cross_entropy_rows(nullptr, M, V, l, ldl, lab, gs, want, loss.data());
    put(l, M * ldl), put(loss.data(), M);
  } else if (mode == "adamw") {
    // n t lr beta1 beta2 eps weight_decay; IN: p, g, m, v [n]; OUT: p, m, v. The scalars as
    // train::adamw_scalars forms them (double, rounded once).
    const int64_t n = I(), t = I();
    const double lr = std::atof(argv[ai++]), b1 = std::atof(argv[ai++]), b2 = std::atof(argv[ai++]);
    const double eps = std::atof(argv[ai++]), wd = std::atof(argv[ai++]);
    float* p = take(n);
    float* g = take(n);
    float* m = take(n);
    float* v = take(n);
    qlora::train::AdamWScalars sc;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t)), bc2 = 1.0 - std::pow(b2, static_cast<double>(t));
    sc.apply_decay = wd != 0.0;
    sc.decay = static_cast<float>(1.0 - lr * wd);
    sc.one_minus_b1 = static_cast<float>(1.0 - b1);
    sc.beta2 = static_cast<float>(b2);
    sc.one_minus_b2 = static_cast<float>(1.0 - b2);
    sc.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
    sc.eps = static_cast<float>(eps);
    sc.neg_step = static_cast<float>(-(lr / bc1));
    adamw_update(nullptr, n, p, g, m, v, sc);
    put(p, n), put(m, n), put(v, n);
  } else if (mode == "grad_norm") {
    // n_chunks n s; IN: bounds [n_chunks + 1] (int64 as 2 words each), x [n]; OUT: partial [n_chunks]
    // and out (doubles, 2 words each), the first non-finite index (int64), then x * s
    const int64_t nc = I(), n = I();
    const float sc = F();
    const int64_t* bounds = reinterpret_cast<const int64_t*>(take(2 * (nc + 1)));
    float* x = take(n);
    std::vector<double> part(nc + 1, 12345.0), sum(1, 12345.0);
    sum_squares(nullptr, nc, bounds, x, part.data(), sum.data());
    std::vector<int64_t> first(1, 77);
    find_nonfinite(nullptr, n, x, first.data());
    scale_inplace(nullptr, n, x, sc);
    put(reinterpret_cast<float*>(part.data()), 2 * nc), put(reinterpret_cast<float*>(sum.data()), 2);
    put(reinterpret_cast<float*>(first.data()), 2), put(x, n);
  } else if (mode == "sample") {
    // n V ldl temperature top_k top_p penalty; IN: logits [n, ldl], u [n] (doubles, 2 words each),
    // pen_off [n + 1], pen_tok (int32, distinct per row); OUT: the n tokens (int32). With
    // penalty != 1 the rows go through sample_penalize into a [n, V] work buffer first.
    const int64_t n = I(), V = I(), ldl = I();
    const float T = F();
    const int64_t top_k = I();
    const float top_p = F(), pen = F();
    float* l = take(n * ldl);
    const double* u = reinterpret_cast<const double*>(take(2 * n));
    const int32_t* pen_off = reinterpret_cast<const int32_t*>(take(n + 1));
    const int32_t* pen_tok = reinterpret_cast<const int32_t*>(take(pen_off[n]));
    std::vector<int64_t> off(n);
    for (int64_t r = 0; r < n; ++r) off[r] = r * ldl;
    std::vector<float> work(n * V, 12345.0f);
    const float* base = l;
    if (pen != 1.0f) {
      sample_penalize(nullptr, n, V, l, off.data(), pen_off, pen_tok, pen, work.data());
      for (int64_t r = 0; r < n; ++r) off[r] = r * V;
      base = work.data();
    }
    std::vector<int32_t> tok(n, -7);
    sample_rows(nullptr, n, V, base, off.data(), u, T, top_k, top_p, tok.data());
    put(reinterpret_cast<float*>(tok.data()), n);
  } else if (mode == "dropout" || mode == "dropout_backward") {
    // M in ld seed offset p; IN: forward x [M, ld]; backward g [M, in], dx [M, ld]. OUT: out [M, in] / dx.
    // p_keep and the scale as CudaBackend::lora_dropout forms them.
    const int64_t M = I(), nin = I(), ld = I();
    const uint64_t seed = std::strtoull(argv[ai++], nullptr, 10), offset = std::strtoull(argv[ai++], nullptr, 10);
    const float p = F();
    if (mode == "dropout") {
      float* x = take(M * ld);
      std::vector<float> o(M * nin, 12345.0f);
      lora_dropout(nullptr, seed, offset, 1.0 - static_cast<double>(p), 1.0f / (1.0f - p), M, nin, x, ld, o.data());
      put(o.data(), o.size());
    } else {
      float* g = take(M * nin);
      float* dx = take(M * ld);
      lora_dropout_backward(nullptr, seed, offset, 1.0 - static_cast<double>(p), 1.0f / (1.0f - p), M, nin, g, dx, ld);
      put(dx, M * ld);
    }
  } else if (mode == "rope") {
    // M H hd ldx inverse; IN: x [M, ldx], pos [M] (int32), inv_freq [hd / 2]; OUT: x
    const int64_t M = I(), H = I(), hd = I(), ldx = I();
    const bool inverse = I() != 0;
    float* x = take(M * ldx);
    const int32_t* pos = reinterpret_cast<const int32_t*>(take(M));
    const float* inv = take(hd / 2);
    rope(nullptr, M, H, hd, x, ldx, pos, inv, inverse);
    put(x, M * ldx);
  } else if (mode == "kv_write") {
    // B T H hd ldx S start bf16; IN: x [B * T, ldx], cache [B, H, S, hd] (fp32, or bf16 bits packed
    // two a word); OUT: the cache
    const int64_t B = I(), T = I(), H = I(), hd = I(), ldx = I(), S = I(), start = I();
    const bool b16 = I() != 0;
    const float* x = take(B * T * ldx);
    const int64_t nc = B * H * S * hd;
    float* cache = take(b16 ? (nc + 1) / 2 : nc);
    if (b16) kv_write_bf16(nullptr, B, T, H, hd, x, ldx, reinterpret_cast<uint16_t*>(cache), S, start);
    else kv_write(nullptr, B, T, H, hd, x, ldx, cache, S, start);
    put(cache, b16 ? (nc + 1) / 2 : nc);
  } else if (mode == "rows") {
    // kind (0 fp16, 1 bf16, 2 Q8_0, 3 fp32 embedding) M K N; IN: W (its bytes, padded to words), ids [M]; OUT: [M, K]
    const int kind = static_cast<int>(I());
    const int64_t M = I(), K = I(), N = I();
    const int64_t bytes = kind == 3 ? N * K * 4 : kind == 2 ? N * (K / 32) * 34 : N * K * 2;
    const void* W = take((bytes + 3) / 4);
    const int32_t* ids = reinterpret_cast<const int32_t*>(take(M));
    std::vector<float> o(M * K, 12345.0f);
    if (kind == 3) embedding(nullptr, M, K, static_cast<const float*>(W), ids, o.data());
    else if (kind == 2) q8_0_rows(nullptr, M, K, W, ids, o.data());
    else half_rows(nullptr, kind == 1, M, K, W, ids, o.data());
    put(o.data(), o.size());
  } else if (mode == "swiglu") {
    // M N ldg ldu ldo; IN: gate, up, out (each [M, ld]); OUT: out
    const int64_t M = I(), N = I(), ldg = I(), ldu = I(), ldo = I();
    const float* g = take(M * ldg);
    const float* u = take(M * ldu);
    float* o = take(M * ldo);
    swiglu(nullptr, M, N, g, ldg, u, ldu, o, ldo);
    put(o, M * ldo);
  } else if (mode == "add") {
    // M N ldy; IN: bias [N], y [M, ldy], x [M * ldy]; OUT: y + bias (add_bias), then that + x (add_inplace)
    const int64_t M = I(), N = I(), ldy = I();
    const float* bias = take(N);
    float* y = take(M * ldy);
    const float* x = take(M * ldy);
    add_bias(nullptr, M, N, bias, y, ldy);
    put(y, M * ldy);
    add_inplace(nullptr, M * ldy, x, y);
    put(y, M * ldy);
  } else {
    return 2;
  }
  FILE* f = std::fopen(argv[3], "wb");
  if (!f || std::fwrite(out.data(), 4, out.size(), f) != out.size()) return 2;
  std::fclose(f);
  std::puts("DONE");
  return 0;
}
