#include "bindings.h"

namespace mpiep {
void bind_low_latency(pybind11::module_& m) { (void)m; }
}  // namespace mpiep
