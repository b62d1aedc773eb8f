// qlora_native._core.grad_ops: the training ops (backward kernels, training attention, chunked
// LM cross-entropy) on numpy arrays, for tests. Inputs are float32 / int32 exactly (no implicit
// dtype conversion; non-contiguous arrays are copied); outputs are new arrays. Host backends only.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backend.hpp"
#include "bindings.hpp"
#include "common/error.hpp"
#include "model/lm_loss.hpp"

namespace qlora::py_bind {

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

py::array checked(py::handle obj, const std::string& name, int ndim, const py::dtype& dt, const char* dtname) {
  check_arg(py::isinstance<py::array>(obj), name + " must be a numpy.ndarray");
  auto a = py::reinterpret_borrow<py::array>(obj);
  check_arg(a.dtype().is(dt), name + " must have dtype " + dtname + ", got " + std::string(py::str(a.dtype())) +
                                  " (no implicit conversion)");
  check_arg(a.ndim() == ndim, name + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
  return a;
}

// float32 array of `ndim` dims, C-contiguous; NaN / Inf rejected (allow_neg_inf: -inf allowed, for lse).
F32 f32(py::handle obj, const std::string& name, int ndim, bool allow_neg_inf = false) {
  F32 a = F32::ensure(checked(obj, name, ndim, py::dtype::of<float>(), "float32"));
  const float* p = a.data();
  const py::ssize_t n = a.size();  // once: size() multiplies the shape out per call
  for (py::ssize_t i = 0; i < n; ++i) {
    const float x = p[i];
    if (!std::isfinite(x) && !(allow_neg_inf && x == -INFINITY))
      throw ValueError(name + " holds a non-finite value (" + std::to_string(x) + ") at flat index " + std::to_string(i));
  }
  return a;
}

I32 i32(py::handle obj, const std::string& name, int ndim) {
  return I32::ensure(checked(obj, name, ndim, py::dtype::of<int32_t>(), "int32"));
}

void expect_shape(const py::array& a, const std::string& name, std::vector<int64_t> shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  std::string want = "(";
  for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  want += shape.size() == 1 ? ",)" : ")";
  check_arg(ok, name + " has shape " + shape_str(a) + ", expected " + want);
}

Backend& host_backend(const std::string& name) {
  Backend& be = get_backend(name);
  check_arg(be.host_memory(), "grad_ops run on host backends only, got '" + name + "'");
  return be;
}

py::array_t<float> new_f32(std::vector<int64_t> shape) { return py::array_t<float>(shape); }

py::array rmsnorm_backward(py::handle x_o, py::handle w_o, py::handle dy_o, float eps, const std::string& backend) {
  Backend& be = host_backend(backend);
  F32 x = f32(x_o, "x", 2), w = f32(w_o, "w", 1), dy = f32(dy_o, "dy", 2);
  const int64_t M = x.shape(0), D = x.shape(1);
  expect_shape(w, "w", {D});
  expect_shape(dy, "dy", {M, D});
  check_arg(std::isfinite(eps) && eps >= 0.0f, "eps must be finite and >= 0");
  auto dx = new_f32({M, D});
  float* o = dx.mutable_data();
  py::gil_scoped_release nogil;
  be.rmsnorm_backward(M, D, x.data(), w.data(), eps, dy.data(), o);
  return dx;
}

py::array rope_backward(py::handle dy_o, py::handle pos_o, py::handle inv_o, int64_t n_heads,
                        const std::string& backend) {
  Backend& be = host_backend(backend);
  F32 dy = f32(dy_o, "dy", 2), inv = f32(inv_o, "inv_freq", 1);
  I32 pos = i32(pos_o, "pos", 1);
  const int64_t M = dy.shape(0), hd = 2 * inv.shape(0);
  check_arg(n_heads >= 1 && hd >= 2, "need n_heads >= 1 and a non-empty inv_freq");
  check_arg(dy.shape(1) == n_heads * hd, "dy has " + std::to_string(dy.shape(1)) + " columns, expected n_heads * " +
                                             "2 * len(inv_freq) = " + std::to_string(n_heads * hd));
  expect_shape(pos, "pos", {M});
  auto dx = new_f32({M, n_heads * hd});
  float* o = dx.mutable_data();
  std::memcpy(o, dy.data(), sizeof(float) * static_cast<size_t>(M * n_heads * hd));
  py::gil_scoped_release nogil;
  be.rope_backward(M, n_heads, hd, o, n_heads * hd, pos.data(), inv.data());
  return dx;
}

py::array swiglu_forward(py::handle g_o, py::handle u_o, const std::string& backend) {
  Backend& be = host_backend(backend);
  F32 g = f32(g_o, "gate", 2), u = f32(u_o, "up", 2);
  const int64_t M = g.shape(0), N = g.shape(1);
  expect_shape(u, "up", {M, N});
  auto out = new_f32({M, N});
  float* o = out.mutable_data();
  py::gil_scoped_release nogil;
  be.swiglu(M, N, g.data(), N, u.data(), N, o, N);
  return out;
}

py::tuple swiglu_backward(py::handle g_o, py::handle u_o, py::handle d_o, const std::string& backend) {
  Backend& be = host_backend(backend);
  F32 g = f32(g_o, "gate", 2), u = f32(u_o, "up", 2), d = f32(d_o, "dout", 2);
  const int64_t M = g.shape(0), N = g.shape(1);
  expect_shape(u, "up", {M, N});
  expect_shape(d, "dout", {M, N});
  auto dg = new_f32({M, N}), du = new_f32({M, N});
  float *pg = dg.mutable_data(), *pu = du.mutable_data();
  {
    py::gil_scoped_release nogil;
    be.swiglu_backward(M, N, g.data(), N, u.data(), N, d.data(), N, pg, N, pu, N);
  }
  return py::make_tuple(dg, du);
}

struct AttnDims {
  int64_t B, T, Hq, Hkv, hd;
};

AttnDims attn_dims(const F32& q, const F32& k, const F32& v, const I32& mask, int64_t Hq, int64_t Hkv, float scale) {
  check_arg(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0,
            "n_heads (" + std::to_string(Hq) + ") must be a positive multiple of n_kv_heads (" + std::to_string(Hkv) + ")");
  check_arg(std::isfinite(scale), "scale must be finite");
  const int64_t B = mask.shape(0), T = mask.shape(1);
  check_arg(q.shape(1) % Hq == 0 && q.shape(1) > 0, "q columns must be n_heads * head_dim");
  const int64_t hd = q.shape(1) / Hq;
  expect_shape(q, "q", {B * T, Hq * hd});
  expect_shape(k, "k", {B * T, Hkv * hd});
  expect_shape(v, "v", {B * T, Hkv * hd});
  return {B, T, Hq, Hkv, hd};
}

py::tuple attention_train(py::handle q_o, py::handle k_o, py::handle v_o, py::handle m_o, int64_t Hq, int64_t Hkv,
                          float scale, const std::string& backend, const std::string& compute_dtype) {
  const bool bf16 = bf16_arg(compute_dtype);
  Backend& be = host_backend(backend);
  F32 q = f32(q_o, "q", 2), k = f32(k_o, "k", 2), v = f32(v_o, "v", 2);
  I32 mask = i32(m_o, "key_mask", 2);
  const AttnDims a = attn_dims(q, k, v, mask, Hq, Hkv, scale);
  auto out = new_f32({a.B * a.T, a.Hq * a.hd}), lse = new_f32({a.B, a.Hq, a.T});
  float *po = out.mutable_data(), *pl = lse.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (bf16)
      be.attention_train_bf16(a.B, a.T, a.Hq, a.Hkv, a.hd, q.data(), a.Hq * a.hd, k.data(), a.Hkv * a.hd, v.data(),
                              a.Hkv * a.hd, mask.data(), scale, po, a.Hq * a.hd, pl);
    else
      be.attention_train(a.B, a.T, a.Hq, a.Hkv, a.hd, q.data(), a.Hq * a.hd, k.data(), a.Hkv * a.hd, v.data(),
                         a.Hkv * a.hd, mask.data(), scale, po, a.Hq * a.hd, pl);
  }
  return py::make_tuple(out, lse);
}

py::tuple attention_train_backward(py::handle q_o, py::handle k_o, py::handle v_o, py::handle m_o, py::handle out_o,
                                   py::handle lse_o, py::handle dout_o, int64_t Hq, int64_t Hkv, float scale,
                                   const std::string& backend, const std::string& compute_dtype) {
  const bool bf16 = bf16_arg(compute_dtype);
  Backend& be = host_backend(backend);
  F32 q = f32(q_o, "q", 2), k = f32(k_o, "k", 2), v = f32(v_o, "v", 2);
  I32 mask = i32(m_o, "key_mask", 2);
  const AttnDims a = attn_dims(q, k, v, mask, Hq, Hkv, scale);
  F32 out = f32(out_o, "out", 2), dout = f32(dout_o, "dout", 2), lse = f32(lse_o, "lse", 3, /*allow_neg_inf=*/true);
  expect_shape(out, "out", {a.B * a.T, a.Hq * a.hd});
  expect_shape(dout, "dout", {a.B * a.T, a.Hq * a.hd});
  expect_shape(lse, "lse", {a.B, a.Hq, a.T});
  auto dq = new_f32({a.B * a.T, a.Hq * a.hd}), dk = new_f32({a.B * a.T, a.Hkv * a.hd}),
       dv = new_f32({a.B * a.T, a.Hkv * a.hd});
  float *pq = dq.mutable_data(), *pk = dk.mutable_data(), *pv = dv.mutable_data();
  {
    py::gil_scoped_release nogil;
    const int64_t QD = a.Hq * a.hd, KD = a.Hkv * a.hd;
    if (bf16)
      be.attention_train_backward_bf16(a.B, a.T, a.Hq, a.Hkv, a.hd, q.data(), QD, k.data(), KD, v.data(), KD,
                                       mask.data(), scale, out.data(), QD, lse.data(), dout.data(), QD, pq, QD, pk, KD,
                                       pv, KD);
    else
      be.attention_train_backward(a.B, a.T, a.Hq, a.Hkv, a.hd, q.data(), QD, k.data(), KD, v.data(), KD, mask.data(),
                                  scale, out.data(), QD, lse.data(), dout.data(), QD, pq, QD, pk, KD, pv, KD);
  }
  return py::make_tuple(dq, dk, dv);
}

// The inference ops the training ops mirror, exposed so tests can check the pairing: rope()
// on a copy of x, and the KV-cache attention() over a cache holding exactly the sequence.
py::array rope_forward(py::handle x_o, py::handle pos_o, py::handle inv_o, int64_t n_heads, const std::string& backend) {
  Backend& be = host_backend(backend);
  F32 x = f32(x_o, "x", 2), inv = f32(inv_o, "inv_freq", 1);
  I32 pos = i32(pos_o, "pos", 1);
  const int64_t M = x.shape(0), hd = 2 * inv.shape(0);
  check_arg(n_heads >= 1 && hd >= 2 && x.shape(1) == n_heads * hd, "x must be [M, n_heads * 2 * len(inv_freq)]");
  expect_shape(pos, "pos", {M});
  auto y = new_f32({M, n_heads * hd});
  float* o = y.mutable_data();
  std::memcpy(o, x.data(), sizeof(float) * static_cast<size_t>(M * n_heads * hd));
  py::gil_scoped_release nogil;
  be.rope(M, n_heads, hd, o, n_heads * hd, pos.data(), inv.data());
  return y;
}

py::array attention_cached(py::handle q_o, py::handle k_o, py::handle v_o, py::handle m_o, int64_t Hq, int64_t Hkv,
                           float scale, const std::string& backend) {
  Backend& be = host_backend(backend);
  F32 q = f32(q_o, "q", 2), k = f32(k_o, "k", 2), v = f32(v_o, "v", 2);
  I32 mask = i32(m_o, "key_mask", 2);
  const AttnDims a = attn_dims(q, k, v, mask, Hq, Hkv, scale);
  auto out = new_f32({a.B * a.T, a.Hq * a.hd});
  float* po = out.mutable_data();
  std::vector<float> kc(static_cast<size_t>(a.B * a.Hkv * a.T * a.hd)), vc(kc.size());  // [B, Hkv, T, hd]
  py::gil_scoped_release nogil;
  be.kv_write(a.B, a.T, a.Hkv, a.hd, k.data(), a.Hkv * a.hd, kc.data(), a.T, 0);
  be.kv_write(a.B, a.T, a.Hkv, a.hd, v.data(), a.Hkv * a.hd, vc.data(), a.T, 0);
  be.attention(a.B, a.T, a.Hq, a.Hkv, a.hd, q.data(), a.Hq * a.hd, kc.data(), vc.data(), a.T, 0, mask.data(), scale,
               po, a.Hq * a.hd);
  return out;
}

// The inference KV-cache attention() on caller-given caches: q[B*T, Hq*hd], k/v caches
// [B, Hkv, S_cap, hd], key_mask int32 [B, S_cap]; queries sit in slots start .. start+T-1.
py::array attention_kv(py::handle q_o, py::handle k_o, py::handle v_o, py::handle m_o, int64_t start, int64_t Hq,
                       int64_t Hkv, float scale, const std::string& backend) {
  Backend& be = host_backend(backend);
  F32 q = f32(q_o, "q", 2), kc = f32(k_o, "k_cache", 4), vc = f32(v_o, "v_cache", 4);
  I32 mask = i32(m_o, "key_mask", 2);
  check_arg(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0,
            "n_heads (" + std::to_string(Hq) + ") must be a positive multiple of n_kv_heads (" + std::to_string(Hkv) + ")");
  check_arg(std::isfinite(scale), "scale must be finite");
  const int64_t B = kc.shape(0), S_cap = kc.shape(2), hd = kc.shape(3);
  check_arg(B >= 1 && S_cap >= 1 && hd >= 1, "k_cache must be non-empty, got shape " + shape_str(kc));
  expect_shape(kc, "k_cache", {B, Hkv, S_cap, hd});
  expect_shape(vc, "v_cache", {B, Hkv, S_cap, hd});
  expect_shape(mask, "key_mask", {B, S_cap});
  check_arg(q.shape(0) % B == 0 && q.shape(0) > 0, "q rows must be B * T with T >= 1, got shape " + shape_str(q));
  const int64_t T = q.shape(0) / B;
  expect_shape(q, "q", {B * T, Hq * hd});
  check_arg(start >= 0 && start + T <= S_cap, "need 0 <= start and start + T <= S_cap, got start " +
                                                  std::to_string(start) + ", T " + std::to_string(T) + ", S_cap " +
                                                  std::to_string(S_cap));
  auto out = new_f32({B * T, Hq * hd});
  float* po = out.mutable_data();
  py::gil_scoped_release nogil;
  be.attention(B, T, Hq, Hkv, hd, q.data(), Hq * hd, kc.data(), vc.data(), S_cap, start, mask.data(), scale, po,
               Hq * hd);
  return out;
}

// dh [N, D] of the lm_head losses when want_grad (else None / null), and their result dict.
std::pair<py::object, float*> optional_dh(int64_t N, int64_t D, bool want_grad) {
  if (!want_grad) return {py::none(), nullptr};
  auto dh = new_f32({N, D});
  float* p = dh.mutable_data();
  return {std::move(dh), p};
}

py::dict ce_result(const CrossEntropyResult& r, const py::object& dh) {
  py::dict d;
  d["loss_sum"] = r.loss_sum;
  d["count"] = r.count;
  d["dh"] = dh;
  d["workspace_bytes"] = r.workspace_bytes;
  return d;
}

py::dict lm_cross_entropy(py::handle h_o, py::handle e_o, py::handle lab_o, float grad_scale, int64_t chunk_rows,
                          bool want_grad, bool bf16, const std::string& backend) {
  Backend& be = host_backend(backend);
  F32 h = f32(h_o, "h", 2), E = f32(e_o, "E", 2);
  I32 labels = i32(lab_o, "labels", 1);
  const int64_t N = h.shape(0), D = h.shape(1), V = E.shape(0);
  check_arg(D > 0 && V > 0, "h and E need at least one column and E at least one row");
  expect_shape(E, "E", {V, D});
  expect_shape(labels, "labels", {N});
  check_arg(std::isfinite(grad_scale), "grad_scale must be finite");
  auto [dh_obj, pdh] = optional_dh(N, D, want_grad);
  CrossEntropyResult r;
  {
    py::gil_scoped_release nogil;
    r = lm_cross_entropy(be, N, D, V, h.data(), D, E.data(), labels.data(), grad_scale, pdh, D, chunk_rows, bf16);
  }
  return ce_result(r, dh_obj);
}

// The same through a Q8_0 lm_head: E_q8 uint8 [V, D/32*34] (GGUF Q8_0 rows).
py::dict lm_cross_entropy_q8_0(py::handle h_o, const py::array_t<uint8_t, py::array::c_style>& eq,
                               py::handle lab_o, float grad_scale, int64_t chunk_rows, bool want_grad, bool bf16,
                               const std::string& backend, bool as_f32) {
  Backend& be = host_backend(backend);
  F32 h = f32(h_o, "h", 2);
  I32 labels = i32(lab_o, "labels", 1);
  const int64_t N = h.shape(0), D = h.shape(1);
  check_arg(D > 0 && D % 32 == 0, "h: D must be a positive multiple of 32 for a Q8_0 E");
  check_arg(eq.ndim() == 2 && eq.shape(1) == D / 32 * 34 && eq.shape(0) > 0,
            "E_q8 must be uint8 [V, D/32*34] (Q8_0 rows)");
  const int64_t V = eq.shape(0);
  expect_shape(labels, "labels", {N});
  check_arg(std::isfinite(grad_scale), "grad_scale must be finite");
  auto [dh_obj, pdh] = optional_dh(N, D, want_grad);
  CrossEntropyResult r;
  {
    py::gil_scoped_release nogil;
    if (as_f32) {
      r = lm_cross_entropy_q8_0_as_f32(be, N, D, V, h.data(), D, eq.data(), labels.data(), grad_scale, pdh, D,
                                       chunk_rows, bf16);
    } else {
      r = lm_cross_entropy_q8_0(be, N, D, V, h.data(), D, eq.data(), labels.data(), grad_scale, pdh, D, chunk_rows,
                                bf16);
    }
  }
  return ce_result(r, dh_obj);
}

}  // namespace

void bind_grad_ops(py::module_& m) {
  py::module_ g = m.def_submodule("grad_ops", "training ops (backward kernels, training attention, LM loss) on numpy arrays");
  g.def("rmsnorm_backward", &rmsnorm_backward, py::arg("x"), py::arg("w"), py::arg("dy"), py::kw_only(),
        py::arg("eps"), py::arg("backend") = "cpu",
        "dx[M, D] from dy[M, D] for y = rmsnorm(x[M, D], w[D], eps) (no dw)");
  g.def("rope_backward", &rope_backward, py::arg("dy"), py::arg("pos"), py::arg("inv_freq"), py::kw_only(),
        py::arg("n_heads"), py::arg("backend") = "cpu",
        "dx[M, n_heads*hd] from dy for rotate-half RoPE at int32 positions pos[M] (hd = 2 * len(inv_freq))");
  g.def("swiglu", &swiglu_forward, py::arg("gate"), py::arg("up"), py::kw_only(), py::arg("backend") = "cpu",
        "out[M, N] = silu(gate) * up (the model's MLP activation; forward op, exposed for tests)");
  g.def("swiglu_backward", &swiglu_backward, py::arg("gate"), py::arg("up"), py::arg("dout"), py::kw_only(),
        py::arg("backend") = "cpu", "(dgate, dup) for out = silu(gate) * up");
  g.def("attention_train", &attention_train, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_mask"),
        py::kw_only(), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("scale"), py::arg("backend") = "cpu",
        py::arg("compute_dtype") = "float32",
        "(out[B*T, Hq*hd], lse[B, Hq, T]) of causal GQA self-attention; key_mask int32 [B, T]; compute_dtype "
        "'bfloat16': tile products on bf16-rounded operands, fp32 accumulation");
  g.def("attention_train_backward", &attention_train_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("key_mask"), py::arg("out"), py::arg("lse"), py::arg("dout"), py::kw_only(), py::arg("n_heads"),
        py::arg("n_kv_heads"), py::arg("scale"), py::arg("backend") = "cpu", py::arg("compute_dtype") = "float32",
        "(dq, dk, dv) of attention_train");
  g.def("rope_forward", &rope_forward, py::arg("x"), py::arg("pos"), py::arg("inv_freq"), py::kw_only(),
        py::arg("n_heads"), py::arg("backend") = "cpu", "the inference rope() on a copy of x (tests pair it with rope_backward)");
  g.def("attention_cached", &attention_cached, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_mask"),
        py::kw_only(), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("scale"), py::arg("backend") = "cpu",
        "the inference KV-cache attention() over a cache holding exactly k, v (tests pair it with attention_train)");
  g.def("attention_kv", &attention_kv, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("key_mask"),
        py::kw_only(), py::arg("start"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("scale"),
        py::arg("backend") = "cpu",
        "the inference KV-cache attention(): out[B*T, Hq*hd] for q[B*T, Hq*hd] in slots start..start+T-1 over "
        "caches [B, Hkv, S_cap, hd] with int32 key_mask [B, S_cap]");
  g.def("lm_cross_entropy", &lm_cross_entropy, py::arg("h"), py::arg("E"), py::arg("labels"), py::kw_only(),
        py::arg("grad_scale") = 1.0f, py::arg("chunk_rows") = kCrossEntropyChunkRows, py::arg("want_grad") = true,
        py::arg("bf16") = false, py::arg("backend") = "cpu",
        "chunked cross-entropy of logits = h[N, D] @ E[V, D].T against int32 labels[N] (-100 ignored): dict with "
        "loss_sum, count, dh (d(loss_sum * grad_scale)/dh, or None) and workspace_bytes (scratch allocated)");
  g.def("lm_cross_entropy_q8_0", &lm_cross_entropy_q8_0, py::arg("h"), py::arg("E_q8"), py::arg("labels"),
        py::kw_only(), py::arg("grad_scale") = 1.0f, py::arg("chunk_rows") = kCrossEntropyChunkRows,
        py::arg("want_grad") = true, py::arg("bf16") = false, py::arg("backend") = "cpu", py::arg("as_f32") = false,
        "lm_cross_entropy through a Q8_0 lm_head (head_format 'q8_0'): logits by q8_0_gemm_nt, dh by q8_0_gemm_nn; "
        "as_f32: exactly lm_cross_entropy over the rows' fp32 dequantization (bf16: panels packed from the Q8_0 "
        "rows; fp32: rows decoded into each GEMM's B panels; ValueError where that path does not apply)");
  g.attr("default_chunk_rows") = kCrossEntropyChunkRows;
  g.def(
      "cross_entropy_workspace_bytes",
      [](int64_t rows, int64_t V, int64_t D, bool device) { return cross_entropy_workspace_bytes(rows, V, D, device); },
      py::arg("rows_in_chunk"), py::arg("V"), py::arg("D"), py::arg("device") = false,
      "scratch bytes one lm_cross_entropy call allocates for min(N, chunk_rows) rows");
}

}  // namespace qlora::py_bind
