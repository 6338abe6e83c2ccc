"""GPU normal mode inside one node: CUDA IPC buffers and the ``mpiep._C`` intranode kernels.

Each rank allocates one buffer of ``num_nvl_bytes`` (a 1 MiB control area, then rows),
exports a CUDA IPC handle, and maps every peer's buffer; the handles travel over MPI.

Dispatch = notify kernel (count matrix and per-expert counts to every peer, token slots)
+ one host wait on host-mapped memory for the receive size (skipped with
``num_worst_tokens``) + the data kernel, all in one native call of ``mpiep._ops``
(src/ops/intranode_ops.cpp). Combine is one kernel. All launches go to the current stream;
Buffer picks that stream. Repeated calls allocate only their output tensors (torch's
caching allocator): no cudaMalloc, no IPC work.

The handle's ``backend_state`` keeps ``state`` = [``send_slot`` [T, R] int32 (a token's
row within each receiver's block from this rank, or -1 - the exclusive prefix when it does
not go there), ``count_matrix`` [R, R+1] int32 on the GPU (row s: tokens s sent to each
rank, then s's token count)] and ``host_counts``, its host copy when the host waited.
"""

from __future__ import annotations

import torch

from mpiep.backends import native
from mpiep.backends.base import DispatchResult, Layout
from mpiep.comm import Communicator
from mpiep.config import Config
from mpiep.handles import DispatchHandle


class IntranodeEngine:
    """Normal-mode dispatch/combine over CUDA IPC for the ranks of one node."""

    name = "cuda-intranode"

    def __init__(
        self, comm: Communicator, device: torch.device, num_nvl_bytes: int, timeout_s: float
    ) -> None:
        from mpiep import _C

        if not hasattr(_C, "IntranodeRuntime"):
            raise RuntimeError("mpiep._C was built without the intranode kernels")
        if comm.num_nodes != 1:
            raise ValueError(
                f"IntranodeEngine needs all {comm.size} ranks on one node, "
                f"found {comm.num_nodes} nodes"
            )
        self._C = _C
        self.comm = comm
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"IntranodeEngine needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.num_ranks = comm.rank, comm.size
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.timeout_s = float(timeout_s)
        self._rt = None
        # Every rank creates and maps, then all agree that every rank succeeded; a rank
        # that failed must not leave the others using a half-built mesh.
        error = None
        rt = None
        try:
            with torch.cuda.device(self.device):
                rt = _C.IntranodeRuntime(
                    self.rank, self.num_ranks, self.device.index, self.num_nvl_bytes, self.timeout_s
                )
            handle = rt.export_handle()
        except Exception as exc:  # reported on every rank below
            error, handle = f"{type(exc).__name__}: {exc}", b""
        handles = comm.allgather_bytes(handle, "intranode: exchange IPC handles")
        if error is None and all(handles):
            try:
                with torch.cuda.device(self.device):
                    rt.open_peers(handles)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        errors = comm.allgather(error, "intranode: map peer buffers")
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            if rt is not None:
                rt.destroy()
            r, e = failed[0]
            raise RuntimeError(f"intranode buffer setup failed on rank {r}: {e}")
        self._rt = rt
        self.row_area_bytes = int(rt.row_area_bytes)
        self._ops = native.ops()
        self._address = int(rt.address)

    # -- helpers -----------------------------------------------------------------------
    def _runtime_address(self) -> int:
        if self._rt is None:
            raise RuntimeError("IntranodeEngine used after destroy()")
        return self._address

    def _state_of(self, handle: DispatchHandle) -> dict:
        state = handle.backend_state
        if state.get("engine") != id(self) or "state" not in state:
            raise ValueError("handle: not produced by this Buffer's intranode dispatch")
        return state

    # -- layout --------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        self._runtime_address()  # raises after destroy()
        per_rank, _, per_expert, in_rank = self._ops.layout(
            topk_idx, num_experts, self.num_ranks, self.num_ranks
        )
        return Layout(per_rank, None, per_expert, in_rank)

    # -- dispatch ------------------------------------------------------------------------
    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        layout: Layout | None,
        handle: DispatchHandle | None,
        num_experts: int,
        expert_alignment: int,
        num_worst_tokens: int,
        config: Config,
    ) -> DispatchResult:
        """One native call: notify, the host wait for the receive size (skipped with
        num_worst_tokens and in cached mode), output allocation and the data kernel."""
        address = self._runtime_address()
        if handle is not None:
            st = self._state_of(handle)
            out = self._ops.intranode_dispatch(
                address, x, x_scales, None, None, None, None, None, st["state"],
                st["host_counts"], handle.num_output_rows, handle.num_experts, expert_alignment,
                handle.num_worst_tokens, config.num_sms,
            )  # fmt: skip
            return DispatchResult(out[0], out[1], None, None, [], handle)
        if layout is None:
            if topk_idx is None:
                raise ValueError("dispatch: needs a layout or topk_idx (or a handle)")
            layout = self.get_dispatch_layout(topk_idx, num_experts)
        out = self._ops.intranode_dispatch(
            address, x, x_scales, topk_idx, topk_weights, layout.num_tokens_per_rank,
            layout.num_tokens_per_expert, layout.is_token_in_rank, [], [], 0, num_experts,
            expert_alignment, num_worst_tokens, config.num_sms,
        )  # fmt: skip
        recv_x, recv_scales, recv_idx, recv_w, recv_src, num_recv, experts, state, host = out
        handle = DispatchHandle(
            num_ranks=self.num_ranks,
            num_experts=num_experts,
            hidden=int(x.shape[1]),
            is_token_in_rank=layout.is_token_in_rank,
            num_tokens_per_rank=layout.num_tokens_per_rank,
            num_recv_per_src=state[1][:, self.rank],  # a view: rows from each source
            recv_src_idx=recv_src,
            # With num_worst_tokens the real count stays on the GPU (no host wait): -1.
            num_recv_tokens=num_recv,
            num_recv_tokens_per_expert_list=experts,
            num_worst_tokens=num_worst_tokens,
            backend_state={"engine": id(self), "state": state, "host_counts": host},
        )
        return DispatchResult(recv_x, recv_scales, recv_idx, recv_w, experts, handle)

    # -- combine -------------------------------------------------------------------------
    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        config: Config,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        address = self._runtime_address()
        st = self._state_of(handle)
        if len(bias) > 2:
            raise ValueError(f"combine: at most two bias tensors, got {len(bias)}")
        b0, b1 = (*bias, None, None)[:2]
        return self._ops.intranode_combine(
            address, x, topk_weights, handle.recv_src_idx, st["state"], st["host_counts"], b0,
            b1, handle.num_tokens, config.num_sms,
        )  # fmt: skip

    # -- errors and teardown -------------------------------------------------------------
    def check_errors(self) -> None:
        """Raise if a kernel reported a timeout or overflow (else seen at the next call)."""
        if self._rt is not None:
            self._rt.check_error()

    def destroy(self) -> None:
        """Collective: every rank calls it. Frees the buffer and unmaps the peers'."""
        if self._rt is None:
            return
        rt, self._rt = self._rt, None
        self._address = 0
        # No kernel of any rank may touch the buffers any more: finish ours, then wait for
        # everyone's; unmap the peers, wait again, and only then free our own memory.
        torch.cuda.synchronize(self.device)
        self.comm.barrier("intranode: destroy (kernels finished)")
        rt.close_peers()
        self.comm.barrier("intranode: destroy (peers unmapped)")
        rt.destroy()
