// Python bindings of the internode normal mode: the size formulas that python/mpiep/config.py
// mirrors, and InternodeRuntime (set-up, teardown, errors). The launches go through the torch
// op layer (src/ops/), which receives the runtime's address.
#include <pybind11/stl.h>

#include "bindings.h"
#include "mpiep/internode.h"
#include "runtime/internode_runtime.h"

namespace py = pybind11;

namespace mpiep {
namespace {}  // namespace

void bind_internode(py::module_& m) {
  using namespace internode;
  m.attr("INTERNODE_NVL_CONTROL_BYTES") = kNvlControlBytes;
  m.attr("INTERNODE_MAX_LOCAL_RANKS") = kMaxLocalRanks;
  m.attr("INTERNODE_MAX_NODES") = kMaxNodes;
  m.attr("INTERNODE_MAX_LOCAL_EXPERTS") = kMaxLocalExperts;
  m.attr("INTERNODE_CHUNKS_PER_SOURCE") = kChunksPerSource;
  m.attr("INTERNODE_MAX_SMS") = kMaxSms;
  m.def(
      "internode_rdma_control_bytes",
      [](int num_ranks, int num_nodes) { return rdma_control_layout(num_ranks, num_nodes).total; },
      py::arg("num_ranks"), py::arg("num_nodes"));
  m.def("internode_rdma_dispatch_row_bytes", &rdma_dispatch_row_bytes, py::arg("hidden_bytes"),
        py::arg("num_scales"), py::arg("num_topk"), py::arg("local_ranks"));
  m.def("internode_nvl_dispatch_row_bytes", &nvl_dispatch_row_bytes, py::arg("hidden_bytes"),
        py::arg("num_scales"), py::arg("num_topk"));
  m.def("internode_combine_row_bytes", &combine_row_bytes, py::arg("hidden"), py::arg("num_topk"));
  m.def(
      "internode_table_size",
      [](int num_ranks, int num_nodes, int local_ranks) {
        return table_layout(num_ranks, num_nodes, local_ranks).total;
      },
      py::arg("num_ranks"), py::arg("num_nodes"), py::arg("local_ranks"));

  py::class_<InternodeRuntime>(m, "InternodeRuntime")
      .def(py::init<int, int, int, int, int64_t, int64_t, double, bool>(), py::arg("rank"),
           py::arg("num_ranks"), py::arg("local_ranks"), py::arg("device"),
           py::arg("num_nvl_bytes"), py::arg("num_rdma_bytes"), py::arg("timeout_s"),
           py::arg("force_puts"))
      .def("export_handle", [](const InternodeRuntime& r) { return py::bytes(r.export_handle()); })
      .def("open_peers",
           [](InternodeRuntime& r, const std::vector<py::bytes>& handles) {
             std::vector<std::string> h;
             for (const auto& b : handles) h.emplace_back(b);
             r.open_peers(h);
           })
      .def("has_unmapped_rdma_peer", &InternodeRuntime::has_unmapped_rdma_peer)
      .def("set_staged", &InternodeRuntime::set_staged)
      .def_property_readonly("staged", &InternodeRuntime::staged)
      .def("close_peers", &InternodeRuntime::close_peers)
      .def("destroy", &InternodeRuntime::destroy)
      .def_property_readonly("alive", &InternodeRuntime::alive)
      .def_property_readonly("nvl_row_bytes", &InternodeRuntime::nvl_row_bytes)
      .def_property_readonly("rdma_data_bytes", &InternodeRuntime::rdma_data_bytes)
      .def("check_error", &InternodeRuntime::check_error)
      .def("set_test_stall", &InternodeRuntime::set_test_stall, py::arg("phases"))
      .def_property_readonly("test_stall", &InternodeRuntime::test_stall)
      .def_property_readonly(
          "address", [](const InternodeRuntime& r) { return reinterpret_cast<uintptr_t>(&r); });
}

}  // namespace mpiep
