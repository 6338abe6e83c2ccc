"""GPU normal mode inside one node: CUDA IPC buffers and the ``mpiep._C`` intranode kernels.

Each rank allocates one buffer of ``num_nvl_bytes`` (a 1 MiB control area, then rows),
exports a CUDA IPC handle, and maps every peer's buffer; the handles travel over MPI.

Dispatch = notify kernel (count matrix and per-expert counts to every peer, token slots)
+ one host wait on host-mapped memory for the receive size (skipped with
``num_worst_tokens``) + the data kernel. Combine is one kernel. All launches go to
``torch.cuda.current_stream()``; Buffer picks that stream. Repeated calls allocate only
their output tensors (torch's caching allocator): no cudaMalloc, no IPC work.

The handle's ``backend_state`` keeps ``send_slot`` [T, R] int32 (a token's row within
each receiver's block from this rank, or -1 - the exclusive prefix when it does not go
there), ``count_matrix`` [R, R+1] int32 on the GPU (row s: tokens s sent to each rank,
then s's token count) and its host copy when the host waited for it.
"""

from __future__ import annotations

import torch

from mpiep.backends.base import DispatchResult, Layout
from mpiep.comm import Communicator
from mpiep.config import Config
from mpiep.errors import CapacityError
from mpiep.handles import DispatchHandle

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.data_ptr())


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

    # -- helpers -----------------------------------------------------------------------
    def _stream(self) -> int:
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def _runtime(self):
        if self._rt is None:
            raise RuntimeError("IntranodeEngine used after destroy()")
        return self._rt

    def _check_fit(self, rows_per_rank: list[int], row_bytes: int, what: str) -> None:
        """Raise the same CapacityError on every rank (all hold the same counts)."""
        for r, rows in enumerate(rows_per_rank):
            if rows * row_bytes > self.row_area_bytes:
                raise CapacityError(
                    f"{what}: rank {r} needs {rows} rows x {row_bytes} B = {rows * row_bytes} B of "
                    f"buffer but num_nvl_bytes leaves {self.row_area_bytes} B for rows; create the "
                    "Buffer with a larger num_nvl_bytes "
                    "(see mpiep.config.get_normal_buffer_size_hint)"
                )

    # -- layout --------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        self._runtime()  # raises after destroy()
        topk_idx = topk_idx.contiguous()
        num_tokens, num_topk = topk_idx.shape
        R = self.num_ranks
        per_rank = torch.empty(R, dtype=torch.int32, device=self.device)
        per_expert = torch.empty(num_experts, dtype=torch.int32, device=self.device)
        in_rank = torch.empty((num_tokens, R), dtype=torch.bool, device=self.device)
        self._C.intranode_layout(
            _ptr(topk_idx),
            num_tokens,
            num_topk,
            num_experts,
            R,
            _ptr(per_rank),
            _ptr(per_expert),
            _ptr(in_rank),
            self._stream(),
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
        rt = self._runtime()
        R, me = self.num_ranks, self.rank
        x = x.contiguous()
        hidden = int(x.shape[1])
        hidden_bytes = hidden * x.element_size()
        if hidden_bytes % 16 or _ptr(x) % 16:
            raise ValueError(f"x: rows must be 16-byte multiples and aligned (hidden={hidden})")
        if x_scales is not None:
            x_scales = x_scales.contiguous()
        num_scales = int(x_scales.shape[1]) if x_scales is not None else 0
        num_channels = config.num_sms // 2
        stream = self._stream()
        cached = handle is not None

        if cached:
            state = self._state_of(handle)
            num_experts = handle.num_experts
            send_slot, count_matrix = state["send_slot"], state["count_matrix"]
            host_matrix = state["host_matrix"]
            worst = handle.num_worst_tokens
            topk_idx = topk_weights = None
            num_topk = 0
        else:
            if layout is None:
                if topk_idx is None:
                    raise ValueError("dispatch: needs a layout or topk_idx (or a handle)")
                layout = self.get_dispatch_layout(topk_idx, num_experts)
            num_topk = int(topk_idx.shape[1]) if topk_idx is not None else 0
            if topk_idx is not None:
                topk_idx = topk_idx.contiguous()
            if topk_weights is not None:
                topk_weights = topk_weights.contiguous()
            worst = int(num_worst_tokens)
        row_bytes = self._C.intranode_dispatch_row_bytes(hidden_bytes, num_scales, num_topk)
        if worst > 0:
            # Same value on every rank, so every rank raises alike, before any launch.
            self._check_fit([worst], row_bytes, "dispatch (num_worst_tokens)")

        num_local = num_experts // R
        if cached:
            num_out = handle.num_output_rows
            expert_list = list(handle.num_recv_tokens_per_expert_list)
            if host_matrix is not None:
                self._check_fit(_recv_rows(host_matrix, R), row_bytes, "dispatch")
        else:
            num_tokens = int(x.shape[0])
            send_slot = torch.empty((num_tokens, R), dtype=torch.int32, device=self.device)
            count_matrix = torch.empty((R, R + 1), dtype=torch.int32, device=self.device)
            token = rt.notify(
                _ptr(layout.num_tokens_per_rank),
                _ptr(layout.num_tokens_per_expert),
                _ptr(layout.is_token_in_rank),
                num_tokens,
                num_experts,
                max(1, expert_alignment),
                _ptr(send_slot),
                _ptr(count_matrix),
                stream,
            )
            if worst > 0:
                host_matrix, num_out, expert_list = None, worst, []
            else:
                rt.wait_notify(token, stream)
                flat = rt.count_matrix()
                host_matrix = [flat[s * (R + 1) : (s + 1) * (R + 1)] for s in range(R)]
                self._check_fit(_recv_rows(host_matrix, R), row_bytes, "dispatch")
                num_out = _recv_rows(host_matrix, R)[me]
                expert_list = rt.recv_per_expert(num_local)

        dev = self.device
        recv_x = torch.empty((num_out, hidden), dtype=x.dtype, device=dev)
        recv_scales = (
            torch.empty((num_out, num_scales), dtype=torch.float32, device=dev)
            if x_scales is not None
            else None
        )
        recv_topk_idx = (
            torch.empty((num_out, num_topk), dtype=torch.int64, device=dev)
            if topk_idx is not None
            else None
        )
        recv_topk_weights = (
            torch.empty((num_out, num_topk), dtype=torch.float32, device=dev)
            if topk_idx is not None and topk_weights is not None
            else None
        )
        recv_src_idx = torch.empty(num_out, dtype=torch.int32, device=dev)
        rt.dispatch(
            _ptr(x),
            _ptr(x_scales),
            _ptr(topk_idx),
            _ptr(topk_weights if topk_idx is not None else None),
            _ptr(send_slot),
            _ptr(count_matrix),
            int(x.shape[0]),
            hidden_bytes,
            num_scales,
            num_topk,
            num_local,
            _ptr(recv_x),
            _ptr(recv_scales),
            _ptr(recv_topk_idx),
            _ptr(recv_topk_weights),
            _ptr(recv_src_idx),
            num_out,
            worst > 0,
            num_channels,
            stream,
        )

        if not cached:
            handle = DispatchHandle(
                num_ranks=R,
                num_experts=num_experts,
                hidden=hidden,
                is_token_in_rank=layout.is_token_in_rank,
                num_tokens_per_rank=layout.num_tokens_per_rank,
                num_recv_per_src=count_matrix[:, me].contiguous(),
                recv_src_idx=recv_src_idx,
                # With num_worst_tokens the real count stays on the GPU (no host wait):
                # -1 here, and count_matrix in backend_state holds it.
                num_recv_tokens=num_out if worst == 0 else -1,
                num_recv_tokens_per_expert_list=expert_list,
                num_worst_tokens=worst,
                backend_state={
                    "engine": id(self),
                    "send_slot": send_slot,
                    "count_matrix": count_matrix,
                    "host_matrix": host_matrix,
                },
            )
        return DispatchResult(
            recv_x, recv_scales, recv_topk_idx, recv_topk_weights, expert_list, handle
        )

    def _state_of(self, handle: DispatchHandle) -> dict:
        state = handle.backend_state
        if state.get("engine") != id(self) or "send_slot" not in state:
            raise ValueError("handle: not produced by this Buffer's intranode dispatch")
        return state

    # -- combine -------------------------------------------------------------------------
    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        config: Config,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rt = self._runtime()
        state = self._state_of(handle)
        R = self.num_ranks
        if x.dtype != torch.bfloat16:
            raise ValueError(f"combine: x must be bfloat16, got {x.dtype}")
        x = x.contiguous()
        hidden = int(x.shape[1])
        if hidden % 8 or _ptr(x) % 16:
            raise ValueError(
                f"combine: hidden ({hidden}) must be a multiple of 8 and x 16-byte aligned"
            )
        if len(bias) > 2:
            raise ValueError(f"combine: at most two bias tensors, got {len(bias)}")
        biases = [b.contiguous() for b in bias] + [None] * (2 - len(bias))
        num_topk = 0
        if topk_weights is not None:
            topk_weights = topk_weights.contiguous()
            num_topk = int(topk_weights.shape[1])
        row_bytes = self._C.intranode_combine_row_bytes(hidden, num_topk)
        host_matrix = state["host_matrix"]
        if host_matrix is not None:
            # Rows arriving at rank s = rows s sent in dispatch.
            self._check_fit([sum(row[:R]) for row in host_matrix], row_bytes, "combine")
        num_tokens = handle.num_tokens
        out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self.device)
        out_weights = (
            torch.empty((num_tokens, num_topk), dtype=torch.float32, device=self.device)
            if topk_weights is not None
            else None
        )
        rt.combine(
            _ptr(x),
            _ptr(topk_weights),
            _ptr(handle.recv_src_idx),
            _ptr(state["send_slot"]),
            _ptr(state["count_matrix"]),
            _ptr(biases[0]),
            _ptr(biases[1]),
            num_tokens,
            hidden,
            num_topk,
            _ptr(out),
            _ptr(out_weights),
            config.num_sms // 2,
            self._stream(),
        )
        return out, out_weights

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
        # No kernel of any rank may touch the buffers any more: finish ours, then wait for
        # everyone's; unmap the peers, wait again, and only then free our own memory.
        torch.cuda.synchronize(self.device)
        self.comm.barrier("intranode: destroy (kernels finished)")
        rt.close_peers()
        self.comm.barrier("intranode: destroy (peers unmapped)")
        rt.destroy()


def _recv_rows(matrix: list[list[int]], num_ranks: int) -> list[int]:
    """Rows each rank receives in dispatch: column sums of the count matrix."""
    return [sum(matrix[s][r] for s in range(num_ranks)) for r in range(num_ranks)]
