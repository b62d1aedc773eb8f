// The attention's AMX-BF16 kernels on emulated tiles (attention_amx_body.hpp with amx::EmulatedTiles,
// plain C++ following the Intel SDM: QLORA_AMX=emulate, any CPU; slow, for tests), which tiles run
// (choice()), and the dispatch to the two compilations. Level-neutral.
#include <cstdlib>
#include <cstring>

#include "cpu/amx_tiles.hpp"
#include "cpu/attention_amx.hpp"
#include "cpu/attention_amx_body.hpp"

namespace qlora::cpu::attn_amx {

Kernel choice() {
  const char* e = std::getenv("QLORA_ATTN_AMX");
  if (e && std::strcmp(e, "0") == 0) return Kernel::Avx512Bf16;
  return bf16_amx::kernel_choice();
}

void rows_amx_emulated(int64_t kp, const uint32_t* A, int64_t lda, int mr, const uint32_t* Bp, int64_t bstride,
                       int64_t ncols, float* C, int64_t ldc) {
  rows_kernel<amx::EmulatedTiles>(kp, A, lda, mr, Bp, bstride, ncols, C, ldc);
}

void acc_t_amx_emulated(int64_t kp, const uint32_t* At, int64_t lda, int64_t m, const uint32_t* Bk, int64_t ldb,
                        int64_t ncols, float* Ct, int64_t ldc, int64_t q0) {
  acc_t_kernel<amx::EmulatedTiles>(kp, At, lda, m, Bk, ldb, ncols, Ct, ldc, q0);
}

void rows(Kernel k, int64_t kp, const uint32_t* A, int64_t lda, int mr, const uint32_t* Bp, int64_t bstride,
          int64_t ncols, float* C, int64_t ldc) {
#ifdef QLORA_AMX_KERNEL
  if (k == Kernel::Amx) return rows_amx(kp, A, lda, mr, Bp, bstride, ncols, C, ldc);
#endif
  if (k == Kernel::AmxEmulated) return rows_amx_emulated(kp, A, lda, mr, Bp, bstride, ncols, C, ldc);
  std::abort();  // Kernel::Amx without the kernel compiled in (kernel_choice() never returns it), or no AMX kernel
}

void acc_t(Kernel k, int64_t kp, const uint32_t* At, int64_t lda, int64_t m, const uint32_t* Bk, int64_t ldb,
           int64_t ncols, float* Ct, int64_t ldc, int64_t q0) {
#ifdef QLORA_AMX_KERNEL
  if (k == Kernel::Amx) return acc_t_amx(kp, At, lda, m, Bk, ldb, ncols, Ct, ldc, q0);
#endif
  if (k == Kernel::AmxEmulated) return acc_t_amx_emulated(kp, At, lda, m, Bk, ldb, ncols, Ct, ldc, q0);
  std::abort();
}

}  // namespace qlora::cpu::attn_amx
