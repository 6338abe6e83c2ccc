// The mpiep._C module: torch-free entry points taking device pointers (as
// integers), sizes and CUDA stream handles. The Python layer owns tensors.
#include "bindings.h"
#include "mpiep/errors.h"
#include "mpiep/version.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mpiep compiled core (CUDA kernels, CUDA IPC and NVSHMEM runtime)";
  m.attr("version") = py::make_tuple(MPIEP_VERSION_MAJOR, MPIEP_VERSION_MINOR, MPIEP_VERSION_PATCH);

  static py::exception<mpiep::Error> error_type(m, "CoreError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mpiep::Error& e) {
      if (e.code() == mpiep::ErrorCode::kTimeout) {
        PyErr_SetString(PyExc_TimeoutError, e.what());
      } else if (e.code() == mpiep::ErrorCode::kInvalidArgument ||
                 e.code() == mpiep::ErrorCode::kCapacity) {
        PyErr_SetString(PyExc_ValueError, e.what());
      } else {
        error_type(e.what());
      }
    }
  });

  mpiep::bind_runtime(m);
  mpiep::bind_intranode(m);
  mpiep::bind_low_latency(m);
  mpiep::bind_internode(m);
}
