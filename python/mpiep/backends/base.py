"""The interface every backend implements.

``Buffer`` validates arguments, agrees on them across ranks, handles streams and
events, and then calls exactly one of these methods. Inputs reaching a backend are
therefore already checked: right dtypes, shapes, devices, contiguity, ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from mpiep.config import Config
from mpiep.handles import DispatchHandle, LowLatencyHandle

if TYPE_CHECKING:  # type only: importing mpiep.comm starts MPI
    from mpiep.comm import Communicator
    from mpiep.errors import PeerTimeoutError


@dataclass(frozen=True)
class BackendSettings:
    """What a backend is built from: the Buffer's constructor arguments that size and place
    it. ``Buffer`` builds one and passes it down, so backends never import ``Buffer``."""

    comm: Communicator
    device: torch.device
    num_nvl_bytes: int
    num_rdma_bytes: int
    low_latency_mode: bool = False
    num_qps_per_rank: int = 24
    allow_nvlink_for_low_latency_mode: bool = True
    nvshmem_bootstrap: str | None = None  # "uid", "mpi", "auto" or None (env, then "uid")


@dataclass
class Layout:
    num_tokens_per_rank: torch.Tensor  # [R] int32
    num_tokens_per_rdma_rank: torch.Tensor | None  # [nodes] int32, None on one node
    num_tokens_per_expert: torch.Tensor  # [E] int32
    is_token_in_rank: torch.Tensor  # [T, R] bool


@dataclass
class DispatchResult:
    recv_x: torch.Tensor
    recv_x_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    num_recv_tokens_per_expert_list: list[int]
    handle: DispatchHandle


@dataclass
class LowLatencyDispatchResult:
    recv_x: torch.Tensor  # [E_local, R*max, H] bf16 or e4m3
    recv_x_scales: (
        torch.Tensor | None
    )  # [E_local, R*max, H/128] f32, or [.., ceil(H/512)] int32 (UE8M0)
    recv_count: torch.Tensor  # [E_local] int32
    handle: LowLatencyHandle
    hook: Callable[[], None] | None  # finishes the receive when return_recv_hook=True


# -- one request object per operation ---------------------------------------------------
# ``Buffer`` builds one per call from its arguments (checked) and hands it down unchanged:
# through the rank mask (``mpiep.shrink``), the backend and its engine, instead of ten
# positional arguments repeated at every layer. Slotted: building one costs ~0.3 us.


@dataclass(slots=True)
class DispatchRequest:
    """Normal dispatch. Cached mode (``handle`` set): ``layout``/``topk_*`` are None and
    ``num_experts``/``num_worst_tokens`` are the handle's."""

    x: torch.Tensor  # bf16 [T, H] or e4m3 [T, H]
    x_scales: torch.Tensor | None  # float32 [T, H/128] with e4m3 x
    topk_idx: torch.Tensor | None
    topk_weights: torch.Tensor | None
    layout: Layout | None
    handle: DispatchHandle | None
    num_experts: int
    expert_alignment: int
    num_worst_tokens: int
    config: Config


@dataclass(slots=True)
class CombineRequest:
    """Normal combine of the rows of ``handle``'s dispatch."""

    x: torch.Tensor  # bf16 [N, H]
    handle: DispatchHandle
    topk_weights: torch.Tensor | None
    bias: tuple[torch.Tensor, ...]
    config: Config


@dataclass(slots=True)
class LowLatencyDispatchRequest:
    x: torch.Tensor  # bf16 [T, H]
    topk_idx: torch.Tensor  # int64 [T, K]
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    use_fp8: bool
    round_scale: bool
    use_ue8m0: bool
    cumulative_local_expert_recv_stats: torch.Tensor | None
    return_recv_hook: bool


@dataclass(slots=True)
class LowLatencyCombineRequest:
    """``x`` is ignored with ``zero_copy`` (the rows are in the engine's combine buffer)."""

    x: torch.Tensor  # bf16 [E_local, R * max_tokens, H]
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    handle: LowLatencyHandle
    zero_copy: bool
    out: torch.Tensor | None
    return_recv_hook: bool


class Backend(Protocol):
    name: str
    # True when the low-latency calls check their own tensors (dtype, shape, device,
    # capacity) with Buffer's messages: Buffer then skips its Python checks without validation.
    native_checks: bool

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout: ...

    def dispatch(self, req: DispatchRequest) -> DispatchResult: ...

    def combine(self, req: CombineRequest) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def low_latency_dispatch(self, req: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """Returns the hook (when asked for) already bound to the receive-hook rules if the
        backend has a ``hook_tracker`` (``mpiep.hooks``); else ``Buffer`` applies them."""
        ...

    def low_latency_combine(
        self, req: LowLatencyCombineRequest
    ) -> tuple[torch.Tensor, Callable[[], None] | None]: ...

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor: ...

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None: ...

    def destroy(self) -> None: ...


class MaskingBackend(Backend, Protocol):
    """A backend whose low-latency kernels mask ranks themselves (``supports_masking``):
    ``mpiep.shrink`` routes masked calls to it; others run them through ``mpiep.masked_ll``."""

    supports_masking: bool

    def enable_rank_masking(self) -> None:
        """From now on every low-latency launch reads the mask (before any call)."""
        ...

    def set_active_ranks(self, active: list[int], comm: Communicator) -> None:
        """Set the agreed active ranks; collective over ``comm`` (theirs) on those ranks."""
        ...

    def settled_timeout(self) -> PeerTimeoutError | None:
        """At a low-latency combine's entry: a timeout the kernels recorded and masked the
        silent rank for, once every surviving rank is sure to have it too; else None."""
        ...
