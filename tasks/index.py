from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from navcache.descriptors import DESCRIBED, ShardResult, load_shard
from navcache.errors import ProvisionError
from navcache.index import IndexBudget, IndexResult, build_index
from navcache.tiles import ChunkGrid

log = logging.getLogger(__name__)


def gather(shards: list[ShardResult], grid: ChunkGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All described chunks of all shards: descriptors, (z, x, y) ids and geo bounds, in shard order."""
    parts, ids = [], []
    for shard in shards:
        descriptors, table = load_shard(shard)
        rows = table[table["status"] == DESCRIBED]
        if len(rows) != len(descriptors):
            raise ProvisionError(
                f"shard {shard.descriptors_path.name} is inconsistent: {len(rows)} described "
                f"chunks but {len(descriptors)} descriptors",
                hint="delete it and re-provision",
            )
        if len(rows):
            parts.append(descriptors)
            ids.append(np.stack([rows["z"], rows["x"], rows["y"]], axis=1).astype(np.int64))
    if not parts:  # coverage is 0 %: say why, blank (imagery there, useless) apart from missing (none there)
        blank, missing = sum(s.blank for s in shards), sum(s.missing for s in shards)
        fixes = ["check that the orthophoto covers the area"] if missing else []
        if blank:
            fixes.append(
                "the imagery is nodata or near-uniform there: use imagery with detail, or lower "
                "[orthophoto] blank_std if it is faint but usable"
            )
        raise ProvisionError(
            f"no chunk of the area can be described: {blank:,} blank, {missing:,} missing",
            hint="; ".join(fixes) or "check that the orthophoto covers the area",
        )
    tile_ids = np.concatenate(ids)
    return np.concatenate(parts), tile_ids, grid.chunk_bounds_array(tile_ids[:, 1:])


@task(name="build-index", cache_policy=NO_CACHE)
def build_index_task(shards: list[ShardResult], grid: ChunkGrid, out_dir: Path, budget: IndexBudget) -> IndexResult:
    descriptors, tile_ids, bounds = gather(shards, grid)
    index = build_index(descriptors, tile_ids, bounds, out_dir, budget)
    log.info(
        "index %s (%s): %d vectors of dim %d, recall@1 %.3f, recall@10 %.3f, %d bytes: %s",
        index.index_type,
        index.reason,
        index.n,
        index.dim,
        index.recall_at_1,
        index.recall_at_10,
        index.size_bytes,
        index.index_path,
    )
    return index
