// A grow-only 64-byte aligned scratch buffer, one per thread and purpose (thread_local): the bf16
// micro-kernels load their panels with aligned loads, and a decode or training step calls them
// often enough that a fresh allocation per call shows. Contents are not kept across a growth.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace qlora::cpu {

struct AlignedScratch {
  void* p = nullptr;
  size_t n = 0;  // bytes allocated (a multiple of 64)
  AlignedScratch() = default;
  AlignedScratch(const AlignedScratch&) = delete;
  AlignedScratch& operator=(const AlignedScratch&) = delete;
  ~AlignedScratch() { std::free(p); }
  // At least count T's, 64-byte aligned.
  template <class T>
  T* get(size_t count) {
    const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    if (bytes > n) {
      std::free(p);
      p = std::aligned_alloc(64, bytes);
      if (!p) {
        n = 0;
        throw std::bad_alloc();
      }
      n = bytes;
    }
    return static_cast<T*>(p);
  }
};

}  // namespace qlora::cpu
