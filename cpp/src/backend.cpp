#include "backend.hpp"

#include <cstdlib>
#include <map>
#include <new>
#include <memory>
#include <mutex>
#include <exception>

#include "common/error.hpp"
#include "cpu/cpu_backend.hpp"
#include "cpu/features.hpp"
#include "devsim_backend.hpp"

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.hpp"
#endif

namespace qlora {

namespace {
std::mutex g_mu;
std::map<std::string, std::unique_ptr<Backend>> g_backends;
}  // namespace

namespace {
// Ops every backend has (pure virtuals, and defaults built only on them).
const char* const kCoreOps[] = {"gemm_nt", "gemm_nn", "gemm_tn", "nf4_gemm_nt", "nf4_gemm_nt_many",
                                "nf4_gemm_nt_many_lora", "nf4_gemm_nn", "nf4_dequantize", "lora_segments",
                                "lora_segments_many", "gemm_nt_bf16",
                                "gemm_nn_bf16", "gemm_tn_bf16", "nf4_gemm_nt_bf16", "nf4_gemm_nt_many_bf16", "nf4_gemm_nt_many_lora_bf16", "nf4_gemm_nn_bf16",
                                "host_output", "sample_rows", "offload"};
// Ops whose Backend default throws not_implemented.
const char* const kOptionalOps[] = {"q8_0_gemm_nt", "q8_0_rows", "half_gemm_nt", "half_rows", "embedding", "rmsnorm",
                                    "add_inplace", "add_bias",
                                    "rope", "swiglu", "kv_write", "attention", "kv_write_bf16",
                                    "attention_kv_bf16", "rmsnorm_backward", "rope_backward",
                                    "swiglu_backward", "attention_train", "attention_train_backward",
                                    "cross_entropy_rows", "adamw_update", "sum_squares", "scale_inplace",
                                    "find_nonfinite", "lora_dropout", "lora_dropout_backward"};
}  // namespace

bool Backend::is_core_op(const std::string& op) {
  for (const char* c : kCoreOps)
    if (op == c) return true;
  return false;
}

bool Backend::supports_op(const std::string& op) const { return is_core_op(op); }

namespace {
// The Exec bound to this thread by the innermost ExecScope (of whichever backend owns it).
thread_local Backend::Exec* t_exec = nullptr;
}  // namespace

Backend::Exec* Backend::current_exec() const {
  return t_exec && &t_exec->owner() == this ? t_exec : nullptr;
}

Backend::ExecScope::ExecScope(Backend& be, Exec* exec) : be_(be), exec_(exec) {
  if (!exec_) return;
  check_arg(&exec_->owner() == &be_, "ExecScope: the Exec belongs to backend '" + exec_->owner().name() +
                                         "', not '" + be_.name() + "'");
  be_.exec_enter(exec_);  // may throw: then nothing is bound and the destructor does not run
  prev_ = t_exec;
  t_exec = exec_;
  uncaught_ = std::uncaught_exceptions();
}

Backend::ExecScope::~ExecScope() {
  if (!exec_) return;
  t_exec = prev_;
  be_.exec_leave(exec_, std::uncaught_exceptions() > uncaught_);
}

void* Backend::host_alloc(size_t bytes) {
  void* p = std::malloc(bytes ? bytes : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
void Backend::host_free(void* p) { std::free(p); }

const std::vector<std::string>& Backend::all_ops() {
  static const std::vector<std::string> ops = [] {
    std::vector<std::string> v(std::begin(kCoreOps), std::end(kCoreOps));
    v.insert(v.end(), std::begin(kOptionalOps), std::end(kOptionalOps));
    return v;
  }();
  return ops;
}

std::vector<std::string> Backend::supported_ops() const {
  std::vector<std::string> out;
  for (const std::string& op : all_ops())
    if (supports_op(op)) out.push_back(op);
  return out;
}

void Backend::require_ops(const std::vector<std::string>& ops, const std::string& what) const {
  std::string miss;
  int n = 0;
  for (const std::string& op : ops)
    if (!supports_op(op)) miss += (n++ ? ", " : "") + op;
  if (n)
    throw ValueError(what + ": backend '" + name() + "' does not implement " + (n > 1 ? "ops " : "op ") + miss);
}

Backend& get_backend(const std::string& name) {
  std::unique_lock<std::mutex> lk(g_mu);
  auto it = g_backends.find(name);
  if (it != g_backends.end()) return *it->second;
  std::unique_ptr<Backend> b;
  if (name == "cpu") {
    b = std::make_unique<cpu::CpuBackend>(cpu::best_simd_level(), /*follow_active=*/true);
  } else if (name == "cpu:devsim") {  // test backend: CPU kernels behind a device-backend face
    lk.unlock();
    Backend& cpu = get_backend("cpu");
    lk.lock();
    it = g_backends.find(name);
    if (it != g_backends.end()) return *it->second;
    b = make_devsim_backend(cpu);
  } else if (name.rfind("cpu:", 0) == 0) {
    cpu::SimdLevel level = cpu::simd_level_from_name(name.substr(4));
    check_arg(cpu::simd_level_supported(level), "backend '" + name + "': this CPU does not support that SIMD level");
    b = std::make_unique<cpu::CpuBackend>(level, /*follow_active=*/false);
  } else if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
#ifdef QLORA_HAVE_CUDA
    int dev = name == "cuda" ? 0 : std::stoi(name.substr(5));
    int n = cuda::device_count();
    check_arg(n > 0, "backend '" + name + "' unavailable: " + cuda::device_summary());
    check_arg(dev >= 0 && dev < n, "backend '" + name + "': no such device (" + std::to_string(n) + " visible)");
    b = cuda::make_backend(dev);
#else
    throw ValueError("backend '" + name + "' unavailable: qlora_native was built without CUDA (QLORA_CUDA=OFF or no nvcc)");
#endif
  } else {
    throw ValueError("unknown backend '" + name + "' (expected cpu, cpu:<level> or cuda)");
  }
  Backend& ref = *b;
  g_backends.emplace(name, std::move(b));
  return ref;
}

std::vector<std::string> available_backends() {
  std::vector<std::string> out;
  for (cpu::SimdLevel l : cpu::supported_simd_levels()) out.push_back(std::string("cpu:") + cpu::simd_level_name(l));
  if (cuda_device_count() > 0) out.push_back("cuda");
  return out;
}

std::vector<std::string> cuda_supported_ops() {
#ifdef QLORA_HAVE_CUDA
  return cuda::supported_ops();
#else
  return {};
#endif
}

bool cuda_compiled() {
#ifdef QLORA_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef QLORA_HAVE_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

std::string cuda_device_summary() {
#ifdef QLORA_HAVE_CUDA
  return cuda::device_summary();
#else
  return "not compiled (built with QLORA_CUDA=OFF or without nvcc)";
#endif
}

}  // namespace qlora
