"""What the self-test reads of the described chunks: a few rows and one statistic, never all rows at once, with
the figures a pass over all rows in memory gives (navcache.selftest's rows, navcache.shard_set.ShardRows), and
the bounded tile cache of its renderer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import navcache.selftest as selftest
import navcache_runtime as nr
from navcache.descriptors import DESCRIBED, DescriptorEngine, Preprocessing, describe_shard, load_shard
from navcache.imagery import GeoTiffSource, open_tile_source
from navcache.selftest import ArrayRows, SelfTestConfig, ViewRenderer, column_spread, draw_params, neighbour_pairs
from navcache.shard_set import described_rows
from navcache.tiles import ChunkGrid, plan_shards, tile_for_lonlat
from navcache.types import TileId
from tests.conftest import TinyModel
from tests.support.realistic import cut_tiles, xyz_folder
from tests.support.sorties import Assets
from tests.support.sources import CountingSource


def _blocks(rows: np.ndarray, cuts: np.ndarray) -> list[np.ndarray]:
    return np.split(rows, np.sort(cuts))


@pytest.mark.parametrize("dim", [1, 2, 3, 128])
def test_the_spread_read_a_block_at_a_time_is_numpys_float32_std_bit_for_bit(dim: int) -> None:
    # float16 rows as the shards store them, cut at random places (empty blocks included) and, for the
    # 128-dim case, in ~2,800-row shards over 1e5 rows as a provision at 1e5 tiles has them
    rng = np.random.default_rng(dim)
    for n, cuts in [
        (50_000, rng.integers(0, 50_000, 40)),
        (7, np.array([0, 0, 3, 7])),
        (1, np.array([], np.int64)),
        (100_000 if dim == 128 else 20_000, np.arange(2_773, 100_000 if dim == 128 else 20_000, 2_773)),
    ]:
        rows = (rng.standard_normal((n, dim)) * 0.09 + rng.random(dim) * 0.05).astype(np.float16)
        blocks = _blocks(rows, cuts)
        assert column_spread(lambda blocks=blocks: iter(blocks)) == ArrayRows(rows).spread(), (n, dim)
        assert ArrayRows(rows).spread() == float(np.asarray(rows, np.float32).std(axis=0).max())
    assert column_spread(lambda: iter([np.zeros((0, 4), np.float16)])) == 0.0


def test_neighbour_pairs_are_each_chunk_with_its_east_then_its_south_neighbour() -> None:
    def reference(chunks: np.ndarray) -> list[tuple[int, int]]:  # the self-test's pairs, one tuple at a time
        position = {(int(x), int(y)): k for k, (x, y) in enumerate(chunks)}
        return [
            (k, position[(int(x) + dx, int(y) + dy)])
            for k, (x, y) in enumerate(chunks)
            for dx, dy in ((1, 0), (0, 1))
            if (int(x) + dx, int(y) + dy) in position
        ]

    rng = np.random.default_rng(0)
    grid = np.array([(x, y) for y in range(40_000, 40_030) for x in range(70_000, 70_025)], np.int32)
    holes = grid[rng.random(len(grid)) > 0.3]
    repeated = np.concatenate([holes, holes[rng.integers(0, len(holes), 20)]])  # the last of equal chunks counts
    for chunks in (grid, holes[rng.permutation(len(holes))], repeated, grid[:1], grid[:0]):
        a, b = neighbour_pairs(chunks)
        assert list(zip(a.tolist(), b.tolist(), strict=True)) == reference(chunks)
    a, b = neighbour_pairs(grid)
    assert len(a) == 2 * 25 * 30 - 25 - 30


@pytest.fixture(scope="module")
def engine(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> DescriptorEngine:
    runtime = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(tmp_path_factory.mktemp("eng"))})
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    return DescriptorEngine(runtime, runtime.deserialize_engine(entry), "image", None, entry.sha256, 4)


def test_shard_rows_read_the_rows_and_the_spread_the_shards_hold(
    assets: Assets, engine: DescriptorEngine, tmp_path: Path
) -> None:
    # Real shards over the orthophoto's east edge: some with every chunk described, some with part, and one
    # beyond the imagery with none (its descriptor file is a shapeless empty array)
    grid = ChunkGrid(18, 256)
    with GeoTiffSource(assets.ortho) as source:
        _, south, east, north = source.bounds_lonlat()
        edge = tile_for_lonlat(east, (south + north) / 2, 18)
        chunks = [TileId(18, x, y) for x in range(edge.x - 6, edge.x + 10) for y in range(edge.y - 2, edge.y + 2)]
        shards = [
            describe_shard(
                plan, source=source, grid=grid, engine=engine, preprocessing=Preprocessing(64, 64), out_dir=tmp_path
            )
            for plan in plan_shards(chunks, 4)
        ]
    assert any(s.described == 0 for s in shards) and sum(s.described for s in shards) >= 16
    loaded = [load_shard(s) for s in shards]
    tables = [table[table["status"] == DESCRIBED] for _, table in loaded]
    everything = np.concatenate([d for d, t in zip((d for d, _ in loaded), tables, strict=True) if len(t)])

    xy, rows = described_rows(shards)
    np.testing.assert_array_equal(xy, np.concatenate([np.stack([t["x"], t["y"]], 1) for t in tables]))
    assert len(rows) == len(xy) == len(everything)
    picks = np.random.default_rng(1).integers(0, len(rows), 60)  # any order, repeats
    taken = rows.take(picks)
    assert taken.dtype == np.float32
    np.testing.assert_array_equal(taken, everything.astype(np.float32)[picks])
    assert rows.spread() == ArrayRows(everything).spread() == float(everything.astype(np.float32).std(axis=0).max())
    with pytest.raises(IndexError):
        rows.take(np.array([len(rows)]))


def test_the_renderer_keeps_a_bounded_set_of_tiles_and_renders_the_same_views_without_them(
    assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tile store cut at one zoom (as XYZ folders often are): each view falls back to full resolution and
    # reads several z17 tiles; over a wide area the views share none
    folder = xyz_folder(cut_tiles(assets.ortho, range(17, 18)), tmp_path / "xyz")
    source = CountingSource(open_tile_source("xyz", folder))
    monkeypatch.setattr(selftest, "RENDER_TILES", 16)  # more than one view reads, fewer than the area has
    grid = ChunkGrid(17)
    tiles = sorted((x, y) for _, x, y in _tile_keys(folder))
    chunks = [TileId(17, x, y) for x, y in tiles[len(tiles) // 3 : 2 * len(tiles) // 3]]
    rng = np.random.default_rng([0, 2])
    params = [draw_params(rng, SelfTestConfig()) for _ in chunks]

    renderer = ViewRenderer(source, grid, 128)
    first = renderer.render(chunks[0], params[0])
    reads = len(source.reads)
    assert np.array_equal(renderer.render(chunks[0], params[0]), first) and len(source.reads) == reads  # kept
    views = [renderer.render(c, p) for c, p in zip(chunks, params, strict=True)]
    assert len(set(source.reads)) > 16
    reads = len(source.reads)
    assert np.array_equal(renderer.render(chunks[0], params[0]), first) and len(source.reads) > reads  # let go
    unbounded = ViewRenderer(source, grid, 128)
    monkeypatch.setattr(selftest, "RENDER_TILES", 10_000)
    for view, c, p in zip(views, chunks, params, strict=True):
        assert np.array_equal(unbounded.render(c, p), view)


def _tile_keys(folder: Path) -> Iterator[tuple[int, int, int]]:
    for path in folder.glob("*/*/*.png"):
        yield int(path.parent.parent.name), int(path.parent.name), int(path.stem)
