"""``mpiep.deep_ep.Buffer``: DeepEP V1's ``deep_ep.Buffer``, running on mpiep.

A thin layer over :class:`mpiep.Buffer` (composition): it takes DeepEP's constructor
(a torch ``ProcessGroup`` first, or ``comm=`` an mpi4py communicator), converts DeepEP's
events and handle tuples at the boundary, and returns DeepEP's tuples in DeepEP's order.
Every argument's fate is listed in docs/deep_ep_compat.md.

Importing this module imports torch but not mpi4py; MPI starts when the first Buffer is
created (mpi4py initialises it on import).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from mpiep import config as cfg
from mpiep.deep_ep.group import comm_from_process_group, is_process_group
from mpiep.deep_ep.handles import (
    DispatchHandleTuple,
    LowLatencyHandleTuple,
    unwrap_dispatch_handle,
    unwrap_low_latency_handle,
)
from mpiep.deep_ep.utils import EventHandle, EventOverlap, from_mpiep_event, to_mpiep_event
from mpiep.errors import CapacityError

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpiep.buffer import Buffer as MpiepBuffer

# DeepEP's NVLink buffer holds chunked ring queues whose size does not depend on the token
# count; mpiep's holds a whole receive. Config.get_nvl_buffer_size_hint, which DeepEP-style
# sizing code calls, therefore assumes a token budget per rank (env MPIEP_MAX_TOKENS_PER_RANK).
MAX_TOKENS_ENV = "MPIEP_MAX_TOKENS_PER_RANK"
DEFAULT_MAX_TOKENS_PER_RANK = 4096
HINT_NUM_TOPK = 32  # top-k the size hint reserves metadata for (its callers do not say)

topk_idx_t = torch.int64  # DeepEP's deep_ep.topk_idx_t in its default build


def max_tokens_per_rank() -> int:
    """The token budget per rank behind ``Config.get_nvl_buffer_size_hint``."""
    raw = os.environ.get(MAX_TOKENS_ENV)
    if raw is None:
        return DEFAULT_MAX_TOKENS_PER_RANK
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_TOKENS_ENV} must be a positive integer, got {raw!r}")
    return value


class Config(cfg.Config):
    """DeepEP's ``Config(num_sms, num_max_nvl_chunked_send_tokens,
    num_max_nvl_chunked_recv_tokens, num_max_rdma_chunked_send_tokens,
    num_max_rdma_chunked_recv_tokens)``: :class:`mpiep.Config` with DeepEP's size hints
    turned into what mpiep needs.

    mpiep's kernels use ``num_sms`` (even); the chunk sizes are accepted and checked but do
    not change how mpiep moves data. The default ``num_sms`` is mpiep's 24 (DeepEP: 20).
    """

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """NVLink bytes for normal mode: DeepEP's queue size or, when larger, a whole
        receive of ``MPIEP_MAX_TOKENS_PER_RANK`` (default 4096) tokens from every rank.

        ``hidden_bytes`` is DeepEP's ``hidden * max(element_size, 2)``.
        """
        hidden = -(-int(hidden_bytes) // 2)
        need = cfg.get_normal_buffer_size_hint(
            max_tokens_per_rank(), hidden, num_ranks, HINT_NUM_TOPK
        )
        return max(super().get_nvl_buffer_size_hint(hidden_bytes, num_ranks), need)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """RDMA bytes for normal mode across nodes: none on one node; else what a whole
        exchange of ``MPIEP_MAX_TOKENS_PER_RANK`` (default 4096) tokens per rank needs
        (:func:`mpiep.config.get_internode_rdma_size_hint`), with ``MPIEP_RANKS_PER_NODE``
        (default 8, DeepEP's NVLink domain) ranks per node."""
        per_node = int(os.environ.get("MPIEP_RANKS_PER_NODE") or 8)
        if num_ranks <= per_node:
            return 0
        hidden = -(-int(hidden_bytes) // 2)
        return cfg.get_internode_rdma_size_hint(
            max_tokens_per_rank(), hidden, num_ranks, per_node, HINT_NUM_TOPK
        )


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"mpiep.deep_ep: {message}", stacklevel=3)


def _check_cost_stats(name: str, t: torch.Tensor | None, num_ranks: int) -> None:
    """DeepEP's wait-time statistics tensors are checked as DeepEP does, then left alone."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor")
    if t.dim() != 1 or t.shape[0] != num_ranks or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [num_ranks={num_ranks}] tensor")
    _warn_once(
        name,
        f"{name} is accepted but not updated: mpiep does not time the waits on each peer "
        "(a silent peer raises PeerTimeoutError instead)",
    )


def _with_sizing_note(error: CapacityError) -> CapacityError:
    """A CapacityError about the NVLink buffer, plus how DeepEP-style sizing maps here."""
    text = str(error)
    if "num_nvl_bytes" not in text:
        return error
    return CapacityError(
        f"{text}. mpiep.deep_ep: mpiep's NVLink buffer holds a whole receive, and "
        f"Config.get_nvl_buffer_size_hint sizes it for {MAX_TOKENS_ENV}="
        f"{max_tokens_per_rank()} tokens per rank; raise that variable, or create the Buffer "
        "with num_nvl_bytes >= mpiep.get_normal_buffer_size_hint(max_tokens, hidden, "
        "num_ranks, num_topk)"
    )


class Buffer:
    """DeepEP's ``Buffer`` on mpiep: expert-parallel dispatch/combine for one group of ranks.

    Args (DeepEP's, in DeepEP's order; the first seven may be positional):
        group: a ``torch.distributed.ProcessGroup`` (torch ranks must equal MPI world ranks:
            launch with ``mpirun``/``srun``), or an mpi4py communicator.
        num_nvl_bytes: normal-mode buffer; mpiep holds a whole receive in it (see
            :meth:`Config.get_nvl_buffer_size_hint`).
        num_rdma_bytes: low-latency buffer (:meth:`get_low_latency_rdma_size_hint`).
        low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl:
            as in DeepEP, passed to :class:`mpiep.Buffer`.

    Keyword-only (DeepEP V1 and DeepEP V2's legacy Buffer order them differently):
        use_fabric: accepted, no effect (mpiep maps node-local buffers with CUDA IPC).
        explicitly_destroy: as in DeepEP (``destroy()`` may be called either way here).
        enable_shrink: rank masking in low-latency mode (``mpiep.Buffer(enable_shrink=True)``):
            a silent rank is masked and low-latency calls go on among the others.
        comm: an mpi4py communicator, when ``group`` is None.

    mpiep's own keywords (``backend``, ``ranks_per_node``, ``timeout_s``, ``validate``,
    ``device``) pass through to :class:`mpiep.Buffer`.
    """

    num_sms: int = cfg.Config().num_sms
    _num_sms_set: bool = False  # set_num_sms() wins over a tuned table (MPIEP_TUNED_CONFIG)

    def __init__(
        self,
        group: Any = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        *,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: MPI.Comm | None = None,
        backend: str = "auto",
        ranks_per_node: int | None = None,
        timeout_s: float | None = None,
        validate: bool | None = None,
        device: str | torch.device | None = None,
        nvshmem_bootstrap: str | None = None,
    ) -> None:
        mpi_comm, owned = self._resolve_comm(group, comm)
        from mpiep.buffer import Buffer as MpiepBuffer

        try:
            self._buffer: MpiepBuffer = MpiepBuffer(
                mpi_comm,
                num_nvl_bytes,
                num_rdma_bytes,
                low_latency_mode,
                num_qps_per_rank,
                allow_nvlink_for_low_latency_mode,
                allow_mnnvl,
                explicitly_destroy,
                backend=backend,
                ranks_per_node=ranks_per_node,
                timeout_s=timeout_s,
                validate=validate,
                device=device,
                enable_shrink=bool(enable_shrink),
                nvshmem_bootstrap=nvshmem_bootstrap,
            )
        finally:
            if owned:
                mpi_comm.Free()  # mpiep's Buffer keeps its own duplicate
        # DeepEP's public attributes.
        self.rank: int = self._buffer.rank
        self.group_size: int = self._buffer.group_size
        self.group: Any = group if group is not None else comm
        self.num_nvl_bytes: int = num_nvl_bytes
        self.num_rdma_bytes: int = num_rdma_bytes
        self.low_latency_mode: bool = low_latency_mode
        self.explicitly_destroy: bool = explicitly_destroy
        self.enable_shrink: bool = bool(enable_shrink)
        self.use_fabric: bool = bool(use_fabric)

    @staticmethod
    def _resolve_comm(group: Any, comm: Any) -> tuple[Any, bool]:
        """The MPI communicator to build on, and whether it was created here."""
        if group is not None and comm is not None:
            raise ValueError("pass either group (a ProcessGroup) or comm (mpi4py), not both")
        if group is None and comm is None:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        if comm is None and type(group).__module__.startswith("mpi4py"):
            comm, group = group, None  # an mpi4py communicator given positionally
        if comm is not None:
            return comm, False  # mpiep's Buffer checks its type
        if is_process_group(group):
            return comm_from_process_group(group), True
        raise TypeError(
            "group must be a torch.distributed.ProcessGroup or an mpi4py communicator, got "
            f"{group!r} (on ranks outside a subgroup, do not create the Buffer)"
        )

    # -- mpiep's side ----------------------------------------------------------------------
    @property
    def mpiep_buffer(self) -> MpiepBuffer:
        """The :class:`mpiep.Buffer` underneath."""
        return self._buffer

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def num_nodes(self) -> int:
        return self._buffer.num_nodes

    def __repr__(self) -> str:
        return f"mpiep.deep_ep.{self._buffer!r}"

    # -- DeepEP's class-level helpers --------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: every feature DeepEP builds only for SM90 (FP8 dispatch, FP8 low-latency
        casts, UE8M0 scales) exists on every mpiep backend."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SMs of the normal-mode kernels (even), as used by the default configs."""
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(f"The SM count must be a positive even number, got {new_num_sms}")
        Buffer.num_sms = new_num_sms
        Buffer._num_sms_set = True

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream (DeepEP: ``EventOverlap(EventHandle())``)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """mpiep's low-latency buffer size (not DeepEP's: the layouts differ)."""
        return cfg.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """mpiep's default dispatch config (any rank count; DeepEP knows a fixed list)."""
        base = cfg.default_dispatch_config(num_ranks, Buffer.num_sms, not Buffer._num_sms_set)
        return Config(*_fields(base))

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """mpiep's default combine config."""
        base = cfg.default_combine_config(num_ranks, Buffer.num_sms, not Buffer._num_sms_set)
        return Config(*_fields(base))

    # -- buffers and streams -----------------------------------------------------------------
    def destroy(self) -> None:
        """Release the buffers (collective). Allowed whatever ``explicitly_destroy`` says."""
        self._buffer.destroy()

    def get_comm_stream(self) -> torch.cuda.Stream | None:
        """The communication stream (None on CPU, where ``torch.cuda.stream(None)`` is a
        no-op context, so DeepEP-style ``with torch.cuda.stream(...)`` code still runs)."""
        return self._buffer.comm_stream

    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: torch.Size | None = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """Not supported: DeepEP exposes its raw ring buffers here, and mpiep's buffers have
        another layout (a control area, then rows at their final positions) that callers
        must not write into. For zero-copy low-latency combine use
        :meth:`get_next_low_latency_combine_buffer`."""
        raise NotImplementedError(
            "get_local_buffer_tensor: mpiep's buffers are not DeepEP's ring buffers, so a raw "
            "view of them has no DeepEP meaning (and writing into it would corrupt calls in "
            "flight); for zero-copy low-latency combine use get_next_low_latency_combine_buffer"
        )

    # -- normal mode -------------------------------------------------------------------------
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert,
        is_token_in_rank, event)``, as DeepEP."""
        per_rank, per_rdma, per_expert, in_rank, event = self._buffer.get_dispatch_layout(
            topk_idx,
            num_experts,
            previous_event=to_mpiep_event(previous_event),
            async_finish=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream,
        )
        return per_rank, per_rdma, per_expert, in_rank, from_mpiep_event(event)

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: Any = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: cfg.Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Any, torch.Tensor | None, torch.Tensor | None, list[int] | None, Any, EventOverlap]:
        """``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``, as DeepEP; the handle is a :class:`DispatchHandleTuple`.

        Cached mode (``handle=`` an earlier dispatch's handle) returns
        ``(recv_x, None, None, None, None, event)``, as DeepEP.
        """
        cached = handle is not None
        inner = unwrap_dispatch_handle(handle) if cached else None
        if cached and (topk_idx is not None or topk_weights is not None):
            raise ValueError("cached dispatch (handle=...) takes no topk_idx or topk_weights")
        if config is None:
            config = self.get_dispatch_config(self.group_size)
        try:
            recv_x, recv_idx, recv_w, counts, new_handle, event = self._buffer.dispatch(
                x,
                handle=inner,
                num_tokens_per_rank=num_tokens_per_rank,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert,
                topk_idx=topk_idx,
                topk_weights=topk_weights,
                expert_alignment=expert_alignment,
                num_worst_tokens=num_worst_tokens,
                config=config,
                previous_event=to_mpiep_event(previous_event),
                async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream,
            )
        except CapacityError as exc:
            raise _with_sizing_note(exc) from exc
        if cached:
            return recv_x, None, None, None, None, from_mpiep_event(event)
        return (
            recv_x,
            recv_idx,
            recv_w,
            [int(c) for c in counts] if counts is not None else None,
            DispatchHandleTuple(new_handle, self._buffer.num_nodes),
            from_mpiep_event(event),
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: Any,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        config: cfg.Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """``(combined_x, combined_topk_weights, event)``, as DeepEP (sum without weights)."""
        inner = unwrap_dispatch_handle(handle)
        if config is None:
            config = self.get_combine_config(self.group_size)
        try:
            combined, weights, event = self._buffer.combine(
                x,
                inner,
                topk_weights=topk_weights,
                bias=bias,
                config=config,
                previous_event=to_mpiep_event(previous_event),
                async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream,
            )
        except CapacityError as exc:
            raise _with_sizing_note(exc) from exc
        return combined, weights, from_mpiep_event(event)

    # DeepEP exposes its internode paths too ("normally you should not call"); mpiep picks
    # the path itself, so they are the same calls.
    internode_dispatch = dispatch
    internode_combine = combine

    # -- low-latency mode --------------------------------------------------------------------
    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        self._buffer.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandleTuple, EventOverlap, Callable[[], None] | None]:
        """``(recv_x, recv_count, handle, event, hook)``, as DeepEP; the handle is a
        :class:`LowLatencyHandleTuple`."""
        _check_cost_stats(
            "dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, self.group_size
        )
        recv_x, recv_count, handle, event, hook = self._buffer.low_latency_dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            async_finish=async_finish,
            return_recv_hook=return_recv_hook,
        )
        return recv_x, recv_count, LowLatencyHandleTuple(handle), from_mpiep_event(event), hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: Any,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """``(combined_x, event, hook)``, as DeepEP (weighted sum)."""
        _check_cost_stats(
            "combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, self.group_size
        )
        if use_logfmt:
            _warn_once(
                "use_logfmt",
                "use_logfmt=True is accepted but the combine sends BF16 (mpiep has no LogFMT "
                "encoding): results are at least as exact, the bytes are not reduced",
            )
        combined, event, hook = self._buffer.low_latency_combine(
            x,
            topk_idx,
            topk_weights,
            unwrap_low_latency_handle(handle),
            zero_copy=zero_copy,
            async_finish=async_finish,
            return_recv_hook=return_recv_hook,
            out=out,
        )
        return combined, from_mpiep_event(event), hook

    def get_next_low_latency_combine_buffer(self, handle: Any) -> torch.Tensor:
        """The bf16 [E_local, R * max_tokens, H] buffer that ``zero_copy`` combine reads."""
        return self._buffer.get_next_low_latency_combine_buffer(unwrap_low_latency_handle(handle))

    # Rank masking (enable_shrink=True): mpiep.Buffer's, with DeepEP's names.
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        self._buffer.low_latency_update_mask_buffer(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        self._buffer.low_latency_query_mask_buffer(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        self._buffer.low_latency_clean_mask_buffer()


def _fields(c: cfg.Config) -> tuple[int, int, int, int, int]:
    return (
        c.num_sms,
        c.num_max_nvl_chunked_send_tokens,
        c.num_max_nvl_chunked_recv_tokens,
        c.num_max_rdma_chunked_send_tokens,
        c.num_max_rdma_chunked_recv_tokens,
    )
