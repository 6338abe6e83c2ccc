"""``mpiep doctor``: runs anywhere, parses GPU/NIC topology, flags bad network settings."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mpiep import doctor
from mpiep import network_env as ne

ROOT = Path(__file__).resolve().parents[1]
_LAUNCHER_VARS = ("OMPI_", "PMIX_", "PMI_", "ORTE_", "OPAL_", "SLURM_", "HYDRA_", "MPI_LOCAL")

TOPO = """\
\tGPU0\tGPU1\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tPIX\tSYS\t0-15\t0\t\tN/A
GPU1\tNV18\t X \tSYS\tPIX\t16-31\t1\t\tN/A
NIC0\tPIX\tSYS\t X \tSYS
NIC1\tSYS\tPIX\tSYS\t X

Legend:
  X    = Self
  NIC0: mlx5_0
"""

P2P = """\
 \tGPU0\tGPU1\t
 GPU0\tX\tOK\t
 GPU1\tOK\tX\t
"""

FAKE_SMI = """#!/bin/bash
case "$*" in
  *--query-gpu*) printf '0, NVIDIA H200, GPU-aaaa, 00000000:06:00.0\\n'
                 printf '1, NVIDIA H200, GPU-bbbb, 00000000:86:00.0\\n' ;;
  "topo -m") cat "$FAKE_TOPO" ;;
  "topo -p2p r") cat "$FAKE_P2P" ;;
  *) exit 1 ;;
esac
"""


def clean_env() -> dict[str, str]:
    """Environment without any launcher's variables (tests may run under mpirun)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def fake_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sysfs tree with two GPUs and two HCAs, each pair under its own PCIe root, and a
    stand-in nvidia-smi on PATH."""
    sys_root = tmp_path / "sys"
    devices = sys_root / "devices"
    layout = {
        ("gpu", "0000:06:00.0"): "pci0000:00/0000:00:01.0/0000:05:00.0/0000:06:00.0",
        ("gpu", "0000:86:00.0"): "pci0000:80/0000:80:01.0/0000:85:00.0/0000:86:00.0",
        ("mlx5_0", ""): "pci0000:00/0000:00:01.0/0000:05:00.0/0000:07:00.0",
        ("mlx5_1", ""): "pci0000:80/0000:80:01.0/0000:85:00.0/0000:87:00.0",
    }
    (sys_root / "bus/pci/devices").mkdir(parents=True)
    for (kind, bus), rel in layout.items():
        target = devices / rel
        target.mkdir(parents=True)
        (target / "numa_node").write_text("0\n" if "pci0000:00" in rel else "1\n")
        if kind == "gpu":
            (sys_root / "bus/pci/devices" / bus).symlink_to(target)
            continue
        dev = sys_root / "class/infiniband" / kind
        port = dev / "ports" / "1"
        port.mkdir(parents=True)
        (port / "state").write_text("4: ACTIVE\n")
        (port / "link_layer").write_text("InfiniBand\n")
        (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
        (dev / "device").symlink_to(target)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "topo.txt").write_text(TOPO)
    (tmp_path / "p2p.txt").write_text(P2P)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TOPO", str(tmp_path / "topo.txt"))
    monkeypatch.setenv("FAKE_P2P", str(tmp_path / "p2p.txt"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return sys_root


def test_parse_topo_matrix() -> None:
    labels, links = doctor.parse_topo_matrix(TOPO)
    assert labels == ["GPU0", "GPU1"]
    assert links[("GPU0", "GPU1")] == "NV18" and links[("GPU1", "GPU0")] == "NV18"
    _, p2p = doctor.parse_topo_matrix(P2P)
    assert p2p[("GPU0", "GPU1")] == "OK"


def test_topology_from_fake_node(fake_node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys_root = str(fake_node)
    devices = ne.ib_devices(sys_root)
    assert [d.name for d in devices] == ["mlx5_0", "mlx5_1"]
    assert devices[0].active_ports()[0].link_layer == "InfiniBand"
    assert devices[1].numa_node == 1
    assert ne.gpu_nic_map(sys_root) == {0: "mlx5_0:1", 1: "mlx5_1:1"}
    assert ne.nic_for_local_rank(1, sys_root) == "mlx5_1:1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # local rank 0 uses GPU 1
    assert ne.nic_for_local_rank(0, sys_root) == "mlx5_1:1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    assert ne.nic_for_local_rank(0, sys_root) == "mlx5_0:1"
    assert ne.nic_for_local_rank(1, sys_root) is None


def test_report_on_fake_node(fake_node: Path) -> None:
    report = doctor.collect(sys_root=str(fake_node), env={})
    assert report.gpus["count"] == 2
    assert report.gpus["pairs"] == [{"pair": "GPU0-GPU1", "link": "NV18", "p2p_read": "OK"}]
    assert len(report.rdma["devices"]) == 2
    assert report.rdma["gpu_nic_map"] == {"0": "mlx5_0:1", "1": "mlx5_1:1"}
    text = doctor.format_text(report)
    assert "GPU1 NVIDIA H200 0000:86:00.0" in text
    assert "GPU0-GPU1: link NV18, P2P read OK" in text
    assert "mlx5_1 (NUMA 1): port 1 ACTIVE InfiniBand" in text
    assert "GPU0 -> nearest NIC mlx5_0:1" in text
    assert any("subnet-manager" in f.message for f in report.findings)


def _messages(env: dict[str, str]) -> list[str]:
    report = doctor.Report()
    doctor.check_environment(report, env, "normal", "isolated-static")
    return [f"[{f.level}] {f.message}" for f in report.findings]


def test_environment_checks() -> None:
    good = {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0", "NVSHMEM_IB_SL": "1"}
    assert _messages(good) == []
    msgs = _messages({**good, "NVSHMEM_HCA_LIST": "mlx5_0:1"})
    assert any("NVSHMEM_ENABLE_NIC_PE_MAPPING=1" in m for m in msgs)
    msgs = _messages({**good, "NVSHMEM_IB_SL": "16", "UCX_IB_SL": "x"})
    assert sum("is not an InfiniBand SL" in m for m in msgs) == 2
    ar = {**good, "MPIEP_MODE": "normal", "NVSHMEM_IB_SL": "3", "MPIEP_NET_ADAPTIVE_SLS": "3"}
    assert any(m.startswith("[fix]") and "adaptively routed SL 3" in m for m in _messages(ar))
    in_job = _messages({"SLURM_JOB_ID": "5"})
    assert any(m.startswith("[fix]") and "NVSHMEM_DISABLE_NVLS=1" in m for m in in_job)
    shared = {**good, "NCCL_IB_SL": "1", "MPIEP_NET_PROFILE": "isolated-static"}
    assert any("share SL 1" in m for m in _messages(shared))


@pytest.mark.parametrize("loads", [True, False])
def test_nvshmem_bootstrap_probe(monkeypatch: pytest.MonkeyPatch, loads: bool) -> None:
    """Which bootstrap works: 'uid' always, 'mpi' where NVSHMEM's MPI plugin loads."""
    from mpiep.backends import nvshmem_boot

    detail = (
        "/x/lib/nvshmem_bootstrap_mpi.so.3" if loads else "nvshmem_bootstrap_mpi.so.3 not found"
    )
    monkeypatch.setattr(nvshmem_boot, "mpi_plugin_loads", lambda: (loads, detail))
    report = doctor.Report()
    doctor.probe_nvshmem_bootstrap(report, {})
    data = json.loads(doctor.to_json(report))["nvshmem"]["bootstrap"]
    assert data["uid"]["available"] is True
    assert data["mpi"] == {"available": loads, "detail": detail}
    assert data["requested"] == "uid"
    [finding] = report.findings
    assert (finding.level, finding.topic) == ("info", "nvshmem")
    assert "'uid' (unique id over MPI) always" in finding.message
    state = "available" if loads else "unavailable"
    assert f"'mpi' (NVSHMEM's MPI plugin, no extra sockets) {state}: {detail}" in finding.message
    advice = "set MPIEP_NVSHMEM_BOOTSTRAP=mpi or Buffer(nvshmem_bootstrap='mpi')"
    assert (advice in finding.message) == loads
    # Asking for the plugin where it does not load (or for no known bootstrap) is a fix.
    for value, fix in (("mpi", not loads), ("auto", False), ("bogus", True)):
        report = doctor.Report()
        doctor.probe_nvshmem_bootstrap(report, {"MPIEP_NVSHMEM_BOOTSTRAP": value})
        assert [f.level for f in report.findings] == ["info"] + ["fix"] * fix, value


def test_report_on_this_machine() -> None:
    report = doctor.collect()
    text = doctor.format_text(report)
    for heading in ("mpiep doctor on", "GPUs:", "NVSHMEM:", "RDMA devices:", "MPI:", "Launcher:"):
        assert heading in text
    assert "NVSHMEM bootstrap: 'uid'" in text
    assert "NVSHMEM_DISABLE_NVLS=1" in text  # the environment a job would get
    assert report.findings, "a node always gets some advice"
    if report.gpus["count"] == 0:
        assert any(f.topic == "gpu" for f in report.findings)


def test_cli_json_and_text_exit_zero() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mpiep.doctor", "--json", "--mode", "low-latency"],
        capture_output=True, text=True, timeout=180, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("host", "gpus", "nvshmem", "rdma", "mpi", "launcher", "job_env", "findings"):
        assert key in data
    job = {v["name"]: v["value"] for v in data["job_env"]}
    assert job["NVSHMEM_IB_SL"] == "2" and job["MPIEP_MODE"] == "low-latency"
    assert data["mpi"].get("mpi4py"), data["mpi"]
    assert data["nvshmem"]["bootstrap"]["uid"]["available"] is True
    assert isinstance(data["nvshmem"]["bootstrap"]["mpi"]["available"], bool)
    text = subprocess.run(
        [sys.executable, "-m", "mpiep.doctor"],
        capture_output=True, text=True, timeout=180, env=clean_env(),
    )  # fmt: skip
    assert text.returncode == 0 and "What to fix:" in text.stdout


def test_register_convention() -> None:
    parser = argparse.ArgumentParser(prog="mpiep")
    doctor.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--json"])
    assert args.func is doctor.run and args.json
