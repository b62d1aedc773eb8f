#include "backend.hpp"

#include <map>
#include <memory>
#include <mutex>

#include "common/error.hpp"
#include "cpu/cpu_backend.hpp"
#include "cpu/features.hpp"

#ifdef QLORA_HAVE_CUDA
#include "cuda_backend.hpp"
#endif

namespace qlora {

namespace {
std::mutex g_mu;
std::map<std::string, std::unique_ptr<Backend>> g_backends;
}  // namespace

Backend& get_backend(const std::string& name) {
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_backends.find(name);
  if (it != g_backends.end()) return *it->second;
  std::unique_ptr<Backend> b;
  if (name == "cpu") {
    b = std::make_unique<cpu::CpuBackend>(cpu::best_simd_level(), /*follow_active=*/true);
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
