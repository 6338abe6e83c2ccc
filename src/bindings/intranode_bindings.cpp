// Python bindings of the intranode normal mode: IntranodeRuntime (IPC buffer set-up and
// teardown, errors) and the row sizes. The launches go through the torch op layer
// (src/ops/), which receives the runtime's address.
#include <pybind11/stl.h>

#include "bindings.h"
#include "mpiep/intranode.h"
#include "runtime/intranode_runtime.h"

namespace py = pybind11;

namespace mpiep {
namespace {}  // namespace

void bind_intranode(py::module_& m) {
  using namespace intranode;
  m.attr("INTRANODE_CONTROL_BYTES") = kControlBytes;
  m.attr("INTRANODE_MAX_RANKS") = kMaxRanks;
  m.attr("INTRANODE_MAX_CHANNELS") = kMaxChannels;
  m.attr("INTRANODE_MAX_LOCAL_EXPERTS") = kMaxLocalExperts;
  m.def("intranode_dispatch_row_bytes", &dispatch_row_bytes, py::arg("hidden_bytes"),
        py::arg("num_scales"), py::arg("num_topk"));
  m.def("intranode_combine_row_bytes", &combine_row_bytes, py::arg("hidden"), py::arg("num_topk"));

  py::class_<IntranodeRuntime>(m, "IntranodeRuntime")
      .def(py::init<int, int, int, int64_t, double>(), py::arg("rank"), py::arg("num_ranks"),
           py::arg("device"), py::arg("num_nvl_bytes"), py::arg("timeout_s"))
      .def("export_handle", [](const IntranodeRuntime& r) { return py::bytes(r.export_handle()); })
      .def("open_peers",
           [](IntranodeRuntime& r, const std::vector<py::bytes>& handles) {
             std::vector<std::string> h;
             for (const auto& b : handles) h.emplace_back(b);
             r.open_peers(h);
           })
      .def("close_peers", &IntranodeRuntime::close_peers)
      .def("destroy", &IntranodeRuntime::destroy)
      .def_property_readonly("alive", &IntranodeRuntime::alive)
      .def_property_readonly("row_area_bytes", &IntranodeRuntime::row_area_bytes)
      .def("check_error", &IntranodeRuntime::check_error)
      .def("set_test_stall", &IntranodeRuntime::set_test_stall, py::arg("phases"))
      .def_property_readonly("test_stall", &IntranodeRuntime::test_stall)
      .def_property_readonly(
          "address", [](const IntranodeRuntime& r) { return reinterpret_cast<uintptr_t>(&r); });
}

}  // namespace mpiep
