// Each part of the core registers its Python functions through one of these,
// so that bindings.cpp stays a list and each feature keeps its glue beside it.
#pragma once

#include <pybind11/pybind11.h>

namespace mpiep {

void bind_runtime(pybind11::module_& m);      // src/runtime/runtime_bindings.cpp
void bind_intranode(pybind11::module_& m);    // src/kernels/intranode_bindings.cpp
void bind_low_latency(pybind11::module_& m);  // src/kernels/low_latency_bindings.cpp
void bind_internode(pybind11::module_& m);    // src/bindings/internode_bindings.cpp

}  // namespace mpiep
