// Overflow-checked size arithmetic for sizes computed from user input or file contents: a product
// that wraps would allocate a tiny buffer that later writes run past.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/error.hpp"

namespace qlora {

// The product of non-negative factors; ValueError naming `what` when one is negative or the
// product exceeds int64.
inline int64_t checked_mul(std::initializer_list<int64_t> factors, const std::string& what) {
  int64_t p = 1;
  for (int64_t f : factors) {
    check_arg(f >= 0, what + ": negative size factor " + std::to_string(f));
    if (__builtin_mul_overflow(p, f, &p)) throw ValueError(what + ": size overflows 64-bit integers");
  }
  return p;
}

}  // namespace qlora
