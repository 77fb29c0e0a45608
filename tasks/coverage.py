from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from navcache.coverage import CoverageReport, coverage_walk
from navcache.coverage_map import render_coverage_map
from navcache.descriptors import BLANK, DESCRIBED, TABLE_DTYPE, ShardResult, load_shard
from navcache.errors import NavcacheError
from navcache.imagery import open_tile_source
from navcache.tiles import ChunkGrid
from navcache.types import TileId
from navcache_runtime import InferenceRuntimeError
from navcache_runtime.integrity import verify_artifact, write_artifact_once

from .runlog import gate

log = logging.getLogger(__name__)


def chunk_statuses(shards: list[ShardResult]) -> tuple[np.ndarray, np.ndarray]:
    """(described, blank) chunks of all shards as (N, 3) [z, x, y] arrays: the walk's fast input form."""
    tables = [load_shard(shard)[1] for shard in shards]
    rows = np.concatenate(tables) if tables else np.zeros(0, dtype=TABLE_DTYPE)
    zxy = np.column_stack((rows["z"], rows["x"], rows["y"])).astype(np.int64)
    return zxy[rows["status"] == DESCRIBED], zxy[rows["status"] == BLANK]


@task(name="coverage-walk", cache_policy=NO_CACHE)
def coverage_task(
    shards: list[ShardResult],
    grid: ChunkGrid,
    storage_tiles: list[TileId],
    threshold: float,
    out_dir: Path,
    takeoff_lonlat: tuple[float, float],
    area: Any = None,
    imagery: tuple[str, tuple[Path, ...]] | None = None,
) -> tuple[CoverageReport, Path, bytes]:
    """Classify every storage tile; write the coverage table (an artifact the manifest lists) and its map:
    the orthophoto (``imagery``: kind and files) under the tile statuses, the ``area`` outline (shapely,
    lon/lat), takeoff, coordinates and scale. The bytes returned are the map in the cache, so the run's
    artifact shows the very picture the manifest names."""
    described, blank = chunk_statuses(shards)
    report = coverage_walk(grid, storage_tiles, described, blank, threshold)
    # Named by their own bytes: a threshold or takeoff change makes new files, never rewrites old ones.
    table = json.dumps(report.to_json(), separators=(",", ":")).encode()
    table_path = out_dir / f"coverage-{hashlib.sha256(table).hexdigest()[:16]}.json"
    write_artifact_once(table_path, table)
    png_path = table_path.with_suffix(".png")
    try:
        verify_artifact(png_path)  # drawn by an earlier run for this very table: keep it (a manifest may name it)
        png = png_path.read_bytes()
    except (OSError, InferenceRuntimeError):
        png = _draw(report, grid, takeoff_lonlat, area, imagery)
        write_artifact_once(png_path, png)
    log.info(
        "coverage %.2f %% (threshold %s %%): %d covered, %d blank, %d missing of %d tiles; table %s",
        report.percent,
        report.threshold,
        report.covered,
        report.blank,
        report.missing,
        report.total,
        table_path,
    )
    return report, table_path, png


def _draw(
    report: CoverageReport,
    grid: ChunkGrid,
    takeoff_lonlat: tuple[float, float],
    area: Any,
    imagery: tuple[str, tuple[Path, ...]] | None,
) -> bytes:
    if imagery is None:
        return render_coverage_map(report, grid, takeoff_lonlat, area=area)
    kind, paths = imagery
    try:
        source = open_tile_source(kind, list(paths), grid.tile_size)
    except Exception as exc:  # the map is for people: without the photo it still tells every tile's status
        log.warning("coverage map drawn without the orthophoto underneath: %s", exc)
        return render_coverage_map(report, grid, takeoff_lonlat, area=area)
    with source:
        return render_coverage_map(report, grid, takeoff_lonlat, area=area, source=source)


@task(name="coverage-gate", task_run_name="coverage-gate", cache_policy=NO_CACHE)
def coverage_gate(report: CoverageReport, error: Callable[[], NavcacheError]) -> State[None]:
    """The coverage quality gate as its own task run: green when the threshold is met, red with the error's one
    message when not (``error`` builds it; the flow owns its wording)."""
    return gate(
        report.passed,
        error,
        f"coverage gate passed: {report.percent:.2f} % ≥ {report.threshold} % of {report.total} tiles",
    )
