// LoRA adapters on _core.model.LlamaModel: adapter tables (numpy <-> backend buffers), the
// training passes (forward_backward / eval_loss) and the AdamW step over the active adapter.
// python/qlora_native/lora_model.py maps these to PEFT tensor names.
#include "bind_lora.hpp"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <climits>
#include <functional>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/error.hpp"
#include "parallel/nccl.hpp"
#include "model/lora_infer.hpp"
#include "model/lora_setup.hpp"
#include "train/grad_utils.hpp"

namespace qlora::py_bind {

namespace py = pybind11;
using model::LlamaModel;
using model::LoraAdapter;
using model::LoraModule;
using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

namespace {

int proj_of(const std::string& name) {
  const int p = model::proj_index(name);
  check_arg(p >= 0, "unknown projection '" + name + "' (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
  return p;
}

void check_2d(const F32Array& a, int64_t rows, int64_t cols, const std::string& what) {
  check_arg(a.ndim() == 2 && a.shape(0) == rows && a.shape(1) == cols,
            what + " must have shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

py::array_t<float> download(Backend& be, const void* p, int64_t rows, int64_t cols) {
  py::array_t<float> out({rows, cols});
  be.download(out.mutable_data(), p, sizeof(float) * rows * cols);
  return out;
}

// A module of adapter `name` and the reference that keeps it alive (the adapter may be deleted
// meanwhile by another thread; its memory stays until the last reference goes).
std::pair<LlamaModel::AdapterRef, LoraModule*> module_at(LlamaModel& self, const std::string& name, int64_t layer,
                                                          const std::string& proj) {
  LlamaModel::AdapterRef a = self.adapter(name);
  check_arg(layer >= 0 && layer < self.config().num_layers, "layer " + std::to_string(layer) + " out of range");
  LoraModule* m = a->at(layer, proj_of(proj));
  check_arg(m != nullptr, "adapter '" + name + "' has no module at layer " + std::to_string(layer) + " " + proj);
  return {std::move(a), m};
}

// Per-module (layer, proj, A-like, B-like) tuples of the active adapter from `which` buffers.
template <class Get>
py::list module_list(LlamaModel& self, const std::string& name, Get get) {
  const LlamaModel::AdapterRef ap = self.adapter(name);
  LoraAdapter& a = *ap;
  py::list out;
  for (int64_t l = 0; l < self.config().num_layers; ++l)
    for (int p = 0; p < model::kNumProj; ++p)
      if (LoraModule* m = a.at(l, p)) {
        auto [A, B] = get(*m);
        out.append(py::make_tuple(l, model::proj_name(p), download(self.backend(), A, m->r, m->in),
                                  download(self.backend(), B, m->out, m->r)));
      }
  return out;
}

void need_host(LlamaModel& self, const char* what) {
  check_arg(self.backend().host_memory(), std::string(what) + " is implemented for host-memory (CPU) backends only");
}

// The adapter (kept alive by the returned reference) after checking its optimizer is configured.
LlamaModel::AdapterRef with_optimizer(LlamaModel& self, const std::string& name) {
  LlamaModel::AdapterRef a = self.adapter(name);
  check_arg(a->opt != nullptr, "adapter '" + name + "': call configure_optimizer first");
  return a;
}

// fn(checks, gradient buffer) on adapter `name`'s contiguous gradients through the backend's ops
// (the optimizer's checks when it is configured, else a temporary set).
template <class Fn>
double grad_checks(LlamaModel& self, const std::string& name, Fn fn) {
  const LlamaModel::AdapterRef a = self.adapter(name);  // alive through the call
  model::ensure_lora_grads(self.backend(), *a);
  std::unique_ptr<train::FlatGradOps> own;
  if (!a->opt) {
    std::vector<int64_t> numels;
    for (const train::ParamRef& p : a->params()) numels.push_back(p.numel);
    own = std::make_unique<train::FlatGradOps>(self.backend(), std::move(numels));
  }
  py::gil_scoped_release nogil;
  return a->opt ? fn(a->opt->checks(), a->grad_arena.f32()) : fn(*own, a->grad_arena.f32());
}

std::tuple<int64_t, int64_t> shape2(const I32Array& a, const char* what) {
  check_arg(a.ndim() == 2 && a.shape(0) >= 1 && a.shape(1) >= 1, std::string(what) + " must be a non-empty [batch, seq] array");
  return {a.shape(0), a.shape(1)};
}

}  // namespace

void bind_lora_methods(py::class_<LlamaModel>& cls) {
  cls.def(
         "lora_add",
         [](LlamaModel& self, const std::string& name, const py::list& modules, float dropout, uint64_t seed) {
           auto a = std::make_unique<LoraAdapter>();
           const int64_t L = self.config().num_layers;
           a->modules.resize(L * model::kNumProj);
           a->dropout = dropout, a->seed = seed;
           for (py::handle h : modules) {
             auto [layer, proj, scaling, A, B] = h.cast<std::tuple<int64_t, std::string, float, F32Array, F32Array>>();
             check_arg(layer >= 0 && layer < L, "layer " + std::to_string(layer) + " out of range");
             const int p = proj_of(proj);
             const model::Linear& lin = model::proj(self.weights().layers[layer], p);
             check_arg(A.ndim() == 2 && A.shape(0) >= 1, "A must be 2-D [r, in]");
             const int64_t r = A.shape(0);
             check_2d(A, r, lin.in, "layer " + std::to_string(layer) + " " + proj + " A");
             check_2d(B, lin.out, r, "layer " + std::to_string(layer) + " " + proj + " B");
             check_arg(std::isfinite(scaling), "scaling must be finite");
             auto& slot = a->modules[layer * model::kNumProj + p];
             check_arg(!slot, "duplicate module layer " + std::to_string(layer) + " " + proj);
             try {
               slot = model::make_lora_module(self.backend(), r, lin.in, lin.out, scaling, A.data(), B.data());
             } catch (const ValueError& e) {  // name the module (lora_check.hpp's refusals)
               throw ValueError("layer " + std::to_string(layer) + " " + proj + ": " + e.what());
             }
           }
           self.add_adapter(name, std::move(a));
         },
         py::arg("name"), py::arg("modules"), py::arg("dropout") = 0.0f, py::arg("seed") = 0)
      .def(
          "lora_merge",
          [](LlamaModel& self, const std::string& name, bool subtract, bool requantize, const std::string& round,
             const py::object& progress) {
            model::MergeOptions opt;
            opt.subtract = subtract, opt.requantize = requantize;
            if (round == "float32") opt.round = model::MergeRound::F32;
            else if (round == "bfloat16") opt.round = model::MergeRound::BF16;
            else if (round == "float16") opt.round = model::MergeRound::F16;
            else throw ValueError("merge dtype must be float32, bfloat16 or float16, got '" + round + "'");
            std::function<void(int64_t)> cb;
            if (!progress.is_none()) cb = [&progress](int64_t layer) { progress(layer); };
            self.merge_adapter(name, opt, cb);  // GIL held: the progress callback is Python
          },
          py::arg("name"), py::arg("subtract") = false, py::arg("requantize") = false,
          py::arg("round") = "float32", py::arg("progress") = py::none(),
          "Merge adapter `name` into the projections (subtract: unmerge); all or nothing.")
      .def("lora_set_active", &LlamaModel::set_active_adapter, py::arg("name"))
      .def_property("offload_checkpoints", &LlamaModel::offload_checkpoints, &LlamaModel::set_offload_checkpoints,
                    "checkpointed layer inputs in host memory (pinned on CUDA) during training passes")
      .def("lora_set_scale", &LlamaModel::set_adapter_scale, py::arg("name"), py::arg("scale"))
      .def("lora_get_scale", &LlamaModel::adapter_scale, py::arg("name"))
      .def_property_readonly("lora_active", &LlamaModel::active_adapter_name)
      .def("lora_names", &LlamaModel::adapter_names)
      .def("lora_delete", &LlamaModel::delete_adapter, py::arg("name"))
      .def("lora_get",
           [](LlamaModel& self, const std::string& name) {
             return module_list(self, name, [](LoraModule& m) { return std::make_pair(static_cast<const void*>(m.A.data()), static_cast<const void*>(m.B.data())); });
           })
      .def("lora_grads",
           [](LlamaModel& self, const std::string& name) {
             model::ensure_lora_grads(self.backend(), *self.adapter(name));  // before any training: zeros
             return module_list(self, name, [](LoraModule& m) { return std::make_pair(static_cast<const void*>(m.dA), static_cast<const void*>(m.dB)); });
           })
      .def("lora_set",
           [](LlamaModel& self, const std::string& name, int64_t layer, const std::string& proj, const F32Array& A,
              const F32Array& B) {
             auto [ref, m] = module_at(self, name, layer, proj);
             check_2d(A, m->r, m->in, "A");
             check_2d(B, m->out, m->r, "B");
             try {
               model::set_lora_factors(self.backend(), *m, A.data(), B.data());
             } catch (const ValueError& e) {  // name the module (lora_check.hpp's refusals)
               model::lora_factors_changed(*ref);
               throw ValueError("layer " + std::to_string(layer) + " " + proj + ": " + e.what());
             }
             model::lora_factors_changed(*ref);  // later passes rebuild the bf16 inference copy
           })
      .def("lora_scaling",
           [](LlamaModel& self, const std::string& name, int64_t layer, const std::string& proj) {
             return module_at(self, name, layer, proj).second->scaling;
           })
      .def("lora_dropout_state",
           [](LlamaModel& self, const std::string& name) {
             const LlamaModel::AdapterRef a = self.adapter(name);
             return std::make_tuple(a->seed, a->micro_step);
           }, "(seed, micro_step) keying the dropout masks")
      .def("lora_set_dropout_state",
           [](LlamaModel& self, const std::string& name, uint64_t seed, int64_t step) {
             check_arg(step >= 0, "dropout step must be >= 0");
             const LlamaModel::AdapterRef a = self.adapter(name);
             a->seed = seed, a->micro_step = step;
           })
      .def("lora_zero_grad", [](LlamaModel& self, const std::string& name) {
        model::zero_lora_grads(self.backend(), *self.adapter(name));
      })
      .def(
          "forward_backward",
          [](LlamaModel& self, const I32Array& ids, const std::optional<I32Array>& mask, const I32Array& labels,
             float grad_scale, bool training, bool checkpointing, double activation_memory_budget) {
            auto [B, T] = shape2(ids, "input_ids");
            check_arg(labels.ndim() == 2 && labels.shape(0) == B && labels.shape(1) == T, "labels shape must equal input_ids shape");
            if (mask) check_arg(mask->ndim() == 2 && mask->shape(0) == B && mask->shape(1) == T, "attention_mask shape must equal input_ids shape");
            const int32_t* mp = mask ? mask->data() : nullptr;
            py::gil_scoped_release nogil;
            auto r = self.forward_backward(ids.data(), mp, labels.data(), B, T, grad_scale, training, checkpointing,
                                           activation_memory_budget);
            return std::make_tuple(r.loss_sum, r.count, r.peak_train_bytes);
          },
          py::arg("input_ids"), py::arg("attention_mask"), py::arg("labels"), py::arg("grad_scale"),
          py::arg("training") = true, py::arg("checkpointing") = true, py::arg("activation_memory_budget") = 0.0,
          "labels already shifted; returns (loss_sum, count, peak_train_bytes). activation_memory_budget (0..1, "
          "with checkpointing): the share of the last layers that keep their intermediates instead of recomputing")
      .def(
          "lora_train_step",
          [](LlamaModel& self, const py::list& micro, double lr, double max_grad_norm, bool training,
             bool checkpointing, const py::object& comm, double activation_memory_budget) {
            std::vector<I32Array> keep;  // the arrays stay alive while the GIL is released
            std::vector<model::MicroBatch> mbs;
            for (py::handle h : micro) {
              if (h.is_none()) {  // data parallel: this rank holds no row of the micro-batch
                check_arg(!comm.is_none(), "a micro-batch of None needs a data-parallel comm");
                mbs.push_back({nullptr, nullptr, nullptr, 0, 0, 0, 0});
                continue;
              }
              auto t = h.cast<py::tuple>();
              check_arg(t.size() == 4 || t.size() == 5,
                        "micro-batch must be (ids, mask|None, shifted labels, count[, row0])");
              auto ids = t[0].cast<I32Array>();
              auto mask = t[1].cast<std::optional<I32Array>>();
              auto labels = t[2].cast<I32Array>();
              const auto count = t[3].cast<int64_t>();
              const int64_t row0 = t.size() == 5 ? t[4].cast<int64_t>() : 0;
              check_arg(row0 >= 0, "row0 must be >= 0");
              auto [B, T] = shape2(ids, "input_ids");
              check_arg(labels.ndim() == 2 && labels.shape(0) == B && labels.shape(1) == T,
                        "labels shape must equal input_ids shape");
              if (mask)
                check_arg(mask->ndim() == 2 && mask->shape(0) == B && mask->shape(1) == T,
                          "attention_mask shape must equal input_ids shape");
              mbs.push_back({ids.data(), mask ? mask->data() : nullptr, labels.data(), B, T, count, row0});
              keep.push_back(ids), keep.push_back(labels);
              if (mask) keep.push_back(*mask);
            }
            // Data parallel: comm.sum_scalars(float64 array) / comm.sum_grads(float32 array) sum in
            // place over every rank (mpi4py Allreduce IN_PLACE); they get zero-copy views, valid
            // during the call only, and run with the GIL taken back.
            // GPU ranks: comm.nccl (a _core.nccl.Comm on the model's backend) all-reduces the
            // gradient buffer on the device, without the GIL; the scalars still go through comm.
            model::StepReducer red;
            py::object nccl = comm.is_none() ? py::object(py::none()) : py::getattr(comm, "nccl", py::none());
            if (!comm.is_none()) {
              check_arg(nccl.is_none() || py::isinstance<dist::NcclComm>(nccl),
                        "comm.nccl must be None or a qlora_native._core.nccl.Comm");
              dist::NcclComm* nc = nccl.is_none() ? nullptr : nccl.cast<dist::NcclComm*>();
              if (nc)
                check_arg(&nc->backend() == &self.backend(), "comm.nccl runs on backend '" + nc->backend().name() +
                                                                 "', the model on '" + self.backend().name() + "'");
              else
                need_host(self, "data-parallel training through Python (GPU ranks reduce over NCCL: comm.nccl)");
              py::object ss = comm.attr("sum_scalars"), sg = comm.attr("sum_grads");
              red.sum_scalars = [ss](double* v, int n) {
                py::gil_scoped_acquire gil;
                py::capsule none(v, [](void*) {});
                ss(py::array_t<double>({static_cast<py::ssize_t>(n)}, {sizeof(double)}, v, none));
              };
              if (nc)
                red.sum_grads = [nc](float* g, int64_t n) { nc->all_reduce_sum(g, n); };
              else
                red.sum_grads = [sg](float* g, int64_t n) {
                  py::gil_scoped_acquire gil;
                  py::capsule none(g, [](void*) {});
                  sg(py::array_t<float>({static_cast<py::ssize_t>(n)}, {sizeof(float)}, g, none));
                };
            }
            model::TrainStepResult r;
            {
              py::gil_scoped_release nogil;
              r = model::lora_train_step(self, mbs, lr, max_grad_norm, training, checkpointing,
                                         comm.is_none() ? nullptr : &red, activation_memory_budget);
            }
            py::dict d;
            d["loss"] = r.loss, d["grad_norm"] = r.norm, d["count"] = r.count, d["stepped"] = r.stepped;
            d["peak_train_bytes"] = r.peak_train_bytes, d["bad_micro"] = r.bad_micro, d["bad_loss"] = r.bad_loss;
            return d;
          },
          py::arg("micro"), py::arg("lr"), py::arg("max_grad_norm"), py::arg("training") = true,
          py::arg("checkpointing") = true, py::arg("comm") = py::none(), py::arg("activation_memory_budget") = 0.0,
          "One optimizer step over micro-batches [(ids, mask|None, shifted labels, count[, row0])] (lora_setup.cpp "
          "lora_train_step, the C API's step rule); comm: data-parallel reducer with sum_scalars / sum_grads "
          "(None entries: this rank holds no row of that micro-batch).")
      .def(
          "eval_loss",
          [](LlamaModel& self, const I32Array& ids, const std::optional<I32Array>& mask, const I32Array& labels) {
            auto [B, T] = shape2(ids, "input_ids");
            check_arg(labels.ndim() == 2 && labels.shape(0) == B && labels.shape(1) == T, "labels shape must equal input_ids shape");
            if (mask) check_arg(mask->ndim() == 2 && mask->shape(0) == B && mask->shape(1) == T, "attention_mask shape must equal input_ids shape");
            const int32_t* mp = mask ? mask->data() : nullptr;
            py::gil_scoped_release nogil;
            auto r = self.eval_loss(ids.data(), mp, labels.data(), B, T);
            return std::make_tuple(r.loss_sum, r.count);
          },
          py::arg("input_ids"), py::arg("attention_mask"), py::arg("labels"))
      .def(
          "lora_configure_optimizer",
          [](LlamaModel& self, const std::string& name, std::pair<double, double> betas, double eps, double wd) {
            const LlamaModel::AdapterRef a = self.adapter(name);
            train::AdamWConfig c;
            c.beta1 = betas.first, c.beta2 = betas.second, c.eps = eps, c.weight_decay = wd;
            model::configure_lora_optimizer(self.backend(), *a, c);
          },
          py::arg("name"), py::arg("betas"), py::arg("eps"), py::arg("weight_decay"))
      .def("lora_optimizer_step",
           [](LlamaModel& self, const std::string& name, double lr) {
             const LlamaModel::AdapterRef a = with_optimizer(self, name);  // alive through the step
             model::ensure_lora_grads(self.backend(), *a);
             py::gil_scoped_release nogil;
             a->opt->step(a->grad_arena.f32(), lr);
             model::lora_factors_changed(*a);  // later passes rebuild the bf16 inference copy
           })
      .def("lora_grad_norm",
           [](LlamaModel& self, const std::string& name) {
             return grad_checks(self, name, [](train::FlatGradOps& k, float* g) { return k.grad_norm(g); });
           })
      .def("lora_clip_grad_norm",
           [](LlamaModel& self, const std::string& name, double max_norm) {
             return grad_checks(self, name, [max_norm](train::FlatGradOps& k, float* g) {
               return k.clip_grad_norm(g, max_norm);
             });
           })
      .def("lora_optimizer_state",
           [](LlamaModel& self, const std::string& name) {
             const train::AdamWState s = with_optimizer(self, name)->opt->state();
             py::list m, v;
             for (size_t i = 0; i < s.exp_avg.size(); ++i) {
               m.append(py::array_t<float>(s.exp_avg[i].size(), s.exp_avg[i].data()));
               v.append(py::array_t<float>(s.exp_avg_sq[i].size(), s.exp_avg_sq[i].data()));
             }
             py::dict d;
             d["step"] = s.step;
             d["exp_avg"] = m;
             d["exp_avg_sq"] = v;
             d["betas"] = py::make_tuple(s.config.beta1, s.config.beta2);
             d["eps"] = s.config.eps;
             d["weight_decay"] = s.config.weight_decay;
             return d;
           })
      .def("lora_load_optimizer_state", [](LlamaModel& self, const std::string& name, const py::dict& d) {
        const LlamaModel::AdapterRef ap = with_optimizer(self, name);
        train::FlatAdamW& opt = *ap->opt;
        for (const char* k : {"step", "exp_avg", "exp_avg_sq", "betas", "eps", "weight_decay"})
          check_arg(d.contains(k), std::string("optimizer state: missing key '") + k + "'");
        // a checkpoint's values: a wrong type is a ValueError naming the key (pybind11's cast_error
        // is a RuntimeError that names neither); bools are not numbers here
        auto field = [&](auto tag, const char* k, const char* want) {
          using T = decltype(tag);
          const py::handle h = d[k];
          if (!py::isinstance<py::bool_>(h)) {
            try {
              return h.cast<T>();
            } catch (const py::cast_error&) {
            }
          }
          throw ValueError(std::string("optimizer state: '") + k + "' must be " + want + ", got " +
                           std::string(py::repr(h)).substr(0, 200));
        };
        train::AdamWState s;
        check_arg(py::isinstance<py::int_>(d["step"]), "optimizer state: 'step' must be an int");
        const int64_t step = field(int64_t(), "step", "an int below 2^63");
        check_arg(step >= 0, "optimizer state: 'step' must be >= 0");
        s.step = step;
        auto b = field(std::pair<double, double>(), "betas", "a pair of numbers");
        s.config.beta1 = b.first, s.config.beta2 = b.second;
        s.config.eps = field(double(), "eps", "a number");
        s.config.weight_decay = field(double(), "weight_decay", "a number");
        for (const char* k : {"exp_avg", "exp_avg_sq"}) {
          auto& dst = std::string(k) == "exp_avg" ? s.exp_avg : s.exp_avg_sq;
          for (py::handle h : field(py::list(), k, "a list of float32 arrays")) {
            F32Array a = h.cast<F32Array>();
            dst.emplace_back(a.data(), a.data() + a.size());
          }
        }
        check_arg(s.exp_avg.size() == opt.num_params() && s.exp_avg_sq.size() == opt.num_params(),
                  "optimizer state: holds " + std::to_string(s.exp_avg.size()) + " tensors for " +
                      std::to_string(opt.num_params()) + " parameters");
        opt.load_state(std::move(s));
      });
}

}  // namespace qlora::py_bind
