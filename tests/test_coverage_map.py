"""The coverage map for people: the orthophoto under the tile statuses, grid, area outline, takeoff,
coordinates and scale bar; the same bytes in the cache as the coverage task returns; a compact copy for the
run's artifact."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from navcache.coverage_map import render_coverage_map
from navcache.coverage_walk import COLORS, coverage_walk, map_pixel_of_tile
from navcache.imagery import open_tile_source
from navcache.tiles import ChunkGrid, tiles_to_array
from tests.support.sorties import Assets, block_tiles, tiles_polygon


def _report(tiles_covered, tiles_missing, threshold=99.0):
    grid = ChunkGrid(18)
    storage = sorted(tiles_covered + tiles_missing)
    described = np.column_stack([np.full(len(tiles_covered), 18), tiles_to_array(tiles_covered)]).astype(np.int64)
    return grid, coverage_walk(grid, storage, described, np.zeros((0, 3), np.int64), threshold)


def test_the_map_shows_the_photo_statuses_outline_takeoff_and_a_scale(assets: Assets) -> None:
    first, second = block_tiles()
    far = [type(t)(t.z, t.x + 4, t.y) for t in second[:1]]  # next to the area, so the map stays small
    grid, report = _report(first + second, far)
    assert report.missing == 1
    area = shape(tiles_polygon(first + second + far))
    w, s, e, n = area.bounds
    takeoff = ((w + e) / 2, (s + n) / 2)
    with open_tile_source("geotiff", [assets.ortho], 256) as source:
        png = render_coverage_map(report, grid, takeoff, area=area, source=source, max_px=512)
    assert png == render_coverage_map(
        report, grid, takeoff, area=area, source=open_tile_source("geotiff", [assets.ortho], 256), max_px=512
    )
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    if os.environ.get("NAVCACHE_MAP_OUT"):  # to look at it: NAVCACHE_MAP_OUT=DIR pytest tests/test_coverage_map.py
        (Path(os.environ["NAVCACHE_MAP_OUT"]) / "map.png").write_bytes(png)
    flat = np.asarray(
        Image.open(io.BytesIO(render_coverage_map(report, grid, takeoff, area=area, max_px=512))).convert("RGB")
    ).astype(int)
    assert image.shape == flat.shape and image.shape[1] >= 500
    # Covered tiles: green over the photo, so not one flat colour (the white-background map is).
    cx, cy = map_pixel_of_tile(report, first[0], 512)
    patch = image[cy - 6 : cy + 6, cx - 6 : cx + 6]
    assert patch.std() > 2.0 and patch[..., 1].mean() > patch[..., 0].mean()
    # The missing tile: red hatching.
    mx, my = map_pixel_of_tile(report, far[0], 512)
    hatch = image[my - 8 : my + 8, mx - 8 : mx + 8].reshape(-1, 3)
    assert any(tuple(p) == COLORS["missing"] for p in hatch)
    # The area outline (yellow) and the takeoff ring (blue) are drawn; the footer holds scale and corners.
    assert ((image[..., 0] > 240) & (image[..., 1] > 180) & (image[..., 1] < 220) & (image[..., 2] < 30)).any()
    assert (np.abs(image - np.array(COLORS["takeoff"])).sum(axis=2) < 10).any()
    footer = image[-38:]
    assert (footer.sum(axis=2) < 100).sum() > 50  # the scale bar and the coordinates' text


def test_the_artifact_bytes_are_the_map_in_the_cache(assets: Assets, tmp_path: Path) -> None:
    from navcache_tasks.coverage_walk import coverage_task

    first, _ = block_tiles()
    grid, _ = _report(first, [])
    shards_dir = tmp_path  # no shards: every tile missing is fine for the picture's identity
    area = shape(tiles_polygon(first))
    imagery = ("geotiff", (assets.ortho,))
    one = coverage_task.fn([], grid, first, 99.0, shards_dir / "coverage", (11.575, 48.137), area=area, imagery=imagery)
    png_path = one[1].with_suffix(".png")
    assert one[2] == png_path.read_bytes()
    two = coverage_task.fn([], grid, first, 99.0, shards_dir / "coverage", (11.0, 48.0), area=area, imagery=imagery)
    assert two[1] == one[1] and two[2] == png_path.read_bytes()  # the map the manifest names, never another


def test_compact_png_fits_the_budget_at_full_size_or_shrunk_and_is_deterministic() -> None:
    from navcache.coverage_map import MAX_EMBEDDED_PNG_BYTES, compact_png

    first, second = block_tiles()
    grid, report = _report(first, second)
    flat = render_coverage_map(report, grid, max_px=1024)  # flat tints and text: fits at full size
    compact = compact_png(flat)
    assert len(compact) <= MAX_EMBEDDED_PNG_BYTES and compact == compact_png(flat)
    assert Image.open(io.BytesIO(compact)).size == Image.open(io.BytesIO(flat)).size
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1024, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    shrunk = compact_png(buffer.getvalue())  # nothing compresses noise: only a smaller picture fits
    assert len(shrunk) <= MAX_EMBEDDED_PNG_BYTES
    width, height = Image.open(io.BytesIO(shrunk)).size
    assert width < 1024 and abs(width / height - 1024 / 1100) < 0.01
    with pytest.raises(ValueError, match="raise max_bytes"):
        compact_png(buffer.getvalue(), max_bytes=100)
