"""The benchmark table, printed by rank 0, and the progress line while it runs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mpiep.bench.run import Row

FOOTNOTE = (
    "GB/s = bytes received per rank / median time (mean over ranks). logical: all rows\n"
    "received, the rank's own included (DeepEP's count); nvlink: rows other GPUs of the node\n"
    "write into it; rdma (several nodes): rows it receives over RDMA as its node's forwarder.\n"
    "Row bytes: BF16 H*2; FP8 H + H/128*4 (scales); low latency: one row per (token, expert).\n"
    "Times (slowest rank's): median/min = back-to-back calls in batches after one barrier,\n"
    "per call (GPUs: batches of 10); synced = one call right after an MPI barrier;\n"
    "kernel (with --kernel-times) = GPU time of the call's kernels and copies (torch profiler);\n"
    "host = median - kernel, what the call costs beyond its kernels.\n"
    "Hook rows: send phase = one call with return_recv_hook right after a barrier, from the\n"
    "call to the end of its kernel; host call = how long that call holds the caller's thread.\n"
    "CUDA graph replay: the same calls captured once, replayed (the kernel-only floor).\n"
    "MPI floor (CPU runs) = median of a raw mpi4py Alltoallv of the same rows between the\n"
    "same ranks, in this run; x floor = median / MPI floor."
)


def format_time(us: float) -> str:
    """A time with its unit (us, ms or s) and three significant figures."""
    if us <= 0:
        return "-"
    for unit, scale in (("s", 1e6), ("ms", 1e3)):
        if us >= scale:
            return f"{_sig(us / scale)} {unit}"
    return f"{_sig(us)} us"


def format_gbps(gbps: float) -> str:
    """GB/s with at least two significant figures (three below 100)."""
    return "-" if gbps <= 0 else _sig(gbps)


def _sig(v: float) -> str:
    """Three significant figures, no exponent: 0.0123, 1.26, 42.9, 168, 1130."""
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:#.3g}" if v >= 0.001 else f"{v:.2e}"


def format_table(title: str, rows: list[Row]) -> str:
    kernels = any(r.time.get("kernel_us", 0.0) > 0 for r in rows)
    floors = any(r.extra.get("floor_us") for r in rows)
    rdma = any(r.rdma_bytes for r in rows)
    cols = [("case", 44, "<"), ("shape", 30, "<"), ("median", 9, ">"), ("min", 9, ">")]
    cols.append(("synced", 9, ">"))
    if kernels:
        cols += [("kernel", 9, ">"), ("host", 9, ">")]
    if floors:
        cols += [("MPI floor", 9, ">"), ("x floor", 7, ">")]
    cols += [("logical GB/s", 12, ">"), ("nvlink GB/s", 11, ">")]
    if rdma:
        cols.append(("rdma GB/s", 9, ">"))
    cols.append(("check", 0, "<"))

    def line(values: list[str]) -> str:
        return " ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(values, cols, strict=True)).rstrip()

    header = line([name for name, _, _ in cols])
    out = [title, header, "-" * len(header)]
    for r in rows:
        t = r.time
        cells = [r.case, r.shape.label, format_time(t["median_us"]), format_time(t["min_us"])]
        cells.append(format_time(t.get("synced_us", 0.0)))
        if kernels:
            kernel = t.get("kernel_us", 0.0)
            cells.append(format_time(kernel))
            cells.append(format_time(t["median_us"] - kernel if kernel else 0.0))
        if floors:
            floor = float(r.extra.get("floor_us", 0.0) or 0.0)
            ratio = t["median_us"] / floor if floor else 0.0
            cells += [format_time(floor), f"{ratio:.2f}" if ratio else "-"]
        cells += [format_gbps(r.gbps("logical")), format_gbps(r.gbps("nvlink"))]
        if rdma:
            cells.append(format_gbps(r.gbps("rdma")))
        cells.append(r.check)
        out.append(line(cells))
    return "\n".join(out)


class Progress:
    """One status line, rewritten in place on a terminal; plain lines per shape elsewhere."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.perf_counter()
        self.prefix = ""
        self.width = 0

    def shape(self, index: int, total: int, label: str) -> None:
        self.prefix = f"[{index}/{total}] {label}"
        if not self.live:
            print(f"{self.prefix} ({self.elapsed():.0f}s elapsed)", file=self.stream, flush=True)
        else:
            self._show(self.prefix)

    def step(self, case: str, done: int, total: int) -> None:
        if self.live:
            self._show(f"{self.prefix}  {case}: {done}/{total}  ({self.elapsed():.0f}s elapsed)")

    def close(self) -> None:
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _show(self, text: str) -> None:
        pad = max(self.width - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self.width = len(text)
