"""The coverage step and its quality gate as Prefect tasks (:mod:`navcache.coverage_artifacts` does the work)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from navcache.coverage_artifacts import CoverageArtifacts, write_coverage
from navcache.coverage_walk import CoverageReport
from navcache.descriptors import ShardResult
from navcache.errors import NavcacheError
from navcache.tiles import ChunkGrid
from navcache.types import TileId

from .runlog import gate


@task(name="coverage-walk", cache_policy=NO_CACHE)
def coverage_task(
    shards: list[ShardResult],
    grid: ChunkGrid,
    storage_tiles: Sequence[TileId] | np.ndarray,
    threshold: float,
    out_dir: Path,
    takeoff_lonlat: tuple[float, float],
    area: Any = None,
    imagery: tuple[str, tuple[Path, ...]] | None = None,
) -> CoverageArtifacts:
    """Classify every storage tile; write the coverage table (an artifact the manifest lists) and its map."""
    return write_coverage(shards, grid, storage_tiles, threshold, out_dir, takeoff_lonlat, area, imagery)


@task(name="coverage-gate", task_run_name="coverage-gate", cache_policy=NO_CACHE)
def coverage_gate(report: CoverageReport, error: Callable[[], NavcacheError]) -> State[None]:
    """The coverage quality gate as its own task run: green when the threshold is met, red with the error's one
    message when not (``error`` builds it; the flow owns its wording)."""
    return gate(
        report.passed,
        error,
        f"coverage gate passed: {report.percent:.2f} % ≥ {report.threshold} % of {report.total} tiles",
    )
