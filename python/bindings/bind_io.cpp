// Placeholder: the io work replaces this file.
#include "bindings.hpp"

namespace qlora::py_bind {
void bind_io(py::module_& m) { m.def_submodule("io"); }
}  // namespace qlora::py_bind
