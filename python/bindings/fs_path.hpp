// FsPath: the type of every _core parameter that names a file or directory, so that all of them take
// what Python's open() takes, by one rule (os.fsencode's): str (encoded with the file system
// encoding and its error handler, surrogateescape on POSIX: the str os.listdir / os.fsdecode give
// for a name whose bytes are not UTF-8 becomes those bytes again), bytes (as they are) and
// os.PathLike. Anything else is a TypeError; an embedded NUL is a ValueError (C would cut the name
// there and open another file). qlora_native.fspath.core_path is this rule (_core.fs_path).
#pragma once
#include <pybind11/pybind11.h>

#include <string>

#include "bindings.hpp"

namespace qlora::py_bind {

struct FsPath {
  std::string bytes;  // the name as the OS takes it
  operator const std::string&() const { return bytes; }
};

// The bytes of a path object by the rule above (module.cpp); raises TypeError / ValueError.
std::string fs_path_bytes(py::handle obj);

}  // namespace qlora::py_bind

namespace pybind11::detail {
template <>
struct type_caster<qlora::py_bind::FsPath> {
  PYBIND11_TYPE_CASTER(qlora::py_bind::FsPath, const_name("str | bytes | os.PathLike"));
  // Throws rather than returning false: a path of the wrong kind gets Python's own message, not
  // pybind11's "incompatible function arguments" (no binding overloads a path parameter).
  bool load(handle src, bool) {
    value.bytes = qlora::py_bind::fs_path_bytes(src);
    return true;
  }
  static handle cast(const qlora::py_bind::FsPath& p, return_value_policy, handle) {
    return qlora::py_bind::fs_text(p.bytes).release();  // as os.fsdecode gives it
  }
};
}  // namespace pybind11::detail
