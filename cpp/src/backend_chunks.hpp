// The widening scratch of the chunked backend defaults over row formats (backend_q8.cpp: Q8_0,
// backend_half.cpp: fp16 / bf16): ids 0..nc-1 and nc fp32 rows in the backend's memory, freed after
// the backend finished with them.
#pragma once
#include <algorithm>
#include <vector>

#include "backend.hpp"

namespace qlora {

struct RowChunks {
  Backend& be;
  int64_t nc;
  void* ids = nullptr;   // int32 [nc]: 0..nc-1
  void* rows = nullptr;  // fp32 [nc, K]
  RowChunks(Backend& b, int64_t N, int64_t chunk, int64_t K) : be(b), nc(std::min(N, chunk)) {
    ids = be.alloc(static_cast<size_t>(nc) * sizeof(int32_t));
    try {
      rows = be.alloc(static_cast<size_t>(nc) * static_cast<size_t>(K) * sizeof(float));
      std::vector<int32_t> iota(static_cast<size_t>(nc));
      for (int64_t i = 0; i < nc; ++i) iota[i] = static_cast<int32_t>(i);
      be.upload(ids, iota.data(), iota.size() * sizeof(int32_t));
      be.synchronize();  // before `iota` goes
    } catch (...) {
      release();
      throw;
    }
  }
  RowChunks(const RowChunks&) = delete;
  RowChunks& operator=(const RowChunks&) = delete;
  ~RowChunks() {
    try {
      be.synchronize();
    } catch (...) {  // already failing: the memory is still given back
    }
    release();
  }
  void release() {
    if (rows) be.free(rows);
    if (ids) be.free(ids);
    rows = ids = nullptr;
  }
};

}  // namespace qlora
