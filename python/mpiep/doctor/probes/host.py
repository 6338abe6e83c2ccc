"""The host: name, platform, Python, mpiep version, CPUs."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import sys

from mpiep.doctor.report import Report


def probe_host(report: Report) -> None:
    """What machine this is (the report's heading)."""
    try:
        mpiep_version = importlib.metadata.version("mpiep")
    except importlib.metadata.PackageNotFoundError:
        mpiep_version = "not installed (source tree)"
    report.host = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "mpiep": mpiep_version,
        "cpus": os.cpu_count(),
    }
