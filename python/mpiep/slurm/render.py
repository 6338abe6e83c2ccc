"""Render an sbatch script for an mpiep expert-parallel job (pure: no I/O)."""

from __future__ import annotations

import re
import shlex
import textwrap
from dataclasses import dataclass, field

from mpiep.slurm.profiles import (
    DEFAULT_PROFILE,
    JobNetwork,
    NetworkProfile,
    get_profile,
    symmetric_size_hint,
    validate,
)

LAUNCHERS: tuple[str, ...] = ("srun", "mpirun")
MPI_PLUGINS: tuple[str, ...] = ("pmix", "pmi2", "auto")
GPU_REQUESTS: tuple[str, ...] = ("gpus-per-node", "gres", "none")
DEFAULT_PAYLOAD = "python -m mpiep bench"
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")
_LIST_RE = re.compile(r"^[A-Za-z0-9_.+\-]+(,[A-Za-z0-9_.+\-]+)*$")
# Variables forwarded to remote ranks by Open MPI's mpirun when set in the batch shell.
_MPIRUN_PASS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "HOME")


class JobError(ValueError):
    """A job option that cannot work; the message is one line for the user."""


@dataclass(frozen=True)
class JobSpec:
    """Everything the rendered script depends on."""

    gpus: int
    gpus_per_node: int = 8
    mode: str = "normal"
    network: NetworkProfile = field(default_factory=lambda: get_profile(DEFAULT_PROFILE))
    launcher: str = "srun"
    mpi: str | None = None  # srun only; None -> 'pmix'
    partition: str | None = None
    account: str | None = None
    time: str = "00:30:00"
    job_name: str | None = None
    output_dir: str = "mpiep-logs"
    payload: str = DEFAULT_PAYLOAD
    cpus_per_task: int | None = None
    exclusive: bool = False
    gpu_request: str = "gpus-per-node"
    nic_map: tuple[str, ...] = ()  # HCA port per local GPU (or per group of GPUs); () = auto
    virtual_node_size: int | None = None  # ranks per virtual node (MPIEP_RANKS_PER_NODE)
    symmetric_size: str | None = None  # NVSHMEM_SYMMETRIC_SIZE

    @property
    def nodes(self) -> int:
        """Nodes the job asks for."""
        return max(1, self.gpus // self.gpus_per_node)

    @property
    def ranks_per_node(self) -> int:
        """Ranks (= GPUs used) per node."""
        return min(self.gpus, self.gpus_per_node)

    @property
    def name(self) -> str:
        """Slurm job name."""
        return self.job_name or f"mpiep-{self.mode}-{self.gpus}g"


def check(spec: JobSpec) -> None:
    """Raise JobError/ProfileError for any option that cannot work."""
    if spec.gpus < 1:
        raise JobError(f"--gpus must be at least 1, not {spec.gpus}")
    if spec.gpus_per_node < 1:
        raise JobError(f"--gpus-per-node must be at least 1, not {spec.gpus_per_node}")
    if spec.gpus > spec.gpus_per_node and spec.gpus % spec.gpus_per_node:
        raise JobError(
            f"--gpus {spec.gpus} is not a multiple of --gpus-per-node {spec.gpus_per_node}: "
            f"jobs larger than one node use whole nodes (try --gpus "
            f"{spec.gpus - spec.gpus % spec.gpus_per_node} or "
            f"{spec.gpus + spec.gpus_per_node - spec.gpus % spec.gpus_per_node})"
        )
    if spec.launcher not in LAUNCHERS:
        raise JobError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not {spec.launcher!r}")
    if spec.mpi is not None:
        if spec.launcher != "srun":
            raise JobError(
                "--mpi selects srun's PMI plugin; it has no meaning with --launcher mpirun"
            )
        if spec.mpi not in MPI_PLUGINS and not re.match(r"^pmix_v\d+$", spec.mpi):
            raise JobError(f"--mpi must be pmix, pmix_vN, pmi2 or auto, not {spec.mpi!r}")
    if spec.gpu_request not in GPU_REQUESTS:
        raise JobError(f"--gpu-request must be one of {', '.join(GPU_REQUESTS)}")
    if not _TIME_RE.match(spec.time):
        raise JobError(
            f"--time {spec.time!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS)"
        )
    if not _NAME_RE.match(spec.name):
        raise JobError(f"--job-name {spec.name!r} may only hold letters, digits and _ . + -")
    for flag, value in (("--partition", spec.partition), ("--account", spec.account)):
        if value is not None and not _LIST_RE.match(value):
            raise JobError(f"{flag} {value!r} may only hold letters, digits, _ . + - and commas")
    if spec.cpus_per_task is not None and spec.cpus_per_task < 1:
        raise JobError(f"--cpus-per-task must be at least 1, not {spec.cpus_per_task}")
    if not spec.payload.strip():
        raise JobError("--payload is empty")
    if "\0" in spec.payload or "\n" in spec.output_dir or not spec.output_dir.strip():
        raise JobError("--payload/--output-dir hold characters a job script cannot carry")
    if spec.nic_map:
        n = len(spec.nic_map)
        if n > spec.ranks_per_node or spec.ranks_per_node % n:
            raise JobError(
                f"--nic-map has {n} entries for {spec.ranks_per_node} ranks per node: give one "
                f"per GPU or a number that divides it (GPUs share NICs in equal groups)"
            )
        if any(item.startswith("^") for item in spec.nic_map):
            raise JobError("--nic-map entries name the NIC to use; exclusions (^) are not allowed")
    if spec.virtual_node_size is not None:
        v = spec.virtual_node_size
        if v < 1 or spec.ranks_per_node % v:
            raise JobError(
                f"--virtual-node-size {v} must divide the {spec.ranks_per_node} ranks per node"
            )
    if spec.symmetric_size is not None and not re.match(
        r"^\d+(\.\d+)?[kKmMgGtT]?$", spec.symmetric_size
    ):
        raise JobError(f"--symmetric-size {spec.symmetric_size!r} is not like 512m, 2g or 1.5G")
    validate(spec.network, spec.mode)


def _sbatch_lines(spec: JobSpec) -> list[str]:
    lines = [
        f"#SBATCH --job-name={spec.name}",
        f"#SBATCH --nodes={spec.nodes}",
        f"#SBATCH --ntasks-per-node={spec.ranks_per_node}",
    ]
    if spec.gpu_request == "gpus-per-node":
        lines.append(f"#SBATCH --gpus-per-node={spec.ranks_per_node}")
    elif spec.gpu_request == "gres":
        lines.append(f"#SBATCH --gres=gpu:{spec.ranks_per_node}")
    if spec.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    lines.append(f"#SBATCH --time={spec.time}")
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    if spec.exclusive:
        lines.append("#SBATCH --exclusive")
    lines.append("#SBATCH --output=%x-%j.out")
    return lines


def _env_lines(net: JobNetwork) -> list[str]:
    lines = []
    for var in net.env():
        lines.append(f"# {var.why}")
        lines.append(f"export {var.name}={shlex.quote(var.value)}")
    return lines


# Rank and local rank as each launcher sets them. The batch shell itself carries
# SLURM_PROCID=0, which mpirun-started ranks inherit, so mpirun must not read SLURM_* ids.
_RANK_IDS = {
    "srun": ('rank="$SLURM_PROCID"\nlocal_rank="$SLURM_LOCALID"\n'),
    "mpirun": (
        'rank="${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:?no rank from mpirun}}}"\n'
        'local_rank="${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:?no local rank}}"\n'
    ),
}

_RANK_SCRIPT = r"""set -euo pipefail
@RANK_IDS@# Every rank sees all GPUs of its node (CUDA IPC and NVSHMEM P2P need that) and uses the
# one at its local rank; mpiep's comm layer makes the same choice.
export LOCAL_RANK="$local_rank" MPIEP_LOCAL_RANK="$local_rank"
nic=""
if [[ -n "${MPIEP_NIC_MAP:-}" ]]; then
    IFS=, read -r -a nics <<<"$MPIEP_NIC_MAP"
    nic="${nics[$(( local_rank * ${#nics[@]} / MPIEP_RANKS_ON_NODE ))]}"
elif [[ -z "${NVSHMEM_HCA_LIST:-}" ]]; then
    # Nearest ACTIVE HCA port to this rank's GPU: the longest shared PCI path in sysfs.
    # Plain bash on purpose: a helper process must not start MPI under this rank's identity.
    sysfs="${MPIEP_SYSFS:-/sys}"
    gpu="$local_rank"
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
        gpu="${visible[$local_rank]:-$local_rank}"
    fi
    bus="$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i "$gpu" 2>/dev/null || true)"
    bus="${bus,,}"
    if [[ ${#bus} -ge 12 && -d "$sysfs/class/infiniband" ]]; then
        IFS=/ read -r -a gpu_path <<<"$(readlink -f "$sysfs/bus/pci/devices/${bus: -12}")"
        best=-1
        for dev in "$sysfs"/class/infiniband/*; do
            for port in "$dev"/ports/*; do
                grep -q ACTIVE "$port/state" 2>/dev/null || continue
                IFS=/ read -r -a dev_path <<<"$(readlink -f "$dev/device")"
                depth=0
                while [[ $depth -lt ${#gpu_path[@]} && $depth -lt ${#dev_path[@]} &&
                    "${gpu_path[$depth]}" == "${dev_path[$depth]}" ]]; do depth=$((depth + 1)); done
                if ((depth > best)); then best=$depth nic="${dev##*/}:${port##*/}"; fi
                break
            done
        done
    fi
fi
if [[ -n "$nic" ]]; then
    # NVSHMEM does not know the node-local rank under unique-id bootstrap: pin its NIC here.
    export NVSHMEM_ENABLE_NIC_PE_MAPPING=1 NVSHMEM_HCA_LIST="$nic"
fi
mkdir -p "$MPIEP_LOG_DIR"
log="$MPIEP_LOG_DIR/rank-$(printf '%05d' "$rank").log"
echo "mpiep: rank $rank local_rank $local_rank host $(hostname) nic ${nic:-default}" >>"$log"
bash -c "$MPIEP_PAYLOAD" 2>&1 | tee -a "$log"
"""


def _launch_lines(spec: JobSpec, env_names: list[str]) -> list[str]:
    n = spec.gpus
    if spec.launcher == "srun":
        lines = []
        mpi = spec.mpi or "pmix"
        if mpi == "auto":
            lines += [
                "# PMIx when this Slurm has it, PMI-2 otherwise.",
                'mpi_plugins="$(srun --mpi=list 2>&1 || true)"',
                'if [[ "$mpi_plugins" == *pmix* ]]; then MPIEP_SRUN_MPI=pmix; '
                "else MPIEP_SRUN_MPI=pmi2; fi",
            ]
            mpi_arg = '--mpi="$MPIEP_SRUN_MPI"'
        else:
            mpi_arg = f"--mpi={mpi}"
        cmd = [
            "srun",
            mpi_arg,
            f"--nodes={spec.nodes}",
            f"--ntasks={n}",
            f"--ntasks-per-node={spec.ranks_per_node}",
        ]
        if spec.cpus_per_task:
            cmd.append(f"--cpus-per-task={spec.cpus_per_task}")
        if spec.gpu_request != "none":
            cmd.append("--gpu-bind=none")
        cmd += ["--kill-on-bad-exit=1", "--label"]
        lines.append(" \\\n    ".join([" ".join(cmd[:2]), " ".join(cmd[2:])]) + " \\")
        lines.append('    bash -c "$mpiep_rank_script" mpiep-rank')
        return lines
    passed = " ".join(_MPIRUN_PASS)
    lines = [
        "# Open MPI's mpirun forwards only variables named with -x to remote nodes.",
        "mpirun_env=()",
        f"for v in {passed} ${{!MPIEP_@}}; do",
        '    if [[ -n "${!v+x}" ]]; then mpirun_env+=(-x "$v"); fi',
        "done",
    ]
    names = " ".join(sorted({v for v in env_names if not v.startswith("MPIEP_")}))
    lines += [
        f"for v in {names}; do",
        '    if [[ -n "${!v+x}" ]]; then mpirun_env+=(-x "$v"); fi',
        "done",
        f"mpirun -np {n} --map-by ppr:{spec.ranks_per_node}:node --bind-to none --tag-output \\",
        '    "${mpirun_env[@]}" \\',
        '    bash -c "$mpiep_rank_script" mpiep-rank',
    ]
    return lines


def default_symmetric_size(mode: str) -> str:
    """Heap hint for the benchmark's default shapes (hidden 7168, 256 experts, top-8)."""
    tokens = 128 if mode == "low-latency" else 4096
    return symmetric_size_hint(mode, hidden=7168, max_tokens=tokens, num_experts=256, topk=8)


def render(spec: JobSpec) -> str:
    """The sbatch script for ``spec`` (validated first)."""
    check(spec)
    size = spec.symmetric_size or default_symmetric_size(spec.mode)
    net = JobNetwork(profile=spec.network, mode=spec.mode, symmetric_size=size)
    p = spec.network
    adaptive = ",".join(str(s) for s in sorted(p.adaptive_sls)) or "none"
    out = ["#!/bin/bash"]
    out.append(
        f"# mpiep expert-parallel job: {spec.gpus} ranks = {spec.nodes} node(s) x "
        f"{spec.ranks_per_node} GPUs, {spec.mode} mode, one rank per GPU."
    )
    out.append("# Generated by `mpiep slurm`; re-render instead of editing. Submit: sbatch FILE")
    out.append("# What every variable below does and why: slurm/README.md")
    out += _sbatch_lines(spec)
    out += ["set -euo pipefail", ""]
    out.append(f"# ---- Network profile {p.name!r}")
    out += textwrap.wrap(p.description, 96, initial_indent="# ", subsequent_indent="# ")
    out.append(
        f"# SLs: normal={p.sl.normal} low-latency={p.sl.low_latency} other={p.sl.other}; "
        f"adaptive SLs: {adaptive}; congestion control: "
        f"{'on' if p.congestion_control else 'off'}; this job's lane: SL {net.ep_sl()}."
    )
    env = net.env()
    out += _env_lines(net)
    out += ["", "# ---- Layout, logs and payload"]
    nic_map = ",".join(spec.nic_map)
    out.append("# HCA port per local rank ('' = nearest active port to each GPU, found at start)")
    out.append(f"export MPIEP_NIC_MAP={shlex.quote(nic_map)}")
    out.append(f"export MPIEP_RANKS_ON_NODE={spec.ranks_per_node}")
    if spec.virtual_node_size is not None:
        out.append("# Virtual nodes: mpiep treats each group of ranks as a node (tests internode).")
        out.append(f"export MPIEP_RANKS_PER_NODE={spec.virtual_node_size}")
    out.append(f'export MPIEP_LOG_DIR={shlex.quote(spec.output_dir)}/"${{SLURM_JOB_ID:-local}}"')
    out.append(f"export MPIEP_PAYLOAD={shlex.quote(spec.payload)}")
    out.append('mkdir -p "$MPIEP_LOG_DIR"')
    out.append('echo "mpiep: ${SLURM_JOB_NUM_NODES:-?} node(s), per-rank logs in $MPIEP_LOG_DIR"')
    out += ["", "# Per-rank wrapper, handed to every rank on the command line (no shared file)."]
    out.append("mpiep_rank_script=$(cat <<'MPIEP_RANK_EOF'")
    out.append(_RANK_SCRIPT.replace("@RANK_IDS@", _RANK_IDS[spec.launcher]).rstrip("\n"))
    out.append("MPIEP_RANK_EOF")
    out.append(")")
    out.append("")
    out += _launch_lines(spec, [v.name for v in env])
    return "\n".join(out) + "\n"
