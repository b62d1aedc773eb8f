// Exception types of the engine. The Python bindings map them to Python exceptions:
//   ValueError (bad argument, shape, dtype, non-finite data) -> ValueError
//   FormatError (corrupt / truncated / malformed file)      -> qlora_native.FormatError (a ValueError)
//   std::runtime_error (I/O, CUDA, internal)               -> RuntimeError
#pragma once
#include <stdexcept>
#include <string>

namespace qlora {

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct FormatError : ValueError {
  using ValueError::ValueError;
};

// Throw ValueError with a message when cond is false.
inline void check_arg(bool cond, const std::string& msg) {
  if (!cond) throw ValueError(msg);
}

}  // namespace qlora
