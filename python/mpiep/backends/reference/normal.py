"""Normal-mode dispatch and combine of the reference backend.

Dispatch sends each token once to every rank that owns one of its experts, rows grouped
by destination rank in token order, so that receivers see rows by source rank, then
source token (the contract's order) without sorting. Two collectives run together: the
rows themselves, read by MPI out of ``x`` in runs of consecutive tokens and received
straight into ``recv_x`` (no packing or unpacking copy), and one packed matrix of the small
per-row fields (FP8 scales, source token id, top-k ids and weights).

Every count travels in one allgather first, so every rank sees every rank's send and
receive counts and all raise the same error (capacity, mismatched handles) before any
data moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from mpi4py import MPI

from mpiep.backends.base import CombineRequest, DispatchRequest, DispatchResult
from mpiep.backends.reference import datatypes as dt
from mpiep.backends.reference.exchange import Exchange, as_numpy
from mpiep.backends.reference.fused import gather_sum
from mpiep.backends.reference.host_cache import host_empty
from mpiep.backends.reference.packing import RowLayout
from mpiep.backends.reference.reduce import rows_by_token
from mpiep.config import CONTROL_BYTES, normal_row_bytes
from mpiep.errors import CapacityError
from mpiep.handles import DispatchHandle

if TYPE_CHECKING:
    from mpiep.backends.reference.backend import ReferenceBackend


def on_cpu(t: torch.Tensor) -> torch.Tensor:
    """Stage a tensor on the CPU (once per call; a no-op for CPU tensors)."""
    return t if t.device.type == "cpu" else t.cpu()


Counts = torch.Tensor | np.ndarray | None


def start_counts(
    backend: ReferenceBackend, phase: str, *parts: tuple[int, Counts]
) -> tuple[Exchange, np.ndarray]:
    """Start an allgather of fixed-width int64 vectors: ``parts`` are (width, values or
    None for -1s). The [R, total width] result is valid once the exchange is waited for;
    a caller can do its local work in between."""
    width = sum(w for w, _ in parts)
    mine = np.full(width, -1, dtype=np.int64)
    at = 0
    for w, values in parts:
        if isinstance(values, torch.Tensor):
            values = on_cpu(values).to(torch.int64).numpy()
        if values is not None:
            mine[at : at + w] = values
        at += w
    everyone = np.empty((backend.comm.size, width), dtype=np.int64)
    exchange = backend.exchange(phase)
    exchange.start_allgather(mine, everyone)
    return exchange, everyone


def gather_counts(backend: ReferenceBackend, phase: str, *parts: tuple[int, Counts]) -> np.ndarray:
    """:func:`start_counts` and wait."""
    exchange, everyone = start_counts(backend, phase, *parts)
    backend.wait(exchange)
    return everyone


def _check_capacity(backend: ReferenceBackend, matrix: np.ndarray, row_bytes: int) -> None:
    """Every rank checks every rank's receive (and combine's return), so all raise together."""
    capacity = max(backend.num_nvl_bytes - CONTROL_BYTES, 0) // row_bytes
    received, sent = matrix.sum(axis=0), matrix.sum(axis=1)
    worst = int(np.argmax(np.maximum(received, sent)))
    need = int(max(received[worst], sent[worst]))
    if need > capacity:
        raise CapacityError(
            f"dispatch: rank {worst} would receive {need} rows but the NVLink buffer "
            f"(num_nvl_bytes={backend.num_nvl_bytes}) holds {capacity} rows of {row_bytes} "
            "bytes; size it with mpiep.get_normal_buffer_size_hint()"
        )


def token_runs(
    dest: np.ndarray, token: np.ndarray, num_ranks: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per destination rank, the runs of consecutive token ids it gets: (lengths, first
    tokens). ``dest`` ascending, ``token`` ascending within each destination."""
    n = token.size
    new = np.ones(n, dtype=bool)
    new[1:] = (np.diff(token) != 1) | (np.diff(dest) != 0)
    starts = np.flatnonzero(new)
    lengths = np.diff(np.append(starts, n))
    where = dest[starts]
    return [(lengths[where == d], token[starts][where == d]) for d in range(num_ranks)]


def row_types(
    x: torch.Tensor,
    runs: list[tuple[np.ndarray, np.ndarray]],
    recv_x: torch.Tensor,
    recv_per_src: list[int],
    rank: int,
) -> tuple[list[MPI.Datatype], list[MPI.Datatype]]:
    """Ialltoallw datatypes: runs of rows of ``x`` to each peer, each source's rows into
    its block of ``recv_x``; none to or from this rank. Runs average ~10 rows at top-8 of
    256, and MPI packs them as it sends: on 4 ranks x 2 cores the dispatch took 7-15% less
    time than with a gather into a send buffer first (interleaved A/B, 6 of 8 runs; the
    exchange alone 25%), where single picked rows had been 2.4x slower."""
    row = dt.row_type(x.shape[1] * x.element_size())
    x_np = as_numpy(x)
    rows = as_numpy(recv_x).reshape(recv_x.shape[0], -1) if recv_x.numel() else as_numpy(recv_x)
    sends, recvs = [], []
    at = 0
    for peer, (lengths, firsts) in enumerate(runs):
        if peer == rank:
            sends.append(dt.peer_type([]))
            recvs.append(dt.peer_type([]))
        else:
            sends.append(dt.peer_type([(x_np, dt.row_runs(row, lengths, firsts))]))
            recvs.append(dt.peer_type([dt.contiguous(rows, at, recv_per_src[peer], row)]))
        at += recv_per_src[peer]
    row.Free()
    return sends, recvs


def check_handles(matrix: np.ndarray, expected: np.ndarray, what: str) -> None:
    """``expected[d, s]``: rows rank d's handle expects from rank s; ``matrix[s, d]``: rows
    s sends to d. A mismatch means handles of different dispatches."""
    bad = np.argwhere(expected != matrix.T)
    if bad.size:
        d, s = (int(v) for v in bad[0])
        raise ValueError(
            f"{what}: rank {d} expects {int(expected[d, s])} rows from rank {s}, which sends "
            f"{int(matrix[s, d])}: the ranks passed handles of different dispatches"
        )


def dispatch(backend: ReferenceBackend, req: DispatchRequest) -> DispatchResult:
    x, x_scales, topk_idx, topk_weights = req.x, req.x_scales, req.topk_idx, req.topk_weights
    layout, handle, num_experts = req.layout, req.handle, req.num_experts
    expert_alignment, num_worst_tokens = req.expert_alignment, req.num_worst_tokens
    comm, device = backend.comm, backend.device
    num_ranks, rank = comm.size, comm.rank
    experts_per_rank = num_experts // num_ranks
    hidden = x.shape[1]
    cached = handle is not None
    in_rank = on_cpu(handle.is_token_in_rank if cached else layout.is_token_in_rank)
    num_topk = topk_idx.shape[1] if topk_idx is not None else 0

    # Rows go out grouped by destination rank, each group in token order.
    dest, token = torch.nonzero(in_rank.t(), as_tuple=True)
    send_counts = torch.bincount(dest, minlength=num_ranks)
    counting, everyone = start_counts(
        backend,
        "dispatch: count exchange",
        (num_ranks, send_counts),
        (num_ranks, handle.num_recv_per_src if cached else None),
        (num_experts, None if cached else layout.num_tokens_per_expert),
    )
    # While the counts travel: the runs of consecutive tokens each rank gets, which MPI
    # reads straight out of x (this rank's own rows go into recv_x below and skip MPI).
    xc = on_cpu(x)
    if xc.numel() == 0 or not xc.is_contiguous():  # MPI reads x through its address
        xc = xc.clone(memory_format=torch.contiguous_format)
    first = int(send_counts[:rank].sum())
    last = first + int(send_counts[rank])
    runs = token_runs(dest.numpy(), token.numpy(), num_ranks)
    backend.wait(counting)

    matrix = everyone[:, :num_ranks]  # [s, d]: rows s sends to d
    if cached:
        check_handles(matrix, everyone[:, num_ranks : 2 * num_ranks], "cached dispatch")
    _check_capacity(backend, matrix, normal_row_bytes(hidden, num_topk, fp8=False))
    received = matrix.sum(axis=0)
    if num_worst_tokens and num_worst_tokens < int(received.max()):
        worst = int(received.argmax())
        raise CapacityError(
            f"dispatch: num_worst_tokens={num_worst_tokens} is below the {int(received[worst])} "
            f"rows rank {worst} receives"
        )
    num_recv = int(received[rank])
    recv_per_src = matrix[:, rank]
    out_rows = num_worst_tokens or num_recv
    recv_x = host_empty((out_rows, hidden), x.dtype)  # the rows are received in place
    at = int(recv_per_src[:rank].sum())
    torch.index_select(xc, 0, token[first:last], out=recv_x[at : at + last - first])

    # The small fields, packed into one aligned matrix.
    fields = []
    if x_scales is not None:
        fields.append(("scales", torch.float32, x_scales.shape[1]))
    if not cached:
        fields.append(("src", torch.int32, 1))
    if topk_idx is not None:
        fields.append(("topk_idx", torch.int64, num_topk))
        if topk_weights is not None:
            fields.append(("topk_weights", torch.float32, num_topk))
    meta = RowLayout(fields)
    send_meta = torch.empty(token.numel(), meta.row_bytes, dtype=torch.uint8)
    if x_scales is not None:
        torch.index_select(on_cpu(x_scales), 0, token, out=meta.view(send_meta, "scales"))
    if "src" in meta:
        meta.view(send_meta, "src").copy_(token.unsqueeze(1))
    if topk_idx is not None:
        # Each receiver sees its own local expert ids, -1 for experts owned elsewhere.
        ids = on_cpu(topk_idx)[token]
        local = ids - (dest * experts_per_rank).unsqueeze(1)
        is_local = (ids >= 0) & (local >= 0) & (local < experts_per_rank)
        meta.view(send_meta, "topk_idx").copy_(torch.where(is_local, local, -1))
        if topk_weights is not None:
            w = on_cpu(topk_weights)[token]
            meta.view(send_meta, "topk_weights").copy_(torch.where(is_local, w, 0.0))
    recv_meta = torch.empty(num_recv, meta.row_bytes, dtype=torch.uint8)

    exchange = backend.exchange("dispatch: data")
    sends, recvs = row_types(xc, runs, recv_x, recv_per_src.tolist(), rank)
    exchange.start_alltoallw(sends, recvs, xc, recv_x)
    if meta.row_bytes:
        exchange.start_alltoallv(
            send_meta, send_counts.tolist(), recv_meta, recv_per_src, meta.row_bytes
        )
    backend.wait(exchange)

    def unpack(name: str, fill: float) -> torch.Tensor | None:
        if name not in meta:
            return None
        rows = meta.view(recv_meta, name)
        out = torch.empty(out_rows, rows.shape[1], dtype=rows.dtype)
        out[:num_recv].copy_(rows)
        out[num_recv:].fill_(fill)
        return out.to(device)

    recv_x[num_recv:].zero_()  # num_worst_tokens padding
    if handle is None:
        src_idx = meta.view(recv_meta, "src").reshape(-1).clone()
        # Per local expert: every source's layout counts for this rank's experts, summed
        # (what the GPU notify step exchanges), padded to the alignment.
        first = 2 * num_ranks + rank * experts_per_rank
        counts = everyone[:, first : first + experts_per_rank].sum(axis=0).tolist()
        handle = DispatchHandle(
            num_ranks=num_ranks,
            num_experts=num_experts,
            hidden=hidden,
            is_token_in_rank=layout.is_token_in_rank,
            num_tokens_per_rank=send_counts.to(torch.int32).to(device),
            num_recv_per_src=torch.from_numpy(recv_per_src.astype(np.int32)).to(device),
            recv_src_idx=src_idx.to(device),
            num_recv_tokens=num_recv,
            num_recv_tokens_per_expert_list=[
                -(-c // expert_alignment) * expert_alignment for c in counts
            ],
            num_worst_tokens=num_worst_tokens,
        )
    return DispatchResult(
        recv_x=recv_x.to(device),
        recv_x_scales=unpack("scales", 0.0),
        recv_topk_idx=unpack("topk_idx", -1),
        recv_topk_weights=unpack("topk_weights", 0.0),
        num_recv_tokens_per_expert_list=(
            [] if num_worst_tokens else list(handle.num_recv_tokens_per_expert_list)
        ),
        handle=handle,
    )


def combine(
    backend: ReferenceBackend, req: CombineRequest
) -> tuple[torch.Tensor, torch.Tensor | None]:
    x, handle, topk_weights, bias = req.x, req.handle, req.topk_weights, req.bias
    comm, device = backend.comm, backend.device
    num_ranks = comm.size
    num_recv, hidden = handle.num_recv_tokens, handle.hidden
    in_rank = on_cpu(handle.is_token_in_rank)
    num_tokens = in_rank.shape[0]
    # Received rows are grouped by source rank: each group goes back to its source, and
    # comes back here in the order this rank sent it (by destination, then token).
    send_rows = on_cpu(handle.num_recv_per_src).to(torch.int64)
    dest, token = torch.nonzero(in_rank.t(), as_tuple=True)
    back_rows = torch.bincount(dest, minlength=num_ranks)
    everyone = gather_counts(
        backend, "combine: count exchange", (num_ranks, send_rows), (num_ranks, back_rows)
    )
    check_handles(everyone[:, :num_ranks], everyone[:, num_ranks:], "combine")

    num_back = token.numel()
    rows = host_empty((num_back + 1, hidden), torch.bfloat16)
    rows[num_back].zero_()  # the row that tokens with fewer rows point at
    exchange = backend.exchange("combine: data")
    # x's first rows are sent as they are: no packing copy.
    exchange.start_alltoallv(
        on_cpu(x)[:num_recv], send_rows.tolist(), rows[:num_back], back_rows.tolist(), hidden * 2
    )
    weights = None
    if topk_weights is not None:
        num_topk = topk_weights.shape[1]
        weights = torch.empty(num_back + 1, num_topk, dtype=torch.float32)
        weights[num_back].zero_()
        exchange.start_alltoallv(
            on_cpu(topk_weights)[:num_recv],
            send_rows.tolist(),
            weights[:num_back],
            back_rows.tolist(),
            num_topk * 4,
        )
    backend.wait(exchange)

    idx = rows_by_token(token, num_tokens, num_back)
    out = host_empty((num_tokens, hidden), torch.bfloat16)
    gather_sum(rows, idx, out, bias=[on_cpu(b) for b in bias])
    combined_weights = None
    if weights is not None:
        # One rank holds each slot's weight (0 elsewhere): the sum is exact in any order.
        combined_weights = weights[idx].sum(dim=1).to(device)
    return out.to(device), combined_weights
