"""Kernel configuration and buffer-size hints.

``Config`` keeps DeepEP's constructor so existing tuning tables carry over. The
normal-mode kernels of mpiep write every token straight to its final row in the
receiver's buffer (no ring), so the NVLink buffer must hold the largest receive
of one dispatch; :func:`get_normal_buffer_size_hint` computes that size.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

# Bytes that every buffer reserves for counters, flags and the count matrices.
CONTROL_BYTES = 1 << 20
# Rows are padded to this many bytes so that 16-byte vector copies stay aligned.
ROW_ALIGN = 16
FP8_BLOCK = 128  # channels per FP8 scale
# Per half of the low-latency buffer: counters and flags (kSignalBytes in low_latency.h).
LOW_LATENCY_SIGNAL_BYTES = 1 << 20


def _align(n: int, a: int = ROW_ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Config:
    """Per-call kernel configuration.

    ``num_sms`` is the number of SMs the normal-mode kernels may occupy (an even
    number: half send, half receive). The chunk sizes are kept for DeepEP
    compatibility and bound how many tokens a channel moves between signals.
    """

    num_sms: int = 24
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        if self.num_sms <= 0 or self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be a positive even number, got {self.num_sms}")
        for name in (
            "num_max_nvl_chunked_send_tokens",
            "num_max_nvl_chunked_recv_tokens",
            "num_max_rdma_chunked_send_tokens",
            "num_max_rdma_chunked_recv_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be positive")
        if self.num_max_nvl_chunked_send_tokens > self.num_max_nvl_chunked_recv_tokens:
            raise ValueError("Config: NVL send chunk must not exceed the NVL receive chunk")

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """DeepEP-compatible hint: bytes of the chunked NVLink queues of this config.

        mpiep's own kernels need :func:`get_normal_buffer_size_hint` instead; this
        one is kept so that DeepEP-style sizing code keeps working.
        """
        per_token = _align(hidden_bytes) + 64
        return (
            CONTROL_BYTES
            + self.num_channels * num_ranks * self.num_max_nvl_chunked_recv_tokens * per_token
        )

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """DeepEP-compatible hint for the RDMA queues (internode mode)."""
        per_token = _align(hidden_bytes) + 64
        return (
            CONTROL_BYTES
            + self.num_channels * num_ranks * self.num_max_rdma_chunked_recv_tokens * per_token * 2
        )


# -- the buffer formulas: the compiled core is their one source ------------------------------
# Where mpiep._C is built, the functions below ask it; the ``_mirror`` functions repeat its
# formulas for installs without the core (the reference backend on a laptop), and
# tests/test_sizes.py checks that every mirror agrees with the core wherever it is built.


@functools.cache
def _core() -> Any:
    """mpiep._C (``backends.native.core``), or None where it is not built (or does not load);
    cached either way, since the capacity checks ask on every call."""
    from mpiep.backends import native

    try:
        return native.core()
    except ImportError:
        return None


def normal_row_bytes(hidden: int, num_topk: int, fp8: bool) -> int:
    """Bytes of one token row in the normal-mode buffer: data, FP8 scales, then the top-k
    local ids (int32) and weights (float) and the source token id
    (``intranode::dispatch_row_bytes``, include/mpiep/intranode.h)."""
    c = _core()
    if c is None:
        return normal_row_bytes_mirror(hidden, num_topk, fp8)
    scales = hidden // FP8_BLOCK if fp8 else 0
    return int(c.intranode_dispatch_row_bytes(hidden * (1 if fp8 else 2), scales, num_topk))


def normal_row_bytes_mirror(hidden: int, num_topk: int, fp8: bool) -> int:
    data = hidden * (1 if fp8 else 2)
    scales = (hidden // FP8_BLOCK) * 4 if fp8 else 0
    return _align(data) + _align(scales) + _align(num_topk * (4 + 4) + 4)


def get_normal_buffer_size_hint(
    num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int = 8
) -> int:
    """NVLink buffer bytes for normal mode: a full receive of BF16 rows from every rank.

    The same region serves dispatch (rows received) and combine (rows sent back),
    so the larger of the two, a BF16 row with its metadata, sizes it.
    """
    row = normal_row_bytes(hidden, num_topk, fp8=False)
    return CONTROL_BYTES + num_ranks * num_max_tokens_per_rank * row


def low_latency_row_bytes(hidden: int) -> int:
    """Bytes of one low-latency message: BF16 payload (FP8 + scales fits inside) and a header."""
    return _align(16 + hidden * 2)


def get_low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Symmetric (NVSHMEM) bytes needed by low-latency mode, double-buffered: two halves of
    ``half_bytes_needed`` (include/mpiep/low_latency.h), each rounded to 4 KiB."""
    if num_experts % num_ranks:
        raise ValueError(
            f"num_experts ({num_experts}) must be a multiple of the rank count ({num_ranks})"
        )
    c = _core()
    if c is None:
        return low_latency_rdma_size_mirror(num_max_dispatch_tokens_per_rank, hidden, num_experts)
    half = int(c.low_latency_half_bytes(hidden, num_max_dispatch_tokens_per_rank, num_experts))
    return 2 * _align(half, 4096)


def low_latency_rdma_size_mirror(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
) -> int:
    """The Python mirror of :func:`get_low_latency_rdma_size_hint`. Each of the two halves
    holds a fixed 1 MiB signal area, the staged send messages (``max`` rows), the dispatch
    receive slots (``num_experts * max`` rows), and the combine send and receive areas
    (``num_experts * max`` BF16 rows each). Dispatch and combine do not share memory, so a
    combine can never overwrite dispatch data that a late receive hook still reads.
    """
    m, e = num_max_dispatch_tokens_per_rank, num_experts
    row = low_latency_row_bytes(hidden)
    per_buffer = (
        LOW_LATENCY_SIGNAL_BYTES
        + _align(m * row, 128)
        + _align(e * m * row, 128)
        + 2 * _align(e * m * hidden * 2, 128)
    )
    return 2 * _align(per_buffer, 4096)


# -- internode normal mode (include/mpiep/internode.h) --
INTERNODE_MAX_LOCAL_EXPERTS = 1024
INTERNODE_CHUNKS_PER_SOURCE = 4096


def internode_rdma_control_bytes(num_ranks: int, num_nodes: int) -> int:
    """Bytes of the symmetric control area (flags, the notify's count rows and staging)."""
    c = _core()
    if c is None:
        return internode_rdma_control_bytes_mirror(num_ranks, num_nodes)
    return int(c.internode_rdma_control_bytes(num_ranks, num_nodes))


def internode_rdma_control_bytes_mirror(num_ranks: int, num_nodes: int) -> int:
    r, n = num_ranks, num_nodes
    parts = [
        r * 8,  # notify flags: count rows
        r * 8,  # notify flags: expert counts
        n * 8,  # barrier flags
        n * INTERNODE_CHUNKS_PER_SOURCE * 8,  # dispatch chunk flags
        n * INTERNODE_CHUNKS_PER_SOURCE * 8,  # combine chunk flags
        2 * r * (r + n + 1) * 4,  # count rows, double-buffered
        2 * r * INTERNODE_MAX_LOCAL_EXPERTS * 4,  # expert counts, double-buffered
        (r + n + 1 + r * INTERNODE_MAX_LOCAL_EXPERTS) * 4,  # staging of my own
    ]
    return _align(sum(_align(p, 128) for p in parts), 4096)


def internode_rdma_row_bytes(hidden: int, num_topk: int, ranks_per_node: int, fp8: bool) -> int:
    """Bytes of one token row in the RDMA area: data, FP8 scales, top-k, source, positions."""
    c = _core()
    if c is None:
        return internode_rdma_row_bytes_mirror(hidden, num_topk, ranks_per_node, fp8)
    scales = hidden // FP8_BLOCK if fp8 else 0
    return int(
        c.internode_rdma_dispatch_row_bytes(
            hidden * (1 if fp8 else 2), scales, num_topk, ranks_per_node
        )
    )


def internode_rdma_row_bytes_mirror(
    hidden: int, num_topk: int, ranks_per_node: int, fp8: bool
) -> int:
    data = hidden * (1 if fp8 else 2)
    scales = (hidden // FP8_BLOCK) * 4 if fp8 else 0
    return _align(data) + _align(scales) + _align((2 * num_topk + 1 + ranks_per_node) * 4)


def get_internode_rdma_size_hint(
    num_max_tokens_per_rank: int,
    hidden: int,
    num_ranks: int,
    ranks_per_node: int,
    num_topk: int = 8,
) -> int:
    """``num_rdma_bytes`` for normal mode across nodes that no routing can overflow.

    A rank receives over RDMA at most ``max_tokens`` rows from each of the ``N`` nodes (as
    the forwarder of its node) and sends at most that many (its staged puts), BF16 rows
    with their metadata. Routing that spreads tokens over ``G`` of ``N`` nodes needs about
    ``G / N`` of this; a smaller buffer works as long as no call exceeds it (a call that
    does raises ``CapacityError`` on every rank).
    """
    if num_ranks % ranks_per_node:
        raise ValueError(
            f"ranks_per_node ({ranks_per_node}) must divide the rank count ({num_ranks})"
        )
    nodes = num_ranks // ranks_per_node
    row = internode_rdma_row_bytes(hidden, num_topk, ranks_per_node, fp8=False)
    data = 2 * nodes * num_max_tokens_per_rank * row
    return internode_rdma_control_bytes(num_ranks, nodes) + _align(data, 4096)


# Defaults per EP size, from the tuner's first runs; `mpiep tune` can override them.
_DEFAULT_DISPATCH = {2: Config(24, 6, 256), 4: Config(24, 6, 256), 8: Config(24, 6, 256)}
_DEFAULT_COMBINE = {2: Config(24, 10, 256), 4: Config(24, 9, 256), 8: Config(24, 4, 256)}


def _tuned_sms(num_ranks: int, kind: str) -> int | None:
    """SM count that ``mpiep tune`` measured best, from the file MPIEP_TUNED_CONFIG names."""
    path = os.environ.get("MPIEP_TUNED_CONFIG")
    if not path:
        return None
    entry = _tuned_table(path).get(str(num_ranks), {}).get(kind)
    return int(entry["num_sms"]) if entry else None


@functools.lru_cache(maxsize=8)
def _tuned_table(path: str) -> dict:
    """The tuned table, read once per path (calls ask for configs on every dispatch)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=256)
def _config(num_sms: int, chunks: tuple[int, int, int, int]) -> Config:
    return Config(num_sms, *chunks)


def default_dispatch_config(num_ranks: int, num_sms: int, use_tuned: bool = True) -> Config:
    base = _DEFAULT_DISPATCH.get(num_ranks, Config(num_sms))
    tuned = _tuned_sms(num_ranks, "dispatch") if use_tuned else None
    return _config(tuned or num_sms, _chunks(base))


def default_combine_config(num_ranks: int, num_sms: int, use_tuned: bool = True) -> Config:
    base = _DEFAULT_COMBINE.get(num_ranks, Config(num_sms))
    tuned = _tuned_sms(num_ranks, "combine") if use_tuned else None
    return _config(tuned or num_sms, _chunks(base))


def _chunks(c: Config) -> tuple[int, int, int, int]:
    return (
        c.num_max_nvl_chunked_send_tokens,
        c.num_max_nvl_chunked_recv_tokens,
        c.num_max_rdma_chunked_send_tokens,
        c.num_max_rdma_chunked_recv_tokens,
    )
