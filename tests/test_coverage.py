"""The coverage walk: classification, counts, digest, JSON round trip and the map picture."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import shapely
from PIL import Image

from navcache.coverage_walk import COLORS, CoverageReport, coverage_walk, map_pixel_of_tile, render_coverage_png
from navcache.tiles import ChunkGrid, array_to_tiles, tile_bounds
from navcache.types import TileId
from navcache_runtime.coverage import coverage_digest

Z = 17


def T(x: int, y: int) -> TileId:
    return TileId(Z, x, y)


# A 4 x 3 block of storage tiles at x 100..103, y 200..202 (hand-made case, span 1).
STORAGE = [T(x, y) for x in range(100, 104) for y in range(200, 203)]
DESCRIBED = [T(100, 200), T(101, 200), T(102, 200), T(103, 200), T(100, 201), T(101, 201), T(103, 202)]
BLANK = [T(102, 201), T(100, 202), T(103, 200)]  # 103/200 is also described: described wins
# missing: 103/201, 101/202, 102/202


@pytest.fixture
def report() -> CoverageReport:
    return coverage_walk(ChunkGrid(Z), STORAGE, DESCRIBED, BLANK, threshold=50.0)


def test_hand_made_case_counts(report: CoverageReport) -> None:
    assert (report.total, report.covered, report.blank, report.missing) == (12, 7, 2, 3)
    assert report.percent == pytest.approx(7 / 12 * 100)
    assert report.threshold == 50.0 and report.passed
    assert report.missing_tiles == (T(101, 202), T(102, 202), T(103, 201))
    assert report.blank_tiles == (T(100, 202), T(102, 201))
    assert report.status_of(T(103, 200)) == "covered"
    assert report.status_of(T(102, 201)) == "blank"
    assert report.status_of(T(103, 201)) == "missing"
    assert report.status_of(T(99, 200)) is None
    assert "58.33%" in report.summary()


def test_threshold_decides_pass_or_fail() -> None:
    grid = ChunkGrid(Z)
    assert not coverage_walk(grid, STORAGE, DESCRIBED, BLANK, threshold=99.0).passed
    assert coverage_walk(grid, STORAGE, STORAGE, [], threshold=100.0).passed
    with pytest.raises(ValueError, match="threshold"):
        coverage_walk(grid, STORAGE, DESCRIBED, BLANK, threshold=120.0)


def test_digest_is_the_shared_coverage_digest(report: CoverageReport) -> None:
    rows = list(report.statuses())
    assert len(rows) == 12 and rows == sorted(rows)
    assert report.digest == coverage_digest(rows)
    expected = {(Z, t.x, t.y): "covered" for t in DESCRIBED}
    expected.update({(Z, 102, 201): "blank", (Z, 100, 202): "blank"})
    expected.update({(Z, x, y): "missing" for x, y in [(103, 201), (101, 202), (102, 202)]})
    assert report.digest == coverage_digest(expected.items())


def test_input_order_and_arrays_do_not_change_the_result(report: CoverageReport) -> None:
    grid = ChunkGrid(Z)
    shuffled = coverage_walk(grid, STORAGE[::-1], iter(DESCRIBED[::-1]), set(BLANK), threshold=50.0)
    assert shuffled == report
    arrays = coverage_walk(
        grid,
        np.array([[t.x, t.y] for t in STORAGE]),
        np.array([[Z, t.x, t.y] for t in DESCRIBED]),
        np.array([[t.x, t.y] for t in BLANK]),
        threshold=50.0,
    )
    assert arrays == report and arrays.digest == report.digest


def test_bad_inputs_are_rejected() -> None:
    grid = ChunkGrid(Z)
    with pytest.raises(ValueError, match="appears twice"):
        coverage_walk(grid, [*STORAGE, STORAGE[0]], [], [], threshold=0.0)
    with pytest.raises(ValueError, match="not at zoom 17"):
        coverage_walk(grid, STORAGE, [TileId(16, 1, 1)], [], threshold=0.0)
    with pytest.raises(ValueError, match="outside the zoom-17 grid"):
        coverage_walk(grid, [TileId(Z, 2**Z, 0)], [], [], threshold=0.0)


def test_empty_area_proves_nothing() -> None:
    empty = coverage_walk(ChunkGrid(Z), [], [], [], threshold=90.0)
    assert (empty.total, empty.percent, empty.passed) == (0, 0.0, False)
    assert empty.digest == coverage_digest([])


def test_overlapping_chunks_cover_every_tile_they_touch() -> None:
    grid = ChunkGrid(Z, 256, 2, 0.5)  # chunk (i, j) spans tiles i..i+1, j..j+1
    storage = [T(x, y) for x in range(10, 14) for y in range(10, 14)]
    report = coverage_walk(grid, storage, [T(10, 10)], [T(12, 12)], threshold=0.0)
    assert report.covered == 4 and {t.x for t in storage if report.status_of(t) == "covered"} == {10, 11}
    assert set(report.blank_tiles) == {T(12, 12), T(12, 13), T(13, 12), T(13, 13)}
    assert report.missing == 16 - 8
    # a chunk that hangs over a missing chunk's tiles fills them in
    more = coverage_walk(grid, storage, [T(10, 10), T(11, 11)], [T(12, 12)], threshold=0.0)
    assert more.status_of(T(12, 12)) == "covered" and more.status_of(T(13, 13)) == "blank"


def test_walk_over_a_real_area_with_unaligned_chunks() -> None:
    grid = ChunkGrid(16, 256, 2, 0.4)
    area = shapely.Point(11.575, 48.137).buffer(0.02)
    chunks = grid.chunks_for_area(area)
    storage = grid.storage_tiles_for_area(area)
    full = coverage_walk(grid, storage, chunks, [], threshold=100.0)
    assert full.passed and full.covered == len(storage)
    mid = chunks[len(chunks) // 2].x
    west = [c for c in chunks if c.x < mid]
    east = [c for c in chunks if c.x >= mid]
    half = coverage_walk(grid, storage, west, east, threshold=100.0)
    assert half.missing == 0 and half.covered + half.blank == len(storage)
    assert half.blank > 0 and not half.passed
    assert all(t.x * 256 >= (mid - 1) * grid.stride_px + grid.chunk_px for t in half.blank_tiles)
    gap = coverage_walk(grid, storage, west, [], threshold=0.0)
    assert gap.missing == half.blank and set(gap.missing_tiles) == set(half.blank_tiles)


def test_json_round_trip(report: CoverageReport) -> None:
    doc = report.to_json()
    text = json.dumps(doc)
    back = CoverageReport.from_json(json.loads(text))
    assert back == report and back.digest == report.digest
    assert doc["status_codes"] == {"0": "covered", "1": "missing", "2": "blank"}
    assert doc["counts"] == {"total": 12, "covered": 7, "blank": 2, "missing": 3}
    assert doc["tiles"][0] == [Z, 100, 200, 0]
    assert [Z, 103, 201, 1] in doc["tiles"] and [Z, 102, 201, 2] in doc["tiles"]


def test_from_json_rejects_tampering(report: CoverageReport) -> None:
    doc = report.to_json()
    doc["tiles"][0][3] = 1
    with pytest.raises(ValueError, match="counts"):
        CoverageReport.from_json(doc)
    doc["counts"] = {"total": 12, "covered": 6, "blank": 2, "missing": 4}
    with pytest.raises(ValueError, match="digest"):
        CoverageReport.from_json(doc)
    unverified = CoverageReport.from_json(doc, verify=False)  # trusts the stored digest
    assert unverified.digest == report.digest and unverified.missing == 4
    with pytest.raises(ValueError, match="format"):
        CoverageReport.from_json({**doc, "format": "other"})
    with pytest.raises(ValueError, match="status codes"):
        CoverageReport.from_json({**doc, "status_codes": {"0": "missing", "1": "covered", "2": "blank"}})


# --- picture ----------------------------------------------------------------------------------------------


def _image(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image.convert("RGB")


def test_png_has_the_status_colours_at_known_tiles(report: CoverageReport) -> None:
    png = render_coverage_png(report, ChunkGrid(Z))
    image = _image(png)
    assert image.width >= 1000 or image.height >= 700  # 4 x 3 tiles upscaled to ~1024 px
    for tile, colour in [
        (T(100, 200), COLORS["covered"]),
        (T(102, 201), COLORS["blank"]),
        (T(103, 201), COLORS["missing"]),
        (T(101, 202), COLORS["missing"]),
    ]:
        assert image.getpixel(map_pixel_of_tile(report, tile)) == colour, tile


def test_png_is_deterministic_and_marks_the_takeoff(report: CoverageReport) -> None:
    west, south, east, north = tile_bounds(T(101, 201))
    takeoff = ((west + east) / 2, (south + north) / 2)
    first = render_coverage_png(report, takeoff_lonlat=takeoff)
    assert first == render_coverage_png(report, takeoff_lonlat=takeoff)
    assert first != render_coverage_png(report)
    image = _image(first)
    pixels = np.asarray(image)
    assert np.all(pixels == COLORS["takeoff"], axis=-1).sum() > 20
    # the marker sits on the takeoff tile (its ring passes a few pixels from the centre)
    cx, cy = map_pixel_of_tile(report, T(101, 201))
    window = pixels[cy - 20 : cy + 21, cx - 20 : cx + 21]
    assert np.all(window == COLORS["takeoff"], axis=-1).any()


def test_png_of_a_large_area_keeps_missing_tiles_visible() -> None:
    side = 3000  # 9e6 tiles would be too many; use a sparse diagonal band instead
    xs = np.arange(side)
    storage = np.column_stack((np.concatenate([xs, xs]), np.concatenate([xs, np.minimum(xs + 1, side - 1)])))
    storage = np.unique(storage, axis=0)
    described = storage[storage[:, 0] != 1500]
    report = coverage_walk(ChunkGrid(Z), storage, described, [], threshold=99.0)
    assert report.missing == 2
    image = _image(render_coverage_png(report, max_px=512))
    assert max(image.size) <= 600
    pixels = np.asarray(image)
    assert np.all(pixels == COLORS["missing"], axis=-1).any()
    assert image.getpixel(map_pixel_of_tile(report, TileId(Z, 1500, 1500), max_px=512)) == COLORS["missing"]


@pytest.mark.slow
def test_walk_timing_for_a_million_tiles() -> None:
    """Not asserted: prints the time of a 1000 x 1000 tile walk (digest included and separately)."""
    xs, ys = np.meshgrid(np.arange(69000, 70000), np.arange(45000, 46000), indexing="ij")
    storage = np.column_stack((xs.ravel(), ys.ravel()))
    rng = np.random.default_rng(0)
    pick = rng.random(len(storage))
    tiles = array_to_tiles(storage, Z)
    described = array_to_tiles(storage[pick < 0.98], Z)
    blank = array_to_tiles(storage[(pick >= 0.98) & (pick < 0.99)], Z)
    start = time.perf_counter()
    report = coverage_walk(ChunkGrid(Z), tiles, described, blank, threshold=99.0)
    walk = time.perf_counter() - start
    start = time.perf_counter()
    coverage_digest(report.statuses())
    digest = time.perf_counter() - start
    print(f"\n1e6-tile coverage walk: {walk:.2f} s in all, of which the shared digest ~{digest:.2f} s")
    assert report.total == 1_000_000


def test_one_status_encoding_for_shards_coverage_json_and_the_runtime(report: CoverageReport) -> None:
    """TileStatus is the only encoding: a shard's .tiles.npy, the coverage JSON and the onboard side agree
    (shards once stored blank as 1, the coverage table as 2)."""
    from navcache import coverage_walk as coverage
    from navcache import descriptors
    from navcache_runtime.coverage import COVERAGE_STATUSES, TileStatus

    assert [(s.name, s.value) for s in TileStatus] == [("COVERED", 0), ("MISSING", 1), ("BLANK", 2)]
    assert TileStatus.DESCRIBED is TileStatus.COVERED
    assert (descriptors.DESCRIBED, descriptors.MISSING, descriptors.BLANK) == (0, 1, 2)
    assert (coverage.COVERED, coverage.MISSING, coverage.BLANK) == (0, 1, 2)
    assert COVERAGE_STATUSES == ("covered", "missing", "blank")
    doc = report.to_json()
    assert doc["status_codes"] == {str(s.value): s.label for s in TileStatus}
    by_tile = {(z, x, y): code for z, x, y, code in doc["tiles"]}
    assert by_tile[(Z, 102, 201)] == TileStatus.BLANK and by_tile[(Z, 103, 201)] == TileStatus.MISSING


def _failing(codes: list[int]) -> CoverageReport:
    xy = [(100 + i, 200) for i in range(len(codes))]
    return coverage_walk(
        ChunkGrid(Z),
        [T(x, y) for x, y in xy],
        [T(x, y) for (x, y), c in zip(xy, codes, strict=True) if c == 0],
        [T(x, y) for (x, y), c in zip(xy, codes, strict=True) if c == 2],
        threshold=99.0,
    )


def test_the_coverage_failure_tells_blank_from_missing() -> None:
    all_blank = str(_failing([0, 2, 2, 2]).failure(where="s1"))
    assert all_blank == (
        "s1: coverage 25.00 % is below the threshold 99 % (0 missing, 3 blank of 4 tiles) (fix: the imagery is "
        "nodata or near-uniform over 3 tiles (blank): use imagery with detail there, or lower [orthophoto] "
        "blank_std if it is faint but usable; or lower coverage_threshold (the previous manifest stays in force))"
    )
    assert "extend the orthophoto" not in all_blank
    missing = str(_failing([0, 0, 1, 1]).failure(where="s1"))
    assert missing == (
        "s1: coverage 50.00 % is below the threshold 99 % (2 missing, 0 blank of 4 tiles) (fix: extend the "
        "orthophoto over the 2 tiles it does not reach (missing); or lower coverage_threshold (the previous "
        "manifest stays in force))"
    )
    both = str(_failing([0, 1, 2, 2]).failure())
    assert "over the 1 tile it does not reach (missing); the imagery is nodata or near-uniform over 2 tiles" in both
    assert _failing([0, 1]).failure().exit_code == 1
