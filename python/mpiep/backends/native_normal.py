"""What the two GPU normal-mode engines share: the Python side of one native call per
operation (``mpiep._ops``), the handle they build, and their teardown.

``IntranodeEngine`` and ``InternodeEngine`` set up their runtimes and say which native
entries to call (``_native_dispatch``/``_native_combine``); everything else is here.
"""

from __future__ import annotations

from typing import Any

import torch

from mpiep import stall
from mpiep.backends.base import CombineRequest, DispatchRequest, DispatchResult, Layout
from mpiep.comm import Communicator
from mpiep.config import Config
from mpiep.handles import DispatchHandle


class NativeNormalEngine:
    """Base of the normal-mode engines over a runtime of ``mpiep._C``."""

    kind: str  # "intranode" or "internode", for messages
    needs_node_counts = False  # the layout must carry num_tokens_per_rdma_rank
    comm: Communicator
    device: torch.device
    rank: int
    num_ranks: int
    _rt: Any
    _address: int
    _ops: Any
    _hop = 0  # the comm-stream hop of the ops (use_comm_stream), or 0: the current stream

    # -- what each engine provides ----------------------------------------------------------
    def _native_dispatch(
        self,
        address: int,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        layout: Layout | None,
        state: list[torch.Tensor],
        host_counts: list[int],
        cached_rows: int,
        num_experts: int,
        expert_alignment: int,
        num_worst_tokens: int,
        config: Config,
    ) -> tuple[Any, ...]:
        raise NotImplementedError

    def _native_combine(
        self,
        address: int,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        state: dict,
        bias0: torch.Tensor | None,
        bias1: torch.Tensor | None,
        config: Config,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------
    def use_comm_stream(self, stream: torch.cuda.Stream) -> None:
        """Run the ops on ``stream``, ordered against the caller's stream inside the op (one
        native hop instead of Python's stream switch and events)."""
        self._free_hop()
        self._hop = int(self._ops.make_stream_hop(stream.cuda_stream))

    def _free_hop(self) -> None:
        if self._hop:
            hop, self._hop = self._hop, 0
            self._ops.free_stream_hop(hop)

    def _runtime_address(self) -> int:
        if self._rt is None:
            raise RuntimeError(f"the {self.kind} engine was used after destroy()")
        return self._address

    def _state_of(self, handle: DispatchHandle) -> dict:
        state = handle.backend_state
        if state.get("engine") != id(self) or "state" not in state:
            raise ValueError(f"handle: not produced by this Buffer's {self.kind} dispatch")
        return state

    def dispatch(self, req: DispatchRequest) -> DispatchResult:
        """One native call: notify, the host wait for the receive size (skipped with
        num_worst_tokens and in cached mode), output allocation and the data kernel."""
        x, x_scales, handle, config = req.x, req.x_scales, req.handle, req.config
        expert_alignment = req.expert_alignment
        address = self._runtime_address()
        if handle is not None:  # cached: the handle's routes, no notify
            st = self._state_of(handle)
            out = self._native_dispatch(
                address, x, x_scales, None, None, None, st["state"], st["host_counts"],
                handle.num_output_rows, handle.num_experts, expert_alignment,
                handle.num_worst_tokens, config,
            )  # fmt: skip
            return DispatchResult(out[0], out[1], None, None, [], handle)
        topk_idx, topk_weights, layout = req.topk_idx, req.topk_weights, req.layout
        num_experts, num_worst_tokens = req.num_experts, req.num_worst_tokens
        if layout is None or (self.needs_node_counts and layout.num_tokens_per_rdma_rank is None):
            if topk_idx is None:
                raise ValueError("dispatch: needs a layout or topk_idx (or a handle)")
            layout = self.get_dispatch_layout(topk_idx, num_experts)
        out = self._native_dispatch(
            address, x, x_scales, topk_idx, topk_weights, layout, [], [], 0, num_experts,
            expert_alignment, num_worst_tokens, config,
        )  # fmt: skip
        recv_x, recv_scales, recv_idx, recv_w, recv_src, num_recv, experts, state, host, per_src = (
            out
        )
        handle = DispatchHandle(
            num_ranks=self.num_ranks,
            num_experts=num_experts,
            hidden=x.shape[1],
            is_token_in_rank=layout.is_token_in_rank,
            num_tokens_per_rank=layout.num_tokens_per_rank,
            # Made by the op: a view of the count matrix (no copy kernel), the rows this rank
            # received from each source.
            num_recv_per_src=per_src,
            recv_src_idx=recv_src,
            # With num_worst_tokens the real count stays on the GPU (no host wait): -1.
            num_recv_tokens=num_recv,
            num_recv_tokens_per_expert_list=experts,
            num_worst_tokens=num_worst_tokens,
            backend_state={"engine": id(self), "state": state, "host_counts": host},
        )
        return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, experts, handle)

    def combine(self, req: CombineRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        address = self._runtime_address()
        handle, bias = req.handle, req.bias
        st = self._state_of(handle)
        if len(bias) > 2:
            raise ValueError(f"combine: at most two bias tensors, got {len(bias)}")
        b0, b1 = (*bias, None, None)[:2]
        return self._native_combine(
            address, req.x, handle, req.topk_weights, st, b0, b1, req.config
        )

    def set_test_stall(self, phases: str | int | None) -> None:
        """Tests only (mpiep.stall): this rank skips its data kernel of ``dispatch`` and/or
        ``combine`` (notify still runs), so that its peers time out. ``None`` reads
        ``MPIEP_TEST_STALL``."""
        bits = stall.from_env(self.rank) if phases is None else stall.parse(phases)
        if self._rt is not None:
            self._rt.set_test_stall(bits & stall.NORMAL)

    def check_errors(self) -> None:
        """Raise if a kernel reported a timeout or overflow (else seen at the next call)."""
        if self._rt is not None:
            self._rt.check_error()

    def destroy(self) -> None:
        """Collective: every rank calls it. Frees the buffers and unmaps the peers'."""
        if self._rt is None:
            return
        rt, self._rt = self._rt, None
        self._address = 0
        # No kernel of any rank may touch the buffers any more: finish ours, then wait for
        # everyone's; unmap the peers, wait again, and only then free our own memory.
        torch.cuda.synchronize(self.device)
        self._free_hop()
        self.comm.barrier(f"{self.kind}: destroy (kernels finished)")
        rt.close_peers()
        self.comm.barrier(f"{self.kind}: destroy (peers unmapped)")
        rt.destroy()
