"""A run's descriptor shards read back as one set, in shard order, for the steps after them.

* :func:`index_input`: every described chunk's descriptor, (z, x, y) id and geo bounds, for the FAISS
  index; refuses a shard whose descriptor rows do not match its described chunks (hint: delete it and
  re-provision), and an area where no chunk could be described (saying blank apart from missing);
* :func:`chunk_statuses`: the described and blank chunks as (N, 3) [z, x, y] arrays, the coverage walk's
  fast input form;
* :func:`described_rows`: (chunk x, y) of every described chunk and their descriptor rows as
  :class:`ShardRows`, read from the shards when the self-test asks for them: its input.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .descriptors import BLANK, DESCRIBED, TABLE_DTYPE, ShardResult, load_shard
from .errors import ProvisionError
from .selftest import column_spread
from .tiles import ChunkGrid


def index_input(shards: list[ShardResult], grid: ChunkGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All described chunks of all shards: descriptors, (z, x, y) ids and geo bounds, in shard order."""
    parts, ids = [], []
    for shard in shards:
        descriptors, table = load_shard(shard)
        rows = table[table["status"] == DESCRIBED]
        _check_rows(shard, len(rows), len(descriptors))
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


def _check_rows(shard: ShardResult, described: int, rows: int) -> None:
    if described != rows:
        raise ProvisionError(
            f"shard {shard.descriptors_path.name} is inconsistent: {described} described chunks but {rows} descriptors",
            hint="delete it and re-provision",
        )


def described_rows(shards: list[ShardResult]) -> tuple[np.ndarray, ShardRows]:
    """(chunk x, y) of every described chunk, in shard order, and their descriptor rows (read when asked)."""
    xy, paths, counts = [], [], []
    for shard in shards:
        table = np.load(shard.table_path, allow_pickle=False)
        described = table["status"] == DESCRIBED
        if described.any():  # a shard with nothing described (no imagery there) has a shapeless empty array
            rows = np.load(shard.descriptors_path, mmap_mode="r", allow_pickle=False)  # reads the header only
            _check_rows(shard, int(described.sum()), len(rows))
            xy.append(np.stack([table["x"][described], table["y"][described]], 1))
            paths.append(shard.descriptors_path)
            counts.append(len(rows))
    return (np.concatenate(xy) if xy else np.zeros((0, 2), np.int32)), ShardRows(paths, counts)


class ShardRows:
    """The descriptor rows of the shards' described chunks, numbered in shard order, read from the shard files
    when asked (:class:`navcache.selftest.DescriptorRows`): the self-test reads a few thousand rows and one
    statistic over all of them, a shard at a time, instead of holding every row (at 1e5 chunks, 49 MiB in
    float32 plus as much again for the statistic's temporaries)."""

    def __init__(self, paths: list[Path], counts: list[int]) -> None:
        self.paths = paths
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < len(self):
            raise IndexError(f"descriptor rows {rows.min()}..{rows.max()} outside 0..{len(self) - 1}")
        out: np.ndarray | None = None
        for path, start, stop in zip(self.paths, self.starts[:-1], self.starts[1:], strict=True):
            mine = np.flatnonzero((rows >= start) & (rows < stop))
            if len(mine):
                block = np.load(path, mmap_mode="r", allow_pickle=False)  # only the pages of those rows are read
                if out is None:
                    out = np.empty((len(rows), block.shape[1]), np.float32)
                out[mine] = block[rows[mine] - start]
        return out if out is not None else np.zeros((0, 0), np.float32)

    def spread(self) -> float:
        return column_spread(self._blocks)

    def _blocks(self) -> Iterator[np.ndarray]:
        for path in self.paths:
            yield np.load(path, allow_pickle=False)
