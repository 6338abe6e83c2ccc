// mpiep._ops: the torch op layer, one native entry per operation. Built against torch's own
// pybind11 (torch/extension.h) as a module of its own, so that the core mpiep._C stays
// torch-free; the runtime objects of mpiep._C arrive as addresses (their `address`
// property) and are called directly (their classes are exported from mpiep._C).
//
// Every entry releases the GIL while it checks, allocates, waits for the notify counts and
// launches. Errors of the core become mpiep's Python exceptions (set_error_types).
#include <torch/extension.h>

#include "mpiep/errors.h"
#include "ops/low_latency_ops.h"
#include "ops/normal_ops.h"
#include "ops/reference_cpu_ops.h"
#include "runtime/stream_hop.h"

namespace py = pybind11;
using namespace mpiep::ops;

namespace {

PyObject* g_timeout_error = PyExc_TimeoutError;
PyObject* g_capacity_error = PyExc_ValueError;

py::object opt(const OptTensor& t) { return t ? py::cast(*t) : py::none(); }

py::tuple dispatch_tuple(const DispatchOut& o) {
  return py::make_tuple(o.recv_x, opt(o.recv_scales), opt(o.recv_topk_idx),
                        opt(o.recv_topk_weights), o.recv_src_idx, o.num_recv, o.expert_counts,
                        o.state, o.host_counts, o.recv_per_src);
}

Routing routing_of(const OptTensor& per_rank, const OptTensor& per_node,
                   const OptTensor& per_expert, const OptTensor& in_rank,
                   const std::vector<at::Tensor>& state, const std::vector<int>& host_counts,
                   int64_t cached_rows) {
  Routing r;
  r.num_tokens_per_rank = per_rank;
  r.num_tokens_per_rdma_rank = per_node;
  r.num_tokens_per_expert = per_expert;
  r.is_token_in_rank = in_rank;
  r.state = state;
  r.host_counts = host_counts;
  r.cached_rows = cached_rows;
  return r;
}

}  // namespace

PYBIND11_MODULE(_ops, m) {
  m.doc() = "mpiep torch op layer: one native call per operation (see src/ops/)";
  m.attr("ABI") = 1;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mpiep::Error& e) {
      switch (e.code()) {
        case mpiep::ErrorCode::kTimeout:
          PyErr_SetString(g_timeout_error, e.what());
          break;
        case mpiep::ErrorCode::kCapacity:
          PyErr_SetString(g_capacity_error, e.what());
          break;
        case mpiep::ErrorCode::kInvalidArgument:
          PyErr_SetString(PyExc_ValueError, e.what());
          break;
        case mpiep::ErrorCode::kType:
          PyErr_SetString(PyExc_TypeError, e.what());
          break;
        default:
          PyErr_SetString(PyExc_RuntimeError, e.what());
      }
    }
  });
  m.def(
      "set_error_types",
      [](py::object timeout, py::object capacity) {
        g_timeout_error = timeout.release().ptr();
        g_capacity_error = capacity.release().ptr();
      },
      "The Python classes raised for peer timeouts and capacity errors.");

  // The comm-stream hop of normal mode (runtime/stream_hop.h): made once per engine, passed
  // to every normal-mode op by address; freed after the last op that uses it.
  m.def(
      "make_stream_hop",
      [](int64_t comm_stream) {
        return reinterpret_cast<int64_t>(
            new mpiep::StreamHop(reinterpret_cast<cudaStream_t>(comm_stream)));
      },
      "A comm-stream hop for the normal-mode ops (the stream's cudaStream_t as an int).");
  m.def("free_stream_hop",
        [](int64_t address) { delete reinterpret_cast<mpiep::StreamHop*>(address); });
  m.def(
      "layout",
      [](const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t ranks_per_node,
         int64_t hop) {
        py::gil_scoped_release nogil;
        return layout(topk_idx, num_experts, num_ranks, ranks_per_node, hop);
      },
      py::arg("topk_idx"), py::arg("num_experts"), py::arg("num_ranks"), py::arg("ranks_per_node"),
      py::arg("hop"));

  m.def(
      "ll_dispatch",
      [](int64_t ctx, const at::Tensor& x, const at::Tensor& topk_idx, int64_t max_tokens,
         int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
         const OptTensor& stats, int64_t buffer, int64_t phases) {
        LowLatencyDispatchOut o;
        {
          py::gil_scoped_release nogil;
          o = ll_dispatch(ctx, x, topk_idx, max_tokens, num_experts, use_fp8, round_scale,
                          use_ue8m0, stats, buffer, phases);
        }
        return py::make_tuple(o.recv_x, opt(o.recv_scales), o.recv_count, o.src_token_idx,
                              o.layout_range);
      },
      py::arg("ctx"), py::arg("x"), py::arg("topk_idx"), py::arg("max_tokens"),
      py::arg("num_experts"), py::arg("use_fp8"), py::arg("round_scale"), py::arg("use_ue8m0"),
      py::arg("stats"), py::arg("buffer"), py::arg("phases"));

  m.def("ll_num_ranks", &ll_num_ranks, py::arg("ctx"),
        "The rank count of a low-latency context (the torch custom op's shapes need it).");

  m.def("ll_dispatch_receive",
        [](int64_t ctx, const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& recv_x,
           const OptTensor& recv_scales, const at::Tensor& recv_count,
           const at::Tensor& src_token_idx, const at::Tensor& layout_range, int64_t max_tokens,
           int64_t num_experts, bool use_fp8, bool round_scale, bool use_ue8m0,
           const OptTensor& stats, int64_t buffer) {
          py::gil_scoped_release nogil;
          const LowLatencyDispatchOut outputs{recv_x, recv_scales, recv_count, src_token_idx,
                                              layout_range};
          ll_dispatch_receive(ctx, x, topk_idx, outputs, max_tokens, num_experts, use_fp8,
                              round_scale, use_ue8m0, stats, buffer);
        });

  m.def(
      "ll_combine",
      [](int64_t ctx, const at::Tensor& y, const at::Tensor& topk_idx,
         const at::Tensor& topk_weights, const at::Tensor& src_token_idx,
         const at::Tensor& layout_range, const OptTensor& out, int64_t hidden, int64_t max_tokens,
         int64_t num_experts, bool zero_copy, int64_t buffer, int64_t phases) {
        py::gil_scoped_release nogil;
        return ll_combine(ctx, y, topk_idx, topk_weights, src_token_idx, layout_range, out, hidden,
                          max_tokens, num_experts, zero_copy, buffer, phases);
      },
      py::arg("ctx"), py::arg("y"), py::arg("topk_idx"), py::arg("topk_weights"),
      py::arg("src_token_idx"), py::arg("layout_range"), py::arg("out"), py::arg("hidden"),
      py::arg("max_tokens"), py::arg("num_experts"), py::arg("zero_copy"), py::arg("buffer"),
      py::arg("phases"));

  // Normal mode. Returns (recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
  // recv_src_idx, num_recv (-1 with num_worst_tokens), expert_counts, state, host_counts,
  // recv_per_src (rows from each rank: a view of the count matrix on the GPU)).
  m.def("intranode_dispatch",
        [](int64_t rt, const at::Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
           const OptTensor& topk_weights, const OptTensor& per_rank, const OptTensor& per_expert,
           const OptTensor& in_rank, const std::vector<at::Tensor>& state,
           const std::vector<int>& host_counts, int64_t cached_rows, int64_t num_experts,
           int64_t expert_alignment, int64_t num_worst_tokens, int64_t num_sms, int64_t hop) {
          DispatchOut o;
          {
            py::gil_scoped_release nogil;
            const Routing r = routing_of(per_rank, std::nullopt, per_expert, in_rank, state,
                                         host_counts, cached_rows);
            o = intranode_dispatch(rt, x, x_scales, topk_idx, topk_weights, r, num_experts,
                                   expert_alignment, num_worst_tokens, num_sms, hop);
          }
          return dispatch_tuple(o);
        });
  m.def("intranode_combine",
        [](int64_t rt, const at::Tensor& x, const OptTensor& topk_weights,
           const at::Tensor& recv_src_idx, const std::vector<at::Tensor>& state,
           const std::vector<int>& host_counts, const OptTensor& bias0, const OptTensor& bias1,
           int64_t num_tokens, int64_t num_sms, int64_t hop) {
          py::gil_scoped_release nogil;
          return intranode_combine(rt, x, topk_weights, recv_src_idx, state, host_counts, bias0,
                                   bias1, num_tokens, num_sms, hop);
        });
  m.def("internode_dispatch",
        [](int64_t rt, const at::Tensor& x, const OptTensor& x_scales, const OptTensor& topk_idx,
           const OptTensor& topk_weights, const OptTensor& per_rank, const OptTensor& per_node,
           const OptTensor& per_expert, const OptTensor& in_rank,
           const std::vector<at::Tensor>& state, const std::vector<int>& host_counts,
           int64_t cached_rows, int64_t num_experts, int64_t expert_alignment,
           int64_t num_worst_tokens, int64_t num_sms, int64_t chunk, int64_t hop) {
          DispatchOut o;
          {
            py::gil_scoped_release nogil;
            const Routing r = routing_of(per_rank, per_node, per_expert, in_rank, state,
                                         host_counts, cached_rows);
            o = internode_dispatch(rt, x, x_scales, topk_idx, topk_weights, r, num_experts,
                                   expert_alignment, num_worst_tokens, num_sms, chunk, hop);
          }
          return dispatch_tuple(o);
        });
  m.def("internode_combine",
        [](int64_t rt, const at::Tensor& x, const OptTensor& topk_weights,
           const std::vector<at::Tensor>& state, const std::vector<int>& host_counts,
           const OptTensor& bias0, const OptTensor& bias1, int64_t num_tokens, int64_t num_sms,
           int64_t chunk, int64_t hop) {
          py::gil_scoped_release nogil;
          return internode_combine(rt, x, topk_weights, state, host_counts, bias0, bias1,
                                   num_tokens, num_sms, chunk, hop);
        });

  // The reference backend's fused CPU kernels (backends/reference/fused.py picks them).
  m.def(
      "reference_gather_sum",
      [](const at::Tensor& rows, const at::Tensor& idx, const at::Tensor& out,
         const OptTensor& weights, const std::vector<at::Tensor>& bias) {
        py::gil_scoped_release nogil;
        reference_gather_sum(rows, idx, out, weights, bias);
      },
      py::arg("rows"), py::arg("idx"), py::arg("out"), py::arg("weights"), py::arg("bias"));
  m.def(
      "reference_cast_to_fp8",
      [](const at::Tensor& x, bool round_scale, bool use_ue8m0) {
        py::gil_scoped_release nogil;
        return reference_cast_to_fp8(x, round_scale, use_ue8m0);
      },
      py::arg("x"), py::arg("round_scale"), py::arg("use_ue8m0"));
}
