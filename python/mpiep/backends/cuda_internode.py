"""GPU normal mode across nodes: NVLink inside a node, RDMA (NVSHMEM) between nodes, and
NVLink forwarding (``mpiep._C`` internode kernels; design in include/mpiep/internode.h).

Each rank holds an NVLink buffer of ``num_nvl_bytes`` (CUDA IPC, mapped by the ranks of its
node) and a symmetric NVSHMEM area of ``num_rdma_bytes`` (reached by the same-local-index
rank of every node). Dispatch = notify kernel (the count matrix to every rank over NVSHMEM,
the per-dispatch tables) + one host wait for the receive size (skipped with
``num_worst_tokens`` and in cached mode) + one data kernel. Combine is one kernel.

The handle's ``backend_state`` keeps the routing on the GPU: ``send_slot`` [T, R],
``node_slot`` [T, N], ``node_token`` [N, T], ``counts`` [R, R + N + 1], ``tables``,
``fwd_pos`` [rows this rank forwards, L], and ``status`` (the notify's row counts, or None
when the host did not wait for them).

``MPIEP_INTERNODE_FORCE_PUTS=1`` sends every RDMA message through NVSHMEM puts even where
the peer is mapped (NVLink/MPS), so that the put path runs on one machine.
"""

from __future__ import annotations

import os

import torch

from mpiep.backends.base import DispatchResult, Layout
from mpiep.backends.nvshmem_boot import init_nvshmem
from mpiep.comm import Communicator
from mpiep.config import Config
from mpiep.errors import CapacityError
from mpiep.handles import DispatchHandle

# TableStatus words (include/mpiep/internode.h).
MAX_RECV, MAX_RDMA_ROWS, MAX_FWD_ROWS, MAX_SEND_ROWS = 0, 1, 2, 3
NUM_RECV, RDMA_ROWS = 4, 5


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.data_ptr())


class InternodeEngine:
    """Normal-mode dispatch/combine for ranks on several (possibly virtual) nodes."""

    name = "cuda-internode"

    def __init__(
        self,
        comm: Communicator,
        device: torch.device,
        num_nvl_bytes: int,
        num_rdma_bytes: int,
        timeout_s: float,
        num_qps_per_rank: int = 24,
        heap_bytes: int | None = None,
        nvshmem_bootstrap: str | None = None,
        force_puts: bool | None = None,
    ) -> None:
        from mpiep import _C

        if not hasattr(_C, "InternodeRuntime"):
            raise RuntimeError("mpiep._C was built without the internode kernels")
        self._C = _C
        self.comm = comm
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"InternodeEngine needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.num_ranks = comm.rank, comm.size
        self.local_ranks, self.num_nodes = comm.local_size, comm.num_nodes
        self.node, self.local = comm.node, comm.local_rank
        self.num_nvl_bytes, self.num_rdma_bytes = int(num_nvl_bytes), int(num_rdma_bytes)
        self.timeout_s = float(timeout_s)
        if force_puts is None:
            force_puts = os.environ.get("MPIEP_INTERNODE_FORCE_PUTS") == "1"
        self.force_puts = bool(force_puts)
        self._check_sizes()
        self._rt = None
        self.bootstrap = init_nvshmem(
            comm,
            self.device.index,
            heap_bytes or self.num_rdma_bytes,
            num_qps_per_rank,
            nvshmem_bootstrap,
        )
        # The constructor allocates the symmetric area: collective over every rank, after
        # the checks above agreed (a rank failing alone would leave the others in NVSHMEM).
        with torch.cuda.device(self.device):
            rt = _C.InternodeRuntime(
                self.rank,
                self.num_ranks,
                self.local_ranks,
                self.device.index,
                self.num_nvl_bytes,
                self.num_rdma_bytes,
                self.timeout_s,
                self.force_puts,
            )
        error = None
        handle = b""
        try:
            handle = rt.export_handle()
        except Exception as exc:  # reported on every rank below
            error = f"{type(exc).__name__}: {exc}"
        handles = comm.allgather_bytes(handle, "internode: exchange IPC handles")
        mine = handles[self.node * self.local_ranks : (self.node + 1) * self.local_ranks]
        if error is None and all(mine):
            try:
                with torch.cuda.device(self.device):
                    rt.open_peers(mine)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        unmapped = self.force_puts or rt.has_unmapped_rdma_peer()
        reports = comm.allgather((error, unmapped), "internode: map peer buffers")
        failed = [(r, e) for r, (e, _) in enumerate(reports) if e]
        if failed:
            rt.destroy()
            r, e = failed[0]
            raise RuntimeError(f"internode buffer setup failed on rank {r}: {e}")
        # Staging space for puts is reserved on every rank when any rank needs it, so that
        # every rank takes the same capacity decisions.
        rt.set_staged(any(u for _, u in reports))
        self._rt = rt
        self.nvl_row_bytes = int(rt.nvl_row_bytes)
        self.rdma_data_bytes = int(rt.rdma_data_bytes)
        self.staged = bool(rt.staged)
        self.table_size = int(
            _C.internode_table_size(self.num_ranks, self.num_nodes, self.local_ranks)
        )

    def _check_sizes(self) -> None:
        """Arguments every rank must agree on before the collective allocation."""
        C = self._C
        problems = []
        if self.local_ranks > C.INTERNODE_MAX_LOCAL_RANKS:
            problems.append(
                f"{self.local_ranks} ranks per node, more than {C.INTERNODE_MAX_LOCAL_RANKS}"
            )
        if self.num_nodes > C.INTERNODE_MAX_NODES:
            problems.append(f"{self.num_nodes} nodes, more than {C.INTERNODE_MAX_NODES}")
        ctrl = int(C.internode_rdma_control_bytes(self.num_ranks, self.num_nodes))
        if self.num_rdma_bytes <= ctrl:
            problems.append(
                f"num_rdma_bytes={self.num_rdma_bytes} does not exceed the {ctrl}-byte control "
                f"area of {self.num_ranks} ranks (see mpiep.config.get_internode_rdma_size_hint)"
            )
        if self.num_nvl_bytes <= C.INTERNODE_NVL_CONTROL_BYTES:
            problems.append(
                f"num_nvl_bytes={self.num_nvl_bytes} does not exceed the 1 MiB control area"
            )
        sizes = (self.num_nvl_bytes, self.num_rdma_bytes, problems)
        everyone = self.comm.allgather(sizes, "internode: check buffer sizes")
        if len({(a, b) for a, b, _ in everyone}) != 1:
            raise ValueError(
                "internode: num_nvl_bytes/num_rdma_bytes differ across ranks: "
                + ", ".join(f"rank {r}: {a}/{b}" for r, (a, b, _) in enumerate(everyone))
            )
        bad = [(r, p) for r, (_, _, p) in enumerate(everyone) if p]
        if bad:
            r, p = bad[0]
            raise ValueError(f"internode normal mode cannot start (rank {r}): {'; '.join(p)}")

    # -- helpers -----------------------------------------------------------------------
    def _stream(self) -> int:
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def _runtime(self):  # type: ignore[no-untyped-def]
        if self._rt is None:
            raise RuntimeError("InternodeEngine used after destroy()")
        return self._rt

    def _state_of(self, handle: DispatchHandle) -> dict:
        state = handle.backend_state
        if state.get("engine") != id(self) or "node_slot" not in state:
            raise ValueError("handle: not produced by this Buffer's internode dispatch")
        return state

    def _check_fit(
        self, status: list[int] | None, nvl: tuple[int, int], rdma: tuple[int, int], what: str
    ) -> None:
        """Raise the same CapacityError on every rank (the maxima are global).

        ``nvl``/``rdma``: (status word, row bytes) of the NVLink area and the RDMA receive
        area; the RDMA area also holds the staged sends when staging is on.
        """
        if status is None:
            return  # the kernel checks on the device and skips the call on every rank
        need_nvl = status[nvl[0]] * nvl[1]
        need_rdma = status[rdma[0]] * rdma[1]
        if self.staged:
            staged_word = MAX_SEND_ROWS if rdma[0] == MAX_RDMA_ROWS else MAX_RDMA_ROWS
            need_rdma += status[staged_word] * rdma[1]
        if need_nvl > self.nvl_row_bytes:
            raise CapacityError(
                f"{what}: a rank needs {need_nvl} B of NVLink buffer ({status[nvl[0]]} rows of "
                f"{nvl[1]} B) but num_nvl_bytes leaves {self.nvl_row_bytes} B for rows; create "
                "the Buffer with a larger num_nvl_bytes (mpiep.get_normal_buffer_size_hint)"
            )
        if need_rdma > self.rdma_data_bytes:
            raise CapacityError(
                f"{what}: a rank needs {need_rdma} B of RDMA buffer but num_rdma_bytes leaves "
                f"{self.rdma_data_bytes} B for rows; create the Buffer with a larger "
                "num_rdma_bytes (mpiep.config.get_internode_rdma_size_hint)"
            )

    # -- layout ------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        return internode_layout(
            self._C, topk_idx, num_experts, self.num_ranks, self.local_ranks, self._stream()
        )

    # -- dispatch ----------------------------------------------------------------------
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
        R, N, L, me = self.num_ranks, self.num_nodes, self.local_ranks, self.rank
        x = x.contiguous()
        T, hidden = int(x.shape[0]), int(x.shape[1])
        hidden_bytes = hidden * x.element_size()
        if hidden_bytes % 16 or _ptr(x) % 16:
            raise ValueError(f"x: rows must be 16-byte multiples and aligned (hidden={hidden})")
        if x_scales is not None:
            x_scales = x_scales.contiguous()
        num_scales = int(x_scales.shape[1]) if x_scales is not None else 0
        chunk = int(config.num_max_rdma_chunked_send_tokens)
        stream = self._stream()
        dev = self.device
        cached = handle is not None

        if cached:
            state = self._state_of(handle)
            num_experts = handle.num_experts
            topk_idx = topk_weights = None
            num_topk = 0
            worst = handle.num_worst_tokens
            status = state["status"]
            num_out = handle.num_output_rows
            expert_list = list(handle.num_recv_tokens_per_expert_list)
        else:
            if layout is None or layout.num_tokens_per_rdma_rank is None:
                if topk_idx is None:
                    raise ValueError("dispatch: needs a layout or topk_idx (or a handle)")
                layout = self.get_dispatch_layout(topk_idx, num_experts)
            num_topk = int(topk_idx.shape[1]) if topk_idx is not None else 0
            if topk_idx is not None:
                topk_idx = topk_idx.contiguous()
            if topk_weights is not None:
                topk_weights = topk_weights.contiguous()
            worst = int(num_worst_tokens)
            state = {
                "engine": id(self),
                "send_slot": torch.empty((T, R), dtype=torch.int32, device=dev),
                "node_slot": torch.empty((T, N), dtype=torch.int32, device=dev),
                "node_token": torch.empty((N, max(T, 1)), dtype=torch.int32, device=dev),
                "counts": torch.empty((R, R + N + 1), dtype=torch.int32, device=dev),
                "tables": torch.empty(self.table_size, dtype=torch.int32, device=dev),
            }
            token = rt.notify(
                _ptr(layout.num_tokens_per_rank),
                _ptr(layout.num_tokens_per_rdma_rank),
                _ptr(layout.num_tokens_per_expert),
                _ptr(layout.is_token_in_rank),
                T,
                num_experts,
                max(1, expert_alignment),
                _ptr(state["send_slot"]),
                _ptr(state["node_slot"]),
                _ptr(state["node_token"]),
                _ptr(state["counts"]),
                _ptr(state["tables"]),
                stream,
            )
            if worst > 0:
                # No host wait: the kernel checks capacity; rows forwarded here are at most
                # L x the rows any rank receives, which num_worst_tokens bounds.
                status, num_out, expert_list = None, worst, []
                state["fwd_pos"] = torch.empty((L * worst, L), dtype=torch.int32, device=dev)
            else:
                rt.wait_notify(token, stream)
                status = list(rt.status())
                num_out = status[NUM_RECV]
                expert_list = list(rt.recv_per_expert(num_experts // R))
                state["fwd_pos"] = torch.empty(
                    (max(status[RDMA_ROWS], 1), L), dtype=torch.int32, device=dev
                )
            state["status"] = status

        C = self._C
        nvl_row = int(C.internode_nvl_dispatch_row_bytes(hidden_bytes, num_scales, num_topk))
        rdma_row = int(C.internode_rdma_dispatch_row_bytes(hidden_bytes, num_scales, num_topk, L))
        self._check_fit(status, (MAX_RECV, nvl_row), (MAX_RDMA_ROWS, rdma_row), "dispatch")
        if status is not None and worst > 0 and status[MAX_RECV] > worst:
            raise CapacityError(
                f"dispatch: num_worst_tokens={worst} is below the {status[MAX_RECV]} rows a "
                "rank receives"
            )

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
            _ptr(state["send_slot"]),
            _ptr(state["node_token"]),
            _ptr(state["counts"]),
            _ptr(state["tables"]),
            T,
            hidden_bytes,
            num_scales,
            num_topk,
            num_experts // R,
            chunk,
            _ptr(state["fwd_pos"]),
            _ptr(recv_x),
            _ptr(recv_scales),
            _ptr(recv_topk_idx),
            _ptr(recv_topk_weights),
            _ptr(recv_src_idx),
            num_out,
            worst > 0,
            config.num_sms,
            stream,
        )
        if not cached:
            handle = DispatchHandle(
                num_ranks=R,
                num_experts=num_experts,
                hidden=hidden,
                is_token_in_rank=layout.is_token_in_rank,
                num_tokens_per_rank=layout.num_tokens_per_rank,
                num_recv_per_src=state["counts"][:, me],
                recv_src_idx=recv_src_idx,
                # With num_worst_tokens the real count stays on the GPU (no host wait).
                num_recv_tokens=num_out if worst == 0 else -1,
                num_recv_tokens_per_expert_list=expert_list,
                num_worst_tokens=worst,
                backend_state=state,
            )
        return DispatchResult(
            recv_x, recv_scales, recv_topk_idx, recv_topk_weights, expert_list, handle
        )

    # -- combine -----------------------------------------------------------------------
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
        row = int(self._C.internode_combine_row_bytes(hidden, num_topk))
        self._check_fit(state["status"], (MAX_FWD_ROWS, row), (MAX_SEND_ROWS, row), "combine")
        T = handle.num_tokens
        out = torch.empty((T, hidden), dtype=torch.bfloat16, device=self.device)
        out_weights = (
            torch.empty((T, num_topk), dtype=torch.float32, device=self.device)
            if topk_weights is not None
            else None
        )
        rt.combine(
            _ptr(x),
            _ptr(topk_weights),
            _ptr(state["node_slot"]),
            _ptr(state["fwd_pos"]),
            _ptr(state["counts"]),
            _ptr(state["tables"]),
            _ptr(biases[0]),
            _ptr(biases[1]),
            T,
            hidden,
            num_topk,
            int(config.num_max_rdma_chunked_send_tokens),
            _ptr(out),
            _ptr(out_weights),
            config.num_sms,
            self._stream(),
        )
        return out, out_weights

    # -- errors and teardown -------------------------------------------------------------
    def check_errors(self) -> None:
        """Raise if a kernel reported a timeout or overflow (else seen at the next call)."""
        if self._rt is not None:
            self._rt.check_error()

    def destroy(self) -> None:
        """Collective: frees the NVLink buffer and the symmetric area on every rank."""
        if self._rt is None:
            return
        rt, self._rt = self._rt, None
        torch.cuda.synchronize(self.device)
        self.comm.barrier("internode: destroy (kernels finished)")
        rt.close_peers()
        self.comm.barrier("internode: destroy (peers unmapped)")
        rt.destroy()


def internode_layout(
    core, topk_idx: torch.Tensor, num_experts: int, num_ranks: int, local_ranks: int, stream: int
) -> Layout:  # type: ignore[no-untyped-def]
    """get_dispatch_layout on the GPU for any rank count (no communication, no buffers)."""
    topk_idx = topk_idx.contiguous()
    T, K = topk_idx.shape
    dev = topk_idx.device
    N = num_ranks // local_ranks
    per_rank = torch.empty(num_ranks, dtype=torch.int32, device=dev)
    per_node = torch.empty(N, dtype=torch.int32, device=dev)
    per_expert = torch.empty(num_experts, dtype=torch.int32, device=dev)
    in_rank = torch.empty((T, num_ranks), dtype=torch.bool, device=dev)
    core.internode_layout(
        _ptr(topk_idx),
        T,
        K,
        num_experts,
        num_ranks,
        local_ranks,
        _ptr(per_rank),
        _ptr(per_node),
        _ptr(per_expert),
        _ptr(in_rank),
        stream,
    )
    return Layout(per_rank, per_node if N > 1 else None, per_expert, in_rank)
