from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from navcache.coverage import CoverageReport, coverage_walk, render_coverage_png
from navcache.descriptors import BLANK, DESCRIBED, ShardResult, load_shard
from navcache.tiles import ChunkGrid
from navcache.types import TileId
from navcache_runtime.integrity import write_artifact_once


def chunk_statuses(shards: list[ShardResult]) -> tuple[list[TileId], list[TileId]]:
    described, blank = [], []
    for shard in shards:
        _, table = load_shard(shard)
        for z, x, y, status in table[["z", "x", "y", "status"]].tolist():
            if status == DESCRIBED:
                described.append(TileId(z, x, y))
            elif status == BLANK:
                blank.append(TileId(z, x, y))
    return described, blank


@task(name="coverage-walk", cache_policy=NO_CACHE)
def coverage_task(
    shards: list[ShardResult],
    grid: ChunkGrid,
    storage_tiles: list[TileId],
    threshold: float,
    out_dir: Path,
    takeoff_lonlat: tuple[float, float],
) -> tuple[CoverageReport, Path, bytes]:
    """Classify every storage tile; write the coverage table (an artifact the manifest lists) and its map."""
    described, blank = chunk_statuses(shards)
    report = coverage_walk(grid, storage_tiles, described, blank, threshold)
    # Named by their own bytes: a threshold or takeoff change makes new files, never rewrites old ones.
    table = json.dumps(report.to_json(), separators=(",", ":")).encode()
    table_path = out_dir / f"coverage-{hashlib.sha256(table).hexdigest()[:16]}.json"
    write_artifact_once(table_path, table)
    png = render_coverage_png(report, grid, takeoff_lonlat=takeoff_lonlat)
    write_artifact_once(table_path.with_suffix(".png"), png)
    return report, table_path, png
