// qlora_native._core.train: AdamW over numpy float32 parameters (updated in place, no copies),
// the transformers lr schedules, gradient clipping / non-finite checks and the Philox RNG.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.hpp"
#include "common/error.hpp"
#include "model/lora_setup.hpp"
#include "model/train_memory.hpp"
#include "train/grad_utils.hpp"
#include "train/lr_schedule.hpp"
#include "train/optimizer.hpp"
#include "train/rng.hpp"

namespace qlora::py_bind {

namespace {

using train::AdamW;
using train::AdamWConfig;
using train::GradRef;
using train::ParamRef;

std::string type_name(py::handle o) { return py::str(py::type::handle_of(o).attr("__name__")); }

std::string shape_str(const std::vector<py::ssize_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// A float32, C-contiguous, aligned (and, when `writable`, writeable) numpy array; never converted.
py::array checked_f32(py::handle obj, const std::string& name, bool writable) {
  check_arg(py::isinstance<py::array>(obj), name + " must be a numpy.ndarray, got " + type_name(obj));
  auto a = py::reinterpret_borrow<py::array>(obj);
  check_arg(a.dtype().is(py::dtype::of<float>()),
            name + " must have dtype float32, got " + std::string(py::str(a.dtype())) + " (no implicit conversion)");
  check_arg((a.flags() & py::array::c_style) != 0, name + " must be C-contiguous");
  check_arg(reinterpret_cast<uintptr_t>(a.data()) % alignof(float) == 0, name + " data is not 4-byte aligned");
  if (writable) check_arg(a.writeable(), name + " is read-only (the update is in place)");
  return a;
}

std::vector<py::array> checked_list(py::handle seq, const std::string& what, bool writable) {
  check_arg(py::isinstance<py::list>(seq) || py::isinstance<py::tuple>(seq),
            what + " must be a list of float32 numpy arrays, got " + type_name(seq));
  std::vector<py::array> out;
  size_t i = 0;
  for (py::handle h : seq) out.push_back(checked_f32(h, what + "[" + std::to_string(i++) + "]", writable));
  return out;
}

// A Python int or numpy integer (anything with __index__ except bool), as int64 / uint64.
py::int_ index_arg(py::handle obj, const std::string& name) {
  check_arg(PyIndex_Check(obj.ptr()) && !py::isinstance<py::bool_>(obj), name + " must be an int, got " + type_name(obj));
  return py::reinterpret_steal<py::int_>(PyNumber_Index(obj.ptr()));
}

std::vector<GradRef> grad_refs(const std::vector<py::array>& arrs) {
  std::vector<GradRef> out;
  for (const auto& a : arrs) out.push_back({static_cast<const float*>(a.data()), static_cast<int64_t>(a.size())});
  return out;
}

std::vector<ParamRef> param_refs(std::vector<py::array>& arrs) {
  std::vector<ParamRef> out;
  for (auto& a : arrs) out.push_back({static_cast<float*>(a.mutable_data()), static_cast<int64_t>(a.size())});
  return out;
}

// The Python AdamW: holds the parameter arrays (so their memory outlives the optimizer).
struct PyAdamW {
  std::vector<py::array> params;
  std::vector<std::vector<py::ssize_t>> shapes;
  std::unique_ptr<AdamW> opt;

  PyAdamW(py::handle ps, std::pair<double, double> betas, double eps, double weight_decay) {
    params = checked_list(ps, "params", true);
    for (const auto& a : params) shapes.push_back(shape_of(a));
    AdamWConfig c;
    c.beta1 = betas.first;
    c.beta2 = betas.second;
    c.eps = eps;
    c.weight_decay = weight_decay;
    opt = std::make_unique<AdamW>(param_refs(params), c);
  }

  void step(py::handle gs, double lr) {
    std::vector<py::array> grads = checked_list(gs, "grads", false);
    check_arg(grads.size() == params.size(), "AdamW.step: got " + std::to_string(grads.size()) + " gradients for " +
                                                 std::to_string(params.size()) + " parameters");
    for (size_t i = 0; i < grads.size(); ++i)
      check_arg(shape_of(grads[i]) == shapes[i], "AdamW.step: grads[" + std::to_string(i) + "] has shape " +
                                                     shape_str(shape_of(grads[i])) + ", parameter has " + shape_str(shapes[i]));
    const std::vector<GradRef> refs = grad_refs(grads);
    py::gil_scoped_release nogil;
    opt->step(refs, lr);
  }

  py::dict state_dict() const {
    const train::AdamWState s = opt->state();
    py::list m, v;
    for (size_t i = 0; i < params.size(); ++i) {
      py::array_t<float> a(shapes[i]), b(shapes[i]);
      std::copy(s.exp_avg[i].begin(), s.exp_avg[i].end(), a.mutable_data());
      std::copy(s.exp_avg_sq[i].begin(), s.exp_avg_sq[i].end(), b.mutable_data());
      m.append(a);
      v.append(b);
    }
    py::dict d;
    d["step"] = s.step;
    d["exp_avg"] = m;
    d["exp_avg_sq"] = v;
    d["betas"] = py::make_tuple(s.config.beta1, s.config.beta2);
    d["eps"] = s.config.eps;
    d["weight_decay"] = s.config.weight_decay;
    return d;
  }

  void load_state_dict(const py::dict& d) {
    for (const char* k : {"step", "exp_avg", "exp_avg_sq"})
      check_arg(d.contains(k), std::string("AdamW.load_state_dict: missing key '") + k + "'");
    train::AdamWState s;
    s.config = opt->config();
    const py::int_ step = index_arg(d["step"], "AdamW.load_state_dict: 'step'");
    check_arg(step >= py::int_(0) && step < py::int_(INT64_MAX), "AdamW.load_state_dict: 'step' must be >= 0");
    s.step = step.cast<int64_t>();
    if (d.contains("betas")) {
      auto b = d["betas"].cast<std::pair<double, double>>();
      s.config.beta1 = b.first;
      s.config.beta2 = b.second;
    }
    if (d.contains("eps")) s.config.eps = d["eps"].cast<double>();
    if (d.contains("weight_decay")) s.config.weight_decay = d["weight_decay"].cast<double>();
    for (const char* k : {"exp_avg", "exp_avg_sq"}) {
      std::vector<py::array> arrs = checked_list(d[k], std::string("state_dict['") + k + "']", false);
      check_arg(arrs.size() == params.size(), std::string("AdamW.load_state_dict: '") + k + "' holds " +
                                                  std::to_string(arrs.size()) + " arrays for " + std::to_string(params.size()) +
                                                  " parameters");
      auto& dst = std::string(k) == "exp_avg" ? s.exp_avg : s.exp_avg_sq;
      for (size_t i = 0; i < arrs.size(); ++i) {
        check_arg(shape_of(arrs[i]) == shapes[i], std::string("AdamW.load_state_dict: '") + k + "'[" + std::to_string(i) +
                                                      "] has shape " + shape_str(shape_of(arrs[i])) + ", parameter has " +
                                                      shape_str(shapes[i]));
        const float* p = static_cast<const float*>(arrs[i].data());
        dst.emplace_back(p, p + arrs[i].size());
      }
    }
    opt->load_state(std::move(s));
  }
};

py::array_t<float> new_f32(int64_t n) {
  check_arg(n >= 0, "n must be >= 0, got " + std::to_string(n));
  return py::array_t<float>(static_cast<py::ssize_t>(n));
}

}  // namespace

void bind_train(py::module_& m) {
  py::module_ t = m.def_submodule("train", "AdamW, lr schedules, gradient clipping and the Philox RNG");

  py::class_<PyAdamW>(t, "AdamW",
                      "torch.optim.AdamW on float32 numpy arrays, updated in place. Defaults are transformers' "
                      "Trainer defaults.")
      .def(py::init<py::handle, std::pair<double, double>, double, double>(), py::arg("params"),
           py::arg("betas") = std::make_pair(0.9, 0.999), py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0)
      .def("step", &PyAdamW::step, py::arg("grads"), py::arg("lr"),
           "One AdamW step; grads: float32 arrays shaped like the params; lr: finite, >= 0.")
      .def("state_dict", &PyAdamW::state_dict, "{'step', 'exp_avg': [arrays], 'exp_avg_sq': [arrays], 'betas', 'eps', 'weight_decay'} (copies)")
      .def("load_state_dict", &PyAdamW::load_state_dict, py::arg("state"))
      .def_property_readonly("step_count", [](const PyAdamW& s) { return s.opt->step_count(); })
      .def_property_readonly("params", [](const PyAdamW& s) { return py::list(py::cast(s.params)); })
      .def_property_readonly("betas", [](const PyAdamW& s) { return py::make_tuple(s.opt->config().beta1, s.opt->config().beta2); })
      .def_property_readonly("eps", [](const PyAdamW& s) { return s.opt->config().eps; })
      .def_property_readonly("weight_decay", [](const PyAdamW& s) { return s.opt->config().weight_decay; });

  t.def("check_activation_memory_budget", &model::check_activation_budget, py::arg("budget"),
        "ValueError unless 0 <= budget <= 1 (the engine's rule for activation_memory_budget)");
  // The training pass's allocation plan (model/train_memory.hpp): what memory_model.py reports.
  t.attr("HEAD_FORMATS") = py::tuple(py::cast(model::head_format_names()));
  t.def(
      "memory_plan",
      [](int64_t hidden_size, int64_t intermediate_size, int64_t vocab_size, int64_t num_hidden_layers,
         int64_t num_attention_heads, int64_t num_key_value_heads, int64_t head_dim, int64_t batch, int64_t seq,
         int64_t r, bool backward, bool checkpointing, bool offload, bool dropout, const std::string& compute_dtype,
         const std::string& head_format, bool device, bool f32_from_q8_0, double activation_memory_budget) {
        check_arg(compute_dtype == "float32" || compute_dtype == "bfloat16",
                  "compute_dtype must be 'float32' or 'bfloat16', got '" + compute_dtype + "'");
        model::TrainShape s{batch, seq, hidden_size, intermediate_size, vocab_size, num_attention_heads,
                            num_key_value_heads, head_dim, num_hidden_layers, r, backward, checkpointing, offload,
                            dropout, compute_dtype == "bfloat16", device, model::head_rows_from_name(head_format),
                            f32_from_q8_0};
        s.activation_budget = activation_memory_budget;
        // host memory: the "cpu" backend's answer at the active SIMD level; a device: none (CUDA's)
        if (!device) s.lm_head = get_backend("cpu").lm_head_extras(model::lm_head_call(s));
        const model::TrainMemoryPlan p = model::train_memory_plan(s);
        py::dict out;
        out["checkpoints"] = p.checkpoints;
        out["layer_activations"] = p.layer_activations;
        out["lora_scratch"] = p.lora_scratch;
        out["dropout"] = p.dropout;
        out["final_norm"] = p.final_norm_bytes;
        out["backward_scratch"] = p.backward_scratch;
        out["cross_entropy"] = p.cross_entropy;
        out["peak"] = p.peak;
        out["offload_host"] = p.offload_host;
        out["layers_kept"] = p.num_layer_acts;
        out["attention_kept"] = p.num_attention_kept;
        return out;
      },
      py::kw_only(), py::arg("hidden_size"), py::arg("intermediate_size"), py::arg("vocab_size"),
      py::arg("num_hidden_layers"), py::arg("num_attention_heads"), py::arg("num_key_value_heads"),
      py::arg("head_dim"), py::arg("batch"), py::arg("seq"), py::arg("r"), py::arg("backward") = true,
      py::arg("checkpointing") = true, py::arg("offload") = false, py::arg("dropout") = false,
      py::arg("compute_dtype") = "float32", py::arg("head_format") = "float32", py::arg("device") = false,
      py::arg("f32_from_q8_0") = false, py::arg("activation_memory_budget") = 0.0,
      "Device bytes of one training pass by part and its peak (LossResult::peak_train_bytes), as "
      "LlamaModel::train_pass allocates them; offload_host: the host staging of offloaded checkpoints; "
      "layers_kept: the LayerActs sets (the last layers that skip the recompute; activation_memory_budget); "
      "attention_kept: the layers below them that keep their attention half (their recompute runs the MLP half). "
      "device: the backend's memory is not host memory (cuda, cpu:devsim). f32_from_q8_0: head_format "
      "float32 over a GGUF's tied Q8_0 token_embd not yet widened (the loss reads its rows: bf16 packs its "
      "panels, fp32 decodes them into its GEMMs' B panels).");

  t.def("lr_at",
        [](const std::string& schedule, int64_t step, double base_lr, double warmup_steps, int64_t total_steps) {
          return train::lr_at(train::schedule_from_name(schedule), step, base_lr, warmup_steps, total_steps);
        },
        py::arg("schedule"), py::arg("step"), py::arg("base_lr"), py::arg("warmup_steps"), py::arg("total_steps"),
        "transformers' schedule value for optimizer step `step` (0 = the first step); warmup_steps >= 1 counts "
        "steps, < 1 is a ratio -> ceil(total_steps * ratio).");
  t.def("warmup_steps", &train::warmup_steps_from, py::arg("warmup"), py::arg("total_steps"),
        "transformers' TrainingArguments.get_warmup_steps");

  t.def("grad_norm",
        [](py::handle grads) {
          const std::vector<py::array> gs = checked_list(grads, "grads", false);
          const auto refs = grad_refs(gs);
          py::gil_scoped_release nogil;
          return train::global_grad_norm(refs);
        },
        py::arg("grads"), "Global L2 norm over all arrays, summed in float64.");
  t.def("clip_grad_norm",
        [](py::handle grads, double max_norm) {
          std::vector<py::array> gs = checked_list(grads, "grads", true);
          const auto refs = param_refs(gs);
          py::gil_scoped_release nogil;
          return train::clip_grad_norm(refs, max_norm);
        },
        py::arg("grads"), py::arg("max_norm"),
        "torch.nn.utils.clip_grad_norm_ in place; returns the pre-clip norm (non-finite: grads left untouched).");
  t.def("find_nonfinite",
        [](py::handle grads) -> py::object {
          const std::vector<py::array> gs = checked_list(grads, "grads", false);
          const train::NonFinite r = train::find_nonfinite(grad_refs(gs));
          if (!r.found()) return py::none();
          return py::make_tuple(r.tensor, r.index, r.value);
        },
        py::arg("grads"), "(tensor index, flat element index, value) of the first NaN/inf, or None.");

  py::class_<train::Philox>(t, "Philox", "Philox4x32-10 counter-based RNG; state = (seed, position).")
      .def(py::init<uint64_t>(), py::arg("seed") = 0)
      .def("state",
           [](const train::Philox& r) {
             py::dict d;
             d["algorithm"] = "philox4x32-10";
             d["seed"] = r.state().seed;
             d["position"] = r.state().position;
             return d;
           })
      .def("set_state",
           [](train::Philox& r, const py::dict& d) {
             check_arg(d.contains("seed") && d.contains("position"), "Philox.set_state: needs keys 'seed' and 'position'");
             if (d.contains("algorithm"))
               check_arg(py::str(d["algorithm"]).cast<std::string>() == "philox4x32-10",
                         "Philox.set_state: state of another algorithm: " + std::string(py::str(d["algorithm"])));
             uint64_t vals[2];
             const char* keys[2] = {"seed", "position"};
             for (int i = 0; i < 2; ++i) {
               const py::int_ v = index_arg(d[keys[i]], std::string("Philox.set_state: '") + keys[i] + "'");
               check_arg(v >= py::int_(0) && v <= py::int_(UINT64_MAX),
                         std::string("Philox.set_state: '") + keys[i] + "' must be in [0, 2**64)");
               vals[i] = v.cast<uint64_t>();
             }
             r.set_state({vals[0], vals[1]});
           },
           py::arg("state"))
      .def("next_u32", &train::Philox::next_u32)
      .def("next_u64", &train::Philox::next_u64)
      .def("below", &train::Philox::below, py::arg("n"), "uniform int in [0, n), unbiased")
      .def("random",
           [](train::Philox& r, int64_t n) {
             auto a = new_f32(n);
             r.fill_uniform(a.mutable_data(), n);
             return a;
           },
           py::arg("n"), "float32 [n] uniform in [0, 1) (24-bit)")
      .def("uniform",
           [](train::Philox& r, int64_t n, float lo, float hi) {
             auto a = new_f32(n);
             r.fill_uniform(a.mutable_data(), n, lo, hi);
             return a;
           },
           py::arg("n"), py::arg("low") = 0.0f, py::arg("high") = 1.0f)
      .def("normal",
           [](train::Philox& r, int64_t n, float mean, float std) {
             auto a = new_f32(n);
             r.fill_normal(a.mutable_data(), n, mean, std);
             return a;
           },
           py::arg("n"), py::arg("mean") = 0.0f, py::arg("std") = 1.0f)
      .def("bernoulli",
           [](train::Philox& r, int64_t n, double p) {
             check_arg(n >= 0, "n must be >= 0");
             py::array_t<bool> a(static_cast<py::ssize_t>(n));
             static_assert(sizeof(bool) == 1, "bool must be one byte");
             r.fill_bernoulli(reinterpret_cast<uint8_t*>(a.mutable_data()), n, p);
             return a;
           },
           py::arg("n"), py::arg("p"), "bool [n], True with probability p")
      .def("permutation",
           [](train::Philox& r, int64_t n) {
             check_arg(n >= 0, "n must be >= 0");
             py::array_t<int64_t> a(static_cast<py::ssize_t>(n));
             r.permutation(a.mutable_data(), n);
             return a;
           },
           py::arg("n"), "int64 [n]: a uniform shuffle of 0..n-1");
  t.def(
      "lora_init_factors",
      [](uint64_t seed, const std::string& how, const std::vector<std::tuple<int64_t, int64_t, int64_t>>& modules) {
        model::LoraInit h;
        if (how == "kaiming_uniform") h = model::LoraInit::KaimingUniform;
        else if (how == "gaussian") h = model::LoraInit::Gaussian;
        else if (how == "linear_default") h = model::LoraInit::LinearDefault;
        else throw ValueError("lora_init_factors: how must be kaiming_uniform, gaussian or linear_default, got '" + how + "'");
        train::Philox rng = model::lora_init_rng(seed);  // as qlora_adapter_add (new_lora_adapter)
        py::list out;
        for (const auto& [r, in, out_f] : modules) {
          check_arg(r >= 1 && in >= 1 && out_f >= 1 && r <= (int64_t{1} << 31) / in && r <= (int64_t{1} << 31) / out_f,
                    "lora_init_factors: r, in_features and out_features must be >= 1 (and the factors < 2^31 elements)");
          py::array_t<float> A({r, in}), B({out_f, r});
          model::init_lora_factors(rng, h, r, in, out_f, A.mutable_data(), B.mutable_data());
          out.append(py::make_tuple(A, B));
        }
        return out;
      },
      py::arg("seed"), py::arg("how"), py::arg("modules"),
      "PEFT's LoRA init (cpp/src/model/lora_setup.cpp, the C API's): [(A [r, in], B [out, r])] for modules "
      "[(r, in, out)], drawn in order from the adapter init stream of `seed`.");
  t.def("philox4x32_10", &train::philox4x32_10, py::arg("counter"), py::arg("key"), "one raw Philox4x32-10 block");
}

}  // namespace qlora::py_bind
