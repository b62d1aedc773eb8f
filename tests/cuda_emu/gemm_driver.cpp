// Runs the tensor-core GEMM launchers (cuda/gemm_tc.cu: gemm_bf16_tc, every layout;
// cuda/nf4_gemm_tc.cu: nf4_gemm_nt_bf16_tc / nf4_gemm_nn_bf16_tc; the fp32 decode GEMVs of
// cuda/nf4_gemv.cu) under the CPU emulator (emu.hpp)
// on operands from raw files; tests/test_cuda_emu_gemm.py builds it (with the sources and
// mma_tile.cuh rewritten for the emulator) and checks the result against float64. Arguments:
//   gemm DIR LAYOUT(nt|nn|tn) M N K alpha beta lda ldb ldc sm_count offA offB offC
//   nf4 DIR OP(nt|nn) M alpha beta ldx ldc sm_count offX offPacked rows cols blocksize dq offset
// (mode gemm32: the same arguments, run by cuda/gemm.cu's fp32 gemm_f32 (tile_gemm.cuh's SIMT
// kernel); nf4f32: by cuda/nf4_gemm.cu's nf4_gemm_nt_tiled / nf4_gemm_nn_tiled;
// mode gemv: the same arguments, run by cuda/nf4_gemv.cu's nf4_gemv_nt / nf4_gemv_nn; sm_count unused)
//   half DIR BF16(0|1) M N K ldx ldy offX offW  (cuda/ops_half_gemm.cu, linked as its own unit:
//   X.f32, W.u16 [N, K] fp16 or bf16 bits; Y = C.f32 on entry)
//   q8 DIR 0 M N K ldx ldy offX offW  (cuda/ops_q8_0_gemm.cu, its own unit: W.u16 holds the Q8_0 bytes)
// DIR holds A.f32 / B.f32 (nf4: X.f32, packed.u8, absmax.bin, nested.f32, map.f32) and C.f32 (C on
// entry); the result is written to DIR/out.f32. off*: the operand starts that many elements past a
// 64-byte boundary (misaligned starts take the element loaders).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gemm.cu"
#include "gemm_tc.cu"
#include "nf4_gemm.cu"
#include "nf4_gemm_tc.cu"
#include "nf4_gemv.cu"
#include "nf4_dequant.cuh"
#include "ops_half_gemm.cuh"
#include "ops_q8_0_gemm.cuh"

namespace {
std::vector<unsigned char> slurp(const std::string& path) {
  std::vector<unsigned char> v;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return v;
  unsigned char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) v.insert(v.end(), buf, buf + n);
  std::fclose(f);
  return v;
}
// The file's bytes `off` elements of `elem` bytes past a 64-byte boundary (kept alive in `keep`).
template <class T>
T* place(const std::string& path, int64_t off, std::vector<std::vector<unsigned char>>& keep) {
  const auto data = slurp(path);
  keep.emplace_back(data.size() + 64 + off * sizeof(T) + 64, 0);
  auto base = reinterpret_cast<uintptr_t>(keep.back().data());
  unsigned char* p = reinterpret_cast<unsigned char*>((base + 63) & ~uintptr_t{63}) + off * sizeof(T);
  if (!data.empty()) std::memcpy(p, data.data(), data.size());
  return reinterpret_cast<T*>(p);
}
}  // namespace

int main(int argc, char** argv) {
  using namespace qlora::cuda;
  if (argc < 3) return 2;
  const std::string mode = argv[1], dir = std::string(argv[2]) + "/";
  std::vector<std::vector<unsigned char>> keep;
  auto i64 = [&](int i) { return static_cast<int64_t>(std::atoll(argv[i])); };
  auto f32 = [&](int i) { return static_cast<float>(std::atof(argv[i])); };
  float* C = nullptr;
  size_t c_bytes = 0;
  if ((mode == "gemm" || mode == "gemm32") && argc == 16) {
    const std::string lay = argv[3];
    const GemmLayout layout = lay == "nt" ? GemmLayout::NT : lay == "nn" ? GemmLayout::NN : GemmLayout::TN;
    const float* A = place<float>(dir + "A.f32", i64(13), keep);
    const float* B = place<float>(dir + "B.f32", i64(14), keep);
    C = place<float>(dir + "C.f32", i64(15), keep);
    c_bytes = slurp(dir + "C.f32").size();
    if (!gemm_bf16_tc_fits(i64(4), i64(5))) return 3;
    (mode == "gemm" ? gemm_bf16_tc : gemm_f32)(nullptr, static_cast<int>(i64(12)), layout, i64(4), i64(5), i64(6), f32(7), A, i64(9), B, i64(10),
                 f32(8), C, i64(11));
  } else if ((mode == "nf4" || mode == "nf4f32" || mode == "gemv" || mode == "deq") && argc == 17) {
    qlora::Nf4Ref w;
    w.rows = i64(12), w.cols = i64(13), w.blocksize = static_cast<int>(i64(14)), w.double_quant = i64(15) != 0;
    w.offset = f32(16);
    w.packed = place<uint8_t>(dir + "packed.u8", i64(11), keep);
    w.absmax = place<uint8_t>(dir + "absmax.bin", 0, keep);
    w.nested_absmax = place<float>(dir + "nested.f32", 0, keep);
    w.nested_map = place<float>(dir + "map.f32", 0, keep);
    const float* X = place<float>(dir + "X.f32", i64(10), keep);
    C = place<float>(dir + "C.f32", 0, keep);
    c_bytes = slurp(dir + "C.f32").size();
    const std::string op = argv[3];
    if (mode == "deq")
      nf4_dequantize(nullptr, static_cast<int>(i64(9)), w, C);
    else if (mode == "gemv" && op == "nt")
      nf4_gemv_nt(nullptr, i64(4), f32(5), X, i64(7), w, f32(6), C, i64(8));
    else if (mode == "gemv")
      nf4_gemv_nn(nullptr, i64(4), f32(5), X, i64(7), w, f32(6), C, i64(8));
    else if (mode == "nf4f32" && op == "nt")
      nf4_gemm_nt_tiled(nullptr, static_cast<int>(i64(9)), i64(4), f32(5), X, i64(7), w, f32(6), C, i64(8));
    else if (mode == "nf4f32")
      nf4_gemm_nn_tiled(nullptr, static_cast<int>(i64(9)), i64(4), f32(5), X, i64(7), w, f32(6), C, i64(8));
    else if (op == "nt")
      nf4_gemm_nt_bf16_tc(nullptr, static_cast<int>(i64(9)), i64(4), f32(5), X, i64(7), w, f32(6), C, i64(8));
    else
      nf4_gemm_nn_bf16_tc(nullptr, static_cast<int>(i64(9)), i64(4), f32(5), X, i64(7), w, f32(6), C, i64(8));
  } else if ((mode == "half" || mode == "q8") && argc == 11) {
    const float* X = place<float>(dir + "X.f32", i64(9), keep);
    const uint16_t* W = place<uint16_t>(dir + "W.u16", i64(10), keep);
    C = place<float>(dir + "C.f32", 0, keep);
    c_bytes = slurp(dir + "C.f32").size();
    if (mode == "half")
      half_gemm_nt(nullptr, i64(3) != 0, i64(4), i64(5), i64(6), X, i64(7), W, C, i64(8));
    else
      q8_0_gemm_nt(nullptr, i64(4), i64(5), i64(6), X, i64(7), W, C, i64(8));
  } else {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  FILE* f = std::fopen((dir + "out.f32").c_str(), "wb");
  if (!f || std::fwrite(C, 1, c_bytes, f) != c_bytes) return 4;
  std::fclose(f);
  std::puts("DONE");
  return 0;
}
