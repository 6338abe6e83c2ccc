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
from mpiep.backends.base import Layout
from mpiep.backends.native_normal import NativeNormalEngine
from mpiep.comm import Communicator


class IntranodeEngine(NativeNormalEngine):
    """Normal-mode dispatch/combine over CUDA IPC for the ranks of one node."""

    name = "cuda-intranode"
    kind = "intranode"
    # state = [send_slot, count_matrix]

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
        native.sequence(self.device)  # for torch.compile (backends/torch_ops.py)
        self._address = int(rt.address)
        self.set_test_stall(None)  # MPIEP_TEST_STALL, tests only

    # -- the native entries ------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        self._runtime_address()  # raises after destroy()
        per_rank, _, per_expert, in_rank = native.pick(self._ops).layout(
            topk_idx, num_experts, self.num_ranks, self.num_ranks, self._hop
        )
        return Layout(per_rank, None, per_expert, in_rank)

    def _native_dispatch(
        self, address, x, x_scales, topk_idx, topk_weights, layout, state, host_counts,
        cached_rows, num_experts, expert_alignment, num_worst_tokens, config,
    ):  # type: ignore[no-untyped-def]  # fmt: skip
        lay = (None, None, None) if layout is None else (
            layout.num_tokens_per_rank, layout.num_tokens_per_expert, layout.is_token_in_rank
        )  # fmt: skip
        return self._ops.intranode_dispatch(
            address, x, x_scales, topk_idx, topk_weights, *lay, state, host_counts, cached_rows,
            num_experts, expert_alignment, num_worst_tokens, config.num_sms, self._hop,
        )  # fmt: skip

    def _native_combine(self, address, x, handle, topk_weights, st, b0, b1, config):  # type: ignore[no-untyped-def]
        return native.pick(self._ops).intranode_combine(
            address, x, topk_weights, handle.recv_src_idx, st["state"], st["host_counts"], b0,
            b1, handle.num_tokens, config.num_sms, self._hop,
        )  # fmt: skip
