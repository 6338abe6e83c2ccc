"""The reference backend: torch + MPI Alltoallv, on CPU or CUDA tensors.

It implements the semantics contract (docs/semantics.md) in the most direct way:
rows are packed into one byte matrix per call, moved with a single nonblocking
Alltoallv that waits with the communicator's timeout, and unpacked. It is the
embedded default where no GPU kernels exist and the oracle every kernel is tested
against, so clarity wins over speed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from mpiep.backends.base import DispatchResult, Layout, LowLatencyDispatchResult
from mpiep.backends.layout import compute_layout
from mpiep.comm import Communicator
from mpiep.config import CONTROL_BYTES, Config, normal_row_bytes
from mpiep.errors import CapacityError
from mpiep.fp8 import pack_ue8m0, per_token_cast_to_fp8, round_scale_to_pow2
from mpiep.handles import DispatchHandle, LowLatencyHandle


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A [rows, nbytes] uint8 view of a contiguous tensor whose first dim is rows."""
    width = math.prod(t.shape[1:]) * t.element_size()
    if t.numel() == 0:  # empty slices may carry zero strides, which dtype views reject
        return torch.empty(t.shape[0], width, dtype=torch.uint8)
    return t.contiguous().view(torch.uint8).view(t.shape[0], width)


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if b.numel() == 0:  # a rank that receives nothing: views of empty slices can't change dtype
        return torch.empty(shape, dtype=dtype)
    return b.contiguous().view(dtype).view(shape)


class _Exchange:
    """One Alltoallv of byte rows, started at construction, finished by ``wait``."""

    def __init__(
        self,
        comm: Communicator,
        send: torch.Tensor,
        send_rows: list[int],
        recv_rows: list[int],
        row_bytes: int,
        phase: str,
    ):
        self.comm, self.phase, self.row_bytes = comm, phase, row_bytes
        self.send = send.contiguous().cpu().numpy()  # kept alive until the exchange ends
        self.recv = np.empty((sum(recv_rows), row_bytes), dtype=np.uint8)
        scounts = [n * row_bytes for n in send_rows]
        rcounts = [n * row_bytes for n in recv_rows]
        sdispl = np.concatenate([[0], np.cumsum(scounts)[:-1]]).tolist()
        rdispl = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).tolist()
        self.request = comm.comm.Ialltoallv(
            [self.send, (scounts, sdispl), MPI.BYTE], [self.recv, (rcounts, rdispl), MPI.BYTE]
        )

    def wait(self) -> torch.Tensor:
        self.comm.wait(self.request, self.phase)
        return torch.from_numpy(self.recv)


class ReferenceBackend:
    """Backend over MPI. ``num_nvl_bytes``/``num_rdma_bytes`` bound what a call may move,
    exactly as the GPU buffers would, so that capacity errors appear in the same places."""

    name = "reference"

    def __init__(
        self, comm: Communicator, device: torch.device, num_nvl_bytes: int, num_rdma_bytes: int
    ):
        self.comm = comm
        self.device = device
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self._ll_combine_buffer: torch.Tensor | None = None

    # -- layout ------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        return compute_layout(topk_idx, num_experts, self.comm.size, self.comm.local_size)

    # -- normal mode -------------------------------------------------------------------
    def _count_matrix(self, send_counts: torch.Tensor, phase: str) -> np.ndarray:
        """[R, R] matrix: entry [s, d] is the number of rows rank s sends to rank d."""
        send = send_counts.to(torch.int64).cpu().numpy()
        matrix = np.empty((self.comm.size, self.comm.size), dtype=np.int64)
        self.comm.wait(self.comm.comm.Iallgather(send, matrix), phase)
        return matrix

    def _check_capacity(self, matrix: np.ndarray, row_bytes: int, what: str) -> None:
        """Every rank checks every rank's receive, so all raise together."""
        capacity = max(self.num_nvl_bytes - CONTROL_BYTES, 0) // row_bytes
        received = matrix.sum(axis=0)  # rows each rank receives
        sent = matrix.sum(axis=1)  # rows each rank gets back in combine
        worst = int(np.argmax(np.maximum(received, sent)))
        need = int(max(received[worst], sent[worst]))
        if need > capacity:
            raise CapacityError(
                f"{what}: rank {worst} would receive {need} rows but the NVLink buffer "
                f"(num_nvl_bytes={self.num_nvl_bytes}) holds {capacity} rows of {row_bytes} "
                "bytes; size it with mpiep.get_normal_buffer_size_hint()"
            )

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
        num_ranks, rank = self.comm.size, self.comm.rank
        experts_per_rank = num_experts // num_ranks
        hidden = x.shape[1]
        is_token_in_rank = (
            handle.is_token_in_rank if handle is not None else layout.is_token_in_rank
        )
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0

        # Rows go out grouped by destination rank, each group in token order.
        in_rank = is_token_in_rank.cpu()
        dest, token = torch.nonzero(in_rank.t(), as_tuple=True)
        send_counts = in_rank.sum(0)
        matrix = self._count_matrix(send_counts, "dispatch: count exchange")
        row_bytes_bf16 = normal_row_bytes(hidden, num_topk, fp8=False)
        self._check_capacity(matrix, row_bytes_bf16, "dispatch")
        num_recv = int(matrix[:, rank].sum())
        if num_worst_tokens and num_worst_tokens < int(matrix.sum(axis=0).max()):
            worst = int(matrix.sum(axis=0).argmax())
            most = int(matrix.sum(axis=0).max())
            raise CapacityError(
                f"dispatch: num_worst_tokens={num_worst_tokens} is below the {most} rows "
                f"rank {worst} receives"
            )

        parts = [_bytes_of(x.cpu()[token])]
        if x_scales is not None:
            parts.append(_bytes_of(x_scales.cpu()[token]))
        parts.append(_bytes_of(token.to(torch.int32).unsqueeze(1)))
        if topk_idx is not None:
            # Each receiver sees its own local expert ids, -1 for experts owned elsewhere.
            ids = topk_idx.cpu()[token]
            local = ids - (dest * experts_per_rank).unsqueeze(1)
            is_local = (ids >= 0) & (local >= 0) & (local < experts_per_rank)
            parts.append(_bytes_of(torch.where(is_local, local, torch.full_like(local, -1))))
            if topk_weights is not None:
                w = topk_weights.cpu()[token]
                parts.append(_bytes_of(torch.where(is_local, w, torch.zeros_like(w))))
        widths = [p.shape[1] for p in parts]
        send = (
            torch.cat(parts, dim=1)
            if token.numel()
            else torch.empty(0, sum(widths), dtype=torch.uint8)
        )
        recv = _Exchange(
            self.comm,
            send,
            send_counts.tolist(),
            matrix[:, rank].tolist(),
            sum(widths),
            "dispatch: data",
        ).wait()

        fields = torch.split(recv, widths, dim=1)
        recv_x = _from_bytes(fields[0], x.dtype, (num_recv, hidden))
        i = 1
        recv_scales = None
        if x_scales is not None:
            recv_scales = _from_bytes(fields[i], torch.float32, (num_recv, x_scales.shape[1]))
            i += 1
        recv_src_idx = _from_bytes(fields[i], torch.int32, (num_recv,))
        i += 1
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            recv_topk_idx = _from_bytes(fields[i], torch.int64, (num_recv, num_topk))
            i += 1
            if topk_weights is not None:
                recv_topk_weights = _from_bytes(fields[i], torch.float32, (num_recv, num_topk))

        if handle is None:
            counts = self._recv_expert_counts(layout.num_tokens_per_expert, experts_per_rank)
            per_expert = [-(-c // expert_alignment) * expert_alignment for c in counts]
            handle = DispatchHandle(
                num_ranks=num_ranks,
                num_experts=num_experts,
                hidden=hidden,
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_rank=send_counts.to(torch.int32).to(self.device),
                num_recv_per_src=torch.from_numpy(matrix[:, rank].astype(np.int32)).to(self.device),
                recv_src_idx=recv_src_idx.to(self.device),
                num_recv_tokens=num_recv,
                num_recv_tokens_per_expert_list=per_expert,
                num_worst_tokens=num_worst_tokens,
            )
        out_rows = num_worst_tokens if num_worst_tokens else num_recv

        def place(t: torch.Tensor | None, fill: float) -> torch.Tensor | None:
            if t is None:
                return None
            if out_rows == t.shape[0]:
                return t.to(self.device)
            padded = torch.full((out_rows, *t.shape[1:]), fill, dtype=t.dtype)
            padded[: t.shape[0]] = t
            return padded.to(self.device)

        recv_list = [] if num_worst_tokens else list(handle.num_recv_tokens_per_expert_list)
        return DispatchResult(
            recv_x=place(recv_x, 0),
            recv_x_scales=place(recv_scales, 0),
            recv_topk_idx=place(recv_topk_idx, -1),
            recv_topk_weights=place(recv_topk_weights, 0),
            num_recv_tokens_per_expert_list=recv_list,
            handle=handle,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        config: Config,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_recv = handle.num_recv_tokens
        hidden = x.shape[1]
        # Received rows are grouped by source rank: send each group back to its source.
        parts = [_bytes_of(x.cpu()[:num_recv])]
        if topk_weights is not None:
            parts.append(_bytes_of(topk_weights.cpu()[:num_recv]))
        widths = [p.shape[1] for p in parts]
        send = torch.cat(parts, dim=1)
        in_rank = handle.is_token_in_rank.cpu()
        back_counts = in_rank.sum(0).tolist()
        recv = _Exchange(
            self.comm,
            send,
            handle.num_recv_per_src.cpu().tolist(),
            back_counts,
            sum(widths),
            "combine: data",
        ).wait()
        fields = torch.split(recv, widths, dim=1)
        rows = _from_bytes(fields[0], x.dtype, (recv.shape[0], hidden)).float()
        _, token = torch.nonzero(in_rank.t(), as_tuple=True)  # same order the rows arrive in
        out = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32)
        out.index_add_(0, token, rows)
        for b in bias:
            out += b.cpu().float()
        combined_weights = None
        if topk_weights is not None:
            num_topk = topk_weights.shape[1]
            w = _from_bytes(fields[1], torch.float32, (recv.shape[0], num_topk))
            combined_weights = torch.zeros(handle.num_tokens, num_topk, dtype=torch.float32)
            combined_weights.index_add_(0, token, w)
            combined_weights = combined_weights.to(self.device)
        return out.to(torch.bfloat16).to(self.device), combined_weights

    # -- low-latency mode --------------------------------------------------------------
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
        num_ranks = self.comm.size
        experts_per_rank = num_experts // num_ranks
        max_tokens = num_max_dispatch_tokens_per_rank
        tokens, hidden = x.shape
        ids = topk_idx.cpu()
        # One row per (token, slot) with an expert, ordered by (expert, token): grouped by rank.
        token, slot = torch.nonzero(ids >= 0, as_tuple=True)
        expert = ids[token, slot]
        order = torch.argsort(expert * (tokens + 1) + token, stable=True)
        token, expert = token[order], expert[order]
        dest = expert // experts_per_rank
        send_counts = torch.bincount(dest, minlength=num_ranks)
        recv_counts = self._alltoall_counts(send_counts, "low_latency_dispatch: count exchange")

        xc = x.cpu()
        if use_fp8:
            q, scales = per_token_cast_to_fp8(xc, round_scale=round_scale or use_ue8m0)
            parts = [_bytes_of(q[token]), _bytes_of(scales[token])]
        else:
            parts = [_bytes_of(xc[token])]
        meta = torch.stack(
            [token.to(torch.int32), (expert % experts_per_rank).to(torch.int32)], dim=1
        )
        parts.append(_bytes_of(meta))
        widths = [p.shape[1] for p in parts]
        send = (
            torch.cat(parts, dim=1)
            if token.numel()
            else torch.empty(0, sum(widths), dtype=torch.uint8)
        )
        exchange = _Exchange(
            self.comm,
            send,
            send_counts.tolist(),
            recv_counts,
            sum(widths),
            "low_latency_dispatch: data",
        )

        rows = num_ranks * max_tokens
        groups = hidden // 128
        recv_x = torch.zeros(
            experts_per_rank, rows, hidden, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16
        )
        recv_scales = None
        if use_fp8:
            recv_scales = (
                torch.zeros(experts_per_rank, rows, (groups + 3) // 4, dtype=torch.int32)
                if use_ue8m0
                else torch.zeros(experts_per_rank, rows, groups, dtype=torch.float32)
            )
        recv_count = torch.zeros(experts_per_rank, dtype=torch.int32)
        src_token_idx = torch.full((experts_per_rank, rows), -1, dtype=torch.int32)
        layout_range = torch.zeros(experts_per_rank, num_ranks, 2, dtype=torch.int32)
        outputs = [t.to(self.device) for t in (recv_x, recv_count, src_token_idx, layout_range)]
        out_scales = recv_scales.to(self.device) if recv_scales is not None else None
        if out_scales is not None:
            outputs.append(out_scales)

        def finish() -> None:
            recv = exchange.wait()
            fields = torch.split(recv, widths, dim=1)
            meta_r = _from_bytes(fields[-1], torch.int32, (recv.shape[0], 2))
            src_rank = torch.repeat_interleave(torch.arange(num_ranks), torch.tensor(recv_counts))
            local_e = meta_r[:, 1].long()
            # Pack each expert's rows from row 0, by source rank (rows already come in rank order).
            key = local_e * num_ranks + src_rank
            order_r = torch.argsort(key, stable=True)
            counts = torch.bincount(key, minlength=experts_per_rank * num_ranks).view(
                experts_per_rank, num_ranks
            )
            per_expert = counts.sum(1)
            starts = torch.cumsum(counts, 1) - counts
            expert_first = torch.cumsum(per_expert, 0) - per_expert
            pos = torch.arange(recv.shape[0]) - expert_first[local_e[order_r]]
            e_sorted = local_e[order_r]
            data = fields[0][order_r]
            recv_x.view(experts_per_rank, rows, -1).view(torch.uint8)[e_sorted, pos] = data
            if use_fp8:
                sc = _from_bytes(fields[1], torch.float32, (recv.shape[0], groups))[order_r]
                if use_ue8m0:
                    recv_scales[e_sorted, pos] = pack_ue8m0(round_scale_to_pow2(sc))
                else:
                    recv_scales[e_sorted, pos] = sc
            src_token_idx[e_sorted, pos] = meta_r[order_r, 0]
            recv_count.copy_(per_expert.to(torch.int32))
            layout_range[:, :, 0] = starts.to(torch.int32)
            layout_range[:, :, 1] = counts.to(torch.int32)
            for out, src in zip(
                outputs,
                (recv_x, recv_count, src_token_idx, layout_range, recv_scales),
                strict=False,
            ):
                if out.data_ptr() != src.data_ptr():
                    out.copy_(src)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(
                    outputs[1].to(cumulative_local_expert_recv_stats.device)
                )

        handle = LowLatencyHandle(
            num_max_dispatch_tokens_per_rank=max_tokens,
            hidden=hidden,
            num_experts=num_experts,
            src_token_idx=outputs[2],
            layout_range=outputs[3],
            num_tokens=tokens,
        )
        hook: Callable[[], None] | None = None
        if return_recv_hook:
            hook = _once(finish)
        else:
            finish()
        return LowLatencyDispatchResult(outputs[0], out_scales, outputs[1], handle, hook)

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
        num_ranks, rank = self.comm.size, self.comm.rank
        experts_per_rank = handle.num_experts // num_ranks
        hidden = handle.hidden
        y = self._ll_combine_buffer if zero_copy else x
        ranges = handle.layout_range.cpu()
        src_idx = handle.src_token_idx.cpu()
        yc = y.cpu()
        # Send every received row back to its source rank, tagged (token, global expert).
        send_rows, metas, send_counts = [], [], []
        for s in range(num_ranks):
            n = 0
            for e in range(experts_per_rank):
                first, count = ranges[e, s].tolist()
                if count:
                    send_rows.append(yc[e, first : first + count])
                    tok = src_idx[e, first : first + count]
                    metas.append(
                        torch.stack([tok, torch.full_like(tok, rank * experts_per_rank + e)], 1)
                    )
                    n += count
            send_counts.append(n)
        row_bytes = hidden * 2 + 8
        if send_rows:
            send = torch.cat([_bytes_of(torch.cat(send_rows)), _bytes_of(torch.cat(metas))], dim=1)
        else:
            send = torch.empty(0, row_bytes, dtype=torch.uint8)
        recv_counts = self._alltoall_counts(
            torch.tensor(send_counts), "low_latency_combine: count exchange"
        )
        exchange = _Exchange(
            self.comm, send, send_counts, recv_counts, row_bytes, "low_latency_combine: data"
        )
        tokens = topk_idx.shape[0]
        result = (
            out
            if out is not None
            else torch.empty(tokens, hidden, dtype=torch.bfloat16, device=self.device)
        )

        def finish() -> None:
            recv = exchange.wait()
            rows = _from_bytes(
                recv[:, : hidden * 2], torch.bfloat16, (recv.shape[0], hidden)
            ).float()
            meta = _from_bytes(recv[:, hidden * 2 :], torch.int32, (recv.shape[0], 2)).long()
            keys = meta[:, 0] * handle.num_experts + meta[:, 1]
            sorted_keys, order = torch.sort(keys)
            ids = topk_idx.cpu()
            w = topk_weights.cpu().float()
            acc = torch.zeros(tokens, hidden, dtype=torch.float32)
            for k in range(ids.shape[1]):  # slots in order: the summation order is fixed
                valid = ids[:, k] >= 0
                t = torch.nonzero(valid).squeeze(1)
                want = t * handle.num_experts + ids[t, k]
                at = torch.searchsorted(sorted_keys, want)
                acc[t] += w[t, k].unsqueeze(1) * rows[order[at]]
            result.copy_(acc.to(torch.bfloat16))

        if return_recv_hook:
            return result, _once(finish)
        finish()
        return result, None

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        experts_per_rank = handle.num_experts // self.comm.size
        shape = (
            experts_per_rank,
            self.comm.size * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        if self._ll_combine_buffer is None or tuple(self._ll_combine_buffer.shape) != shape:
            self._ll_combine_buffer = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        return self._ll_combine_buffer

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        if self._ll_combine_buffer is not None:
            self._ll_combine_buffer.zero_()
        self.comm.barrier("clean_low_latency_buffer")

    def destroy(self) -> None:
        self._ll_combine_buffer = None

    # -- helpers -------------------------------------------------------------------------
    def _recv_expert_counts(
        self, num_tokens_per_expert: torch.Tensor, experts_per_rank: int
    ) -> list[int]:
        """Per local expert, the (token, slot) pairs all sources route to it: every source's
        layout counts for this rank's experts, summed (what the GPU notify step exchanges)."""
        send = num_tokens_per_expert.to(torch.int64).cpu().numpy()
        recv = np.empty_like(send)
        self.comm.wait(self.comm.comm.Ialltoall(send, recv), "dispatch: per-expert counts")
        return recv.reshape(self.comm.size, experts_per_rank).sum(axis=0).tolist()

    def _alltoall_counts(self, send_counts: torch.Tensor, phase: str) -> list[int]:
        send = send_counts.to(torch.int64).cpu().numpy()
        recv = np.empty(self.comm.size, dtype=np.int64)
        self.comm.wait(self.comm.comm.Ialltoall(send, recv), phase)
        return recv.tolist()


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """A receive hook: the first call completes the receive, later calls do nothing."""
    done = False

    def hook() -> None:
        nonlocal done
        if not done:
            fn()
            done = True

    return hook
