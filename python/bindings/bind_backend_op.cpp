// qlora_native._core.backend_op: runs one Backend op by name on any backend, for the op harness
// (tests/test_backend_ops_harness.py, tests/test_cuda_backend.py; the pattern of ggml's
// test-backend-ops). Every array is copied into the backend's memory between sentinel guards;
// afterwards the outputs come back as new arrays and a guard that changed raises RuntimeError
// (an out-of-bounds write). Sizes are checked against the op's shape arguments first, so a wrong
// call is a ValueError, never a stray device access.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "bindings.hpp"
#include "common/error.hpp"
#include "nf4_ref_from_py.hpp"
#include "train/optimizer.hpp"

namespace py = pybind11;

namespace qlora::py_bind {

namespace {

constexpr size_t kGuard = 256;  // bytes of sentinel each side (keeps the payload 256-aligned)
constexpr unsigned char kSentinel = 0xA5;

struct Buf {
  Backend& be;
  void* base = nullptr;
  size_t bytes;
  py::array host;  // the caller's array (input) or its template (output)
  Buf(Backend& b, py::array a) : be(b), bytes(static_cast<size_t>(a.nbytes())), host(std::move(a)) {
    base = be.alloc(bytes + 2 * kGuard);
    std::vector<unsigned char> img(bytes + 2 * kGuard, kSentinel);
    std::memcpy(img.data() + kGuard, host.data(), bytes);
    be.upload(base, img.data(), img.size());
    be.synchronize();
  }
  ~Buf() { be.free(base); }
  void* ptr() const { return static_cast<unsigned char*>(base) + kGuard; }
  // The payload as a new array; throws when a guard byte changed.
  py::array fetch(const std::string& name) {
    std::vector<unsigned char> img(bytes + 2 * kGuard);
    be.download(img.data(), base, img.size());
    be.synchronize();
    for (size_t i = 0; i < kGuard; ++i)
      if (img[i] != kSentinel || img[kGuard + bytes + i] != kSentinel)
        throw std::runtime_error("backend_op: the op wrote outside array '" + name + "'");
    py::array out(host.dtype(), std::vector<py::ssize_t>(host.shape(), host.shape() + host.ndim()));
    std::memcpy(out.mutable_data(), img.data() + kGuard, bytes);
    return out;
  }
};

}  // namespace

void bind_backend_op(py::module_& m) {
  m.def(
      "backend_op",
      [](const std::string& backend, const std::string& op, const py::dict& arrays, const std::map<std::string, int64_t>& ints,
         const std::map<std::string, double>& floats) {
        Backend& be = get_backend(backend);
        // The chunked 16-bit-row defaults (backend_half.cpp) exist wherever half_rows does.
        const std::string base = op == "half_gemm_nn" || op == "half_gemm_nt_bf16" ? "half_rows" : op;
        check_arg(be.supports_op(base), "backend_op: backend '" + be.name() + "' does not implement op " + base);
        std::map<std::string, std::unique_ptr<Buf>> bufs;
        for (auto kv : arrays) {
          const std::string name = py::str(kv.first);
          check_arg(py::isinstance<py::array>(kv.second), "backend_op: '" + name + "' must be a numpy array");
          py::array a = py::array::ensure(kv.second, py::array::c_style);
          bufs.emplace(name, std::make_unique<Buf>(be, a));
        }
        auto I = [&](const char* k) {
          auto it = ints.find(k);
          check_arg(it != ints.end(), std::string("backend_op ") + op + ": missing int '" + k + "'");
          check_arg(it->second >= 0, std::string("backend_op ") + op + ": int '" + k + "' must be >= 0");
          return it->second;
        };
        auto F = [&](const char* k) {
          auto it = floats.find(k);
          check_arg(it != floats.end(), std::string("backend_op ") + op + ": missing float '" + k + "'");
          return static_cast<float>(it->second);
        };
        // Array k with at least n elements of itemsize isz (n computed from the shape ints).
        auto A = [&](const std::string& k, int64_t n, size_t isz) -> void* {
          auto it = bufs.find(k);
          check_arg(it != bufs.end(), "backend_op " + op + ": missing array '" + k + "'");
          check_arg(static_cast<size_t>(it->second->host.itemsize()) == isz,
                    "backend_op " + op + ": array '" + k + "' has the wrong dtype");
          check_arg(it->second->bytes >= static_cast<size_t>(n) * isz,
                    "backend_op " + op + ": array '" + k + "' is smaller than the shape arguments need");
          return it->second->ptr();
        };
        auto f = [&](const std::string& k, int64_t n) { return static_cast<float*>(A(k, n, 4)); };
        auto i32 = [&](const std::string& k, int64_t n) { return static_cast<int32_t*>(A(k, n, 4)); };
        // Rows x cols with row stride ld: the last row needs only cols.
        auto span = [](int64_t rows, int64_t cols, int64_t ld) { return rows ? (rows - 1) * ld + cols : 0; };
        std::vector<std::string> outs;
        std::vector<int32_t> sampled;  // sample_rows: host output
        {
          py::gil_scoped_release nogil;
          if (op == "embedding") {
            const int64_t M = I("M"), D = I("D"), V = I("V");
            be.embedding(M, D, f("table", V * D), i32("ids", M), f("out", M * D));
            outs = {"out"};
          } else if (op == "q8_0_rows") {
            const int64_t M = I("M"), K = I("K"), N = I("N");
            be.q8_0_rows(M, K, A("W", N * (K / 32) * 34, 1), i32("ids", M), f("out", M * K));
            outs = {"out"};
          } else if (op == "q8_0_gemm_nt") {
            const int64_t M = I("M"), N = I("N"), K = I("K"), ldx = I("ldx"), ldy = I("ldy");
            be.q8_0_gemm_nt(M, N, K, f("X", span(M, K, ldx)), ldx, A("W", N * (K / 32) * 34, 1), f("Y", span(M, N, ldy)),
                            ldy);
            outs = {"Y"};
          } else if (op == "half_rows") {  // ints bf16 = 0 (fp16 rows) / 1 (bf16 rows); W any 2-byte array
            const int64_t M = I("M"), K = I("K"), N = I("N");
            be.half_rows(I("bf16") ? Backend::HalfType::BF16 : Backend::HalfType::F16, M, K, A("W", N * K, 2),
                         i32("ids", M), f("out", M * K));
            outs = {"out"};
          } else if (op == "half_gemm_nt" || op == "half_gemm_nt_bf16") {
            const int64_t M = I("M"), N = I("N"), K = I("K"), ldx = I("ldx"), ldy = I("ldy");
            const Backend::HalfType t = I("bf16") ? Backend::HalfType::BF16 : Backend::HalfType::F16;
            float* X = f("X", span(M, K, ldx));
            const void* W = A("W", N * K, 2);
            float* Y = f("Y", span(M, N, ldy));
            if (op == "half_gemm_nt") be.half_gemm_nt(t, M, N, K, X, ldx, W, Y, ldy);
            else be.half_gemm_nt_bf16(t, M, N, K, X, ldx, W, Y, ldy);
            outs = {"Y"};
          } else if (op == "half_gemm_nn") {  // dX = alpha dY · wide(W) + beta dX (bf16: ints compute_bf16)
            const int64_t M = I("M"), N = I("N"), K = I("K"), lddy = I("lddy"), lddx = I("lddx");
            be.half_gemm_nn(I("bf16") ? Backend::HalfType::BF16 : Backend::HalfType::F16, M, N, K, F("alpha"),
                            f("dY", span(M, N, lddy)), lddy, A("W", N * K, 2), F("beta"), f("dX", span(M, K, lddx)),
                            lddx, I("compute_bf16") != 0);
            outs = {"dX"};
          } else if (op == "rmsnorm") {
            const int64_t M = I("M"), D = I("D");
            be.rmsnorm(M, D, f("x", M * D), f("w", D), F("eps"), f("out", M * D));
            outs = {"out"};
          } else if (op == "add_inplace") {
            const int64_t n = I("n");
            be.add_inplace(n, f("x", n), f("y", n));
            outs = {"y"};
          } else if (op == "add_bias") {
            const int64_t M = I("M"), N = I("N"), ldy = I("ldy");
            be.add_bias(M, N, f("bias", N), f("y", span(M, N, ldy)), ldy);
            outs = {"y"};
          } else if (op == "rope" || op == "rope_backward") {
            const int64_t M = I("M"), H = I("n_heads"), hd = I("head_dim"), ldx = I("ldx");
            float* x = f("x", span(M, H * hd, ldx));
            if (op == "rope") be.rope(M, H, hd, x, ldx, i32("pos", M), f("inv_freq", hd / 2));
            else be.rope_backward(M, H, hd, x, ldx, i32("pos", M), f("inv_freq", hd / 2));
            outs = {"x"};
          } else if (op == "swiglu") {
            const int64_t M = I("M"), N = I("N"), ldg = I("ldg"), ldu = I("ldu"), ldo = I("ldo");
            be.swiglu(M, N, f("gate", span(M, N, ldg)), ldg, f("up", span(M, N, ldu)), ldu, f("out", span(M, N, ldo)), ldo);
            outs = {"out"};
          } else if (op == "kv_write") {
            const int64_t B = I("B"), T = I("T"), H = I("H"), hd = I("hd"), ldx = I("ldx"), S = I("S_cap"), st = I("start");
            check_arg(st + T <= S, "backend_op kv_write: start + T > S_cap");
            be.kv_write(B, T, H, hd, f("x", span(B * T, H * hd, ldx)), ldx, f("cache", B * H * S * hd), S, st);
            outs = {"cache"};
          } else if (op == "attention") {
            const int64_t B = I("B"), T = I("T"), Hq = I("Hq"), Hkv = I("Hkv"), hd = I("hd"), ldq = I("ldq"),
                          S = I("S_cap"), st = I("start"), ldo = I("ldo");
            check_arg(st + T <= S && Hkv >= 1 && Hq % Hkv == 0, "backend_op attention: bad shape arguments");
            be.attention(B, T, Hq, Hkv, hd, f("q", span(B * T, Hq * hd, ldq)), ldq, f("k_cache", B * Hkv * S * hd),
                         f("v_cache", B * Hkv * S * hd), S, st, i32("key_mask", B * S), F("scale"),
                         f("out", span(B * T, Hq * hd, ldo)), ldo);
            outs = {"out"};
          } else if (op == "kv_write_bf16") {  // cache: uint16 (bf16 bit patterns)
            const int64_t B = I("B"), T = I("T"), H = I("H"), hd = I("hd"), ldx = I("ldx"), S = I("S_cap"), st = I("start");
            check_arg(st + T <= S, "backend_op kv_write_bf16: start + T > S_cap");
            be.kv_write_bf16(B, T, H, hd, f("x", span(B * T, H * hd, ldx)), ldx,
                             static_cast<uint16_t*>(A("cache", B * H * S * hd, 2)), S, st);
            outs = {"cache"};
          } else if (op == "attention_kv_bf16") {
            const int64_t B = I("B"), T = I("T"), Hq = I("Hq"), Hkv = I("Hkv"), hd = I("hd"), ldq = I("ldq"),
                          S = I("S_cap"), st = I("start"), ldo = I("ldo");
            check_arg(st + T <= S && Hkv >= 1 && Hq % Hkv == 0, "backend_op attention_kv_bf16: bad shape arguments");
            be.attention_kv_bf16(B, T, Hq, Hkv, hd, f("q", span(B * T, Hq * hd, ldq)), ldq,
                                 static_cast<const uint16_t*>(A("k_cache", B * Hkv * S * hd, 2)),
                                 static_cast<const uint16_t*>(A("v_cache", B * Hkv * S * hd, 2)), S, st,
                                 i32("key_mask", B * S), F("scale"), f("out", span(B * T, Hq * hd, ldo)), ldo);
            outs = {"out"};
          } else if (op == "rmsnorm_backward") {
            const int64_t M = I("M"), D = I("D");
            be.rmsnorm_backward(M, D, f("x", M * D), f("w", D), F("eps"), f("dy", M * D), f("dx", M * D));
            outs = {"dx"};
          } else if (op == "swiglu_backward") {
            const int64_t M = I("M"), N = I("N"), ldg = I("ldg"), ldu = I("ldu"), ldd = I("ldd"), lddg = I("lddg"),
                          lddu = I("lddu");
            be.swiglu_backward(M, N, f("gate", span(M, N, ldg)), ldg, f("up", span(M, N, ldu)), ldu,
                               f("dout", span(M, N, ldd)), ldd, f("dgate", span(M, N, lddg)), lddg,
                               f("dup", span(M, N, lddu)), lddu);
            outs = {"dgate", "dup"};
          } else if (op == "attention_train" || op == "attention_train_backward") {
            const int64_t B = I("B"), T = I("T"), Hq = I("Hq"), Hkv = I("Hkv"), hd = I("hd"), ldq = I("ldq"),
                          ldk = I("ldk"), ldv = I("ldv"), ldo = I("ldo");
            check_arg(Hkv >= 1 && Hq % Hkv == 0, "backend_op " + op + ": Hq must be a multiple of Hkv >= 1");
            const float* q = f("q", span(B * T, Hq * hd, ldq));
            const float* k = f("k", span(B * T, Hkv * hd, ldk));
            const float* v = f("v", span(B * T, Hkv * hd, ldv));
            const int32_t* km = i32("key_mask", B * T);
            float* o = f("out", span(B * T, Hq * hd, ldo));
            float* lse = f("lse", B * Hq * T);
            if (op == "attention_train") {
              be.attention_train(B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, km, F("scale"), o, ldo, lse);
              outs = {"out", "lse"};
            } else {  // optional int bf16 = 1: attention_train_backward_bf16 (bf16 compute)
              const int64_t lddo = I("lddo"), lddq = I("lddq"), lddk = I("lddk"), lddv = I("lddv");
              const bool bf16 = ints.count("bf16") != 0 && ints.at("bf16") != 0;
              const float* g = f("dout", span(B * T, Hq * hd, lddo));
              float* dq = f("dq", span(B * T, Hq * hd, lddq));
              float* dk = f("dk", span(B * T, Hkv * hd, lddk));
              float* dv = f("dv", span(B * T, Hkv * hd, lddv));
              if (bf16)
                be.attention_train_backward_bf16(B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, km, F("scale"), o, ldo, lse,
                                                 g, lddo, dq, lddq, dk, lddk, dv, lddv);
              else
                be.attention_train_backward(B, T, Hq, Hkv, hd, q, ldq, k, ldk, v, ldv, km, F("scale"), o, ldo, lse, g,
                                            lddo, dq, lddq, dk, lddk, dv, lddv);
              outs = {"dq", "dk", "dv"};
            }
          } else if (op == "lora_dropout" || op == "lora_dropout_backward") {
            // ints seed_lo, seed_hi (32-bit halves of the 64-bit seed), offset; float p
            const int64_t M = I("M"), in = I("in"), ld = I("ld");
            const uint64_t seed = static_cast<uint64_t>(I("seed_lo")) | (static_cast<uint64_t>(I("seed_hi")) << 32);
            const float p = F("p");
            check_arg(p >= 0.0f && p < 1.0f, "backend_op " + op + ": p must be in [0, 1)");
            if (op == "lora_dropout") {
              be.lora_dropout(seed, static_cast<uint64_t>(I("offset")), p, M, in, f("x", span(M, in, ld)), ld,
                              f("out", M * in));
              outs = {"out"};
            } else {
              be.lora_dropout_backward(seed, static_cast<uint64_t>(I("offset")), p, M, in, f("g", M * in),
                                       f("dx", span(M, in, ld)), ld);
              outs = {"dx"};
            }
          } else if (op == "cross_entropy_rows") {
            const int64_t M = I("M"), V = I("V"), ldl = I("ldl");
            be.cross_entropy_rows(M, V, f("logits", span(M, V, ldl)), ldl, i32("labels", M), F("grad_scale"),
                                  I("want_grad") != 0, f("loss", M));
            outs = {"logits", "loss"};
          } else if (op == "adamw_update") {
            // scalars from the AdamW config as the optimizer forms them: ints t (step >= 1);
            // floats lr, beta1, beta2, eps, weight_decay (in double, as given)
            auto D = [&](const char* k) {
              auto it = floats.find(k);
              check_arg(it != floats.end(), std::string("backend_op adamw_update: missing float '") + k + "'");
              return it->second;
            };
            train::AdamWConfig c;
            c.beta1 = D("beta1"), c.beta2 = D("beta2"), c.eps = D("eps"), c.weight_decay = D("weight_decay");
            c.validate();
            const int64_t n = I("n"), t = I("t");
            check_arg(t >= 1, "backend_op adamw_update: t must be >= 1");
            be.adamw_update(n, f("p", n), f("g", n), f("m", n), f("v", n), train::adamw_scalars(c, t, D("lr")));
            outs = {"p", "m", "v"};
          } else if (op == "sum_squares") {
            const int64_t nc = I("n_chunks");
            auto* bounds = static_cast<int64_t*>(A("bounds", nc + 1, 8));
            const auto bit = bufs.find("bounds");
            const int64_t* hb = static_cast<const int64_t*>(bit->second->host.data());
            for (int64_t c = 0; c < nc; ++c)
              check_arg(hb[0] == 0 && hb[c] <= hb[c + 1], "backend_op sum_squares: bounds must start at 0 and not decrease");
            be.sum_squares(nc, bounds, f("x", nc ? hb[nc] : 0), static_cast<double*>(A("partial", nc, 8)),
                           static_cast<double*>(A("out", 1, 8)));
            outs = {"partial", "out"};
          } else if (op == "scale_inplace") {
            const int64_t n = I("n");
            be.scale_inplace(n, f("x", n), F("s"));
            outs = {"x"};
          } else if (op == "find_nonfinite") {
            const int64_t n = I("n");
            be.find_nonfinite(n, f("x", n), static_cast<int64_t*>(A("out", 1, 8)));
            outs = {"out"};
          } else if (op == "gemm_nt" || op == "gemm_nt_bf16") {
            const int64_t M = I("M"), N = I("N"), K = I("K"), lda = I("lda"), ldb = I("ldb"), ldc = I("ldc");
            const auto fn = op == "gemm_nt" ? &Backend::gemm_nt : &Backend::gemm_nt_bf16;
            (be.*fn)(M, N, K, F("alpha"), f("A", span(M, K, lda)), lda, f("B", span(N, K, ldb)), ldb, F("beta"),
                     f("C", span(M, N, ldc)), ldc);
            outs = {"C"};
          } else if (op == "lora_segments" || op == "lora_segments_many") {
            // Problems p = 0..np-1 (lora_segments: np = 1), each with ints in_p, out_p, ldx_p, ldy_p,
            // nseg_p and per segment s: row0_p_s, rows_p_s, r_p_s, float alpha_p_s, arrays x_p,
            // y_p, A_p_s, B_p_s; scratch array t.
            const int64_t np = op == "lora_segments" ? 1 : I("np");
            std::vector<std::vector<Backend::LoraSegment>> segs(static_cast<size_t>(np));
            std::vector<Backend::LoraProblem> probs;
            int64_t tmax = 0;
            for (int64_t p = 0; p < np; ++p) {
              const std::string P = std::to_string(p);
              const int64_t in = I(("in_" + P).c_str()), out = I(("out_" + P).c_str()), ldx = I(("ldx_" + P).c_str()),
                            ldy = I(("ldy_" + P).c_str()), ns = I(("nseg_" + P).c_str());
              int64_t rows_end = 0;
              for (int64_t s = 0; s < ns; ++s) {
                const std::string S = P + "_" + std::to_string(s);
                const int64_t row0 = I(("row0_" + S).c_str()), rows = I(("rows_" + S).c_str()), r = I(("r_" + S).c_str());
                segs[p].push_back({row0, rows, r, f("A_" + S, r * in), f("B_" + S, out * r), F(("alpha_" + S).c_str())});
                rows_end = std::max(rows_end, row0 + rows);
                tmax = std::max(tmax, rows * r);
              }
              probs.push_back({in, out, f("x_" + P, span(rows_end, in, ldx)), ldx, ns, segs[p].data(),
                               f("y_" + P, span(rows_end, out, ldy)), ldy});
              outs.push_back("y_" + P);
            }
            float* t = f("t", tmax);
            if (op == "lora_segments")
              be.lora_segments(probs[0].in, probs[0].out, probs[0].x, probs[0].ldx, probs[0].n, probs[0].seg, probs[0].y,
                               probs[0].ldy, t);
            else
              be.lora_segments_many(np, probs.data(), t);
          } else if (op == "sample_rows") {
            // logits [R, ldl] in backend memory; host arrays rows int32 [n], hist int32 (all rows'
            // histories back to back), hist_off int64 [n + 1], u float64 [n]; ints n, V, ldl, R,
            // top_k; floats temperature, top_p, repetition_penalty. Output: tokens int32 [n] (host)
            // and the logits (must come back intact).
            const int64_t n = I("n"), V = I("V"), ldl = I("ldl"), R = I("R");
            check_arg(V >= 1 && ldl >= V, "backend_op sample_rows: need V >= 1 and ldl >= V");
            const float* lg = f("logits", span(R, V, ldl));
            auto host = [&](const std::string& k, int64_t cnt, size_t isz) {
              A(k, cnt, isz);  // size and dtype checks
              return bufs.at(k)->host.data();
            };
            const int32_t* rows = static_cast<const int32_t*>(host("rows", n, 4));
            const int64_t* off = static_cast<const int64_t*>(host("hist_off", n + 1, 8));
            const double* u = static_cast<const double*>(host("u", n, 8));
            const int64_t nh = off[n];
            check_arg(off[0] == 0 && nh >= 0, "backend_op sample_rows: hist_off must start at 0");
            const int32_t* hist = static_cast<const int32_t*>(host("hist", nh, 4));
            std::vector<const int32_t*> hp(n);
            std::vector<int64_t> hn(n);
            for (int64_t i = 0; i < n; ++i) {
              check_arg(rows[i] >= 0 && rows[i] < R, "backend_op sample_rows: row index out of range");
              check_arg(off[i] <= off[i + 1] && off[i + 1] <= nh, "backend_op sample_rows: bad hist_off");
              hp[i] = hist + off[i];
              hn[i] = off[i + 1] - off[i];
            }
            SamplingParams p{F("temperature"), I("top_k"), F("top_p"), F("repetition_penalty")};
            sampled.assign(static_cast<size_t>(n), -7);
            be.sample_rows(n, V, lg, ldl, rows, hp.data(), hn.data(), p, u, sampled.data());
            outs = {"logits"};
          } else {
            throw ValueError("backend_op: no harness case for op '" + op + "'");
          }
          be.synchronize();
        }
        py::dict result;
        for (const std::string& k : outs) result[py::str(k)] = bufs.at(k)->fetch(k);
        if (op == "sample_rows") {
          py::array_t<int32_t> t(static_cast<py::ssize_t>(sampled.size()));
          if (!sampled.empty()) std::memcpy(t.mutable_data(), sampled.data(), sampled.size() * sizeof(int32_t));
          result["tokens"] = t;
        }
        return result;
      },
      py::arg("backend"), py::arg("op"), py::arg("arrays"), py::arg("ints") = std::map<std::string, int64_t>{},
      py::arg("floats") = std::map<std::string, double>{},
      "Run one Backend op on `backend` (test harness): arrays are copied into guarded backend buffers, "
      "the op's outputs come back as a dict of new arrays.");

  // bench/bench_cuda.py: the NF4 GEMM / GEMV on operands resident in the backend's memory (uploaded
  // once), seconds per call over `iters` calls queued back to back (one synchronize at each end).
  m.def(
      "bench_nf4_gemm",
      [](const std::string& backend, int64_t M, py::handle w_obj, int64_t iters, bool bf16) {
        Backend& be = get_backend(backend);
        check_arg(M >= 1 && iters >= 1, "bench_nf4_gemm: M and iters must be >= 1");
        PyNf4 w = nf4_from_py(w_obj);
        const Nf4Ref& h = w.ref;
        std::vector<void*> owned;
        struct Free {
          Backend& be;
          std::vector<void*>& p;
          ~Free() {
            for (void* q : p) be.free(q);
          }
        } fr{be, owned};
        auto up = [&](const void* src, size_t bytes) {
          void* d = be.alloc(bytes ? bytes : 4);
          owned.push_back(d);
          if (bytes && src) be.upload(d, src, bytes);  // src null: an output buffer
          return d;
        };
        Nf4Ref d = h;
        d.packed = static_cast<const uint8_t*>(up(h.packed, static_cast<size_t>((h.numel() + 1) / 2)));
        d.absmax = up(h.absmax, static_cast<size_t>(h.n_blocks()) * (h.double_quant ? 1 : 4));
        if (h.double_quant) {
          d.nested_absmax = static_cast<const float*>(up(h.nested_absmax, sizeof(float) * ((h.n_blocks() + 255) / 256)));
          d.nested_map = static_cast<const float*>(up(h.nested_map, sizeof(float) * 256));
        }
        std::vector<float> x(static_cast<size_t>(M * h.cols));
        for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
        const float* xd = static_cast<const float*>(up(x.data(), sizeof(float) * x.size()));
        float* yd = static_cast<float*>(up(nullptr, sizeof(float) * static_cast<size_t>(M * h.rows)));
        py::gil_scoped_release nogil;
        auto call = [&] {
          if (bf16) be.nf4_gemm_nt_bf16(M, 1.0f, xd, h.cols, d, 0.0f, yd, h.rows);
          else be.nf4_gemm_nt(M, 1.0f, xd, h.cols, d, 0.0f, yd, h.rows);
        };
        call();  // warm-up (first-launch costs)
        be.synchronize();
        const auto t0 = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < iters; ++i) call();
        be.synchronize();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(iters);
      },
      py::arg("backend"), py::arg("M"), py::arg("w"), py::arg("iters") = 10, py::arg("bf16") = false,
      "Seconds per nf4_gemm_nt (bf16: nf4_gemm_nt_bf16) call of X[M, in] (backend memory) by NF4 w.");
}

}  // namespace qlora::py_bind
