// Placeholder: the ops work replaces this file.
#include "bindings.hpp"

namespace qlora::py_bind {
void bind_ops(py::module_& m) { m.def_submodule("ops"); }
}  // namespace qlora::py_bind
