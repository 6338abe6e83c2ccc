"""GPU low-latency mode over NVSHMEM (DeepEP-style API), used by the CUDA backend.

``LowLatencyEngine`` owns the NVSHMEM symmetric heap of one Buffer. NVSHMEM itself is
initialised once per process over MPI (``backends/nvshmem_boot.py``: a unique id that the
MPI layer broadcasts, or NVSHMEM's MPI bootstrap plugin); torch.distributed is never used.

Buffers alternate between the two halves of the heap: dispatch calls and combine calls each
toggle their own index, so two dispatch/combine pairs can be in flight (with receive hooks).
Every spin-wait in the kernels gives up after ``timeout_s``; the next call on this engine (or
:meth:`check`) then raises :class:`~mpiep.errors.PeerTimeoutError` naming rank and phase, and
``clean_low_latency_buffer`` on every rank recovers.

With ``return_recv_hook`` a buffer stays taken until its hook is called: a third dispatch
(or combine) while both buffers wait for hooks raises ``RuntimeError`` before anything is
launched (its sends would land on top of the first call's, whose receive then never sees the
arrival count it expects and times out). A hook runs once, and not after
``clean_low_latency_buffer``.

With ``Buffer(enable_shrink=True)`` the engine masks ranks in its kernels
(``backends/ll_masking.py``; ``mpiep.shrink`` drives it). ``set_test_stall`` (tests only,
``mpiep.stall``) makes this rank withhold its part of a phase.

Known limits: a CUDA graph that replays dispatch alone (no combine between two replays) can
race on the signal reset; capture dispatch and combine together. Duplicate experts inside one
token's top-k are combined correctly only when the expert returns identical rows for them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from mpiep import stall
from mpiep.backends import native
from mpiep.backends.base import (
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from mpiep.backends.ll_masking import LowLatencyMasking
from mpiep.backends.nvshmem_boot import core as nvshmem_core
from mpiep.backends.nvshmem_boot import finalize_nvshmem, init_nvshmem  # noqa: F401 (re-export)
from mpiep.comm import Communicator
from mpiep.errors import PeerTimeoutError
from mpiep.handles import LowLatencyHandle
from mpiep.hooks import HookTracker

# A combine also waits for rows its dispatch dropped (docs/semantics.md); as in
# src/ops/low_latency_ops.cpp.
DROPPED_PAIRS_HINT = (
    ", or, without validation, its dispatch dropped (token, slot) pairs past "
    "num_max_dispatch_tokens_per_rank (an expert repeated in tokens' top-k; validate=True "
    "raises a CapacityError instead)"
)

_WAIT_PHASES = {
    1: ("dispatch", "the token count"),
    2: ("dispatch", "token rows"),
    3: ("combine", "expert outputs"),
    4: ("combine", "the start of its combine"),
}


def _core():
    c = nvshmem_core()
    if not hasattr(c, "LowLatencyContext"):
        raise RuntimeError("mpiep._C was built without the low-latency kernels")
    return c


class _DeviceView:
    """Exposes a raw device pointer to torch through __cuda_array_interface__."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "version": 2,
        }


class LowLatencyEngine:
    name = "cuda-low-latency"
    supports_masking = True  # rank masking in the kernels (enable_masking, set_active)

    def __init__(
        self,
        comm: Communicator,
        device: torch.device,
        num_rdma_bytes: int,
        num_qps_per_rank: int,
        allow_nvlink: bool,
        timeout_s: float,
        heap_bytes: int | None = None,
        nvshmem_bootstrap: str | None = None,
    ) -> None:
        self.comm = comm
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"low-latency mode needs a CUDA device, got {self.device}")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)
        if num_rdma_bytes <= 0:
            raise ValueError(
                "low-latency mode needs num_rdma_bytes > 0 (get_low_latency_rdma_size_hint)"
            )
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.allow_nvlink = bool(allow_nvlink)
        core = _core()
        # heap_bytes: what the whole Buffer takes from the heap (internode mode too).
        self.bootstrap = init_nvshmem(
            comm, index, heap_bytes or self.num_rdma_bytes, num_qps_per_rank, nvshmem_bootstrap
        )
        self.ctx = core.LowLatencyContext(
            index, self.num_rdma_bytes, self.allow_nvlink, self._num_blocks(index), float(timeout_s)
        )
        self._send, self._recv = core.LL_SEND_PHASE, core.LL_RECV_PHASE
        self._send_recv = self._send | self._recv
        self._ops = native.ops()
        native.sequence(self.device)  # for torch.compile (backends/torch_ops.py)
        self._address = int(self.ctx.address)
        # The receive-hook rules; its two slots per op are this engine's two buffers per op.
        self.hooks = HookTracker()
        self._masking: LowLatencyMasking | None = None
        self.set_test_stall(stall.from_env(comm.rank))

    # -- configuration -------------------------------------------------------------
    def _num_blocks(self, index: int) -> int:
        env = os.environ.get("MPIEP_LL_NUM_BLOCKS")
        if env:
            return max(1, int(env))
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        # Every block of a launch must be resident at once, since receive blocks spin on the
        # senders; the context clamps to what the GPU holds (its occupancy query).
        ndev = max(1, torch.cuda.device_count())
        sharing = sum(
            1 for r in range(self.comm.local_size) if r % ndev == self.comm.local_rank % ndev
        )
        # A GPU of its own: two blocks per SM (the kernels' launch bounds); on one H200 the
        # dispatch + combine pair's kernels took 41.8 us instead of 46.8 (docs/PERFORMANCE.md).
        # Ranks sharing a GPU (tests under MPS) split one block per SM: with two per SM, two
        # ranks under MPS timed out waiting for each other's blocks.
        default = 2 if sharing <= 1 else 1
        per_sm = max(1, int(os.environ.get("MPIEP_LL_BLOCKS_PER_SM", default)))
        return max(1, per_sm * sms // max(1, sharing))

    @property
    def timeout_s(self) -> float:
        return self.ctx.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self.ctx.set_timeout(float(value))

    @property
    def nvlink_peers(self) -> list[bool]:
        """Per rank: whether its heap is mapped here (NVLink/P2P stores are possible)."""
        return list(self.ctx.nvlink_peers)

    def check(self) -> None:
        """Raise PeerTimeoutError if a kernel of this engine gave up waiting on a peer."""
        err = self.ctx.error()
        if err is not None:
            raise self._timeout_error(err)

    def settled_timeout(self) -> PeerTimeoutError | None:
        """With rank masking, at a combine's entry: the timeout the kernels recorded (and
        masked the silent rank for) two combines ago or earlier, once every survivor has it."""
        if torch.cuda.is_current_stream_capturing():  # no host waits inside a graph capture
            return None
        err = self.ctx.settled_error()
        return None if err is None else self._timeout_error(err)

    def _timeout_error(self, err: tuple[int, int, int, int, int, int]) -> PeerTimeoutError:
        rank, phase, peer, index, observed, expected = err
        op, what = _WAIT_PHASES.get(phase, ("low-latency", "a signal"))
        src = f"rank {peer}" if peer >= 0 else "the expert ranks"
        where = {1: "local expert", 2: "local expert", 3: "token"}.get(phase)
        detail = f" ({where} {index}: saw {observed}, expected {expected})" if where else ""
        hint = DROPPED_PAIRS_HINT if phase == 3 else ""
        return PeerTimeoutError(
            f"rank {rank}/{self.comm.size}: low-latency {op} timed out after {self.timeout_s:g}s "
            f"waiting for {what} from {src}{detail}; a peer crashed, hangs or skipped the call"
            f"{hint}. Call clean_low_latency_buffer on every rank to recover"
        )

    # -- dispatch ------------------------------------------------------------------
    def low_latency_dispatch(self, req: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        # One native call checks, allocates the outputs and launches (mpiep._ops); the
        # context raises a peer timeout recorded by an earlier call.
        x, topk_idx = req.x, req.topk_idx
        M, E = req.num_max_dispatch_tokens_per_rank, req.num_experts
        fp8, round_scale, ue8m0 = req.use_fp8, req.round_scale, req.use_ue8m0
        stats, with_hook = req.cumulative_local_expert_recv_stats, req.return_recv_hook
        hooks = self.hooks
        buffer = hooks.claim("dispatch")  # refused before launching if its hook is pending
        recv_x, scales, recv_count, src_idx, layout = native.pick(self._ops).ll_dispatch(
            self._address, x, topk_idx, M, E, fp8, round_scale, ue8m0, stats, buffer,
            self._send if with_hook else self._send_recv,
        )  # fmt: skip
        ticket = hooks.issue("dispatch", with_hook)
        T, H = x.shape
        handle = LowLatencyHandle(
            num_max_dispatch_tokens_per_rank=M,
            hidden=H,
            num_experts=E,
            src_token_idx=src_idx,
            layout_range=layout,
            num_tokens=T,
            ticket=ticket,
        )
        hook: Callable[[], None] | None = None
        if ticket is not None:
            ops, address = self._ops, self._address

            def receive() -> None:
                native.pick(ops).ll_dispatch_receive(
                    address, x, topk_idx, recv_x, scales, recv_count, src_idx, layout, M, E,
                    fp8, round_scale, ue8m0, stats, buffer,
                )  # fmt: skip

            # A timed-out receive raises before it launches: the slot stays taken.
            hook = hooks.wrap(ticket, receive)
        return LowLatencyDispatchResult(recv_x, scales, recv_count, handle, hook)

    # -- combine -------------------------------------------------------------------
    def low_latency_combine(
        self, req: LowLatencyCombineRequest
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        x, topk_idx, topk_weights, handle = req.x, req.topk_idx, req.topk_weights, req.handle
        zero_copy, with_hook = req.zero_copy, req.return_recv_hook
        M, E, H = handle.num_max_dispatch_tokens_per_rank, handle.num_experts, handle.hidden
        src_idx, layout = handle.src_token_idx, handle.layout_range
        hooks = self.hooks
        buffer = hooks.claim("combine")
        result = native.pick(self._ops).ll_combine(
            self._address, x, topk_idx, topk_weights, src_idx, layout, req.out, H, M, E,
            zero_copy, buffer, self._send if with_hook else self._send_recv,
        )  # fmt: skip
        ticket = hooks.issue("combine", with_hook)
        if ticket is None:
            return result, None
        ops, address, recv = self._ops, self._address, self._recv

        def receive() -> None:
            native.pick(ops).ll_combine(
                address, x, topk_idx, topk_weights, src_idx, layout, result, H, M, E,
                zero_copy, buffer, recv,
            )  # fmt: skip

        return result, hooks.wrap(ticket, receive)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The symmetric area the next combine sends from: write expert outputs here and pass
        ``zero_copy=True`` to skip a copy. Shape [E_local, R * max, H], BF16."""
        M, E, H = handle.num_max_dispatch_tokens_per_rank, handle.num_experts, handle.hidden
        R = self.comm.size
        ptr = self.ctx.combine_send_buffer(self.hooks.slot("combine"), H, M, E)
        view = _DeviceView(ptr, (E // R, R * M, H), "<i2")
        return torch.as_tensor(view, device=self.device).view(torch.bfloat16)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Zero every signal and the timeout state (collective: every rank calls it; with rank
        masking, every active rank)."""
        self._clean()

    # -- rank masking (mpiep.shrink) and the test stall ------------------------------------
    def enable_masking(self) -> None:
        """From now on every launch reads the device mask (once, before any call)."""
        if self._masking is None:
            self._masking = LowLatencyMasking(self.ctx, self.comm, self.device)

    def set_active(self, active: list[int], comm: Communicator) -> None:
        """The agreed active ranks and their communicator; on those ranks, collective over
        ``comm``: the buffers are cleaned among them (hooks issued before are void)."""
        if self._masking is None:
            raise RuntimeError("set_active needs enable_masking() first")
        if self._masking.set_active(active, comm):
            self._clean()

    def set_test_stall(self, phases: str | int | None) -> None:
        """Tests only (mpiep.stall): withhold this rank's part of the low-latency phases."""
        self.ctx.set_test_stall(stall.parse(phases) & stall.LOW_LATENCY)

    def _clean(self) -> None:
        torch.cuda.synchronize(self.device)
        if self._masking is not None:
            self._masking.clean()
        else:
            self.ctx.clean()
        self.hooks.clean()  # buffer 0 next, and every hook issued before is void

    def destroy(self) -> None:
        """Free the symmetric heap (collective). NVSHMEM stays up for later engines in this
        process; :func:`finalize_nvshmem` shuts it down."""
        if self.ctx is not None:
            torch.cuda.synchronize(self.device)
            self._address = 0  # the op layer refuses a null context
            self.ctx.destroy()
            self.ctx = None  # type: ignore[assignment]
