// Runtime queries. The CUDA IPC buffer and host-mapped counters are added here
// by the intranode work; NVSHMEM by the low-latency work.
#include <cuda_runtime.h>

#include "bindings.h"
#include "mpiep/errors.h"

namespace py = pybind11;

namespace mpiep {

void bind_runtime(py::module_& m) {
  m.def("cuda_runtime_version", [] {
    int version = 0;
    MPIEP_CUDA_CHECK(cudaRuntimeGetVersion(&version));
    return version;
  });
  m.def(
      "device_count",
      [] {
        int count = 0;
        cudaError_t err = cudaGetDeviceCount(&count);
        return err == cudaSuccess ? count : 0;
      },
      "Number of CUDA devices visible (0 when no driver is present).");
}

}  // namespace mpiep
