"""The FAISS index build as a Prefect task: :func:`navcache.index_build.build_index` over the described chunks."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from navcache.descriptors import ShardResult
from navcache.index_build import IndexBudget, IndexResult, build_index
from navcache.shard_set import index_input
from navcache.tiles import ChunkGrid

log = logging.getLogger(__name__)


@task(name="build-index", cache_policy=NO_CACHE)
def build_index_task(shards: list[ShardResult], grid: ChunkGrid, out_dir: Path, budget: IndexBudget) -> IndexResult:
    descriptors, tile_ids, bounds = index_input(shards, grid)
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
