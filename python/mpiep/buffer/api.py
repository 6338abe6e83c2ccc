"""``Buffer``: the public entry point, DeepEP's API over an mpi4py communicator.

Every call reads as the same four steps:

1. check the arguments locally (``checks.py``, one function per operation) and, with
   validation on, agree on them across ranks (``Buffer._checked`` over
   ``Communicator.agree``), so that a bad argument fails the call on every rank before any
   rank waits for data;
2. order the work on the communication stream (``streams.py``);
3. hand it to the backend (``backends/reference.py`` or ``backends/cuda.py``), in
   low-latency mode through ``low_latency.py`` (call counts, rank masking);
4. stamp the handle and return DeepEP's tuple.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from mpi4py import MPI

from mpiep import config as cfg
from mpiep import faults
from mpiep import handle_checks as hc
from mpiep import validate as val
from mpiep.backends.base import (
    Backend,
    BackendSettings,
    CombineRequest,
    DispatchRequest,
    DispatchResult,
    Layout,
    LowLatencyCombineRequest,
    LowLatencyDispatchRequest,
    LowLatencyDispatchResult,
)
from mpiep.buffer import checks, streams
from mpiep.buffer.checks import Signature
from mpiep.buffer.low_latency import Hook, LowLatencyCalls
from mpiep.buffer.startup import BACKENDS, make_backend, pick_device
from mpiep.comm import Communicator
from mpiep.config import Config
from mpiep.errors import PeerTimeoutError
from mpiep.event import EventOverlap
from mpiep.handles import DispatchHandle, LowLatencyHandle
from mpiep.hooks import HookTracker
from mpiep.shrink import Shrink

# Calls that wait on peers (guarded with abort_on_timeout).
_COLLECTIVE_METHODS = (
    "get_dispatch_layout",
    "dispatch",
    "combine",
    "low_latency_dispatch",
    "low_latency_combine",
    "clean_low_latency_buffer",
    "destroy",
)


# The output tensors of each call, which the stream code keeps alive (module-level
# functions: a lambda would be built again on every call).
def _num_experts(handle: Any, num_tokens_per_expert: Any) -> int:
    """A dispatch's expert count, read before its checks (0 where they will raise)."""
    if handle is not None:
        return int(getattr(handle, "num_experts", 0))
    if isinstance(num_tokens_per_expert, torch.Tensor) and num_tokens_per_expert.dim() == 1:
        return int(num_tokens_per_expert.shape[0])
    return 0


def _layout_outputs(lay: Layout) -> tuple[torch.Tensor | None, ...]:
    return (
        lay.num_tokens_per_rank,
        lay.num_tokens_per_rdma_rank,
        lay.num_tokens_per_expert,
        lay.is_token_in_rank,
    )


def _dispatch_outputs(r: DispatchResult) -> tuple[torch.Tensor | None, ...]:
    return (r.recv_x, r.recv_x_scales, r.recv_topk_idx, r.recv_topk_weights)


def _combine_outputs(
    r: tuple[torch.Tensor, torch.Tensor | None],
) -> tuple[torch.Tensor | None, ...]:
    return r


def _ll_dispatch_outputs(r: LowLatencyDispatchResult) -> tuple[torch.Tensor | None, ...]:
    return (r.recv_x, r.recv_x_scales, r.recv_count)


def _ll_combine_outputs(r: tuple[torch.Tensor, Hook | None]) -> tuple[torch.Tensor | None, ...]:
    return (r[0],)


class Buffer:
    """Communication buffers and kernels for one expert-parallel group.

    Args:
        comm: the mpi4py communicator of the EP group (default ``MPI.COMM_WORLD``); one
            rank per GPU. mpiep duplicates it, so its messages never mix with yours.
        num_nvl_bytes: NVLink buffer for normal mode; size it with
            :func:`mpiep.get_normal_buffer_size_hint`.
        num_rdma_bytes: symmetric NVSHMEM buffer for low-latency (and internode) mode;
            size it with :meth:`get_low_latency_rdma_size_hint`.
        low_latency_mode: enable ``low_latency_dispatch``/``low_latency_combine``.
        num_qps_per_rank: RDMA queue pairs per peer (low-latency mode: at least the
            number of local experts for best speed).
        allow_nvlink_for_low_latency_mode: use NVLink stores to peers that are reachable;
            False forces every low-latency message through RDMA.
        allow_mnnvl: allow multi-node NVLink (GB200-class systems).
        explicitly_destroy: if True, ``destroy()`` must be called; otherwise buffers are
            released when the object is collected.
        backend: "auto" (GPU kernels when CUDA and the compiled core are present, else the
            reference), "cuda" or "reference".
        ranks_per_node: treat every ``ranks_per_node`` consecutive ranks as one node
            ("virtual nodes", to test internode paths on one host); env MPIEP_RANKS_PER_NODE.
        timeout_s: seconds to wait on a peer before raising ``PeerTimeoutError`` (env
            MPIEP_TIMEOUT_S, default 20).
        validate: check argument values (expert id range) and agreement across ranks on
            every call. Default: on for the reference backend, off for CUDA (it costs a
            device sync and an MPI allgather); env MPIEP_VALIDATE=0/1.
        device: the CUDA device to use (default: local rank modulo visible devices), or
            "cpu" to force CPU tensors.
        nvshmem_bootstrap: how NVSHMEM starts (GPU internode and low-latency modes): "uid"
            (a unique id broadcast over MPI, any MPI), "mpi" (NVSHMEM's MPI bootstrap plugin
            on this communicator, Open MPI only, no sockets of NVSHMEM's own) or "auto";
            env MPIEP_NVSHMEM_BOOTSTRAP, default "uid". `mpiep doctor` says which loads.
        abort_on_timeout: after a ``PeerTimeoutError`` (raised as usual), abort the whole
            job with ``MPI_Abort`` at exit or 2 s later, instead of hanging in
            ``MPI_Finalize`` on a peer that never comes (env MPIEP_ABORT_ON_TIMEOUT=1).
        enable_shrink: rank masking in low-latency mode (DeepEP's shrink mode): a rank that
            stops answering is masked and low-latency calls go on among the others, its
            experts absent; ``low_latency_update_mask_buffer`` masks ranks by hand.
    """

    num_sms: int = 24
    _num_sms_set: bool = False  # set_num_sms() wins over a tuned table (MPIEP_TUNED_CONFIG)

    def __init__(
        self,
        comm: MPI.Comm | None = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        *,
        backend: str = "auto",
        ranks_per_node: int | None = None,
        timeout_s: float | None = None,
        validate: bool | None = None,
        device: str | torch.device | None = None,
        nvshmem_bootstrap: str | None = None,
        abort_on_timeout: bool | None = None,
        enable_shrink: bool = False,
    ) -> None:
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if num_qps_per_rank <= 0:
            raise ValueError(f"num_qps_per_rank must be positive, got {num_qps_per_rank}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto', 'cuda' or 'reference', got {backend!r}")

        self.comm = Communicator(
            comm,
            ranks_per_node=ranks_per_node,
            timeout_s=timeout_s,
            abort_on_timeout=abort_on_timeout,
        )
        self._destroyed = False  # from here on __del__ frees what exists
        self._ll_fits: set[tuple[int, int, int]] = set()  # low-latency shapes that fit
        self._configs: dict[tuple[str, int, bool], Config] = {}  # _default_config's cache
        self.rank = self.comm.rank
        self.group_size = self.comm.size
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.explicitly_destroy = explicitly_destroy
        self.nvshmem_bootstrap = nvshmem_bootstrap
        self.device = pick_device(self.comm, device)
        self._streams = streams.for_device(self.device)
        self.comm_stream = self._streams.stream  # None on CPU
        self.backend: Backend = make_backend(
            backend,
            BackendSettings(
                self.comm,
                self.device,
                num_nvl_bytes,
                num_rdma_bytes,
                low_latency_mode,
                num_qps_per_rank,
                allow_nvlink_for_low_latency_mode,
                nvshmem_bootstrap,
            ),
        )
        if validate is None:
            env = os.environ.get("MPIEP_VALIDATE")
            validate = env == "1" if env is not None else self.backend.name == "reference"
        self.validate = bool(validate)
        self._native_checks = bool(getattr(self.backend, "native_checks", False))
        # Normal-mode ops that order the comm stream themselves (one native hop per call).
        if isinstance(self._streams, streams.CommStream) and hasattr(
            self.backend, "use_comm_stream"
        ):
            self.backend.use_comm_stream(self._streams.stream)  # type: ignore[attr-defined]
            self._streams.ops_hop = True
        self._id = hc.new_buffer_id()  # stamped on handles: combine checks where they came from
        self._dispatches = 0  # non-cached dispatch calls: a handle's generation
        # One set of receive-hook rules: the backend's own when it keeps them (GPU engine).
        tracker = getattr(self.backend, "hook_tracker", None)
        self._hooks = tracker if isinstance(tracker, HookTracker) else HookTracker()
        self._shrink: Shrink | None = None
        if enable_shrink:
            self._shrink = Shrink(
                self.comm, self.device, num_nvl_bytes, num_rdma_bytes, self.backend
            )
        self._ll = LowLatencyCalls(
            self.backend, self._shrink, self._hooks, self._id, self.group_size
        )
        self._abort = self.comm.abort_on_timeout
        if self._abort:  # also timeouts that backends raise themselves (GPU)
            # With shrink a low-latency timeout is recovered from: only one that escapes aborts.
            self.comm.abort_on_timeout = not enable_shrink
            faults.guard_methods(self, _COLLECTIVE_METHODS, self._timed_out)

    # -- configuration ----------------------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SMs the normal-mode kernels may use (even; default 24)."""
        if new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(f"num_sms must be a positive even number, got {new_num_sms}")
        Buffer.num_sms = new_num_sms
        Buffer._num_sms_set = True

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return cfg.default_dispatch_config(num_ranks, Buffer.num_sms, not Buffer._num_sms_set)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return cfg.default_combine_config(num_ranks, Buffer.num_sms, not Buffer._num_sms_set)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        return cfg.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    @staticmethod
    def get_normal_buffer_size_hint(
        num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int = 8
    ) -> int:
        return cfg.get_normal_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk)

    def _default_config(self, kind: str) -> Config:
        """The config a call without one uses, cached on this Buffer: the tuned table
        (MPIEP_TUNED_CONFIG) is read when the Buffer first needs it, and ``set_num_sms``
        takes effect at the next call."""
        key = (kind, Buffer.num_sms, Buffer._num_sms_set)
        found = self._configs.get(key)
        if found is None:
            make = cfg.default_dispatch_config if kind == "dispatch" else cfg.default_combine_config
            found = self._configs[key] = make(
                self.group_size, Buffer.num_sms, not Buffer._num_sms_set
            )
        return found

    @property
    def num_nodes(self) -> int:
        return self.comm.num_nodes

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def capture(self) -> EventOverlap:
        """An event on the current stream, to pass as ``previous_event``."""
        if self.device.type != "cuda":
            return EventOverlap(None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event)

    # -- the collective argument check ---------------------------------------------------
    def _checked(
        self,
        what: str,
        check: Callable[..., Signature],
        args: tuple[Any, ...],
        low_latency: bool = False,
    ) -> None:
        """Run the local ``check(*args)`` (a function of ``checks.py``, which returns the
        call's signature); with validation on, agree on the outcome across ranks so that all
        ranks fail together (in low-latency mode with ranks masked: across the active ranks)."""
        self._ensure_alive()
        shrink = self._shrink
        comm = self.comm
        if shrink is not None:
            if low_latency:
                comm = shrink.control(self.comm)
            else:
                shrink.check_normal_mode()
        error: Exception | None = None
        signature: Signature = ()
        try:
            signature = check(*args)
        except (TypeError, ValueError, RuntimeError) as exc:
            error = exc
        if self.validate:
            sent = ("__error__", f"{type(error).__name__}: {error}") if error else signature
            try:
                comm.agree(sent, what)
            except PeerTimeoutError as exc:
                if shrink is None or not low_latency:
                    raise
                shrink.recover(exc)  # masks the silent ranks, or raises
                shrink.control(self.comm).agree(sent, what)
        if error is not None:
            raise error

    def _check(
        self,
        what: str,
        check: Callable[..., Signature],
        lean_check: Callable[..., None],
        args: tuple[Any, ...],
        low_latency: bool = False,
    ) -> None:
        """Check a call's arguments: the full ``checks.<op>`` (with validation, agreed
        across ranks), or only its ``checks.<op>_lean`` part when the native op checks the
        tensors itself (:meth:`_lean`)."""
        if self._lean():
            self._ensure_alive()
            lean_check(self, *args)
        else:
            self._checked(what, check, (self, *args), low_latency)

    def _lean(self) -> bool:
        """Calls skip Buffer's Python tensor checks: no validation, no rank mask, and a
        backend whose native ops raise the same errors themselves (``Backend.native_checks``;
        ``checks.*_lean`` keeps what they cannot see)."""
        return not self.validate and self._shrink is None and self._native_checks

    def _guard_hook(self, hook: Callable[[], None]) -> Callable[[], None]:
        if self._abort:
            return faults.guard(hook, self._timed_out)
        return hook

    def _timed_out(self, error: PeerTimeoutError) -> None:
        """A PeerTimeoutError leaves a Buffer call (with abort_on_timeout): end the job."""
        faults.arm_abort(self.comm._abort_comm, self.rank, error)

    def _ensure_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed")

    # -- normal mode ----------------------------------------------------------------------
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Which ranks and experts each token goes to (no communication).

        Returns ``num_tokens_per_rank`` [R] int32, ``num_tokens_per_rdma_rank`` [nodes]
        int32 (None on one node), ``num_tokens_per_expert`` [E] int32,
        ``is_token_in_rank`` [T, R] bool, and an event.
        """
        self._check(
            "get_dispatch_layout",
            checks.get_dispatch_layout,
            checks.get_dispatch_layout_lean,
            (topk_idx, num_experts),
        )
        layout, event = self._streams.run(
            self.backend.get_dispatch_layout,
            (topk_idx, num_experts),
            previous_event,
            async_finish,
            allocate_on_comm_stream,
            (topk_idx,),
            _layout_outputs,
        )
        return (
            layout.num_tokens_per_rank,
            layout.num_tokens_per_rdma_rank,
            layout.num_tokens_per_expert,
            layout.is_token_in_rank,
            event,
        )

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[
        Any,
        torch.Tensor | None,
        torch.Tensor | None,
        list[int] | None,
        DispatchHandle,
        EventOverlap,
    ]:
        """Send each token once to every rank that owns at least one of its experts.

        ``x`` is bf16 [T, H] or an FP8 tuple ``(e4m3 [T, H], float32 scales [T, H/128])``.
        Pass the layout from :meth:`get_dispatch_layout` (and ``topk_idx``/``topk_weights``),
        or a ``handle`` from an earlier dispatch to repeat it without a layout (cached mode).

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``. Received rows are ordered by source rank, then source token id;
        ``recv_topk_idx`` holds local expert ids (-1 for experts elsewhere).
        """
        config = config or self._default_config("dispatch")
        data, scales = val.split_fp8(x)
        cached = handle is not None  # the handle stands for the layout and top-k
        req = DispatchRequest(
            data,
            scales,
            None if cached else topk_idx,
            None if cached else topk_weights,
            None
            if cached
            else Layout(
                num_tokens_per_rank,  # type: ignore[arg-type] (checked: not None)
                num_tokens_per_rdma_rank,
                num_tokens_per_expert,  # type: ignore[arg-type]
                is_token_in_rank,  # type: ignore[arg-type]
            ),
            handle,
            _num_experts(handle, num_tokens_per_expert),
            expert_alignment,
            num_worst_tokens,
            config,
        )
        self._check("dispatch", checks.dispatch, checks.dispatch_lean, (req,))
        if cached:  # the original's shapes, num_worst_tokens padding included
            req.num_worst_tokens = handle.num_worst_tokens
        # A handle's generation: the non-cached dispatches sent so far (a refused one is none).
        generation = self._dispatches + (not cached)
        result, event = self._streams.run(
            self.backend.dispatch,
            (req,),
            previous_event,
            async_finish,
            allocate_on_comm_stream,
            (data, scales, topk_idx, topk_weights, is_token_in_rank),
            _dispatch_outputs,
        )
        self._dispatches = generation
        recv_x = (result.recv_x, result.recv_x_scales) if scales is not None else result.recv_x
        if result.handle.owner == 0:  # a new handle: stamp it with this Buffer and call
            result.handle.owner, result.handle.generation = self._id, generation
        if handle is not None:
            return recv_x, None, None, None, result.handle, event
        return (
            recv_x,
            result.recv_topk_idx,
            result.recv_topk_weights,
            result.num_recv_tokens_per_expert_list,
            result.handle,
            event,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor | None, ...] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Send each received row back to its source and sum per source token (fp32, bf16 out).

        ``x`` is bf16 with the rows of ``dispatch``'s output. Optional ``topk_weights``
        (the received weights) are summed the same way; ``bias`` (one tensor or a pair,
        bf16 [T, H]) is added to the sum. Returns ``(combined_x, combined_topk_weights, event)``.
        """
        config = config or self._default_config("combine")
        biases: tuple[torch.Tensor, ...] = ()
        if isinstance(bias, torch.Tensor):
            biases = (bias,)
        elif bias is not None:
            biases = tuple(b for b in bias if b is not None)
        req = CombineRequest(x, handle, topk_weights, biases, config)
        self._check("combine", checks.combine, checks.combine_lean, (req,))
        (combined, weights), event = self._streams.run(
            self.backend.combine,
            (req,),
            previous_event,
            async_finish,
            allocate_on_comm_stream,
            (x, topk_weights, *biases),
            _combine_outputs,
        )
        return combined, weights, event

    # -- low-latency mode -----------------------------------------------------------------
    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, EventOverlap, Callable[[], None] | None]:
        """Send each (token, expert) pair to the expert's rank; shapes depend only on arguments.

        Returns ``(recv_x, recv_count, handle, event, hook)``. ``recv_x`` is bf16
        [E_local, R * max_tokens, H] or, with ``use_fp8``, ``(e4m3, scales)`` with float32
        scales [E_local, R * max_tokens, H/128] (packed UE8M0 int32 [.., ceil(H/512)] with
        ``use_ue8m0``). Rows of each expert are packed from row 0, grouped by source rank;
        ``recv_count`` [E_local] int32 counts them. With ``return_recv_hook`` the call only
        sends; ``hook()`` completes the receive.
        """
        req = LowLatencyDispatchRequest(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            use_fp8,
            round_scale,
            use_ue8m0,
            cumulative_local_expert_recv_stats,
            return_recv_hook,
        )
        self._check(
            "low_latency_dispatch",
            checks.low_latency_dispatch,
            checks.low_latency_dispatch_lean,
            (req,),
            low_latency=True,
        )
        if return_recv_hook and async_finish:
            raise ValueError("return_recv_hook and async_finish cannot both be set")
        ll = self._ll
        if async_finish:  # on the comm stream, with an event
            result, event = self._streams.run(
                ll.dispatch, (req,), None, True, False, (x, topk_idx), _ll_dispatch_outputs
            )
        else:  # on the current stream, as in DeepEP: CUDA-graph capturable, an empty event
            result, event = ll.dispatch(req), EventOverlap(None)
        recv_x = (result.recv_x, result.recv_x_scales) if use_fp8 else result.recv_x
        hook = ll.after_dispatch(result, topk_idx, self.validate)
        if hook is not None:
            hook = self._guard_hook(hook)
        return recv_x, result.recv_count, result.handle, event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """Send expert outputs back and reduce them with the top-k weights.

        ``out[t] = sum_k w[t,k] * y[expert(t,k), row(t,k)]`` over slots with an expert.

        ``x`` is bf16 [E_local, R * max_tokens, H] (ignored with ``zero_copy``, where the
        data was written into :meth:`get_next_low_latency_combine_buffer`). Returns
        ``(combined_x [T, H] bf16, event, hook)``.
        """
        req = LowLatencyCombineRequest(
            x, topk_idx, topk_weights, handle, zero_copy, out, return_recv_hook
        )
        self._check(
            "low_latency_combine",
            checks.low_latency_combine,
            checks.low_latency_combine_lean,
            (req, use_logfmt),
            low_latency=True,
        )
        if return_recv_hook and async_finish:
            raise ValueError("return_recv_hook and async_finish cannot both be set")
        ll = self._ll
        if async_finish:  # on the comm stream, with an event
            (combined, hook), event = self._streams.run(
                ll.combine, (req,), None, True, False, (x, topk_idx, topk_weights),
                _ll_combine_outputs,
            )  # fmt: skip
        else:  # on the current stream, as in DeepEP: CUDA-graph capturable, an empty event
            (combined, hook), event = ll.combine(req), EventOverlap(None)
        hook = ll.after_combine(hook)
        if hook is not None:
            hook = self._guard_hook(hook)
        return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The bf16 [E_local, R * max_tokens, H] buffer that ``zero_copy`` combine reads."""
        self._ensure_alive()
        hc.check_low_latency_handle(handle, self._id, self.group_size)
        return self._ll.combine_buffer(handle)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Reset the low-latency buffers (collective)."""
        self._ensure_alive()
        checks.low_latency_capacity(self, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._ll.clean(self.comm, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # -- rank masking (enable_shrink) ---------------------------------------------------
    def _shrink_or_raise(self) -> Shrink:
        self._ensure_alive()
        if self._shrink is None:
            raise RuntimeError("rank masking needs Buffer(..., enable_shrink=True)")
        return self._shrink

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``) or unmask one rank for low-latency calls. Collective over
        the ranks active afterwards (a rank being unmasked takes part; a masked one may be
        gone). Later calls treat the masked ranks' experts as absent."""
        self._shrink_or_raise().mask.update(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Write int32 [R] into ``mask_status``: 1 for masked ranks, 0 for active ones."""
        status = self._shrink_or_raise().mask.status()
        if tuple(mask_status.shape) != (self.group_size,):
            raise ValueError(f"mask_status must have shape ({self.group_size},)")
        mask_status.copy_(status.to(mask_status.device, mask_status.dtype))

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank (collective over all ranks)."""
        self._shrink_or_raise().mask.set_active(list(range(self.group_size)))

    @property
    def masked_ranks(self) -> list[int]:
        """Ranks masked out of low-latency mode (always [] without enable_shrink)."""
        return [] if self._shrink is None else self._shrink.mask.masked

    # -- teardown -----------------------------------------------------------------------
    def destroy(self) -> None:
        """Release the buffers (collective when the backend holds shared memory)."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._shrink is not None:
            self._shrink.free()
        self.backend.destroy()
        self.comm.free()

    def __del__(self) -> None:
        """A Buffer dropped without ``destroy()``: free its communicators (``MPI_Comm_free``
        needs no peer in practice: Open MPI and MPICH free locally) and, unless
        ``explicitly_destroy``, the backend's buffers."""
        if getattr(self, "_destroyed", True):
            return
        self._destroyed = True
        shrink = getattr(self, "_shrink", None)
        if shrink is not None:
            try:
                shrink.free()
            except Exception:
                pass
        backend = getattr(self, "backend", None)
        if backend is not None and not getattr(self, "explicitly_destroy", True):
            try:
                backend.destroy()
            except Exception:
                pass
        try:
            self.comm.free()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"Buffer(rank={self.rank}/{self.group_size}, backend={self.backend.name}, "
            f"device={self.device}, "
            f"nodes={self.num_nodes}, low_latency_mode={self.low_latency_mode})"
        )
