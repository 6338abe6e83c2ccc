"""Rank masking in low-latency mode: which ranks take part, and how they agree on it.

A Buffer created with ``enable_shrink=True`` keeps a set of active ranks. While every rank is
active nothing here runs. When ranks are masked (by the caller, or because they stopped
answering), the active ranks build a communicator of their own (``MPI_Comm_create_group``,
collective over its members only, so a dead rank cannot block it) and low-latency calls run
there, with the masked ranks' experts treated as absent: on the GPU kernels, which mask ranks
themselves (``on_change`` hands them each agreed mask), or else on a reference backend over
that communicator (``mpiep.masked_ll``).

Agreement uses point-to-point messages with the Buffer's timeout on the Buffer's private
communicator (tags from ``TAG_BASE``; MPI never matches them with collectives, so an abandoned
collective on that communicator does not disturb them):

- after a timeout, every rank that timed out sends a probe to every active rank and listens
  for theirs for ``timeout_s``: the ranks heard from (and itself) are its view of the living;
- every living rank sends that view, with its count of low-latency calls, to the others in it;
  all views and counts must be equal, or nothing changes and ``PeerTimeoutError`` is raised
  ("could not agree"); a rank that hears no one stays unmasked and raises too;
- then the new communicator is created among the living.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from mpi4py import MPI

from mpiep.comm import Communicator
from mpiep.errors import PeerTimeoutError

TAG_BASE = 0x6D6D00  # "mm": mask messages; two tags per epoch
CREATE_TAG_BASE = 0x6D6E00  # MPI_Comm_create_group's tag, one per epoch

_unfinished: list[tuple[MPI.Request, np.ndarray]] = []  # sends a dead rank will never take


class MaskAgreementError(PeerTimeoutError):
    """The ranks could not agree on who failed (or on a requested mask): nothing changed."""


def _exchange(
    comm: MPI.Comm, peers: Sequence[int], payload: np.ndarray, tag: int, timeout_s: float
) -> dict[int, np.ndarray | None]:
    """Send ``payload`` to every peer and take theirs (same size) for up to ``timeout_s``;
    None for peers not heard from."""
    send = np.ascontiguousarray(payload, dtype=np.int64)
    recvs = {p: np.empty_like(send) for p in peers}
    reqs = {p: comm.Irecv(recvs[p], source=p, tag=tag) for p in peers}
    for p in peers:
        _unfinished.append((comm.Isend(send, dest=p, tag=tag), send))
    deadline = time.monotonic() + timeout_s
    got: dict[int, np.ndarray | None] = {}
    while reqs and time.monotonic() < deadline:
        for p, req in list(reqs.items()):
            if req.Test():
                got[p] = recvs.pop(p)
                del reqs[p]
        time.sleep(1e-4)
    for p, req in reqs.items():  # silent peers: withdraw the receive so nothing lands later
        req.Cancel()
        req.Wait()
        got[p] = None
    _unfinished[:] = [(r, b) for r, b in _unfinished if not r.Test()]
    return got


MaskChanged = Callable[[list[int], Communicator | None], None]


class RankMask:
    """The active ranks of one Buffer, and the communicator low-latency calls use while some
    rank is masked.

    ``reference``: run masked calls on a reference backend over the active ranks (the GPU
    kernels mask ranks themselves: no such backend then). ``on_change(active, comm)`` runs
    after every agreed change, on every rank that records it (``comm``: the active ranks'
    communicator, None when it is the Buffer's own or this rank left)."""

    def __init__(
        self,
        comm: Communicator,
        device: torch.device,
        nvl: int,
        rdma: int,
        reference: bool = True,
        on_change: MaskChanged | None = None,
    ) -> None:
        self.full = comm
        self.device, self.nvl, self.rdma = device, nvl, rdma
        self.reference, self.on_change = reference, on_change
        self.active: list[int] = list(range(comm.size))
        self.epoch = 0  # mask changes so far (the same on the active ranks)
        self.calls = 0  # low-latency calls in this epoch: the ranks that recover must agree
        self.comm: Communicator | None = None  # the communicator of the active ranks
        self.backend = None  # a ReferenceBackend over it
        # A timeout left a collective unfinished on the Buffer's own communicator: only the
        # active ranks' communicator is usable for low latency, and normal mode is not.
        self.poisoned = ""

    # -- state ---------------------------------------------------------------------
    @property
    def engaged(self) -> bool:
        """Low-latency calls run on the active ranks' communicator."""
        return self.comm is not None

    @property
    def masked(self) -> list[int]:
        return sorted(set(range(self.full.size)) - set(self.active))

    def positions(self, device: torch.device) -> torch.Tensor:
        """[R] int64: each rank's rank among the active ones, -1 for masked ranks."""
        pos = torch.full((self.full.size,), -1, dtype=torch.int64)
        pos[self.active] = torch.arange(len(self.active))
        return pos.to(device)

    def status(self) -> torch.Tensor:
        """[R] int32: 1 for masked ranks (DeepEP's low_latency_query_mask_buffer)."""
        out = torch.ones(self.full.size, dtype=torch.int32)
        out[self.active] = 0
        return out

    # -- changes -------------------------------------------------------------------
    def recover(self, error: PeerTimeoutError) -> list[int]:
        """After ``error`` in a low-latency call: find the living, agree, and mask the rest.
        Returns the newly masked ranks; raises MaskAgreementError if no agreement."""
        me = self.full.rank
        peers = [r for r in self.active if r != me]
        probe = self.tagged(0)
        heard = _exchange(
            self.full.comm, peers, np.array([self.epoch, self.calls]), probe, self.full.timeout_s
        )
        living = sorted([me] + [p for p, v in heard.items() if v is not None])
        self.poisoned = self.poisoned or str(error)
        if len(living) == 1 and peers:
            raise MaskAgreementError(
                f"rank {me}: {error}; and no peer answered the failure probe within "
                f"{self.full.timeout_s:g}s: this rank is cut off, nothing was masked"
            ) from error
        self._agree_and_switch(living, self.calls, f"after: {error}")
        return sorted(set(peers) - set(living))

    def update(self, rank: int, mask: bool) -> None:
        """Mask or unmask one rank (collective over the ranks active afterwards)."""
        if not 0 <= rank < self.full.size:
            raise ValueError(f"rank_to_mask={rank} is outside [0, {self.full.size})")
        active = set(self.active)
        active = active - {rank} if mask else active | {rank}
        self.set_active(sorted(active))

    def set_active(self, active: list[int]) -> None:
        if not active:
            raise ValueError("cannot mask every rank")
        if active == self.active:
            return
        if self.full.rank not in active:  # this rank leaves: it only records the new mask
            self._install(active, None)
            return
        self._agree_and_switch(active, -1, "mask update")

    # -- helpers ---------------------------------------------------------------------
    def tagged(self, step: int) -> int:
        return TAG_BASE + 2 * self.epoch + step

    def _agree_and_switch(self, living: list[int], calls: int, why: str) -> None:
        me, size = self.full.rank, self.full.size
        view = np.zeros(size + 2, dtype=np.int64)
        view[0], view[1] = self.epoch, calls
        view[2 + np.asarray(living)] = 1
        others = [r for r in living if r != me]
        views = _exchange(self.full.comm, others, view, self.tagged(1), self.full.timeout_s)
        silent = [r for r, v in views.items() if v is None]
        differ = [r for r, v in views.items() if v is not None and not np.array_equal(v, view)]
        if silent or differ:
            detail = []
            if silent:
                detail.append(f"ranks {silent} did not answer")
            for r in differ:
                v = views[r]
                assert v is not None
                theirs = [int(i) for i in np.nonzero(v[2:])[0]]
                detail.append(
                    f"rank {r} has epoch {v[0]}, {v[1]} low-latency calls, active {theirs}"
                )
            raise MaskAgreementError(
                f"rank {me}: {why}; the ranks could not agree on the active ranks (this rank: "
                f"epoch {self.epoch}, {calls} low-latency calls, active {living}; "
                + "; ".join(detail)
                + "): the mask is unchanged"
            )
        if len(living) == size and not self.poisoned:  # back to the Buffer's own backend
            self._install(living, None)
            return
        group = self.full.comm.Get_group().Incl(living)
        sub = self.full.comm.Create_group(group, CREATE_TAG_BASE + self.epoch)
        group.Free()
        comm = Communicator(
            sub,
            ranks_per_node=len(living),  # one (virtual) node: LL mode does not use nodes
            timeout_s=self.full.timeout_s,
            abort_on_timeout=False,
        )
        sub.Free()  # Communicator keeps its own duplicate
        self._install(living, comm)

    def _install(self, active: list[int], comm: Communicator | None) -> None:
        from mpiep.backends.reference import ReferenceBackend

        self.free()
        self.active = list(active)
        self.epoch += 1
        self.calls = 0
        if comm is not None:
            self.comm = comm
            if self.reference:
                self.backend = ReferenceBackend(comm, self.device, self.nvl, self.rdma)
        if self.on_change is not None:
            self.on_change(list(self.active), self.comm)

    def free(self) -> None:
        if self.backend is not None:
            self.backend.destroy()
        if self.comm is not None:
            self.comm.free()
        self.comm, self.backend = None, None
