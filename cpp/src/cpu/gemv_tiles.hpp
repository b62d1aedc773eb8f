// The output loop shared by the GEMV kernels (fp32 and Q8_0, AVX2 and AVX-512). Include only from
// *_avx2.cpp / *_avx512.cpp kernel files: everything has internal linkage (cpu/README.md).
#pragma once
#include <cstdint>

namespace qlora::cpu {
namespace {

// Accumulators per row of X, padded to a power of two so slot j * P + m of a reduction holds
// output column j of row m.
constexpr int pow2_at_least(int m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8; }

// Output columns [n0, n1) of M rows in tiles of 16: dots_j(n, out) fills out[j * P + m] for
// columns n .. n + J - 1, dots_1(n, out) column n alone (a last tile's remainder), and
// store(m, nt, row, nn) writes tile row m (nn values) to columns [nt, nt + nn). Results go through
// the tile, written out a cache line per row: storing one float per row per column hits M lines
// that often share an L1 set (the row stride is a vocabulary size, a multiple of 4 KiB), and the
// streamed weight evicts them.
template <int M, int P, int J, class DotsJ, class Dots1, class Store>
inline __attribute__((always_inline)) void gemv_tiles(int64_t n0, int64_t n1, float* out, DotsJ dots_j,
                                                      Dots1 dots_1, Store store) {
  constexpr int64_t kTile = 16;
  alignas(64) float tile[M][kTile];
  for (int64_t nt = n0; nt < n1; nt += kTile) {
    const int64_t nn = n1 - nt < kTile ? n1 - nt : kTile;
    int64_t j = 0;
    for (; j + J <= nn; j += J) {
      dots_j(nt + j, out);
      for (int jj = 0; jj < J; ++jj)
        for (int m = 0; m < M; ++m) tile[m][j + jj] = out[jj * P + m];
    }
    for (; j < nn; ++j) {
      dots_1(nt + j, out);
      for (int m = 0; m < M; ++m) tile[m][j] = out[m];
    }
    for (int m = 0; m < M; ++m) store(m, nt, tile[m], nn);
  }
}

}  // namespace
}  // namespace qlora::cpu
