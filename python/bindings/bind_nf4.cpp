// Placeholder: the nf4 work replaces this file.
#include "bindings.hpp"

namespace qlora::py_bind {
void bind_nf4(py::module_& m) { m.def_submodule("nf4"); }
}  // namespace qlora::py_bind
