"""RDMA devices and ports, GPU -> NIC proximity, RoCE congestion control (sysfs)."""

from __future__ import annotations

import ctypes.util
import dataclasses
import glob
import os
import shutil
from pathlib import Path

from mpiep import network_env as ne
from mpiep.doctor.report import Report


def probe_rdma(report: Report, sys_root: str) -> None:
    """RDMA devices, ports, link layers, GPU->NIC proximity, RoCE congestion control."""
    devices = ne.ib_devices(sys_root)
    report.rdma = {
        "devices": [dataclasses.asdict(d) for d in devices],
        "ibv_devinfo": bool(shutil.which("ibv_devinfo")),
        "gpu_nic_map": {str(k): v for k, v in ne.gpu_nic_map(sys_root).items()},
    }
    if not devices:
        report.add(
            "info",
            "rdma",
            "no RDMA device in /sys/class/infiniband: internode mpiep traffic "
            "needs InfiniBand or RoCE HCAs; single-node jobs use NVLink/PCIe P2P",
        )
        return
    libs = {name: bool(ctypes.util.find_library(name)) for name in ("ibverbs", "mlx5")}
    report.rdma["libraries"] = libs
    missing = [f"lib{k}" for k, v in libs.items() if not v]
    if missing:
        report.add(
            "fix",
            "rdma",
            f"{', '.join(missing)} not found: NVSHMEM's IBRC/IBGDA transports "
            "need rdma-core (apt install libibverbs1 ibverbs-providers, or MLNX_OFED/DOCA)",
        )
    active = [d for d in devices if d.active_ports()]
    if not active:
        report.add("warn", "rdma", "no RDMA port is ACTIVE: check cables, `ibstat` and the SM")
    layers = {p.link_layer for d in devices for p in d.ports}
    if "Ethernet" in layers:
        report.add(
            "info",
            "rdma",
            "RoCE ports: NVSHMEM_IB_SL becomes the Ethernet priority; set "
            "the traffic class with --traffic-class (NVSHMEM_IB_TRAFFIC_CLASS, NCCL_IB_TC)",
        )
        ecn = {}
        for path in glob.glob(os.path.join(sys_root, "class/net/*/ecn/roce_rp/enable/*")):
            iface = Path(path).parts[-5]
            if Path(path).read_text().strip() == "1":
                ecn.setdefault(iface, []).append(int(Path(path).name))
        report.rdma["roce_congestion_control_priorities"] = ecn
    if "InfiniBand" in layers:
        report.add(
            "info",
            "rdma",
            "SL-to-VL mapping and per-SL adaptive routing are subnet-manager "
            "settings the host cannot read without SMP queries (smpquery sl2vl); check that "
            "the profile's SLs match what your fabric admins configured",
        )
