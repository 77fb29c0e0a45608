"""The coverage digest: one sha256 over every tile's coverage status, shared by the provisioning side
(which signs it) and the onboard verifier (which re-derives it in operator mode)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

COVERAGE_STATUSES = ("covered", "missing", "blank")


def coverage_digest(statuses: Iterable[tuple[tuple[int, int, int], str]]) -> str:
    """sha256 over lines ``"{z}/{x}/{y} {status}\\n"`` sorted by (z, x, y). Raises on unknown statuses
    or duplicate tiles, so two different coverage tables can never share a digest by accident."""
    rows = sorted(statuses)
    digest = hashlib.sha256()
    previous = None
    for (z, x, y), status in rows:
        if status not in COVERAGE_STATUSES:
            raise ValueError(f"unknown coverage status {status!r} for tile {z}/{x}/{y}")
        if previous == (z, x, y):
            raise ValueError(f"tile {z}/{x}/{y} appears twice in the coverage table")
        previous = (z, x, y)
        digest.update(f"{z}/{x}/{y} {status}\n".encode("ascii"))
    return digest.hexdigest()
