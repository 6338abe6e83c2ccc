"""The benchmark table, printed by rank 0."""

from __future__ import annotations

from mpiep.bench.run import Row

FOOTNOTE = (
    "GB/s = bytes received per rank / median time (mean over ranks). logical: all rows\n"
    "received, the rank's own included (DeepEP's count); nvlink: rows from other GPUs only.\n"
    "Row bytes: BF16 H*2; FP8 H + H/128*4 (scales); low latency: one row per (token, expert).\n"
    "Times (slowest rank's): median/min = back-to-back calls in batches after one barrier,\n"
    "per call (GPUs: batches of 10); synced = one call right after an MPI barrier;\n"
    "kernel (with --kernel-times) = GPU time of the call's kernels and copies (torch profiler)."
)


def format_table(title: str, rows: list[Row]) -> str:
    kernels = any(r.time.get("kernel_us", 0.0) > 0 for r in rows)
    header = (
        f"{'case':<44} {'shape':<30} {'median us':>10} {'min us':>9} {'synced us':>10} "
        + (f"{'kernel us':>10} " if kernels else "")
        + f"{'logical GB/s':>12} {'nvlink GB/s':>11}  check"
    )
    lines = [title, header, "-" * len(header)]
    for r in rows:
        t = r.time
        lines.append(
            f"{r.case:<44} {r.shape.label:<30} {t['median_us']:>10.1f} {t['min_us']:>9.1f} "
            f"{t.get('synced_us', 0.0):>10.1f} "
            + (f"{t.get('kernel_us', 0.0):>10.1f} " if kernels else "")
            + f"{r.gbps('logical'):>12.2f} {r.gbps('nvlink'):>11.2f}  {r.check}"
        )
    return "\n".join(lines)
