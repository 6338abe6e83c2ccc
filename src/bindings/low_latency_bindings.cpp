// Python glue for the low-latency mode: the NVSHMEM runtime functions and LowLatencyContext
// (src/runtime/low_latency_context.h): its life cycle and control calls. Dispatch and combine
// are launched by the torch op layer (src/ops/), which receives the context's address.
#include <cuda_runtime.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "mpiep/errors.h"
#include "mpiep/low_latency.h"
#include "mpiep/test_stall.h"
#include "runtime/low_latency_context.h"
#include "runtime/nvshmem_runtime.h"

namespace py = pybind11;

namespace mpiep {

void bind_low_latency(py::module_& m) {
  // The buffer formulas (python/mpiep/config.py reads them from here where the core is built).
  m.attr("LOW_LATENCY_SIGNAL_BYTES") = ll::kSignalBytes;
  m.def(
      "low_latency_half_bytes",
      [](int hidden, int max_tokens, int num_experts) {
        return ll::half_bytes_needed(hidden, max_tokens, num_experts);
      },
      py::arg("hidden"), py::arg("max_tokens"), py::arg("num_experts"),
      "Bytes one of the two halves of the low-latency heap needs.");
  m.def(
      "nvshmem_get_unique_id", [] { return py::bytes(nvshmem_rt::get_unique_id()); },
      "A fresh NVSHMEM unique id (128 bytes); call on one rank and broadcast it.");
  m.def(
      "nvshmem_init",
      [](py::bytes uid, int rank, int size, int device, size_t heap_bytes) {
        nvshmem_rt::init(std::string(uid), rank, size, device, heap_bytes);
      },
      py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("device"),
      py::arg("heap_bytes"));
  m.def(
      "nvshmem_init_mpi",
      [](uint64_t mpi_comm, int rank, int size, int device, size_t heap_bytes) {
        nvshmem_rt::init_with_mpi_comm(mpi_comm, rank, size, device, heap_bytes);
      },
      py::arg("mpi_comm"), py::arg("rank"), py::arg("size"), py::arg("device"),
      py::arg("heap_bytes"),
      "Initialise NVSHMEM through its MPI bootstrap plugin on the MPI_Comm handle value.");
  m.def("nvshmem_bootstrap", &nvshmem_rt::bootstrap, "'uid', 'mpi', or '' before init.");
  m.def("nvshmem_initialized", &nvshmem_rt::initialized);
  m.def("nvshmem_my_pe", &nvshmem_rt::my_pe);
  m.def("nvshmem_n_pes", &nvshmem_rt::n_pes);
  m.def("nvshmem_barrier_all", &nvshmem_rt::barrier_all);
  m.def("nvshmem_finalize", &nvshmem_rt::finalize);
  m.attr("LL_SEND_PHASE") = static_cast<int>(ll::kSendPhase);
  m.attr("LL_RECV_PHASE") = static_cast<int>(ll::kRecvPhase);
  py::dict stall;  // python/mpiep/stall.py holds the same names and values
  stall["ll_dispatch_count"] = static_cast<int>(kStallLlDispatchCount);
  stall["ll_dispatch_data"] = static_cast<int>(kStallLlDispatchData);
  stall["ll_combine"] = static_cast<int>(kStallLlCombine);
  stall["dispatch"] = static_cast<int>(kStallDispatch);
  stall["combine"] = static_cast<int>(kStallCombine);
  m.attr("TEST_STALL_PHASES") = stall;

  py::class_<LowLatencyContext>(m, "LowLatencyContext")
      .def(py::init<int, size_t, bool, int, double>(), py::arg("device"), py::arg("heap_bytes"),
           py::arg("allow_nvlink"), py::arg("num_blocks"), py::arg("timeout_s"))
      .def("combine_send_buffer",
           [](const LowLatencyContext& ctx, int buffer, int hidden, int max_tokens,
              int num_experts) {
             return reinterpret_cast<uintptr_t>(
                 ctx.combine_send_buffer(buffer, hidden, max_tokens, num_experts));
           })
      .def("clean", &LowLatencyContext::clean)
      .def("quiet", &LowLatencyContext::quiet)
      .def("reset_signals", &LowLatencyContext::reset_signals)
      .def("enable_masking", &LowLatencyContext::enable_masking)
      .def_property_readonly("masking", &LowLatencyContext::masking)
      .def("set_active", &LowLatencyContext::set_active, py::arg("active"))
      .def_property_readonly("active", &LowLatencyContext::active)
      .def("set_test_stall", &LowLatencyContext::set_test_stall, py::arg("phases"))
      .def_property_readonly("test_stall", &LowLatencyContext::test_stall)
      .def("error",
           [](const LowLatencyContext& ctx) -> py::object {
             // None, or (rank, phase, peer, index, observed, expected) of the first timeout.
             auto e = ctx.error();
             if (!e) return py::none();
             return py::make_tuple(e->rank, e->phase, e->peer, e->index, e->observed, e->expected);
           })
      .def("settled_error",
           [](const LowLatencyContext& ctx) -> py::object {
             // Rank masking, at a combine's entry: as error(), once every survivor has it.
             auto e = ctx.settled_error();
             if (!e) return py::none();
             return py::make_tuple(e->rank, e->phase, e->peer, e->index, e->observed, e->expected);
           })
      .def("destroy", &LowLatencyContext::destroy)
      .def("set_timeout", &LowLatencyContext::set_timeout)
      .def_property_readonly("timeout_s", &LowLatencyContext::timeout_s)
      .def_property_readonly("num_blocks", &LowLatencyContext::num_blocks)
      .def_property_readonly("nvlink_peers", &LowLatencyContext::nvlink_peers)
      .def_property_readonly("half_bytes", &LowLatencyContext::half_bytes)
      .def_property_readonly(
          "heap",
          [](const LowLatencyContext& ctx) { return reinterpret_cast<uintptr_t>(ctx.heap()); })
      .def_property_readonly(
          "address", [](LowLatencyContext& ctx) { return reinterpret_cast<uintptr_t>(&ctx); });
}

}  // namespace mpiep
