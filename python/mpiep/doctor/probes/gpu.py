"""GPUs and their NVLink / P2P topology (``nvidia-smi``)."""

from __future__ import annotations

import dataclasses
import re

from mpiep import network_env as ne
from mpiep.doctor.report import Report


def parse_topo_matrix(text: str) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Parse ``nvidia-smi topo -m``/``-p2p r`` output: (GPU labels, {(a, b): link})."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return [], {}
    header = lines[0].split()
    cols = []
    for tok in header:
        if re.fullmatch(r"GPU\d+", tok):
            cols.append(tok)
        elif cols:
            break
    links: dict[tuple[str, str], str] = {}
    for ln in lines[1:]:
        toks = ln.split()
        if not toks or not re.fullmatch(r"GPU\d+", toks[0]):
            continue
        for col, val in zip(cols, toks[1 : 1 + len(cols)], strict=False):
            links[(toks[0], col)] = val
    return cols, links


def probe_gpus(report: Report, sys_root: str) -> None:
    """GPU list and pairwise NVLink / P2P status."""
    gpus = ne.gpus(sys_root)
    report.gpus = {"count": len(gpus), "devices": [dataclasses.asdict(g) for g in gpus]}
    if not gpus:
        report.add(
            "info",
            "gpu",
            "no NVIDIA GPU visible (nvidia-smi absent or failing): only the reference backend "
            "runs here; CUDA kernels and NVSHMEM need a GPU node",
        )
        return
    rc, topo = ne.run_cmd(["nvidia-smi", "topo", "-m"])
    labels, links = parse_topo_matrix(topo) if rc == 0 else ([], {})
    rc, p2p = ne.run_cmd(["nvidia-smi", "topo", "-p2p", "r"])
    _, p2p_links = parse_topo_matrix(p2p) if rc == 0 else ([], {})
    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            pairs.append(
                {
                    "pair": f"{a}-{b}",
                    "link": links.get((a, b), "?"),
                    "p2p_read": p2p_links.get((a, b), "?"),
                }
            )
    report.gpus["pairs"] = pairs
    no_nvlink = [p["pair"] for p in pairs if not p["link"].startswith("NV")]
    no_p2p = [p["pair"] for p in pairs if p["p2p_read"] not in ("OK", "?")]
    if no_p2p:
        report.add(
            "warn",
            "gpu",
            f"P2P reads not available between {', '.join(no_p2p[:6])}: intranode "
            "NVSHMEM/IPC traffic will not work there; check the driver, IOMMU and ACS settings",
        )
    elif no_nvlink:
        report.add(
            "info",
            "gpu",
            f"no NVLink between {', '.join(no_nvlink[:6])}: intranode traffic goes over PCIe",
        )
