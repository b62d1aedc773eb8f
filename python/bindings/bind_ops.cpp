// qlora_native._core.ops: the GEMM kernels of any backend on numpy float32 matrices.
// Host backends read and write the caller's arrays in place (the row stride becomes the leading
// dimension, no copies); device backends go through alloc/upload/run/download.
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backend.hpp"
#include "bindings.hpp"
#include "common/error.hpp"
#include "nf4_ref_from_py.hpp"

namespace qlora::py_bind {

namespace {

// A float32 2-D array with a contiguous last dim: data, shape and leading dimension (elements).
struct Mat {
  py::array arr;
  float* data = nullptr;
  int64_t rows = 0, cols = 0, ld = 1;
  int64_t span() const { return rows == 0 || cols == 0 ? 0 : (rows - 1) * ld + cols; }  // floats touched
};

Mat as_mat(py::handle obj, const std::string& name, bool writable) {
  check_arg(py::isinstance<py::array>(obj), name + " must be a numpy.ndarray, got " + std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  Mat m;
  m.arr = py::reinterpret_borrow<py::array>(obj);
  check_arg(m.arr.dtype().is(py::dtype::of<float>()),
            name + " must have dtype float32, got " + std::string(py::str(m.arr.dtype())) + " (no implicit conversion)");
  check_arg(m.arr.ndim() == 2, name + " must be 2-D, got " + std::to_string(m.arr.ndim()) + "-D");
  m.rows = m.arr.shape(0);
  m.cols = m.arr.shape(1);
  const int64_t s0 = m.arr.strides(0), s1 = m.arr.strides(1);
  check_arg(m.cols <= 1 || m.rows == 0 || s1 == static_cast<int64_t>(sizeof(float)),
            name + " must have a contiguous last dimension (stride " + std::to_string(s1) + " bytes)");
  if (m.rows <= 1 || m.cols == 0) {  // a single row or no data: the stride is meaningless
    m.ld = std::max<int64_t>(1, m.cols);
  } else {
    check_arg(s0 > 0 && s0 % static_cast<int64_t>(sizeof(float)) == 0 && s0 / 4 >= m.cols,
              name + " has an unsupported row stride (" + std::to_string(s0) + " bytes): rows must not overlap");
    m.ld = s0 / 4;
  }
  check_arg(reinterpret_cast<uintptr_t>(m.arr.data()) % alignof(float) == 0, name + " data is not 4-byte aligned");
  if (writable) {
    check_arg(m.arr.writeable(), name + " is read-only");
    m.data = static_cast<float*>(m.arr.mutable_data());
  } else {
    m.data = const_cast<float*>(static_cast<const float*>(m.arr.data()));
  }
  return m;
}

bool overlaps(const Mat& a, const Mat& b) {
  if (a.span() == 0 || b.span() == 0) return false;
  return a.data < b.data + b.span() && b.data < a.data + a.span();
}

// One problem of ops.lora_segments(_many): x [M, in], y [M, out] (written in place) and segments
// (row0, rows, A [r, in], B [out, r], alpha), checked; the arrays stay alive in `keep`.
struct LoraArgs {
  Mat x, y;
  Backend::LoraProblem p{};
  std::vector<Backend::LoraSegment> segs;
  int64_t scratch = 1;  // floats of t the reference needs
};
void parse_lora_problem(py::handle x_obj, py::handle y_obj, py::handle segments, LoraArgs& out, std::vector<Mat>& keep) {
  Mat x = as_mat(x_obj, "x", false);
  Mat y = as_mat(y_obj, "y", true);
  check_arg(x.rows == y.rows, "lora_segments: x and y must have the same number of rows");
  check_arg(!overlaps(x, y), "lora_segments: y must not overlap x");
  check_arg(py::isinstance<py::list>(segments), "lora_segments: segments must be a list");
  for (py::handle h : py::reinterpret_borrow<py::list>(segments)) {
    check_arg(py::isinstance<py::tuple>(h) && py::len(h) == 5, "lora_segments: each segment is (row0, rows, A, B, alpha)");
    const py::tuple t = py::reinterpret_borrow<py::tuple>(h);
    const int64_t row0 = t[0].cast<int64_t>(), rows = t[1].cast<int64_t>();
    Mat A = as_mat(t[2], "A", false), B = as_mat(t[3], "B", false);
    check_arg(row0 >= 0 && rows >= 0 && row0 + rows <= x.rows, "lora_segments: segment rows out of range");
    check_arg(A.rows >= 1 && A.cols == x.cols && A.ld == A.cols, "lora_segments: A must be a contiguous [r, in]");
    check_arg(B.rows == y.cols && B.cols == A.rows && B.ld == B.cols, "lora_segments: B must be a contiguous [out, r]");
    out.segs.push_back({row0, rows, A.rows, A.data, B.data, t[4].cast<float>()});
    out.scratch = std::max(out.scratch, rows * A.rows);
    keep.push_back(A), keep.push_back(B);
  }
  out.p = {x.cols, y.cols, x.data, x.ld, static_cast<int64_t>(out.segs.size()), out.segs.data(), y.data, y.ld};
  out.x = x, out.y = y;
}

// The output: `out` checked for shape [M, N] (and not aliasing any input), or a new array.
Mat out_mat(py::object out, int64_t M, int64_t N, float beta, std::initializer_list<const Mat*> inputs) {
  if (out.is_none()) {
    check_arg(beta == 0.0f, "beta != 0 needs an `out` array to accumulate into");
    return as_mat(py::array_t<float>({M, N}), "out", true);
  }
  Mat o = as_mat(out, "out", true);
  check_arg(o.rows == M && o.cols == N, "out has shape (" + std::to_string(o.rows) + ", " + std::to_string(o.cols) +
                                            "), expected (" + std::to_string(M) + ", " + std::to_string(N) + ")");
  for (const Mat* in : inputs) check_arg(!overlaps(o, *in), "out must not share memory with an input");
  return o;
}

// Device buffer freed on scope exit.
struct DevBuf {
  Backend& be;
  void* p = nullptr;
  DevBuf(Backend& b, size_t bytes) : be(b), p(b.alloc(bytes ? bytes : 4)) {}
  ~DevBuf() { be.free(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  float* f() const { return static_cast<float*>(p); }
};

// Runs fn(a_ptr, b_ptr, c_ptr) with pointers in the backend's memory (same leading dimensions),
// without the GIL.
template <class Fn>
void run2(Backend& be, const Mat& a, const Mat& b, Mat& c, float beta, Fn fn) {
  if (be.host_memory()) {
    py::gil_scoped_release nogil;
    fn(a.data, b.data, c.data);
    return;
  }
  py::gil_scoped_release nogil;
  DevBuf da(be, a.span() * 4), db(be, b.span() * 4), dc(be, c.span() * 4);
  be.upload(da.p, a.data, a.span() * 4);
  be.upload(db.p, b.data, b.span() * 4);
  if (beta != 0.0f) be.upload(dc.p, c.data, c.span() * 4);
  fn(da.f(), db.f(), dc.f());
  std::vector<float> host(static_cast<size_t>(c.span()));
  be.download(host.data(), dc.p, c.span() * 4);
  be.synchronize();
  for (int64_t i = 0; i < c.rows; ++i) std::memcpy(c.data + i * c.ld, host.data() + i * c.ld, c.cols * 4);
}

enum class Layout { NT, NN, TN };


py::array gemm(Layout lay, py::object a_obj, py::object b_obj, py::object out, float alpha, float beta,
               const std::string& backend, const std::string& compute_dtype = "float32") {
  const bool bf16 = bf16_arg(compute_dtype);
  Backend& be = get_backend(backend);
  Mat a = as_mat(a_obj, "a", false), b = as_mat(b_obj, "b", false);
  int64_t M, N, K;
  const char* what;
  switch (lay) {
    case Layout::NT: M = a.rows, K = a.cols, N = b.rows, what = "gemm_nt: a [M, K], b [N, K]"; break;
    case Layout::NN: M = a.rows, K = a.cols, N = b.cols, what = "gemm_nn: a [M, K], b [K, N]"; break;
    default: M = a.cols, K = a.rows, N = b.cols, what = "gemm_tn: a [K, M], b [K, N]"; break;
  }
  const int64_t bk = lay == Layout::NT ? b.cols : b.rows;
  check_arg(bk == K, std::string(what) + ": inner dimensions differ (a gives K = " + std::to_string(K) + ", b gives " +
                         std::to_string(bk) + ")");
  Mat c = out_mat(out, M, N, beta, {&a, &b});
  run2(be, a, b, c, beta, [&](const float* A, const float* B, float* C) {
    if (bf16 && lay == Layout::NT) be.gemm_nt_bf16(M, N, K, alpha, A, a.ld, B, b.ld, beta, C, c.ld);
    else if (bf16 && lay == Layout::NN) be.gemm_nn_bf16(M, N, K, alpha, A, a.ld, B, b.ld, beta, C, c.ld);
    else if (bf16) be.gemm_tn_bf16(M, N, K, alpha, A, a.ld, B, b.ld, beta, C, c.ld);
    else if (lay == Layout::NT) be.gemm_nt(M, N, K, alpha, A, a.ld, B, b.ld, beta, C, c.ld);
    else if (lay == Layout::NN) be.gemm_nn(M, N, K, alpha, A, a.ld, B, b.ld, beta, C, c.ld);
    else be.gemm_tn(M, N, K, alpha, A, a.ld, B, b.ld, beta, C, c.ld);
  });
  return c.arr;
}

// The NF4 weight in the backend's memory (uploaded for device backends).
struct DevNf4 {
  Nf4Ref ref;
  std::vector<std::unique_ptr<DevBuf>> bufs;
  DevNf4(Backend& be, const Nf4Ref& h) : ref(h) {
    if (be.host_memory()) return;
    const int64_t n = h.numel(), nb = h.n_blocks();
    auto up = [&](const void* src, size_t bytes) {
      bufs.push_back(std::make_unique<DevBuf>(be, bytes));
      be.upload(bufs.back()->p, src, bytes);
      return bufs.back()->p;
    };
    ref.packed = static_cast<const uint8_t*>(up(h.packed, (n + 1) / 2));
    ref.absmax = up(h.absmax, nb * (h.double_quant ? 1 : 4));
    if (h.double_quant) {
      ref.nested_absmax = static_cast<const float*>(up(h.nested_absmax, ((nb + 255) / 256) * 4));
      ref.nested_map = static_cast<const float*>(up(h.nested_map, 256 * 4));
    }
  }
};

py::array nf4_gemm(bool nt, py::object x_obj, py::handle w_obj, py::object out, float alpha, float beta,
                   const std::string& backend, const std::string& compute_dtype = "float32") {
  const bool bf16 = bf16_arg(compute_dtype);
  Backend& be = get_backend(backend);
  PyNf4 w = nf4_from_py(w_obj);
  const char* xname = nt ? "x" : "dy";
  Mat x = as_mat(x_obj, xname, false);
  const int64_t M = x.rows, K = nt ? w.ref.cols : w.ref.rows, N = nt ? w.ref.rows : w.ref.cols;
  check_arg(x.cols == K, std::string(nt ? "nf4_gemm_nt: x [M, in] with W [out, in]" : "nf4_gemm_nn: dy [M, out] with W [out, in]") +
                             ": x has " + std::to_string(x.cols) + " columns, expected " + std::to_string(K));
  Mat c = out_mat(out, M, N, beta, {&x});
  auto call = [&](const Nf4Ref& W, const float* X, float* C) {
    if (bf16 && nt) be.nf4_gemm_nt_bf16(M, alpha, X, x.ld, W, beta, C, c.ld);
    else if (bf16) be.nf4_gemm_nn_bf16(M, alpha, X, x.ld, W, beta, C, c.ld);
    else if (nt) be.nf4_gemm_nt(M, alpha, X, x.ld, W, beta, C, c.ld);
    else be.nf4_gemm_nn(M, alpha, X, x.ld, W, beta, C, c.ld);
  };
  {
    py::gil_scoped_release nogil;  // (no Python objects are touched in this scope)
    if (be.host_memory()) {
      call(w.ref, x.data, c.data);
    } else {
      DevNf4 dw(be, w.ref);
      DevBuf dx(be, x.span() * 4), dc(be, c.span() * 4);
      be.upload(dx.p, x.data, x.span() * 4);
      if (beta != 0.0f) be.upload(dc.p, c.data, c.span() * 4);
      call(dw.ref, dx.f(), dc.f());
      std::vector<float> host(static_cast<size_t>(c.span()));
      be.download(host.data(), dc.p, c.span() * 4);
      be.synchronize();
      for (int64_t i = 0; i < c.rows; ++i) std::memcpy(c.data + i * c.ld, host.data() + i * c.ld, c.cols * 4);
    }
  }
  return c.arr;  // with the GIL held again (copying a py::array changes its refcount)
}

py::array nf4_dequantize(py::handle w_obj, const std::string& backend) {
  Backend& be = get_backend(backend);
  PyNf4 w = nf4_from_py(w_obj);
  py::array_t<float> out({w.ref.rows, w.ref.cols});
  float* o = out.mutable_data();
  const size_t bytes = static_cast<size_t>(w.ref.numel()) * 4;
  {
    py::gil_scoped_release nogil;
    if (be.host_memory()) {
      be.nf4_dequantize(w.ref, o);
    } else {
      DevNf4 dw(be, w.ref);
      DevBuf d(be, bytes);
      be.nf4_dequantize(dw.ref, d.f());
      be.download(o, d.p, bytes);
      be.synchronize();
    }
  }
  return out;
}

// A GGUF Q8_0 weight given as raw bytes (uint8, C-contiguous, N * K/32 * 34 bytes): host backends.
const void* q8_0_bytes(py::handle w_obj, int64_t n, int64_t k, const char* what) {
  const std::string f = what;
  check_arg(k >= 32 && k % 32 == 0, f + ": k must be a positive multiple of 32, got " + std::to_string(k));
  check_arg(n >= 1, f + ": n must be >= 1, got " + std::to_string(n));
  check_arg(py::isinstance<py::array>(w_obj), f + ": w_blocks must be a numpy.ndarray");
  auto w = py::reinterpret_borrow<py::array>(w_obj);
  check_arg(w.dtype().is(py::dtype::of<uint8_t>()), f + ": w_blocks must have dtype uint8, got " + std::string(py::str(w.dtype())));
  check_arg(w.flags() & py::array::c_style, f + ": w_blocks must be C-contiguous");
  const int64_t want = n * (k / 32) * 34;
  check_arg(static_cast<int64_t>(w.nbytes()) == want, f + ": w_blocks has " + std::to_string(w.nbytes()) +
                                                          " bytes, expected n * k/32 * 34 = " + std::to_string(want));
  return w.data();
}

}  // namespace

void bind_ops(py::module_& m) {
  py::module_ ops = m.def_submodule("ops", "GEMM kernels (fp32 and fused NF4) of any backend on numpy arrays");
  const char* layout_doc[] = {
      "out[M, N] = alpha * a[M, K] @ b[N, K].T + beta * out",
      "out[M, N] = alpha * a[M, K] @ b[K, N] + beta * out",
      "out[M, N] = alpha * a[K, M].T @ b[K, N] + beta * out",
  };
  const char* names[] = {"gemm_nt", "gemm_nn", "gemm_tn"};
  const Layout lays[] = {Layout::NT, Layout::NN, Layout::TN};
  for (int i = 0; i < 3; ++i) {
    const Layout lay = lays[i];
    ops.def(
        names[i],
        [lay](py::object a, py::object b, py::object out, float alpha, float beta, const std::string& backend,
              const std::string& compute_dtype) { return gemm(lay, a, b, out, alpha, beta, backend, compute_dtype); },
        py::arg("a"), py::arg("b"), py::arg("out") = py::none(), py::kw_only(), py::arg("alpha") = 1.0f,
        py::arg("beta") = 0.0f, py::arg("backend") = "cpu", py::arg("compute_dtype") = "float32", layout_doc[i]);
  }
  ops.def(
      "nf4_gemm_nt",
      [](py::object x, py::object w, py::object out, float alpha, float beta, const std::string& backend,
         const std::string& compute_dtype) { return nf4_gemm(true, x, w, out, alpha, beta, backend, compute_dtype); },
      py::arg("x"), py::arg("w"), py::arg("out") = py::none(), py::kw_only(), py::arg("alpha") = 1.0f,
      py::arg("beta") = 0.0f, py::arg("backend") = "cpu", py::arg("compute_dtype") = "float32",
      "out[M, out_f] = alpha * x[M, in_f] @ dequant(w).T + beta * out (w: NF4 weight [out_f, in_f])");
  ops.def(
      "nf4_gemm_nt_many",
      [](py::object x_obj, const py::list& ws, const std::string& backend, const std::string& compute_dtype) {
        // Host backends only: exposes Backend::nf4_gemm_nt_many (shared-input projections) for tests.
        const bool bf16 = bf16_arg(compute_dtype);
        Backend& be = get_backend(backend);
        check_arg(be.host_memory(), "nf4_gemm_nt_many: host backends only");
        Mat x = as_mat(x_obj, "x", false);
        std::vector<PyNf4> w;
        for (py::handle h : ws) w.push_back(nf4_from_py(h));
        check_arg(!w.empty(), "nf4_gemm_nt_many: no weights");
        std::vector<const Nf4Ref*> refs;
        std::vector<float*> ys;
        std::vector<int64_t> lds;
        py::list outs;
        for (const PyNf4& p : w) {
          check_arg(p.ref.cols == x.cols, "nf4_gemm_nt_many: every weight must have x's column count");
          py::array_t<float> y({x.rows, p.ref.rows});
          refs.push_back(&p.ref);
          ys.push_back(y.mutable_data());
          lds.push_back(p.ref.rows);
          outs.append(y);
        }
        {
          py::gil_scoped_release nogil;
          if (bf16)
            be.nf4_gemm_nt_many_bf16(x.rows, x.data, x.ld, static_cast<int64_t>(refs.size()), refs.data(), ys.data(),
                                     lds.data());
          else
            be.nf4_gemm_nt_many(x.rows, x.data, x.ld, static_cast<int64_t>(refs.size()), refs.data(), ys.data(),
                                lds.data());
        }
        return outs;
      },
      py::arg("x"), py::arg("ws"), py::kw_only(), py::arg("backend") = "cpu", py::arg("compute_dtype") = "float32",
      "[x @ dequant(w).T for w in ws] as one call (weights sharing the input, e.g. q/k/v)");
  ops.def(
      "lora_segments",
      [](py::object x_obj, py::object y_obj, const py::list& segments, const std::string& backend) {
        // Host backends only: exposes Backend::lora_segments (mixed-adapter LoRA terms) for tests.
        Backend& be = get_backend(backend);
        check_arg(be.host_memory(), "lora_segments: host backends only");
        Mat x = as_mat(x_obj, "x", false);
        Mat y = as_mat(y_obj, "y", true);
        check_arg(x.rows == y.rows, "lora_segments: x and y must have the same number of rows");
        check_arg(!overlaps(x, y), "lora_segments: y must not overlap x");
        std::vector<Backend::LoraSegment> segs;
        std::vector<Mat> keep;  // the factor arrays, alive through the call
        int64_t scratch = 1;
        for (py::handle h : segments) {
          const py::tuple t = py::reinterpret_borrow<py::tuple>(h);
          check_arg(py::isinstance<py::tuple>(h) && t.size() == 5, "lora_segments: each segment is (row0, rows, A, B, alpha)");
          const int64_t row0 = t[0].cast<int64_t>(), rows = t[1].cast<int64_t>();
          Mat A = as_mat(t[2], "A", false), B = as_mat(t[3], "B", false);
          check_arg(row0 >= 0 && rows >= 0 && row0 + rows <= x.rows, "lora_segments: segment rows out of range");
          check_arg(A.rows >= 1 && A.cols == x.cols && A.ld == A.cols, "lora_segments: A must be a contiguous [r, in]");
          check_arg(B.rows == y.cols && B.cols == A.rows && B.ld == B.cols, "lora_segments: B must be a contiguous [out, r]");
          segs.push_back({row0, rows, A.rows, A.data, B.data, t[4].cast<float>()});
          scratch = std::max(scratch, rows * A.rows);
          keep.push_back(A), keep.push_back(B);
        }
        std::vector<float> tmp(static_cast<size_t>(scratch));
        {
          py::gil_scoped_release nogil;
          be.lora_segments(x.cols, y.cols, x.data, x.ld, static_cast<int64_t>(segs.size()), segs.data(), y.data, y.ld,
                           tmp.data());
        }
        return y_obj;
      },
      py::arg("x"), py::arg("y"), py::arg("segments"), py::kw_only(), py::arg("backend") = "cpu",
      "y[row0:row0+rows] += alpha * x[row0:row0+rows] @ A.T @ B.T for each (row0, rows, A, B, alpha), in place");
  ops.def(
      "lora_segments_many",
      [](const py::list& problems, const std::string& backend, const std::string& adapter_dtype) {
        // Backend::lora_segments_many (the LoRA terms of projections sharing a job) for tests.
        check_arg(adapter_dtype == "float32" || adapter_dtype == "bfloat16",
                  "lora_segments_many: adapter_dtype must be 'float32' or 'bfloat16', got '" + adapter_dtype + "'");
        Backend& be = get_backend(backend);
        check_arg(be.host_memory(), "lora_segments_many: host backends only");
        std::vector<LoraArgs> args(problems.size());  // sized first: problems point into it
        std::vector<Mat> keep;
        int64_t scratch = 1;
        for (size_t i = 0; i < problems.size(); ++i) {
          py::handle h = problems[i];
          check_arg(py::isinstance<py::tuple>(h) && py::len(h) == 3, "lora_segments_many: each problem is (x, y, segments)");
          const py::tuple t = py::reinterpret_borrow<py::tuple>(h);
          parse_lora_problem(t[0], t[1], t[2], args[i], keep);
          scratch = std::max(scratch, args[i].scratch);
        }
        for (size_t i = 0; i < args.size(); ++i)
          for (size_t j = 0; j < args.size(); ++j)
            check_arg(i == j || (!overlaps(args[i].y, args[j].y) && !overlaps(args[i].y, args[j].x)),
                      "lora_segments_many: a problem's y must not overlap another problem's x or y");
        // adapter_dtype "bfloat16": each segment gets the backend's bf16 copy of its A/B (none where
        // lora_bf16_bytes is 0: that backend then computes in fp32, as the model does).
        std::vector<std::vector<uint32_t>> copies;
        if (adapter_dtype == "bfloat16")
          for (LoraArgs& a : args)
            for (Backend::LoraSegment& g : a.segs) {
              const size_t bytes = be.lora_bf16_bytes(g.r, a.p.in, a.p.out);
              if (!bytes) continue;
              copies.emplace_back((bytes + 3) / 4);
              be.lora_pack_bf16(g.r, a.p.in, a.p.out, g.A, g.B, copies.back().data());
              g.AB16 = copies.back().data();
            }
        std::vector<Backend::LoraProblem> ps;
        for (const LoraArgs& a : args) ps.push_back(a.p);
        std::vector<float> tmp(static_cast<size_t>(scratch));
        {
          py::gil_scoped_release nogil;
          be.lora_segments_many(static_cast<int64_t>(ps.size()), ps.data(), tmp.data());
        }
      },
      py::arg("problems"), py::kw_only(), py::arg("backend") = "cpu", py::arg("adapter_dtype") = "float32",
      "lora_segments for each (x, y, segments) of problems as one call (projections sharing a job), in place; "
      "adapter_dtype='bfloat16': from bf16 copies of A/B where the backend has them (lora_bf16_bytes)");
  ops.def(
      "lora_bf16_bytes",
      [](int64_t r, int64_t in, int64_t out, const std::string& backend) {
        check_arg(r >= 1 && in >= 1 && out >= 1, "lora_bf16_bytes: r, in and out must be >= 1");
        return get_backend(backend).lora_bf16_bytes(r, in, out);
      },
      py::arg("r"), py::arg("in_features"), py::arg("out_features"), py::kw_only(), py::arg("backend") = "cpu",
      "bytes of one module's bf16 inference copy on `backend` (0: it has no bf16 LoRA kernels at its level)");
  ops.def(
      "lora_pack_bf16",
      [](py::object A_obj, py::object B_obj, const std::string& backend) -> py::object {
        // Host backends only: the packed bf16 copy of (A [r, in], B [out, r]) as uint32 words (tests).
        Backend& be = get_backend(backend);
        check_arg(be.host_memory(), "lora_pack_bf16: host backends only");
        Mat A = as_mat(A_obj, "A", false), B = as_mat(B_obj, "B", false);
        check_arg(A.rows >= 1 && A.cols >= 1 && A.ld == A.cols, "lora_pack_bf16: A must be a contiguous [r, in]");
        check_arg(B.rows >= 1 && B.cols == A.rows && B.ld == B.cols, "lora_pack_bf16: B must be a contiguous [out, r]");
        const size_t bytes = be.lora_bf16_bytes(A.rows, A.cols, B.rows);
        if (!bytes) return py::none();
        py::array_t<uint32_t> out(static_cast<py::ssize_t>(bytes / 4));
        be.lora_pack_bf16(A.rows, A.cols, B.rows, A.data, B.data, out.mutable_data());
        return std::move(out);
      },
      py::arg("A"), py::arg("B"), py::kw_only(), py::arg("backend") = "cpu",
      "the backend's packed bf16 copy of A [r, in], B [out, r] as uint32 words (None: no bf16 LoRA kernels)");
  ops.def(
      "nf4_gemm_nn",
      [](py::object dy, py::object w, py::object out, float alpha, float beta, const std::string& backend,
         const std::string& compute_dtype) { return nf4_gemm(false, dy, w, out, alpha, beta, backend, compute_dtype); },
      py::arg("dy"), py::arg("w"), py::arg("out") = py::none(), py::kw_only(), py::arg("alpha") = 1.0f,
      py::arg("beta") = 0.0f, py::arg("backend") = "cpu", py::arg("compute_dtype") = "float32",
      "out[M, in_f] = alpha * dy[M, out_f] @ dequant(w) + beta * out (w: NF4 weight [out_f, in_f])");
  ops.def(
      "bf16_compute_available",
      [](const std::string& backend) { return get_backend(backend).has_bf16_compute(); }, py::arg("backend") = "cpu",
      "True when compute_dtype='bfloat16' runs on bf16 units on this backend (else the fp32 ops run)");
  ops.def("nf4_dequantize", &nf4_dequantize, py::arg("w"), py::arg("backend") = "cpu",
          "float32 [out_f, in_f] copy of an NF4 weight (tests, merging, export)");
  ops.def(
      "q8_0_gemm_nt",
      [](py::object x_obj, py::handle w_obj, int64_t n, int64_t k, const std::string& backend) {
        // Host backends only: exposes Backend::q8_0_gemm_nt (GGUF Q8_0 lm_head) for tests.
        Backend& be = get_backend(backend);
        check_arg(be.host_memory(), "q8_0_gemm_nt: host backends only");
        const void* w = q8_0_bytes(w_obj, n, k, "q8_0_gemm_nt");
        Mat x = as_mat(x_obj, "x", false);
        check_arg(x.cols == k, "q8_0_gemm_nt: x has " + std::to_string(x.cols) + " columns, expected k = " +
                                   std::to_string(k));
        py::array_t<float> y({x.rows, n});  // [M, n]
        float* yp = y.mutable_data();
        {
          py::gil_scoped_release nogil;
          be.q8_0_gemm_nt(x.rows, n, k, x.data, x.ld, w, yp, n);
        }
        return y;
      },
      py::arg("x"), py::arg("w_blocks"), py::arg("n"), py::arg("k"), py::kw_only(), py::arg("backend") = "cpu",
      "out[M, n] = x[M, k] @ dequant(w).T for a GGUF Q8_0 weight [n, k] given as raw blocks (uint8)");
  ops.def(
      "q8_0_rows",
      [](py::handle w_obj, py::handle ids_obj, int64_t n, int64_t k, const std::string& backend) {
        Backend& be = get_backend(backend);
        check_arg(be.host_memory(), "q8_0_rows: host backends only");
        const void* w = q8_0_bytes(w_obj, n, k, "q8_0_rows");
        check_arg(py::isinstance<py::array>(ids_obj), "q8_0_rows: ids must be a numpy.ndarray");
        auto ids_arr = py::reinterpret_borrow<py::array>(ids_obj);
        const char kind = ids_arr.dtype().kind();
        check_arg(kind == 'i' || kind == 'u', "q8_0_rows: ids must have an integer dtype, got " +
                                                  std::string(py::str(ids_arr.dtype())));
        check_arg(ids_arr.ndim() == 1, "q8_0_rows: ids must be 1-D");
        auto ids64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(ids_arr);
        const int64_t M = ids64.shape(0);
        std::vector<int32_t> ids(static_cast<size_t>(M));
        for (int64_t i = 0; i < M; ++i) {
          const int64_t v = ids64.data()[i];
          check_arg(v >= 0 && v < n, "q8_0_rows: id " + std::to_string(v) + " out of range [0, " + std::to_string(n) + ")");
          ids[static_cast<size_t>(i)] = static_cast<int32_t>(v);
        }
        py::array_t<float> out({M, k});  // [M, k]
        float* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          be.q8_0_rows(M, k, w, ids.data(), o);
        }
        return out;
      },
      py::arg("w_blocks"), py::arg("ids"), py::arg("n"), py::arg("k"), py::kw_only(), py::arg("backend") = "cpu",
      "out[len(ids), k] = dequant(w)[ids] for a GGUF Q8_0 weight [n, k] given as raw blocks (uint8)");
}

// compute_dtype "float32" or "bfloat16" (Backend::*_bf16: operands rounded to bf16, fp32 accumulation).
bool bf16_arg(const std::string& compute_dtype) {
  check_arg(compute_dtype == "float32" || compute_dtype == "bfloat16",
            "compute_dtype must be 'float32' or 'bfloat16', got '" + compute_dtype + "'");
  return compute_dtype == "bfloat16";
}

}  // namespace qlora::py_bind
