"""GPU normal mode across nodes: NVLink inside a node, RDMA (NVSHMEM) between nodes, and
NVLink forwarding (``mpiep._C`` internode kernels; design in include/mpiep/internode.h).

Each rank holds an NVLink buffer of ``num_nvl_bytes`` (CUDA IPC, mapped by the ranks of its
node) and a symmetric NVSHMEM area of ``num_rdma_bytes`` (reached by the same-local-index
rank of every node). Dispatch = notify kernel (the count matrix to every rank over NVSHMEM,
the per-dispatch tables) + one host wait for the receive size (skipped with
``num_worst_tokens`` and in cached mode) + one data kernel. Combine is one kernel. Each
operation is one native call of ``mpiep._ops`` (src/ops/internode_ops.cpp).

The handle's ``backend_state`` keeps the routing on the GPU, ``state`` = [``send_slot``
[T, R], ``node_slot`` [T, N], ``node_token`` [N, T], ``counts`` [R, R + N + 1],
``tables``, ``fwd_pos`` [rows this rank forwards, L]], and ``host_counts`` (the notify's
row counts, or empty when the host did not wait for them).

``MPIEP_INTERNODE_FORCE_PUTS=1`` sends every RDMA message through NVSHMEM puts even where
the peer is mapped (NVLink/MPS), so that the put path runs on one machine.
"""

from __future__ import annotations

import os

import torch

from mpiep.backends import native
from mpiep.backends.base import Layout
from mpiep.backends.native_normal import NativeNormalEngine
from mpiep.backends.nvshmem_boot import init_nvshmem
from mpiep.comm import Communicator


class InternodeEngine(NativeNormalEngine):
    """Normal-mode dispatch/combine for ranks on several (possibly virtual) nodes."""

    name = "cuda-internode"
    kind = "internode"
    needs_node_counts = True
    # state: send_slot, node_slot, node_token, counts, tables, fwd_pos

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
        self._ops = native.ops()
        native.sequence(self.device)  # for torch.compile (backends/torch_ops.py)
        self._address = int(rt.address)
        self.set_test_stall(None)  # MPIEP_TEST_STALL, tests only
        self.nvl_row_bytes = int(rt.nvl_row_bytes)
        self.rdma_data_bytes = int(rt.rdma_data_bytes)
        self.staged = bool(rt.staged)

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

    # -- the native entries ------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        self._runtime_address()  # raises after destroy()
        return Layout(
            *native.pick(self._ops).layout(
                topk_idx, num_experts, self.num_ranks, self.local_ranks, self._hop
            )
        )

    def _native_dispatch(
        self, address, x, x_scales, topk_idx, topk_weights, layout, state, host_counts,
        cached_rows, num_experts, expert_alignment, num_worst_tokens, config,
    ):  # type: ignore[no-untyped-def]  # fmt: skip
        lay = (None, None, None, None) if layout is None else (
            layout.num_tokens_per_rank, layout.num_tokens_per_rdma_rank,
            layout.num_tokens_per_expert, layout.is_token_in_rank,
        )  # fmt: skip
        return self._ops.internode_dispatch(
            address, x, x_scales, topk_idx, topk_weights, *lay, state, host_counts, cached_rows,
            num_experts, expert_alignment, num_worst_tokens, config.num_sms,
            int(config.num_max_rdma_chunked_send_tokens), self._hop,
        )  # fmt: skip

    def _native_combine(self, address, x, handle, topk_weights, st, b0, b1, config):  # type: ignore[no-untyped-def]
        return native.pick(self._ops).internode_combine(
            address, x, topk_weights, st["state"], st["host_counts"], b0, b1,
            handle.num_tokens, config.num_sms, int(config.num_max_rdma_chunked_send_tokens),
            self._hop,
        )  # fmt: skip
