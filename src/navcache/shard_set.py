"""A run's descriptor shards read back as one set, in shard order, for the steps after them.

* :func:`index_input`: every described chunk's descriptor, (z, x, y) id and geo bounds, for the FAISS
  index; refuses a shard whose descriptor rows do not match its described chunks (hint: delete it and
  re-provision), and an area where no chunk could be described (saying blank apart from missing);
* :func:`chunk_statuses`: the described and blank chunks as (N, 3) [z, x, y] arrays, the coverage walk's
  fast input form;
* :func:`described_rows`: (chunk x, y) and descriptor rows of every described chunk, the self-test's input.
"""

from __future__ import annotations

import numpy as np

from .descriptors import BLANK, DESCRIBED, TABLE_DTYPE, ShardResult, load_shard
from .errors import ProvisionError
from .tiles import ChunkGrid


def index_input(shards: list[ShardResult], grid: ChunkGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def chunk_statuses(shards: list[ShardResult]) -> tuple[np.ndarray, np.ndarray]:
    """(described, blank) chunks of all shards as (N, 3) [z, x, y] arrays: the walk's fast input form."""
    tables = [load_shard(shard)[1] for shard in shards]
    rows = np.concatenate(tables) if tables else np.zeros(0, dtype=TABLE_DTYPE)
    zxy = np.column_stack((rows["z"], rows["x"], rows["y"])).astype(np.int64)
    return zxy[rows["status"] == DESCRIBED], zxy[rows["status"] == BLANK]


def described_rows(shards: list[ShardResult]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk x, y) and descriptor rows of every described chunk."""
    xy, rows = [], []
    for shard in shards:
        descriptors, table = load_shard(shard)
        described = table["status"] == DESCRIBED
        if described.any():  # a shard with nothing described (no imagery there) has a shapeless empty array
            xy.append(np.stack([table["x"][described], table["y"][described]], 1))
            rows.append(np.asarray(descriptors, np.float32))
    return np.concatenate(xy), np.concatenate(rows)
