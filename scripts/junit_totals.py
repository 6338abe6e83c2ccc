"""Add up the JUnit XML files of one test run and print the closing line.

Exits non-zero when a test failed, or when the multi-rank run executed no MPI test
(an all-skipped run must not pass for a green one)."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(path: Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in total:
            total[k] += int(s.get(k, 0))
    return total


def main(results: str, num_ranks: str) -> int:
    single = (
        counts(Path(results) / "single.xml") if (Path(results) / "single.xml").exists() else None
    )
    ranks = sorted(Path(results).glob("mpi-rank*.xml"))
    mpi = [counts(p) for p in ranks]
    passed = failed = skipped = 0
    for c in ([single] if single else []) + mpi[:1]:
        failed += c["failures"] + c["errors"]
        skipped += c["skipped"]
        passed += c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    failed += sum(c["failures"] + c["errors"] for c in mpi[1:])  # a failure on any rank counts
    mpi_ran = mpi[0]["tests"] - mpi[0]["skipped"] if mpi else 0
    print(f"multi-rank tests: {mpi_ran} ran on each of {len(mpi)}/{num_ranks} ranks")
    ok = failed == 0 and single is not None and len(mpi) == int(num_ranks) and mpi_ran > 0
    if mpi_ran == 0:
        print("error: no multi-rank test ran")
    print(f"total: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
