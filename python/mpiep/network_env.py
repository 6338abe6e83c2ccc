"""Node topology probes shared by ``mpiep doctor`` (and users).

Reads /sys/class/infiniband and ``nvidia-smi`` when they exist; every probe returns empty
results instead of raising on a machine without GPUs or HCAs. ``python -m mpiep.network_env
nic --local-rank N`` prints the HCA port nearest to local rank N's GPU. The rendered job
scripts do the same lookup in bash: a Python helper there would import mpiep, and a process
that starts MPI under a rank's PMIx identity breaks that rank's own MPI_Init.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROBE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class IbPort:
    """One port of an RDMA device."""

    number: int
    state: str  # e.g. 'ACTIVE'
    link_layer: str  # 'InfiniBand' or 'Ethernet' (RoCE)
    rate: str


@dataclass(frozen=True)
class IbDevice:
    """An RDMA device from /sys/class/infiniband."""

    name: str
    pci_path: str  # resolved sysfs path of the PCI function, '' if unknown
    numa_node: int | None
    ports: tuple[IbPort, ...] = field(default=())

    def active_ports(self) -> list[IbPort]:
        """Ports whose state is ACTIVE."""
        return [p for p in self.ports if "ACTIVE" in p.state.upper()]


@dataclass(frozen=True)
class Gpu:
    """A GPU as nvidia-smi lists it."""

    index: int
    name: str
    uuid: str
    bus_id: str  # normalised to 'dddd:bb:dd.f', lower case
    pci_path: str  # resolved sysfs path, '' if unknown


def run_cmd(args: list[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[int, str]:
    """Run a probe: (returncode, stdout+stderr); missing tool 127, timeout 124, never raises."""
    if shutil.which(args[0]) is None:
        return 127, f"{args[0]}: not found"
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return 124, f"{args[0]}: timed out after {timeout:.0f}s"
    except OSError as exc:
        return 126, f"{args[0]}: {exc}"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def ib_devices(sys_root: str = "/sys") -> list[IbDevice]:
    """RDMA devices and their ports, sorted by name."""
    base = Path(sys_root) / "class" / "infiniband"
    if not base.is_dir():
        return []
    devices = []
    for dev in sorted(base.iterdir()):
        ports = []
        ports_dir = dev / "ports"
        if ports_dir.is_dir():
            for port in sorted(
                ports_dir.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0
            ):
                if not port.name.isdigit():
                    continue
                ports.append(
                    IbPort(
                        number=int(port.name),
                        state=_read(port / "state").split(":")[-1].strip(),
                        link_layer=_read(port / "link_layer"),
                        rate=_read(port / "rate"),
                    )
                )
        device_link = dev / "device"
        pci_path = str(device_link.resolve()) if device_link.exists() else ""
        numa = _read(device_link / "numa_node")
        devices.append(
            IbDevice(
                name=dev.name,
                pci_path=pci_path,
                numa_node=int(numa) if numa.lstrip("-").isdigit() else None,
                ports=tuple(ports),
            )
        )
    return devices


def normalise_bus_id(bus_id: str) -> str:
    """'00000000:18:00.0' -> '0000:18:00.0' (the sysfs spelling)."""
    bus_id = bus_id.strip().lower()
    domain, _, rest = bus_id.partition(":")
    if rest and len(domain) > 4:
        domain = domain[-4:]
    return f"{domain}:{rest}" if rest else bus_id


def gpus(sys_root: str = "/sys") -> list[Gpu]:
    """GPUs from nvidia-smi (empty without a driver)."""
    rc, out = run_cmd(
        ["nvidia-smi", "--query-gpu=index,name,uuid,pci.bus_id", "--format=csv,noheader"]
    )
    if rc != 0:
        return []
    result = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        bus = normalise_bus_id(parts[3])
        dev = Path(sys_root) / "bus" / "pci" / "devices" / bus
        result.append(
            Gpu(
                index=int(parts[0]),
                name=parts[1],
                uuid=parts[2],
                bus_id=bus,
                pci_path=str(dev.resolve()) if dev.exists() else "",
            )
        )
    return result


def _common_depth(a: str, b: str) -> int:
    depth = 0
    for x, y in zip(Path(a).parts, Path(b).parts, strict=False):
        if x != y:
            break
        depth += 1
    return depth


def nearest_nic(gpu: Gpu, devices: list[IbDevice]) -> str | None:
    """'mlx5_N:PORT' of the active port sharing the longest PCI path with ``gpu``."""
    best: tuple[int, str] | None = None
    for dev in devices:
        ports = dev.active_ports()
        if not ports:
            continue
        depth = _common_depth(gpu.pci_path, dev.pci_path) if gpu.pci_path and dev.pci_path else 0
        name = f"{dev.name}:{ports[0].number}"
        if best is None or depth > best[0]:
            best = (depth, name)
    return best[1] if best else None


def gpu_nic_map(sys_root: str = "/sys") -> dict[int, str]:
    """GPU index -> nearest active HCA port."""
    devices = ib_devices(sys_root)
    result = {}
    for gpu in gpus(sys_root):
        nic = nearest_nic(gpu, devices)
        if nic:
            result[gpu.index] = nic
    return result


def local_gpu_index(local_rank: int, all_gpus: list[Gpu]) -> int | None:
    """nvidia-smi index of the GPU local rank ``local_rank`` uses (honours CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return local_rank if any(g.index == local_rank for g in all_gpus) else None
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if local_rank >= len(entries):
        return None
    entry = entries[local_rank]
    if entry.isdigit():
        return int(entry)
    for gpu in all_gpus:
        if gpu.uuid.startswith(entry) or entry in gpu.uuid:
            return gpu.index
    return None


def nic_for_local_rank(local_rank: int, sys_root: str = "/sys") -> str | None:
    """HCA port nearest to the GPU of ``local_rank``, or None when unknown."""
    all_gpus = gpus(sys_root)
    index = local_gpu_index(local_rank, all_gpus)
    if index is None:
        return None
    mapping = {g.index: g for g in all_gpus}
    return nearest_nic(mapping[index], ib_devices(sys_root)) if index in mapping else None


def main(argv: list[str] | None = None) -> int:
    """``python -m mpiep.network_env nic --local-rank N``."""
    parser = argparse.ArgumentParser(prog="python -m mpiep.network_env")
    sub = parser.add_subparsers(dest="cmd", required=True)
    nic = sub.add_parser("nic", help="print the HCA port nearest to a local rank's GPU")
    nic.add_argument("--local-rank", type=int, required=True)
    sub.add_parser("map", help="print 'GPU NIC' for every GPU with a nearby active HCA port")
    args = parser.parse_args(argv)
    if args.cmd == "nic":
        found = nic_for_local_rank(args.local_rank)
        if found:
            print(found)
            return 0
        return 1
    for index, name in sorted(gpu_nic_map().items()):
        print(index, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
