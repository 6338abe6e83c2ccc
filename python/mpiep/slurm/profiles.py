"""Per-job network profiles: service levels per traffic class, routing expectations, NICs.

InfiniBand isolates traffic by service level (SL, 0-15); the subnet manager maps each SL to a
virtual lane and decides, per SL, whether switches route it adaptively. A job therefore cannot
"turn adaptive routing on": it picks an SL that the fabric routes adaptively. A profile names
the SL of each traffic class and records which SLs the site routes adaptively, so the rendered
job and ``mpiep doctor`` can say what to expect.

Traffic classes:
  * ``normal``      - mpiep normal-mode dispatch/combine (NVSHMEM),
  * ``low-latency`` - mpiep low-latency dispatch/combine (NVSHMEM, IBGDA),
  * ``other``       - everything else the job sends: NCCL, MPI (UCX / openib), storage.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["normal", "low-latency"]
Switch = Literal["on", "off", "auto"]
MODES: tuple[str, ...] = ("normal", "low-latency")
TRAFFIC_CLASSES: tuple[str, ...] = ("normal", "low-latency", "other")
_HCA_RE = re.compile(r"^\^?[A-Za-z0-9_.\-]+(:[0-9]+)?$")

# Why adaptive routing is refused for normal mode (shown to users verbatim).
AR_NORMAL_REASON = (
    "adaptive routing is unsafe for normal mode: normal-mode kernels write the data and then "
    "a flag that tells the receiver the data has landed, and with adaptive routing packets of "
    "one queue pair may take different paths, so the flag can arrive before the data and the "
    "receiver reads stale rows (DeepEP issue #20); keep normal mode on a statically routed SL"
)


class ProfileError(ValueError):
    """A profile or job option that cannot work; the message is one line for the user."""


@dataclass(frozen=True)
class ServiceLevels:
    """InfiniBand service level (0-15) per traffic class."""

    normal: int
    low_latency: int
    other: int

    def of(self, traffic: str) -> int:
        """SL of ``traffic`` ('normal', 'low-latency' or 'other')."""
        return {"normal": self.normal, "low-latency": self.low_latency, "other": self.other}[
            traffic
        ]


@dataclass(frozen=True)
class NetworkProfile:
    """What a job should send on which lane, and what the fabric is expected to do there."""

    name: str
    description: str
    sl: ServiceLevels
    adaptive_sls: frozenset[int] = frozenset()  # SLs the subnet manager routes adaptively
    isolate: bool = True  # each traffic class on its own SL
    congestion_control: bool = False  # expected on the job's SLs (set by the SM / NIC firmware)
    traffic_class: int | None = None  # RoCE traffic class (DSCP << 2); None: library default
    hca_list: tuple[str, ...] = ()  # 'mlx5_0:1' style; empty: all HCAs, NIC chosen per GPU
    ibgda: bool = True  # NVSHMEM GPU-initiated (IBGDA) transport

    def is_adaptive(self, traffic: str) -> bool:
        """Whether the fabric is expected to route ``traffic``'s SL adaptively."""
        return self.sl.of(traffic) in self.adaptive_sls

    def with_overrides(
        self,
        *,
        sl_normal: int | None = None,
        sl_low_latency: int | None = None,
        sl_other: int | None = None,
        adaptive_routing: Switch = "auto",
        mode: Mode = "normal",
        congestion_control: bool | None = None,
        hca_list: tuple[str, ...] | None = None,
        traffic_class: int | None = None,
    ) -> NetworkProfile:
        """Profile with command-line overrides applied (validation is separate).

        ``adaptive_routing`` 'on'/'off' states that the SL of ``mode``'s traffic class is/is not
        routed adaptively on this fabric; 'auto' keeps the profile's expectation.
        """
        sl = ServiceLevels(
            normal=self.sl.normal if sl_normal is None else sl_normal,
            low_latency=self.sl.low_latency if sl_low_latency is None else sl_low_latency,
            other=self.sl.other if sl_other is None else sl_other,
        )
        adaptive = set(self.adaptive_sls)
        ep_sl = sl.of(mode)
        if adaptive_routing == "on":
            adaptive.add(ep_sl)
        elif adaptive_routing == "off":
            adaptive.discard(ep_sl)
        return dataclasses.replace(
            self,
            sl=sl,
            adaptive_sls=frozenset(adaptive),
            congestion_control=(
                self.congestion_control if congestion_control is None else congestion_control
            ),
            hca_list=self.hca_list if hca_list is None else hca_list,
            traffic_class=self.traffic_class if traffic_class is None else traffic_class,
        )


PROFILES: dict[str, NetworkProfile] = {
    p.name: p
    for p in (
        NetworkProfile(
            name="isolated-static",
            description=(
                "Lightly loaded fabric: normal-mode, low-latency and other traffic each on its "
                "own SL (1, 2, 0), all statically routed."
            ),
            sl=ServiceLevels(normal=1, low_latency=2, other=0),
        ),
        NetworkProfile(
            name="isolated-adaptive",
            description=(
                "Loaded fabric: own SL per traffic class (1, 3, 0); the low-latency SL 3 is "
                "routed adaptively, normal-mode SL 1 stays static."
            ),
            sl=ServiceLevels(normal=1, low_latency=3, other=0),
            adaptive_sls=frozenset({3}),
        ),
        NetworkProfile(
            name="shared-default",
            description=(
                "No isolation: everything on SL 0 with static routing, as on a fabric without "
                "a QoS setup. Use when the site has not mapped SLs to separate lanes."
            ),
            sl=ServiceLevels(normal=0, low_latency=0, other=0),
            isolate=False,
        ),
    )
}
DEFAULT_PROFILE = "isolated-static"


def get_profile(name: str) -> NetworkProfile:
    """The named profile, or ProfileError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ProfileError(f"unknown profile {name!r} (known: {known})") from None


def parse_hca_list(text: str) -> tuple[str, ...]:
    """'mlx5_0:1,mlx5_1' -> ('mlx5_0:1', 'mlx5_1'); ProfileError on a malformed entry."""
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    for item in items:
        if not _HCA_RE.match(item):
            raise ProfileError(f"bad HCA entry {item!r}: expected NAME or NAME:PORT, e.g. mlx5_0:1")
    return items


def validate(profile: NetworkProfile, mode: str) -> None:
    """Raise ProfileError if ``profile`` cannot carry a ``mode`` job safely."""
    if mode not in MODES:
        raise ProfileError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    for traffic in TRAFFIC_CLASSES:
        sl = profile.sl.of(traffic)
        if not 0 <= sl <= 15:
            raise ProfileError(f"SL for {traffic} traffic is {sl}: InfiniBand SLs are 0..15")
    for sl in profile.adaptive_sls:
        if not 0 <= sl <= 15:
            raise ProfileError(f"adaptive SL {sl} is outside 0..15")
    if profile.traffic_class is not None and not 0 <= profile.traffic_class <= 255:
        raise ProfileError(f"traffic class {profile.traffic_class} is outside 0..255")
    if profile.isolate:
        seen: dict[int, str] = {}
        for traffic in TRAFFIC_CLASSES:
            sl = profile.sl.of(traffic)
            if sl in seen:
                raise ProfileError(
                    f"profile {profile.name!r} isolates traffic but {seen[sl]} and {traffic} "
                    f"traffic share SL {sl}; give each its own SL (--sl-normal, "
                    f"--sl-low-latency, --sl-other) or use --profile shared-default"
                )
            seen[sl] = traffic
        if profile.is_adaptive("normal"):
            raise ProfileError(
                f"profile {profile.name!r} routes the normal-mode SL {profile.sl.normal} "
                f"adaptively: {AR_NORMAL_REASON}"
            )
    if mode == "normal" and profile.is_adaptive("normal"):
        raise ProfileError(AR_NORMAL_REASON)
    for item in profile.hca_list:
        if not _HCA_RE.match(item):
            raise ProfileError(f"bad HCA entry {item!r}: expected NAME or NAME:PORT")


@dataclass(frozen=True)
class EnvVar:
    """One environment variable a job gets, with the reason it is set."""

    name: str
    value: str
    why: str


@dataclass(frozen=True)
class JobNetwork:
    """A validated profile bound to one job's mode and symmetric heap size."""

    profile: NetworkProfile
    mode: str
    symmetric_size: str | None = None  # NVSHMEM size string, e.g. '2g'
    extra: tuple[EnvVar, ...] = field(default=())

    def ep_sl(self) -> int:
        """SL of this job's mpiep (NVSHMEM) traffic."""
        return self.profile.sl.of(self.mode)

    def env(self) -> list[EnvVar]:
        """Variables for NVSHMEM, NCCL, UCX and Open MPI, in a stable order."""
        p = self.profile
        ep_adaptive = p.is_adaptive(self.mode)
        other_adaptive = p.is_adaptive("other")
        route = "adaptively" if ep_adaptive else "statically"
        out = [
            EnvVar("MPIEP_MODE", self.mode, "mpiep mode this job's lanes were chosen for"),
            EnvVar("MPIEP_NET_PROFILE", p.name, "network profile (mpiep doctor reports it)"),
            EnvVar(
                "MPIEP_NET_ADAPTIVE_SLS",
                ",".join(str(s) for s in sorted(p.adaptive_sls)),
                "SLs the profile expects the subnet manager to route adaptively",
            ),
            EnvVar(
                "MPIEP_NET_CONGESTION_CONTROL",
                "on" if p.congestion_control else "off",
                "congestion control expected on the job's SLs (set by the SM / NIC firmware)",
            ),
            EnvVar(
                "NVSHMEM_IB_SL",
                str(self.ep_sl()),
                f"SL of NVSHMEM's IB/RoCE queue pairs: the {self.mode} lane, routed {route}",
            ),
        ]
        if p.traffic_class is not None:
            out.append(
                EnvVar(
                    "NVSHMEM_IB_TRAFFIC_CLASS", str(p.traffic_class), "RoCE traffic class (NVSHMEM)"
                )
            )
        out.append(
            EnvVar(
                "NVSHMEM_IB_ENABLE_IBGDA",
                "1" if p.ibgda else "0",
                "GPU-initiated (IBGDA) transport for internode puts",
            )
        )
        if self.symmetric_size:
            out.append(
                EnvVar(
                    "NVSHMEM_SYMMETRIC_SIZE",
                    self.symmetric_size,
                    "symmetric heap per PE, from the buffer size hint",
                )
            )
        out.append(EnvVar("NVSHMEM_DISABLE_NVLS", "1", "no NVLink SHARP: mpiep does not use it"))
        out.append(EnvVar("NCCL_NVLS_ENABLE", "0", "no NVLink SHARP in NCCL either"))
        out.append(EnvVar("NCCL_IB_SL", str(p.sl.other), "NCCL stays on the 'other' lane"))
        if p.traffic_class is not None:
            out.append(EnvVar("NCCL_IB_TC", str(p.traffic_class), "RoCE traffic class (NCCL)"))
        out.append(
            EnvVar(
                "NCCL_IB_ADAPTIVE_ROUTING",
                "1" if other_adaptive else "0",
                "NCCL's adaptive-routing-safe send path, matching the 'other' SL's routing",
            )
        )
        out.append(EnvVar("UCX_IB_SL", str(p.sl.other), "MPI over UCX stays on the 'other' lane"))
        out.append(
            EnvVar(
                "UCX_IB_AR_ENABLE",
                "try" if other_adaptive else "auto",
                "UCX out-of-order (AR) mode where the 'other' SL allows it (try), else as the "
                "SL is set up (auto)",
            )
        )
        out.append(
            EnvVar(
                "OMPI_MCA_btl_openib_ib_service_level",
                str(p.sl.other),
                "Open MPI 4.x openib BTL stays on the 'other' lane",
            )
        )
        if p.hca_list:
            hcas = ",".join(p.hca_list)
            out.append(EnvVar("NCCL_IB_HCA", hcas, "HCAs NCCL may use"))
            out.append(EnvVar("UCX_NET_DEVICES", _ucx_devices(p.hca_list), "HCAs UCX may use"))
        out.extend(self.extra)
        return out


def _ucx_devices(hcas: tuple[str, ...]) -> str:
    """UCX wants DEVICE:PORT; default the port to 1. Exclusions (^) are not expressible."""
    return ",".join(h if ":" in h else f"{h}:1" for h in hcas if not h.startswith("^"))


def symmetric_size_hint(
    mode: str, *, hidden: int, max_tokens: int, num_experts: int, topk: int
) -> str:
    """NVSHMEM_SYMMETRIC_SIZE estimate for one rank, rounded up to a 256 MiB multiple.

    Low-latency: receive buffers hold every expert's slot for ``max_tokens`` tokens per rank
    (shapes do not depend on routing), for dispatch and combine, double buffered.
    Normal: send and receive staging for ``max_tokens`` tokens x ``topk`` destinations,
    for dispatch and combine. Both add 25% headroom for counters and alignment.
    """
    row = hidden * 2 + (hidden // 128) * 4 + 64  # bf16 row + fp8 scales + per-row metadata
    if mode == "low-latency":
        need = 2 * 2 * num_experts * max_tokens * row
    else:
        need = 2 * 2 * max_tokens * max(1, topk) * row
    need = int(need * 1.25)
    unit = 256 << 20
    units = max(1, -(-need // unit))
    mib = units * 256
    return f"{mib // 1024}g" if mib % 1024 == 0 else f"{mib}m"
