"""GPU low-latency mode over NVSHMEM (DeepEP-style API), used by the CUDA backend.

``LowLatencyEngine`` owns the NVSHMEM symmetric heap of one Buffer. NVSHMEM itself is
initialised once per process from a unique id that rank 0 creates and the MPI layer
broadcasts (``Communicator.bcast_bytes``); torch.distributed is never used.

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

Known limits: a CUDA graph that replays dispatch alone (no combine between two replays) can
race on the signal reset; capture dispatch and combine together. Duplicate experts inside one
token's top-k are combined correctly only when the expert returns identical rows for them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from mpiep.backends.base import LowLatencyDispatchResult
from mpiep.comm import Communicator
from mpiep.errors import PeerTimeoutError
from mpiep.handles import LowLatencyHandle

_WAIT_PHASES = {
    1: ("dispatch", "the token count"),
    2: ("dispatch", "token rows"),
    3: ("combine", "expert outputs"),
}


def _core():
    from mpiep import _C  # type: ignore[attr-defined]

    if not hasattr(_C, "LowLatencyContext"):
        raise RuntimeError("mpiep._C was built without the low-latency kernels")
    return _C


def configure_nvshmem_env(num_qps_per_rank: int) -> None:
    """NVSHMEM reads its environment at init: set it before the first engine starts.

    NVLink SHARP (NVLS) is always off (it can take shared hosts' GPUs out of service);
    multi-node NVLink is off unless ``MPIEP_ENABLE_MNNVL=1``. The rest are defaults the user
    may override: IBGDA on, ``num_qps_per_rank`` RC QPs per peer, QP depth 1024 (it must
    exceed 2 x (max tokens + 1) work requests in flight).
    """
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    if os.environ.get("MPIEP_ENABLE_MNNVL") != "1":
        os.environ["NVSHMEM_DISABLE_MNNVL"] = "1"
    os.environ.setdefault("NVSHMEM_IB_ENABLE_IBGDA", "1")
    os.environ.setdefault("NVSHMEM_IBGDA_NUM_RC_PER_PE", str(num_qps_per_rank))
    os.environ.setdefault("NVSHMEM_QP_DEPTH", "1024")
    os.environ.setdefault("NVSHMEM_MAX_TEAMS", "7")


def init_nvshmem(
    comm: Communicator, device_index: int, heap_bytes: int, num_qps_per_rank: int
) -> None:
    """Initialise NVSHMEM on every rank of ``comm`` (collective; once per process)."""
    core = _core()
    if core.nvshmem_initialized():
        if core.nvshmem_my_pe() != comm.rank or core.nvshmem_n_pes() != comm.size:
            raise RuntimeError(
                f"NVSHMEM already runs as PE {core.nvshmem_my_pe()} of {core.nvshmem_n_pes()} in "
                f"this process; a low-latency Buffer on rank {comm.rank} of {comm.size} "
                "cannot reuse it"
            )
        return
    configure_nvshmem_env(num_qps_per_rank)
    uid: bytes | None = None
    error = ""
    if comm.rank == 0:
        try:
            uid = bytes(core.nvshmem_get_unique_id())
        except Exception as exc:  # told to every rank below, so none waits in init
            error = str(exc)
            uid = b""
    uid = comm.bcast_bytes(uid, 0, "low-latency: NVSHMEM unique id")
    if not uid:
        raise RuntimeError(f"rank 0 could not create an NVSHMEM unique id: {error or 'see rank 0'}")
    core.nvshmem_init(uid, comm.rank, comm.size, device_index, heap_bytes)


def finalize_nvshmem() -> None:
    """Finalise NVSHMEM in this process (collective); engines must be destroyed first."""
    core = _core()
    if core.nvshmem_initialized():
        core.nvshmem_finalize()


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

    def __init__(
        self,
        comm: Communicator,
        device: torch.device,
        num_rdma_bytes: int,
        num_qps_per_rank: int,
        allow_nvlink: bool,
        timeout_s: float,
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
        init_nvshmem(comm, index, self.num_rdma_bytes, num_qps_per_rank)
        self.ctx = core.LowLatencyContext(
            index, self.num_rdma_bytes, self.allow_nvlink, self._num_blocks(index), float(timeout_s)
        )
        self._send, self._recv = core.LL_SEND_PHASE, core.LL_RECV_PHASE
        self._dispatch_buffer = 0
        self._combine_buffer = 0
        # Per buffer: a send phase was launched there and its receive hook not yet called.
        self._dispatch_pending = [False, False]
        self._combine_pending = [False, False]
        self._generation = 0  # bumped by clean_low_latency_buffer: older hooks are void

    # -- configuration -------------------------------------------------------------
    def _num_blocks(self, index: int) -> int:
        env = os.environ.get("MPIEP_LL_NUM_BLOCKS")
        if env:
            return max(1, int(env))
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        # Ranks sharing this GPU (tests under MPS) split its SMs: every block of every rank's
        # kernel must be resident at once, since receive blocks spin on the senders.
        ndev = max(1, torch.cuda.device_count())
        sharing = sum(
            1 for r in range(self.comm.local_size) if r % ndev == self.comm.local_rank % ndev
        )
        return max(1, sms // max(1, sharing))

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
        if err is None:
            return
        rank, phase, peer, index, observed, expected = err
        op, what = _WAIT_PHASES.get(phase, ("low-latency", "a signal"))
        src = f"rank {peer}" if peer >= 0 else "the expert ranks"
        where = "local expert" if phase in (1, 2) else "token"
        raise PeerTimeoutError(
            f"rank {rank}/{self.comm.size}: low-latency {op} timed out after {self.timeout_s:g}s "
            f"waiting for {what} from {src} ({where} {index}: saw {observed}, "
            f"expected {expected}); a peer crashed, hangs or skipped the call. "
            "Call clean_low_latency_buffer on every rank to recover"
        )

    def _claim(self, pending: list[bool], buffer: int, op: str) -> None:
        """Refuse a call whose buffer still holds sends waiting for their receive hook."""
        if pending[buffer]:
            raise RuntimeError(
                f"low-latency {op}: both buffers hold {op} calls whose receive hooks have not "
                f"been called (buffer {buffer} is the older); call that hook before the next "
                f"{op} (at most two {op} calls with return_recv_hook may wait for their hooks)"
            )

    def _make_hook(
        self, pending: list[bool], buffer: int, op: str, recv: Callable[[], None]
    ) -> Callable[[], None]:
        pending[buffer] = True
        generation = self._generation
        called = False

        def hook() -> None:
            nonlocal called
            if called:
                raise RuntimeError(f"this low-latency {op} receive hook was already called")
            if generation != self._generation:
                raise RuntimeError(
                    f"this low-latency {op} receive hook is from before clean_low_latency_buffer"
                )
            self.check()
            called = True
            pending[buffer] = False
            recv()

        return hook

    # -- dispatch ------------------------------------------------------------------
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        cumulative_local_expert_recv_stats: torch.Tensor | None,
        return_recv_hook: bool,
    ) -> LowLatencyDispatchResult:
        self.check()
        R, M, E = self.comm.size, int(num_max_dispatch_tokens_per_rank), int(num_experts)
        T, H = int(x.shape[0]), int(x.shape[1])
        K = int(topk_idx.shape[1])
        EL = E // R
        x = x.contiguous()
        topk_idx = topk_idx.to(torch.int64).contiguous()
        dev = self.device
        if use_fp8:
            recv_x = torch.empty((EL, R * M, H), dtype=torch.float8_e4m3fn, device=dev)
            if use_ue8m0:
                scales = torch.empty((EL, R * M, (H + 511) // 512), dtype=torch.int32, device=dev)
            else:
                scales = torch.empty((EL, R * M, H // 128), dtype=torch.float32, device=dev)
        else:
            recv_x = torch.empty((EL, R * M, H), dtype=torch.bfloat16, device=dev)
            scales = None
        recv_count = torch.empty((EL,), dtype=torch.int32, device=dev)
        src_idx = torch.empty((EL, R * M), dtype=torch.int32, device=dev)
        layout = torch.empty((EL, R, 2), dtype=torch.int32, device=dev)
        stats = cumulative_local_expert_recv_stats
        buffer = self._dispatch_buffer
        self._claim(self._dispatch_pending, buffer, "dispatch")
        self._dispatch_buffer ^= 1

        def launch(phases: int) -> None:
            self.ctx.dispatch(
                x.data_ptr(), topk_idx.data_ptr(), T, K, H, M, E,
                bool(use_fp8), bool(round_scale), bool(use_ue8m0),
                recv_x.data_ptr(), scales.data_ptr() if scales is not None else 0,
                recv_count.data_ptr(), src_idx.data_ptr(), layout.data_ptr(),
                stats.data_ptr() if stats is not None else 0,
                buffer, phases, torch.cuda.current_stream(dev).cuda_stream,
            )  # fmt: skip

        hook: Callable[[], None] | None = None
        if return_recv_hook:
            launch(self._send)
            hook = self._make_hook(
                self._dispatch_pending, buffer, "dispatch", lambda: launch(self._recv)
            )
        else:
            launch(self._send | self._recv)
        handle = LowLatencyHandle(
            num_max_dispatch_tokens_per_rank=M,
            hidden=H,
            num_experts=E,
            src_token_idx=src_idx,
            layout_range=layout,
            num_tokens=T,
            backend_state={"recv_count": recv_count, "dispatch_buffer": buffer},
        )
        return LowLatencyDispatchResult(recv_x, scales, recv_count, handle, hook)

    # -- combine -------------------------------------------------------------------
    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        zero_copy: bool,
        out: torch.Tensor | None,
        return_recv_hook: bool,
    ) -> tuple[torch.Tensor, Callable[[], None] | None]:
        self.check()
        M, E, H = handle.num_max_dispatch_tokens_per_rank, handle.num_experts, handle.hidden
        T, K = int(topk_idx.shape[0]), int(topk_idx.shape[1])
        x = x.contiguous()
        topk_idx = topk_idx.to(torch.int64).contiguous()
        topk_weights = topk_weights.to(torch.float32).contiguous()
        if out is None:
            out = torch.empty((T, H), dtype=torch.bfloat16, device=self.device)
        buffer = self._combine_buffer
        self._claim(self._combine_pending, buffer, "combine")
        self._combine_buffer ^= 1
        # Zero copy only when x really is the symmetric send area of this call's buffer;
        # otherwise the kernel stages rows there itself where NVSHMEM puts need it.
        zc = bool(zero_copy) and x.data_ptr() == self.ctx.combine_send_buffer(buffer, H, M, E)
        src_idx, layout = handle.src_token_idx, handle.layout_range

        def launch(phases: int) -> None:
            self.ctx.combine(
                x.data_ptr(), topk_idx.data_ptr(), topk_weights.data_ptr(),
                src_idx.data_ptr(), layout.data_ptr(), out.data_ptr(),
                T, K, H, M, E, zc, buffer, phases,
                torch.cuda.current_stream(self.device).cuda_stream,
            )  # fmt: skip

        hook: Callable[[], None] | None = None
        if return_recv_hook:
            launch(self._send)
            hook = self._make_hook(
                self._combine_pending, buffer, "combine", lambda: launch(self._recv)
            )
        else:
            launch(self._send | self._recv)
        return out, hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The symmetric area the next combine sends from: write expert outputs here and pass
        ``zero_copy=True`` to skip a copy. Shape [E_local, R * max, H], BF16."""
        M, E, H = handle.num_max_dispatch_tokens_per_rank, handle.num_experts, handle.hidden
        R = self.comm.size
        ptr = self.ctx.combine_send_buffer(self._combine_buffer, H, M, E)
        view = _DeviceView(ptr, (E // R, R * M, H), "<i2")
        return torch.as_tensor(view, device=self.device).view(torch.bfloat16)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Zero every signal and the timeout state (collective: every rank calls it)."""
        torch.cuda.synchronize(self.device)
        self.ctx.clean()
        self._dispatch_buffer = 0
        self._combine_buffer = 0
        self._dispatch_pending[:] = [False, False]
        self._combine_pending[:] = [False, False]
        self._generation += 1

    def destroy(self) -> None:
        """Free the symmetric heap (collective). NVSHMEM stays up for later engines in this
        process; :func:`finalize_nvshmem` shuts it down."""
        if self.ctx is not None:
            torch.cuda.synchronize(self.device)
            self.ctx.destroy()
            self.ctx = None  # type: ignore[assignment]
