"""Tile and chunk grids: agreement with morecantile, covering, budgets, shard plans."""

from __future__ import annotations

import time

import morecantile
import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import Geod

from navcache.errors import TileBudgetError
from navcache.tiles import (
    ChunkGrid,
    ShardPlan,
    array_to_tiles,
    in_grid,
    mercator_bounds,
    plan_shard_array,
    plan_shards,
    tile_bounds,
    tile_for_lonlat,
    tiles_to_array,
)
from navcache.types import TileId

TMS = morecantile.tms.get("WebMercatorQuad")
GEOD = Geod(ellps="WGS84")


@pytest.mark.parametrize("tile", [TileId(0, 0, 0), TileId(17, 69752, 45470), TileId(12, 4095, 0)])
def test_tile_bounds_in_degrees_and_mercator_metres_match_morecantile(tile: TileId) -> None:
    assert mercator_bounds(tile) == pytest.approx(tuple(TMS.xy_bounds(tile.x, tile.y, tile.z)), abs=1e-6)
    assert tile_bounds(tile) == pytest.approx(tuple(TMS.bounds(tile.x, tile.y, tile.z)), abs=1e-9)


def test_in_grid() -> None:
    assert in_grid(TileId(2, 3, 3))
    assert not in_grid(TileId(2, 4, 0))
    assert not in_grid(TileId(2, 0, -1))


def square_km(lon: float, lat: float, km: float) -> shapely.Polygon:
    east, _, _ = GEOD.fwd(lon, lat, 90, km * 1000)
    _, north, _ = GEOD.fwd(lon, lat, 0, km * 1000)
    return shapely.box(lon, lat, east, north)


def brute_force_chunks(grid: ChunkGrid, area: shapely.Geometry) -> list[TileId]:
    """Every chunk near the area whose box overlaps it with positive area (slow, obviously right)."""
    w = grid.world_px
    west, south, east, north = area.bounds
    x_lo = int((west + 180) / 360 * w) // grid.stride_px - grid.span - 2
    x_hi = int((east + 180) / 360 * w) // grid.stride_px + 2
    t_north, t_south = tile_for_lonlat(west, north, grid.zoom), tile_for_lonlat(west, south, grid.zoom)
    y_lo = t_north.y * grid.tile_size // grid.stride_px - grid.span - 2
    y_hi = (t_south.y + 1) * grid.tile_size // grid.stride_px + 2
    out = []
    for i in range(max(0, x_lo), min(grid.chunks_per_axis - 1, x_hi) + 1):
        for j in range(max(0, y_lo), min(grid.chunks_per_axis - 1, y_hi) + 1):
            chunk = TileId(grid.zoom, i, j)
            if shapely.intersection(shapely.box(*grid.chunk_bounds(chunk)), area).area > 0:
                out.append(chunk)
    return sorted(out)


# --- tile math ----------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 24).flatmap(lambda z: st.tuples(st.just(z), st.integers(0, 2**z - 1), st.integers(0, 2**z - 1))))
def test_tile_bounds_agree_with_morecantile(zxy: tuple[int, int, int]) -> None:
    z, x, y = zxy
    expected = TMS.bounds(morecantile.Tile(x, y, z))
    assert tile_bounds(TileId(z, x, y)) == pytest.approx(tuple(expected), abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.floats(-179.99, 179.99), st.floats(-85.0, 85.0), st.integers(0, 22))
def test_tile_for_lonlat_agrees_with_morecantile(lon: float, lat: float, zoom: int) -> None:
    tile = tile_for_lonlat(lon, lat, zoom)
    west, south, east, north = tile_bounds(tile)
    assert west - 1e-9 <= lon <= east + 1e-9 and south - 1e-9 <= lat <= north + 1e-9
    expected = TMS.tile(lon, lat, zoom)
    # on an exact edge either neighbour is right; away from edges they must agree
    if min(abs(lon - west), abs(lon - east), abs(lat - south), abs(lat - north)) > 1e-9:
        assert (tile.x, tile.y) == (expected.x, expected.y)


def test_tile_bounds_rejects_tiles_off_the_grid() -> None:
    with pytest.raises(ValueError, match="outside the zoom-3 grid"):
        tile_bounds(TileId(3, 8, 0))


def test_tiles_to_array_round_trip_and_zoom_check() -> None:
    tiles = [TileId(5, 1, 2), TileId(5, 3, 4)]
    xy = tiles_to_array(tiles, 5)
    assert xy.tolist() == [[1, 2], [3, 4]]
    assert array_to_tiles(xy, 5) == tiles
    assert tiles_to_array(np.array([[5, 1, 2]]), 5).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="not at zoom 6"):
        tiles_to_array(tiles, 6)


# --- chunk grid ---------------------------------------------------------------------------------------------


def test_span_one_without_overlap_is_the_xyz_grid() -> None:
    grid = ChunkGrid(12)
    area = square_km(11.5, 48.1, 20)
    chunks = grid.chunks_for_area(area)
    assert chunks == grid.storage_tiles_for_area(area)
    for chunk in chunks[:: max(1, len(chunks) // 20)]:
        assert grid.chunk_bounds(chunk) == tile_bounds(chunk)
        assert grid.storage_tiles_of_chunk(chunk) == [chunk]
        assert grid.chunks_covering(chunk) == [chunk]


def test_chunk_geometry() -> None:
    grid = ChunkGrid(17, 256, 2, 0.5)
    assert (grid.chunk_px, grid.stride_px) == (512, 256)
    chunk = TileId(17, 10, 20)
    assert grid.chunk_pixel_box(chunk) == (2560, 5120, 3072, 5632)
    assert grid.storage_tiles_of_chunk(chunk) == [TileId(17, x, y) for x in (10, 11) for y in (20, 21)]
    assert grid.chunks_covering(TileId(17, 11, 21)) == [TileId(17, x, y) for x in (10, 11) for y in (20, 21)]
    west, south, _, _ = tile_bounds(TileId(17, 10, 21))
    _, _, east, _ = tile_bounds(TileId(17, 11, 20))
    assert grid.chunk_bounds(chunk) == pytest.approx((west, south, east, tile_bounds(TileId(17, 10, 20))[3]))
    assert ChunkGrid(17, 256, 2, 0.4).stride_px == round(512 * 0.6)


def test_last_chunk_is_clipped_to_the_world() -> None:
    grid = ChunkGrid(2, 256, 2, 0.5)  # 1024 px world, chunks of 512 every 256: 3 per axis
    assert grid.chunks_per_axis == 3
    last = TileId(2, 2, 2)
    assert grid.storage_tiles_of_chunk(last) == [TileId(2, x, y) for x in (2, 3) for y in (2, 3)]
    assert grid.chunk_bounds(last)[2] == pytest.approx(180.0)
    with pytest.raises(ValueError, match="not in this grid"):
        grid.chunk_pixel_box(TileId(2, 3, 0))


@pytest.mark.parametrize(
    ("span", "overlap", "size"),
    [(1, 0.0, 256), (2, 0.5, 256), (2, 0.4, 256), (3, 0.25, 512), (4, 0.75, 256), (1, 0.3, 256)],
)
def test_chunks_covering_is_the_inverse_of_storage_tiles_of_chunk(span: int, overlap: float, size: int) -> None:
    grid = ChunkGrid(10, size, span, overlap)
    for chunk in [TileId(10, i, j) for i in (0, 1, 7, 33) for j in (0, 5, 40)]:
        for tile in grid.storage_tiles_of_chunk(chunk):
            assert chunk in grid.chunks_covering(tile)
    for tile in [TileId(10, x, y) for x in (0, 3, 100, 1023) for y in (0, 9, 1023)]:
        for chunk in grid.chunks_covering(tile):
            assert tile in grid.storage_tiles_of_chunk(chunk)
        assert grid.chunks_covering(tile), "every tile lies under some chunk"


@pytest.mark.parametrize(("span", "overlap"), [(2, 0.5), (2, 0.4), (3, 0.0), (4, 0.75)])
def test_chunks_cover_every_storage_tile_of_the_area(span: int, overlap: float) -> None:
    grid = ChunkGrid(16, 256, span, overlap)
    area = shapely.Point(11.575, 48.137).buffer(0.03).union(square_km(11.6, 48.1, 3))
    chunks = set(grid.chunks_for_area(area))
    tiles = grid.storage_tiles_for_area(area)
    assert tiles
    for tile in tiles:
        assert chunks.intersection(grid.chunks_covering(tile)), tile
    # and no chunk is wasted: each one overlaps the area
    for chunk in chunks:
        assert shapely.intersection(shapely.box(*grid.chunk_bounds(chunk)), area).area > 0


@pytest.mark.parametrize(
    "grid", [ChunkGrid(15), ChunkGrid(15, 256, 2, 0.5), ChunkGrid(14, 512, 3, 0.4), ChunkGrid(16, 256, 1, 0.3)]
)
def test_chunks_for_area_matches_brute_force(grid: ChunkGrid) -> None:
    rng = np.random.default_rng(grid.zoom * 10 + grid.span)
    for _ in range(6):
        centre = np.array([11.5, 48.1]) + rng.uniform(-0.05, 0.05, 2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radii = rng.uniform(0.005, 0.03, 7)
        ring = centre + np.column_stack((radii * np.cos(angles), radii * np.sin(angles)))
        area = shapely.make_valid(shapely.Polygon(ring)).union(shapely.box(*(centre + 0.035), *(centre + 0.04)))
        got = grid.chunks_for_area(area)
        assert got == brute_force_chunks(grid, area)
        assert got == sorted(got)
        assert grid.count_chunks(area) == len(got)


def test_area_drawn_on_tile_edges_gets_exactly_those_tiles() -> None:
    grid = ChunkGrid(15)
    west, _, _, north = tile_bounds(TileId(15, 100, 200))
    _, south, east, _ = tile_bounds(TileId(15, 102, 201))
    tiles = grid.storage_tiles_for_area(shapely.box(west, south, east, north))
    assert tiles == [TileId(15, x, y) for x in (100, 101, 102) for y in (200, 201)]


def test_storage_tile_array_is_the_storage_tile_list_as_rows_in_the_same_order() -> None:
    grid = ChunkGrid(17, 256, 2, 0.5)
    area = square_km(11.5, 48.1, 3).difference(square_km(11.5, 48.1, 1))
    tiles = grid.storage_tiles_for_area(area)
    array = grid.storage_tile_array_for_area(area)
    assert len(tiles) > 100 and array.shape == (len(tiles), 2) and array.dtype == np.int64
    assert np.array_equal(array, tiles_to_array(tiles))
    assert array_to_tiles(array, 17) == tiles
    with pytest.raises(TileBudgetError):
        grid.storage_tile_array_for_area(area, budget=10)


def test_multipolygon_with_a_hole() -> None:
    grid = ChunkGrid(16)
    outer = square_km(11.5, 48.1, 6)
    hole = square_km(11.52, 48.12, 1.5)
    area = outer.difference(hole)
    with_hole = set(grid.chunks_for_area(area))
    assert with_hole < set(grid.chunks_for_area(outer))
    assert with_hole == set(brute_force_chunks(grid, area))


def test_empty_area_and_non_polygonal_area() -> None:
    grid = ChunkGrid(16)
    assert grid.chunks_for_area(shapely.Polygon()) == []
    with pytest.raises(ValueError, match="polygonal"):
        grid.chunks_for_area(shapely.LineString([(0, 0), (1, 1)]))
    with pytest.raises(ValueError, match="not a valid geometry: Self-intersection"):
        grid.chunks_for_area(shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1)]))


# --- budget -------------------------------------------------------------------------------------------------


def test_budget_error_before_materialising() -> None:
    grid = ChunkGrid(17)
    area = square_km(0.0, 40.0, 2000)
    start = time.perf_counter()
    with pytest.raises(TileBudgetError) as info:
        grid.chunks_for_area(area, budget=250_000)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    error = info.value
    assert "the budget is 250,000" in error.message and "zoom 17" in error.message
    assert error.hint and "[tiles].budget" in error.hint and "[tiles].zoom" in error.hint


def test_budget_error_gives_the_exact_count() -> None:
    grid = ChunkGrid(16)
    area = square_km(11.5, 48.1, 10)
    count = len(grid.chunks_for_area(area))
    with pytest.raises(TileBudgetError, match=f"needs {count:,} retrieval chunks"):
        grid.chunks_for_area(area, budget=count - 1)
    assert len(grid.chunks_for_area(area, budget=count)) == count


def test_thin_diagonal_corridor_fits_a_budget_its_bbox_does_not() -> None:
    grid = ChunkGrid(16)
    corridor = shapely.LineString([(10.0, 47.0), (12.0, 49.0)]).buffer(0.002)
    west, south, east, north = corridor.bounds
    assert len(grid.chunks_for_area(shapely.box(west, south, east, north))) > 100_000
    assert len(grid.chunks_for_area(corridor, budget=100_000)) < 20_000


def test_enumerating_a_50km_area_at_z17_is_fast() -> None:
    grid = ChunkGrid(17, 256, 2, 0.5)
    area = square_km(11.0, 48.0, 50)
    start = time.perf_counter()
    chunks = grid.chunks_for_area(area, budget=250_000)
    elapsed = time.perf_counter() - start
    assert 50_000 < len(chunks) < 70_000
    assert elapsed < 3.0, f"took {elapsed:.2f} s"


# --- shards -------------------------------------------------------------------------------------------------


def test_plan_shards_groups_by_block_and_sorts() -> None:
    chunks = [TileId(17, x, y) for x, y in [(70, 3), (5, 5), (64, 0), (63, 63), (5, 5), (0, 64)]]
    plans = plan_shards(chunks, 64)
    assert [(p.block_x, p.block_y, p.zoom, p.chunks) for p in plans] == [
        (0, 0, 17, (TileId(17, 5, 5), TileId(17, 63, 63))),
        (0, 1, 17, (TileId(17, 0, 64),)),
        (1, 0, 17, (TileId(17, 64, 0), TileId(17, 70, 3))),
    ]
    assert plan_shards([], 8) == []
    with pytest.raises(ValueError, match="several zoom"):
        plan_shards([TileId(1, 0, 0), TileId(2, 0, 0)], 8)


def test_a_plan_from_the_area_array_is_the_plan_from_its_tiles_and_stays_compact() -> None:
    grid = ChunkGrid(17, 256)
    area = square_km(11.5, 48.1, 6)
    from_tiles = plan_shards(grid.chunks_for_area(area), 16)
    from_array = plan_shard_array(grid.chunk_array_for_area(area), grid.zoom, 16)
    assert from_array == from_tiles and len(from_array) > 4
    assert [p.chunks for p in from_array] == [p.chunks for p in from_tiles]
    assert all(p.xy.dtype == np.int32 and p.xy.shape == (len(p), 2) for p in from_array)
    assert sum(p.xy.nbytes for p in from_array) == 8 * sum(len(p) for p in from_array)
    first = from_array[0]
    other = ShardPlan(first.block_x, first.block_y, first.zoom, first.xy[:-1])
    assert other != first and len({*from_array, *from_tiles}) == len(from_array)


def test_plan_shards_is_stable_when_chunks_are_added_elsewhere() -> None:
    grid = ChunkGrid(16, 256, 2, 0.5)
    first = grid.chunks_for_area(square_km(11.5, 48.1, 8))
    more = grid.chunks_for_area(square_km(11.7, 48.3, 8))
    before = {(p.block_x, p.block_y): p.chunks for p in plan_shards(first, 16)}
    after = {(p.block_x, p.block_y): p.chunks for p in plan_shards(first + more, 16)}
    extra = set(more) - set(first)
    for key, chunks in before.items():
        added = set(after[key]) - set(chunks)
        assert added <= extra
        assert set(chunks) <= set(after[key])
        assert tuple(sorted(set(chunks) | added)) == after[key]
    assert sum(len(p.chunks) for p in plan_shards(first + more, 16)) == len(set(first) | set(more))
