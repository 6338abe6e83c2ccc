"""What the doctor found: the report model, filled by the probes, read by the renderers."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("fix", "warn", "info")  # most urgent first


@dataclass
class Finding:
    """One line of advice: level is 'fix', 'warn' or 'info'."""

    level: str
    topic: str
    message: str


@dataclass
class Report:
    """Everything the doctor found; ``findings`` says what to do about it."""

    host: dict[str, Any] = field(default_factory=dict)
    gpus: dict[str, Any] = field(default_factory=dict)
    nvshmem: dict[str, Any] = field(default_factory=dict)
    rdma: dict[str, Any] = field(default_factory=dict)
    mpi: dict[str, Any] = field(default_factory=dict)
    launcher: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    job_env: list[dict[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def add(self, level: str, topic: str, message: str) -> None:
        """Record a finding."""
        self.findings.append(Finding(level, topic, message))


def to_json(report: Report) -> str:
    """The whole report as JSON (``mpiep doctor --json``)."""
    return json.dumps(dataclasses.asdict(report), indent=2, sort_keys=True)
