// Python bindings of the internode normal mode: the layout kernel, the size formulas that
// python/mpiep/config.py mirrors, and InternodeRuntime. Tensors arrive as device pointers.
#include <pybind11/stl.h>

#include "bindings.h"
#include "mpiep/internode.h"
#include "runtime/internode_runtime.h"

namespace py = pybind11;

namespace mpiep {
namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

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

  m.def(
      "internode_layout",
      [](uintptr_t topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
         int local_ranks, uintptr_t per_rank, uintptr_t per_node, uintptr_t per_expert,
         uintptr_t in_rank, uintptr_t stream) {
        LayoutArgs a{};
        a.topk_idx = ptr<const int64_t>(topk_idx);
        a.num_tokens = num_tokens;
        a.num_topk = num_topk;
        a.num_experts = num_experts;
        a.num_ranks = num_ranks;
        a.local_ranks = local_ranks;
        a.num_tokens_per_rank = ptr<int>(per_rank);
        a.num_tokens_per_rdma_rank = ptr<int>(per_node);
        a.num_tokens_per_expert = ptr<int>(per_expert);
        a.is_token_in_rank = ptr<bool>(in_rank);
        launch_layout(a, stream_of(stream));
      },
      py::arg("topk_idx"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("num_experts"),
      py::arg("num_ranks"), py::arg("local_ranks"), py::arg("num_tokens_per_rank"),
      py::arg("num_tokens_per_rdma_rank"), py::arg("num_tokens_per_expert"),
      py::arg("is_token_in_rank"), py::arg("stream"));

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
      .def(
          "notify",
          [](InternodeRuntime& r, uintptr_t per_rank, uintptr_t per_node, uintptr_t per_expert,
             uintptr_t in_rank, int num_tokens, int num_experts, int expert_alignment,
             uintptr_t send_slot, uintptr_t node_slot, uintptr_t node_token, uintptr_t counts,
             uintptr_t tables, uintptr_t stream) {
            NotifyArgs a{};
            a.num_tokens_per_rank = ptr<const int>(per_rank);
            a.num_tokens_per_rdma_rank = ptr<const int>(per_node);
            a.num_tokens_per_expert = ptr<const int>(per_expert);
            a.is_token_in_rank = ptr<const bool>(in_rank);
            a.num_tokens = num_tokens;
            a.num_experts = num_experts;
            a.expert_alignment = expert_alignment;
            a.send_slot = ptr<int>(send_slot);
            a.node_slot = ptr<int>(node_slot);
            a.node_token = ptr<int>(node_token);
            a.counts = ptr<int>(counts);
            a.tables = ptr<int>(tables);
            return r.notify(a, stream_of(stream));
          },
          py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_rdma_rank"),
          py::arg("num_tokens_per_expert"), py::arg("is_token_in_rank"), py::arg("num_tokens"),
          py::arg("num_experts"), py::arg("expert_alignment"), py::arg("send_slot"),
          py::arg("node_slot"), py::arg("node_token"), py::arg("counts"), py::arg("tables"),
          py::arg("stream"))
      .def(
          "wait_notify",
          [](const InternodeRuntime& r, int64_t token, uintptr_t stream) {
            py::gil_scoped_release release;
            r.wait_notify(token, stream_of(stream));
          },
          py::arg("token"), py::arg("stream"))
      .def("status", &InternodeRuntime::status)
      .def("recv_per_expert", &InternodeRuntime::recv_per_expert, py::arg("num_local_experts"))
      .def(
          "dispatch",
          [](InternodeRuntime& r, uintptr_t x, uintptr_t x_scales, uintptr_t topk_idx,
             uintptr_t topk_weights, uintptr_t send_slot, uintptr_t node_token, uintptr_t counts,
             uintptr_t tables, int num_tokens, int hidden_bytes, int num_scales, int num_topk,
             int num_local_experts, int chunk, uintptr_t fwd_pos, uintptr_t recv_x,
             uintptr_t recv_scales, uintptr_t recv_topk_idx, uintptr_t recv_topk_weights,
             uintptr_t recv_src_idx, int num_out_rows, bool worst, int num_blocks,
             uintptr_t stream) {
            DispatchArgs a{};
            a.x = ptr<const void>(x);
            a.x_scales = ptr<const float>(x_scales);
            a.topk_idx = ptr<const int64_t>(topk_idx);
            a.topk_weights = ptr<const float>(topk_weights);
            a.send_slot = ptr<const int>(send_slot);
            a.node_token = ptr<const int>(node_token);
            a.counts = ptr<const int>(counts);
            a.tables = ptr<const int>(tables);
            a.num_tokens = num_tokens;
            a.hidden_bytes = hidden_bytes;
            a.num_scales = num_scales;
            a.num_topk = num_topk;
            a.num_local_experts = num_local_experts;
            a.chunk = chunk;
            a.fwd_pos = ptr<int>(fwd_pos);
            a.recv_x = ptr<void>(recv_x);
            a.recv_scales = ptr<float>(recv_scales);
            a.recv_topk_idx = ptr<int64_t>(recv_topk_idx);
            a.recv_topk_weights = ptr<float>(recv_topk_weights);
            a.recv_src_idx = ptr<int>(recv_src_idx);
            a.num_out_rows = num_out_rows;
            a.worst = worst ? 1 : 0;
            a.num_blocks = num_blocks;
            r.dispatch(a, stream_of(stream));
          },
          py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"),
          py::arg("send_slot"), py::arg("node_token"), py::arg("counts"), py::arg("tables"),
          py::arg("num_tokens"), py::arg("hidden_bytes"), py::arg("num_scales"),
          py::arg("num_topk"), py::arg("num_local_experts"), py::arg("chunk"),
          py::arg("fwd_pos"), py::arg("recv_x"), py::arg("recv_scales"),
          py::arg("recv_topk_idx"), py::arg("recv_topk_weights"), py::arg("recv_src_idx"),
          py::arg("num_out_rows"), py::arg("worst"), py::arg("num_blocks"), py::arg("stream"))
      .def(
          "combine",
          [](InternodeRuntime& r, uintptr_t x, uintptr_t topk_weights, uintptr_t node_slot,
             uintptr_t fwd_pos, uintptr_t counts, uintptr_t tables, uintptr_t bias0,
             uintptr_t bias1, int num_tokens, int hidden, int num_topk, int chunk, uintptr_t out,
             uintptr_t out_weights, int num_blocks, uintptr_t stream) {
            CombineArgs a{};
            a.x = ptr<const void>(x);
            a.topk_weights = ptr<const float>(topk_weights);
            a.node_slot = ptr<const int>(node_slot);
            a.fwd_pos = ptr<const int>(fwd_pos);
            a.counts = ptr<const int>(counts);
            a.tables = ptr<const int>(tables);
            a.bias0 = ptr<const void>(bias0);
            a.bias1 = ptr<const void>(bias1);
            a.num_tokens = num_tokens;
            a.hidden = hidden;
            a.num_topk = num_topk;
            a.chunk = chunk;
            a.out = ptr<void>(out);
            a.out_weights = ptr<float>(out_weights);
            a.num_blocks = num_blocks;
            r.combine(a, stream_of(stream));
          },
          py::arg("x"), py::arg("topk_weights"), py::arg("node_slot"), py::arg("fwd_pos"),
          py::arg("counts"), py::arg("tables"), py::arg("bias0"), py::arg("bias1"),
          py::arg("num_tokens"), py::arg("hidden"), py::arg("num_topk"), py::arg("chunk"),
          py::arg("out"), py::arg("out_weights"), py::arg("num_blocks"), py::arg("stream"));
}

}  // namespace mpiep
