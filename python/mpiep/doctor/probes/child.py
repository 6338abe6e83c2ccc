"""Probes that must not touch this process (load MPI or NVSHMEM libraries) run in a child
Python that prints one JSON line."""

from __future__ import annotations

import json
import sys

from mpiep import network_env as ne


def python_json(code: str, args: list[str] | None = None, timeout: float = 30.0) -> dict:
    """Run ``code`` in a fresh Python; its last JSON line, or {"error": ...}."""
    rc, out = ne.run_cmd([sys.executable, "-c", code, *(args or [])], timeout=timeout)
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {"error": out.splitlines()[-1] if out else f"probe exited {rc}"}
