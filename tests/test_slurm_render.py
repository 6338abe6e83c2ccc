"""Rendered sbatch scripts: content, syntax (bash -n), the checked-in examples, and a dry run
of the whole script with stand-in ``srun``/``mpirun`` that start the ranks locally."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mpiep.slurm.examples import EXAMPLES
from mpiep.slurm.profiles import get_profile
from mpiep.slurm.render import JobSpec, render

ROOT = Path(__file__).resolve().parents[1]
PYTHON_DIR = ROOT / "python"
SIZES = (8, 16, 32, 64, 128, 256)
_LAUNCHER_VARS = ("OMPI_", "PMIX_", "PMI_", "ORTE_", "OPAL_", "SLURM_", "HYDRA_", "MPI_LOCAL")


def clean_env(**extra: str) -> dict[str, str]:
    """Environment without any launcher's variables (tests may run under mpirun)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def bash_syntax_ok(text: str, tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def sbatch_options(text: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", text, re.M):
        out[m.group(1)] = m.group(2) or ""
    return out


@pytest.mark.parametrize("gpus", SIZES)
def test_every_size_renders_whole_nodes(gpus: int, tmp_path: Path) -> None:
    text = render(JobSpec(gpus=gpus))
    opts = sbatch_options(text)
    assert opts["nodes"] == str(gpus // 8)
    assert opts["ntasks-per-node"] == "8"
    assert opts["gpus-per-node"] == "8"
    assert opts["output"] == "%x-%j.out"
    assert text.startswith("#!/bin/bash\n")
    assert "\nset -euo pipefail\n" in text
    # sbatch reads #SBATCH lines only before the first command
    first_cmd = text.index("\nset -euo pipefail")
    assert text.rfind("#SBATCH", 0) < first_cmd
    assert f"--nodes={gpus // 8} --ntasks={gpus} --ntasks-per-node=8" in text
    assert "srun --mpi=pmix" in text and "--gpu-bind=none" in text
    assert "--kill-on-bad-exit=1" in text
    for line in (
        "export NVSHMEM_DISABLE_NVLS=1",
        "export NCCL_NVLS_ENABLE=0",
        "export NVSHMEM_IB_SL=1",  # isolated-static, normal lane
        "export NCCL_IB_SL=0",
        "export UCX_IB_SL=0",
        "export OMPI_MCA_btl_openib_ib_service_level=0",
        "export NVSHMEM_IB_ENABLE_IBGDA=1",
        "export NCCL_IB_ADAPTIVE_ROUTING=0",
    ):
        assert f"\n{line}\n" in text, line
    assert re.search(r"\nexport NVSHMEM_SYMMETRIC_SIZE=\d+[mg]\n", text)
    assert 'rank="$SLURM_PROCID"' in text and 'local_rank="$SLURM_LOCALID"' in text
    assert "MPIEP_RANKS_PER_NODE" not in text  # only with virtual nodes
    bash_syntax_ok(text, tmp_path)


def test_low_latency_adaptive_lane(tmp_path: Path) -> None:
    spec = JobSpec(gpus=16, mode="low-latency", network=get_profile("isolated-adaptive"))
    text = render(spec)
    assert "\nexport NVSHMEM_IB_SL=3\n" in text
    assert "this job's lane: SL 3" in text and "adaptive SLs: 3" in text
    assert "routed adaptively" in text
    bash_syntax_ok(text, tmp_path)


def test_other_gpus_per_node_and_partial_node(tmp_path: Path) -> None:
    four = sbatch_options(render(JobSpec(gpus=32, gpus_per_node=4)))
    assert (four["nodes"], four["ntasks-per-node"], four["gpus-per-node"]) == ("8", "4", "4")
    text = render(JobSpec(gpus=2, gpus_per_node=8, gpu_request="gres", cpus_per_task=4))
    two = sbatch_options(text)
    assert (two["nodes"], two["ntasks-per-node"], two["gres"]) == ("1", "2", "gpu:2")
    assert two["cpus-per-task"] == "4" and "--cpus-per-task=4" in text
    none = render(JobSpec(gpus=2, gpus_per_node=2, gpu_request="none"))
    assert "gpus-per-node" not in sbatch_options(none) and "--gpu-bind" not in none
    bash_syntax_ok(none, tmp_path)


def test_mpirun_variant(tmp_path: Path) -> None:
    text = render(JobSpec(gpus=16, launcher="mpirun", partition="gpu", account="ep"))
    assert "\nmpirun -np 16 --map-by ppr:8:node --bind-to none --tag-output" in text
    assert "\nsrun " not in text
    assert "OMPI_COMM_WORLD_LOCAL_RANK" in text and "SLURM_PROCID" not in text
    assert "mpirun_env+=(-x" in text and "NVSHMEM_IB_SL" in text
    opts = sbatch_options(text)
    assert opts["partition"] == "gpu" and opts["account"] == "ep"
    bash_syntax_ok(text, tmp_path)


def test_srun_mpi_auto_and_pmi2(tmp_path: Path) -> None:
    auto = render(JobSpec(gpus=8, mpi="auto"))
    assert "srun --mpi=list" in auto and '--mpi="$MPIEP_SRUN_MPI"' in auto
    bash_syntax_ok(auto, tmp_path)
    assert "srun --mpi=pmi2" in render(JobSpec(gpus=8, mpi="pmi2"))


def test_payload_and_paths_are_quoted(tmp_path: Path) -> None:
    payload = "python -c \"print('it''s $HOME')\" && echo done"
    text = render(JobSpec(gpus=8, payload=payload, output_dir="my logs"))
    assert "export MPIEP_PAYLOAD=" in text
    assert "export MPIEP_LOG_DIR='my logs'/" in text
    bash_syntax_ok(text, tmp_path)
    # the shell gives back exactly the payload string
    line = next(ln for ln in text.splitlines() if ln.startswith("export MPIEP_PAYLOAD="))
    proc = subprocess.run(
        ["bash", "-c", f'{line}; printf %s "$MPIEP_PAYLOAD"'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stdout == payload


def test_checked_in_examples_match_renderer(tmp_path: Path) -> None:
    from mpiep.slurm.examples import write_examples

    written = write_examples(str(tmp_path))
    names = {p.name for p in written}
    assert names == set(EXAMPLES)
    checked_in = {p.name for p in (ROOT / "slurm").glob("*.sbatch")}
    assert checked_in == names, "re-run: python -m mpiep.slurm.examples slurm"
    for path in written:
        expected = path.read_text()
        actual = (ROOT / "slurm" / path.name).read_text()
        assert actual == expected, f"slurm/{path.name} drifted; re-run the examples module"
        bash_syntax_ok(actual, tmp_path)
    sizes = {int(m.group(1)) for n in names if (m := re.match(r"ep(\d+)-", n))}
    assert set(SIZES) <= sizes


# ---------------------------------------------------------------- dry run, no Slurm
FAKE_SRUN = r"""#!/bin/bash
# Stand-in for srun: run --ntasks copies of the command here, one after the other.
set -o pipefail
n=1; per=1
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in
        --ntasks=*) n=${1#*=} ;;
        --ntasks-per-node=*) per=${1#*=} ;;
        --mpi=list) echo "MPI plugin types are..."; echo "	pmix"; exit 0 ;;
    esac
    shift
done
for ((i = 0; i < n; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@" | sed "s/^/$i: /" || exit $?
done
"""

FAKE_MPIRUN = r"""#!/bin/bash
# Stand-in for Open MPI's mpirun: run -np copies here with OMPI_* rank variables.
n=1; per=1
while [[ $# -gt 0 ]]; do
    case $1 in
        -np) n=$2; shift 2 ;;
        --map-by) per=${2#ppr:}; per=${per%%:*}; shift 2 ;;
        -x) echo "forward $2" >>"$FAKE_MPIRUN_LOG"; shift 2 ;;
        --bind-to) shift 2 ;;
        --tag-output) shift ;;
        *) break ;;
    esac
done
for ((i = 0; i < n; i++)); do
    OMPI_COMM_WORLD_RANK=$i OMPI_COMM_WORLD_LOCAL_RANK=$((i % per)) "$@" || exit $?
done
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("mpirun", FAKE_MPIRUN)):
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _dry_run(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    bin_dir = _fake_bin(tmp_path)
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="1",
        FAKE_MPIRUN_LOG=str(tmp_path / "mpirun.log"),
        MPIEP_PYTHON=sys.executable,
    )
    return subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


PAYLOAD = 'echo "rank=$LOCAL_RANK hca=${NVSHMEM_HCA_LIST:-none} sl=$NVSHMEM_IB_SL"'


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_dry_run_maps_ranks_to_nics_and_logs(launcher: str, tmp_path: Path) -> None:
    spec = JobSpec(
        gpus=4,
        gpus_per_node=4,
        launcher=launcher,
        gpu_request="none",
        nic_map=("mlx5_0:1", "mlx5_1:1"),
        payload=PAYLOAD,
        virtual_node_size=2,
    )
    proc = _dry_run(render(spec), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank, hca in ((0, "mlx5_0:1"), (1, "mlx5_0:1"), (2, "mlx5_1:1"), (3, "mlx5_1:1")):
        assert f"rank={rank} hca={hca} sl=1" in proc.stdout
        log = (tmp_path / "mpiep-logs" / "4242" / f"rank-{rank:05d}.log").read_text()
        assert f"mpiep: rank {rank} local_rank {rank}" in log
        assert f"rank={rank} hca={hca} sl=1" in log
    if launcher == "mpirun":
        forwarded = (tmp_path / "mpirun.log").read_text()
        for name in ("NVSHMEM_IB_SL", "NCCL_IB_SL", "MPIEP_PAYLOAD", "MPIEP_RANKS_PER_NODE"):
            assert f"forward {name}\n" in forwarded


def test_dry_run_auto_nic_without_hcas_and_failing_payload(tmp_path: Path) -> None:
    ok = JobSpec(gpus=2, gpus_per_node=2, gpu_request="none", payload=PAYLOAD)
    proc = _dry_run(render(ok), tmp_path)
    assert proc.returncode == 0, proc.stderr
    if not Path("/sys/class/infiniband").is_dir():
        assert "0: rank=0 hca=none sl=1" in proc.stdout
    bad = JobSpec(gpus=2, gpus_per_node=2, gpu_request="none", payload="exit 7")
    sub = tmp_path / "bad"
    sub.mkdir()
    assert _dry_run(render(bad), sub).returncode != 0


FAKE_SMI = """#!/bin/bash
# nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i N
case "${@: -1}" in
  0|GPU-aaaa) echo 00000000:06:00.0 ;;
  1|GPU-bbbb) echo 00000000:86:00.0 ;;
  *) exit 6 ;;
esac
"""


def _fake_sysfs(root: Path) -> None:
    """Two GPUs and two HCAs, each GPU sharing a PCIe switch with one HCA."""
    layout = {
        "gpu:0000:06:00.0": "pci0000:00/0000:00:01.0/0000:05:00.0/0000:06:00.0",
        "gpu:0000:86:00.0": "pci0000:80/0000:80:01.0/0000:85:00.0/0000:86:00.0",
        "mlx5_0": "pci0000:00/0000:00:01.0/0000:05:00.0/0000:07:00.0",
        "mlx5_1": "pci0000:80/0000:80:01.0/0000:85:00.0/0000:87:00.0",
        "mlx5_9": "pci0000:00/0000:00:01.0/0000:05:00.0/0000:08:00.0",  # port down
    }
    (root / "bus/pci/devices").mkdir(parents=True)
    for name, rel in layout.items():
        target = root / "devices" / rel
        target.mkdir(parents=True)
        if name.startswith("gpu:"):
            (root / "bus/pci/devices" / name[4:]).symlink_to(target)
            continue
        port = root / "class/infiniband" / name / "ports" / "1"
        port.mkdir(parents=True)
        (port / "state").write_text("1: DOWN\n" if name == "mlx5_9" else "4: ACTIVE\n")
        (root / "class/infiniband" / name / "device").symlink_to(target)


@pytest.mark.parametrize(
    ("visible", "expected"), [(None, ["mlx5_0:1", "mlx5_1:1"]), ("1,0", ["mlx5_1:1", "mlx5_0:1"])]
)
def test_dry_run_auto_nic_from_topology(
    visible: str | None, expected: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_sysfs(tmp_path / "sys")
    smi_dir = tmp_path / "smi"
    smi_dir.mkdir()
    smi = smi_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{smi_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPIEP_SYSFS", str(tmp_path / "sys"))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    spec = JobSpec(gpus=2, gpus_per_node=2, gpu_request="none", payload=PAYLOAD)
    proc = _dry_run(render(spec), tmp_path)
    assert proc.returncode == 0, proc.stderr
    for rank, hca in enumerate(expected):
        assert f"{rank}: rank={rank} hca={hca} sl=1" in proc.stdout, proc.stdout
