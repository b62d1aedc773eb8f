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

// Throw ValueError with a message when cond is false. The const char* overload keeps checks in
// loops cheap: a literal converted to std::string would allocate on every call.
inline void check_arg(bool cond, const char* msg) {
  if (!cond) throw ValueError(msg);
}
inline void check_arg(bool cond, const std::string& msg) {
  if (!cond) throw ValueError(msg);
}

}  // namespace qlora
