// Which micro-kernel the bf16 GEMM driver runs (AVX512-BF16 or AMX-BF16, cpu/gemm_bf16_amx.hpp), the A
// panel re-layout the AMX kernel reads, and the dispatch to its two compilations. Level-neutral.
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/features.hpp"
#include "cpu/gemm_bf16_amx.hpp"

namespace qlora::cpu::bf16_amx {

bool amx_usable() {
#ifdef QLORA_AMX_KERNEL
  // The permission request comes last: only a CPU with the tiles asks the OS for their state.
  static const bool ok = cpu_has_amx_bf16() && amx_tile_data_permitted();
  return ok;
#else
  return false;
#endif
}

Kernel kernel_choice() {
  if (const char* e = std::getenv("QLORA_AMX")) {
    if (std::strcmp(e, "0") == 0) return Kernel::Avx512Bf16;
    if (std::strcmp(e, "emulate") == 0) return Kernel::AmxEmulated;
  }
  return amx_usable() ? Kernel::Amx : Kernel::Avx512Bf16;
}

const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::Avx512Bf16: return "avx512-bf16";
    case Kernel::Amx: return "amx-bf16";
    case Kernel::AmxEmulated: return "amx-bf16-emulated";
  }
  return "?";
}

void relayout_a(uint32_t* panel, int64_t kp, int rows) {
  static thread_local std::vector<uint32_t> tmp;  // a panel is at most KC / 2 * 16 words (~64 KB)
  const size_t n = static_cast<size_t>(kp) * rows;
  if (tmp.size() < n) tmp.resize(n);
  std::memcpy(tmp.data(), panel, n * sizeof(uint32_t));
  for (int64_t c0 = 0; c0 < kp; c0 += 16) {
    const int64_t w = kp - c0 < 16 ? kp - c0 : 16;
    uint32_t* d = panel + c0 * rows;
    const uint32_t* s = tmp.data() + c0 * rows;
    for (int i = 0; i < rows; ++i)
      for (int64_t q = 0; q < w; ++q) d[i * w + q] = s[q * rows + i];
  }
}

void ukernel16(Kernel k, int64_t kp, const uint32_t* Ap, const uint32_t* Bp, float* C, int64_t ldc, float alpha,
               float beta, int mr, int nr) {
#ifdef QLORA_AMX_KERNEL
  if (k == Kernel::Amx) return ukernel16_amx(kp, Ap, Bp, C, ldc, alpha, beta, mr, nr);
#endif
  if (k == Kernel::AmxEmulated) return ukernel16_amx_emulated(kp, Ap, Bp, C, ldc, alpha, beta, mr, nr);
  std::abort();  // Kernel::Amx without the kernel compiled in: kernel_choice() never returns it
}

TileScope::TileScope(Kernel k) : k_(k) {
#ifdef QLORA_AMX_KERNEL
  if (k == Kernel::Amx) open_ = scope_begin_amx();
#endif
  if (k == Kernel::AmxEmulated) open_ = scope_begin_amx_emulated();
}
TileScope::~TileScope() {
  if (!open_) return;
#ifdef QLORA_AMX_KERNEL
  if (k_ == Kernel::Amx) {
    scope_end_amx();
    return;
  }
#endif
  scope_end_amx_emulated();
}

}  // namespace qlora::cpu::bf16_amx
