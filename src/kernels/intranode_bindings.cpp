// Python bindings of the intranode normal mode: the layout kernel and IntranodeRuntime
// (IPC buffer, notify / dispatch / combine). Tensors arrive as device pointers (ints).
#include <pybind11/stl.h>

#include "bindings.h"
#include "mpiep/intranode.h"
#include "runtime/intranode_runtime.h"

namespace py = pybind11;

namespace mpiep {
namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void bind_intranode(py::module_& m) {
  using namespace intranode;
  m.attr("INTRANODE_CONTROL_BYTES") = kControlBytes;
  m.attr("INTRANODE_MAX_RANKS") = kMaxRanks;
  m.attr("INTRANODE_MAX_CHANNELS") = kMaxChannels;
  m.attr("INTRANODE_MAX_LOCAL_EXPERTS") = kMaxLocalExperts;
  m.def("intranode_dispatch_row_bytes", &dispatch_row_bytes, py::arg("hidden_bytes"),
        py::arg("num_scales"), py::arg("num_topk"));
  m.def("intranode_combine_row_bytes", &combine_row_bytes, py::arg("hidden"), py::arg("num_topk"));

  m.def(
      "intranode_layout",
      [](uintptr_t topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
         uintptr_t per_rank, uintptr_t per_expert, uintptr_t in_rank, uintptr_t stream) {
        LayoutArgs a{ptr<const int64_t>(topk_idx),
                     num_tokens,
                     num_topk,
                     num_experts,
                     num_ranks,
                     ptr<int>(per_rank),
                     ptr<int>(per_expert),
                     ptr<bool>(in_rank)};
        launch_layout(a, stream_of(stream));
      },
      py::arg("topk_idx"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("num_experts"),
      py::arg("num_ranks"), py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_expert"),
      py::arg("is_token_in_rank"), py::arg("stream"));

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
      .def(
          "notify",
          [](IntranodeRuntime& r, uintptr_t num_tokens_per_rank, uintptr_t num_tokens_per_expert,
             uintptr_t is_token_in_rank, int num_tokens, int num_experts, int expert_alignment,
             uintptr_t send_slot, uintptr_t count_matrix, uintptr_t stream) {
            NotifyArgs a{};
            a.num_tokens_per_rank = ptr<const int>(num_tokens_per_rank);
            a.num_tokens_per_expert = ptr<const int>(num_tokens_per_expert);
            a.is_token_in_rank = ptr<const bool>(is_token_in_rank);
            a.num_tokens = num_tokens;
            a.num_experts = num_experts;
            a.expert_alignment = expert_alignment;
            a.send_slot = ptr<int>(send_slot);
            a.count_matrix = ptr<int>(count_matrix);
            return r.notify(a, stream_of(stream));
          },
          py::arg("num_tokens_per_rank"), py::arg("num_tokens_per_expert"),
          py::arg("is_token_in_rank"), py::arg("num_tokens"), py::arg("num_experts"),
          py::arg("expert_alignment"), py::arg("send_slot"), py::arg("count_matrix"),
          py::arg("stream"))
      .def(
          "wait_notify",
          [](const IntranodeRuntime& r, int64_t token, uintptr_t stream) {
            py::gil_scoped_release release;
            r.wait_notify(token, stream_of(stream));
          },
          py::arg("token"), py::arg("stream"))
      .def("count_matrix", &IntranodeRuntime::count_matrix)
      .def("recv_per_expert", &IntranodeRuntime::recv_per_expert, py::arg("num_local_experts"))
      .def(
          "dispatch",
          [](IntranodeRuntime& r, uintptr_t x, uintptr_t x_scales, uintptr_t topk_idx,
             uintptr_t topk_weights, uintptr_t send_slot, uintptr_t count_matrix, int num_tokens,
             int hidden_bytes, int num_scales, int num_topk, int num_local_experts,
             uintptr_t recv_x, uintptr_t recv_scales, uintptr_t recv_topk_idx,
             uintptr_t recv_topk_weights, uintptr_t recv_src_idx, int num_out_rows, bool worst,
             int num_channels, uintptr_t stream) {
            DispatchArgs a{};
            a.x = ptr<const void>(x);
            a.x_scales = ptr<const float>(x_scales);
            a.topk_idx = ptr<const int64_t>(topk_idx);
            a.topk_weights = ptr<const float>(topk_weights);
            a.send_slot = ptr<const int>(send_slot);
            a.count_matrix = ptr<const int>(count_matrix);
            a.num_tokens = num_tokens;
            a.hidden_bytes = hidden_bytes;
            a.num_scales = num_scales;
            a.num_topk = num_topk;
            a.num_local_experts = num_local_experts;
            a.recv_x = ptr<void>(recv_x);
            a.recv_scales = ptr<float>(recv_scales);
            a.recv_topk_idx = ptr<int64_t>(recv_topk_idx);
            a.recv_topk_weights = ptr<float>(recv_topk_weights);
            a.recv_src_idx = ptr<int>(recv_src_idx);
            a.num_out_rows = num_out_rows;
            a.worst = worst ? 1 : 0;
            a.num_channels = num_channels;
            r.dispatch(a, stream_of(stream));
          },
          py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"),
          py::arg("send_slot"), py::arg("count_matrix"), py::arg("num_tokens"),
          py::arg("hidden_bytes"), py::arg("num_scales"), py::arg("num_topk"),
          py::arg("num_local_experts"), py::arg("recv_x"), py::arg("recv_scales"),
          py::arg("recv_topk_idx"), py::arg("recv_topk_weights"), py::arg("recv_src_idx"),
          py::arg("num_out_rows"), py::arg("worst"), py::arg("num_channels"), py::arg("stream"))
      .def(
          "combine",
          [](IntranodeRuntime& r, uintptr_t x, uintptr_t topk_weights, uintptr_t recv_src_idx,
             uintptr_t send_slot, uintptr_t count_matrix, uintptr_t bias0, uintptr_t bias1,
             int num_tokens, int hidden, int num_topk, uintptr_t out, uintptr_t out_weights,
             int num_channels, uintptr_t stream) {
            CombineArgs a{};
            a.x = ptr<const void>(x);
            a.topk_weights = ptr<const float>(topk_weights);
            a.recv_src_idx = ptr<const int>(recv_src_idx);
            a.send_slot = ptr<const int>(send_slot);
            a.count_matrix = ptr<const int>(count_matrix);
            a.bias0 = ptr<const void>(bias0);
            a.bias1 = ptr<const void>(bias1);
            a.num_tokens = num_tokens;
            a.hidden = hidden;
            a.num_topk = num_topk;
            a.out = ptr<void>(out);
            a.out_weights = ptr<float>(out_weights);
            a.num_channels = num_channels;
            r.combine(a, stream_of(stream));
          },
          py::arg("x"), py::arg("topk_weights"), py::arg("recv_src_idx"), py::arg("send_slot"),
          py::arg("count_matrix"), py::arg("bias0"), py::arg("bias1"), py::arg("num_tokens"),
          py::arg("hidden"), py::arg("num_topk"), py::arg("out"), py::arg("out_weights"),
          py::arg("num_channels"), py::arg("stream"));
}

}  // namespace mpiep
