"""Handles: what a dispatch remembers so that combine (and cached dispatch) can undo it.

Fields common to every backend are typed here; a backend keeps whatever else it
needs (GPU prefix matrices, buffer slots) in ``backend_state``. ``Buffer`` stamps every
handle with the Buffer that made it and the call (``owner``, ``generation``) and checks
them before the handle is used again (``mpiep.handle_checks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DispatchHandle:
    """Result of a normal-mode dispatch, consumed by ``combine`` and cached ``dispatch``.

    Sender side: ``is_token_in_rank`` [T, R] and ``num_tokens_per_rank`` [R] (rows sent
    to each rank). Receiver side: ``num_recv_per_src`` [R] (rows received from each
    rank, in rank order), ``recv_src_idx`` [N] (the source's token id of each row),
    and ``num_recv_tokens`` (N, the real rows; with ``num_worst_tokens`` the output
    has that many rows, the rest padding).
    """

    num_ranks: int
    num_experts: int
    hidden: int
    is_token_in_rank: torch.Tensor
    num_tokens_per_rank: torch.Tensor
    num_recv_per_src: torch.Tensor
    recv_src_idx: torch.Tensor
    num_recv_tokens: int
    num_recv_tokens_per_expert_list: list[int]
    num_worst_tokens: int = 0
    backend_state: dict[str, Any] = field(default_factory=dict)
    owner: int = 0  # id of the Buffer that made it (0: not stamped yet)
    generation: int = 0  # which dispatch of that Buffer: the same number on every rank

    @property
    def num_tokens(self) -> int:
        return int(self.is_token_in_rank.shape[0])

    @property
    def num_output_rows(self) -> int:
        return self.num_worst_tokens if self.num_worst_tokens > 0 else self.num_recv_tokens


@dataclass
class LowLatencyHandle:
    """Result of a low-latency dispatch, consumed by ``low_latency_combine``.

    ``src_token_idx`` [E_local, R * max_tokens] int32: the source token id of each
    received row (-1 past ``recv_count``). ``layout_range`` [E_local, R, 2] int32:
    (first row, row count) of each source rank's group inside an expert's rows.
    """

    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    src_token_idx: torch.Tensor
    layout_range: torch.Tensor
    num_tokens: int = 0
    backend_state: dict[str, Any] = field(default_factory=dict)
    owner: int = 0  # id of the Buffer that made it (0: not stamped yet)
    generation: int = 0  # which low-latency dispatch of that Buffer, the same on every rank
    mask_epoch: int = 0  # with rank masking, generations count from each change of the mask
    num_ranks: int = 0
    # The dispatched topk_idx: combine must be given the same one. A reference and its
    # version counter (identity costs nothing), plus a copy when the Buffer validates.
    topk_idx: torch.Tensor | None = None
    topk_version: int = -1
    topk_copy: torch.Tensor | None = None
    ticket: Any = None  # mpiep.hooks.HookTicket of the receive hook, None without one
