"""The coverage step's artifacts: the coverage table the manifest lists and the map beside it.

:func:`write_coverage` walks the storage tiles over the shards' chunk statuses
(:func:`navcache.coverage_walk.coverage_walk`) and writes, content-addressed and once:

* ``coverage-{h}.json``: the walk's table; ``h`` is 16 hex digits of its own sha256, so a threshold or
  takeoff change makes new files and never rewrites old ones (a manifest may name them);
* ``coverage-{h}.png``: its map (:func:`navcache.coverage_map.render_coverage_map`): the orthophoto under
  the tile statuses, the area's outline, takeoff, coordinates and scale. A map an earlier run drew for the
  same table is kept when it verifies; without the orthophoto (it cannot be opened) the map still shows
  every tile's status.

The returned :class:`CoverageArtifacts` carries the map's bytes as written, so a report shows the very
picture the manifest names.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from navcache_runtime import InferenceRuntimeError
from navcache_runtime.integrity import verify_artifact, write_artifact_once

from .coverage_map import render_coverage_map
from .coverage_walk import CoverageReport, coverage_walk
from .descriptors import ShardResult
from .imagery import open_tile_source
from .shard_set import chunk_statuses
from .tiles import ChunkGrid
from .types import TileId

log = logging.getLogger(__name__)


class CoverageArtifacts(NamedTuple):
    """The walk's report, the table's path and the map's bytes (a tuple, so it unpacks in that order)."""

    report: CoverageReport
    table_path: Path
    png: bytes

    @property
    def map_path(self) -> Path:
        return self.table_path.with_suffix(".png")


def write_coverage(
    shards: list[ShardResult],
    grid: ChunkGrid,
    storage_tiles: Sequence[TileId] | np.ndarray,
    threshold: float,
    out_dir: Path,
    takeoff_lonlat: tuple[float, float],
    area: Any = None,
    imagery: tuple[str, tuple[Path, ...]] | None = None,
) -> CoverageArtifacts:
    """Classify every storage tile; write the coverage table and its map (``imagery``: kind and files of
    the orthophoto drawn underneath; ``area``: the outline, shapely, lon/lat)."""
    described, blank = chunk_statuses(shards)
    report = coverage_walk(grid, storage_tiles, described, blank, threshold)
    table = report.to_json_bytes()  # the same bytes as json.dumps(report.to_json()), without a list per tile
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
    return CoverageArtifacts(report, table_path, png)


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
