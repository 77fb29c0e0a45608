"""Tile sources on real files: reprojection lands pixels where they belong, masks survive the warp, the
three source kinds agree, and broken inputs fail with a SourceError that names the file."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import blake3
import morecantile
import numpy as np
import pytest
import rasterio
import rasterio.warp
import rasterio.windows
from affine import Affine
from PIL import Image
from rasterio.enums import Resampling

from navcache.errors import SourceError
from navcache.imagery import (
    GDAL_CACHE_BYTES,
    WINDOW_TILES,
    GeoTiffSource,
    MBTilesSource,
    TileSource,
    XyzFolderSource,
    is_blank,
    open_tile_source,
    read_pixels,
    read_window,
    tile_content_hash,
)
from navcache.tiles import mercator_bounds
from navcache.types import Tile, TileId

TMS = morecantile.tms.get("WebMercatorQuad")  # the independent oracle for tile geometry
CENTER = (11.575, 48.137)  # lon, lat
MAGENTA = (255, 0, 255)
CYAN = (0, 255, 255)
# Markers at known lon/lat: south-west and north-east of the centre, ~150 m apart.
MARKERS = {MAGENTA: (11.5738, 48.1362), CYAN: (11.5763, 48.1378)}
NODATA_ROWS = 10  # the north edge of the test rasters is nodata


# --------------------------------------------------------------------------------------------------
# Fixtures: small rasters written with rasterio


@dataclass(frozen=True)
class Raster:
    path: Path
    crs: str
    transform: Affine
    width: int
    height: int


def _background(height: int, width: int, seed: int = 3) -> np.ndarray:
    """Greenish texture that never looks like a marker colour (3, H, W)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 40, (height, width))
    stripes = (np.arange(width)[None, :] // 7 % 2) * 20
    base = np.stack([60 + noise, 110 + noise + stripes, 50 + noise // 2])
    return base.astype(np.uint8)


def write_raster(
    path: Path,
    crs: str,
    *,
    pixel: tuple[float, float],
    size: tuple[int, int] = (900, 900),
    mask: str = "nodata",
    bands: str = "rgb",
) -> Raster:
    """A raster centred on CENTER with MARKERS (5x5 px squares) and NODATA_ROWS invalid rows at the top.

    ``mask``: "nodata" (value 0), "internal" (GDAL mask band) or "alpha" (4th band).
    ``bands``: "rgb" or "grey" (1 band)."""
    width, height = size
    xs, ys = rasterio.warp.transform("EPSG:4326", crs, [CENTER[0]], [CENTER[1]])
    transform = Affine(pixel[0], 0, xs[0] - width / 2 * pixel[0], 0, -pixel[1], ys[0] + height / 2 * pixel[1])
    data = _background(height, width)
    for colour, (lon, lat) in MARKERS.items():
        mx, my = rasterio.warp.transform("EPSG:4326", crs, [lon], [lat])
        col, row = ~transform @ (mx[0], my[0])
        c, r = int(col), int(row)
        data[:, r - 2 : r + 3, c - 2 : c + 3] = np.array(colour, np.uint8)[:, None, None]
    valid = np.ones((height, width), bool)
    valid[:NODATA_ROWS] = False
    if bands == "grey":
        data = data[1:2]
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    if mask == "nodata":
        data[:, ~valid] = 0
        data[:, valid] = np.maximum(data[:, valid], 1)
        profile["nodata"] = 0
    if mask == "alpha":
        data = np.concatenate([data, (valid * 255).astype(np.uint8)[None]])
        profile["photometric"] = "RGB"
    profile["count"] = data.shape[0]
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if mask == "alpha":
            dst.colorinterp = [rasterio.enums.ColorInterp.red, *dst.colorinterp[1:3], rasterio.enums.ColorInterp.alpha]
        if mask == "internal":
            dst.write_mask(valid.astype(np.uint8) * 255)
    return Raster(path, crs, transform, width, height)


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Raster]:
    root = tmp_path_factory.mktemp("rasters")
    return {
        "utm": write_raster(root / "utm.tif", "EPSG:32632", pixel=(0.5, 0.5)),
        "wgs84": write_raster(root / "wgs84.tif", "EPSG:4326", pixel=(6.7e-6, 4.5e-6)),
    }


def marker_tile_and_pixel(lon: float, lat: float, zoom: int) -> tuple[TileId, tuple[float, float]]:
    """Where a lon/lat falls at ``zoom``, computed with morecantile (not the code under test)."""
    t = TMS.tile(lon, lat, zoom)
    left, bottom, right, top = TMS.xy_bounds(t)
    x, y = TMS.xy(lon, lat)
    return TileId(zoom, t.x, t.y), ((x - left) / (right - left) * 256, (top - y) / (top - bottom) * 256)


def colour_centroid(tile: Tile, colour: tuple[int, int, int]) -> tuple[float, float]:
    rgb = tile.rgb.astype(int)
    close = (np.abs(rgb - np.array(colour)).sum(axis=2) < 120) & tile.valid
    assert close.sum() >= 4, f"marker {colour} not found in the tile"
    rows, cols = np.nonzero(close)
    return float(cols.mean()) + 0.5, float(rows.mean()) + 0.5  # pixel centres


def tiles_of(source: TileSource, zoom: int) -> list[TileId]:
    west, south, east, north = source.bounds_lonlat()
    return [TileId(t.z, t.x, t.y) for t in TMS.tiles(west, south, east, north, [zoom])]


def png_bytes(tile: Tile) -> bytes:
    rgba = np.dstack([tile.rgb, (tile.valid * 255).astype(np.uint8)])
    buffer = BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def write_xyz(root: Path, tiles: dict[TileId, Tile]) -> Path:
    for tile_id, tile in tiles.items():
        path = root / str(tile_id.z) / str(tile_id.x) / f"{tile_id.y}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(tile))
    return root


def write_mbtiles(path: Path, tiles: dict[TileId, Tile], metadata: dict[str, str] | None = None) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        db.executemany("INSERT INTO metadata VALUES (?, ?)", list({"format": "png", **(metadata or {})}.items()))
        db.executemany(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)",
            [(t.z, t.x, (1 << t.z) - 1 - t.y, png_bytes(tile)) for t, tile in tiles.items()],
        )
    return path


@pytest.fixture(scope="module")
def z17_tiles(rasters: dict[str, Raster]) -> dict[TileId, Tile]:
    with GeoTiffSource(rasters["utm"].path) as source:
        out = {t: source.read_tile(t) for t in tiles_of(source, 17)}
    return {t: tile for t, tile in out.items() if tile is not None}


@pytest.fixture(scope="module")
def all_sources(
    rasters: dict[str, Raster], z17_tiles: dict[TileId, Tile], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Callable[[], TileSource]]:
    root = tmp_path_factory.mktemp("sources")
    xyz = write_xyz(root / "xyz", z17_tiles)
    mbtiles = write_mbtiles(root / "area.mbtiles", z17_tiles)
    return {
        "geotiff": lambda: open_tile_source("geotiff", rasters["utm"].path, 256),
        "xyz": lambda: open_tile_source("xyz", xyz, 256),
        "mbtiles": lambda: open_tile_source("mbtiles", mbtiles, 256),
    }


# --------------------------------------------------------------------------------------------------
# GeoTIFF reprojection


@pytest.mark.parametrize("crs_key", ["utm", "wgs84"])
@pytest.mark.parametrize("zoom", [17, 18])
def test_markers_land_where_their_lonlat_projects(rasters: dict[str, Raster], crs_key: str, zoom: int) -> None:
    with GeoTiffSource(rasters[crs_key].path) as source:
        for colour, (lon, lat) in MARKERS.items():
            tile_id, (px, py) = marker_tile_and_pixel(lon, lat, zoom)
            tile = source.read_tile(tile_id)
            assert tile is not None
            cx, cy = colour_centroid(tile, colour)
            # The marker is a 5 px square whose centre is its pixel centre; allow 1.5 tile px.
            col, row = marker_source_pixel_centre(rasters[crs_key], lon, lat)
            ex, ey = expected_pixel_of_source_centre(rasters[crs_key], col, row, tile_id)
            assert abs(cx - ex) < 1.5 and abs(cy - ey) < 1.5, (colour, (cx, cy), (ex, ey))
            # ... and that is within a marker's half-size of where the lon/lat itself projects.
            assert abs(cx - px) < 5 and abs(cy - py) < 5


def marker_source_pixel_centre(raster: Raster, lon: float, lat: float) -> tuple[float, float]:
    mx, my = rasterio.warp.transform("EPSG:4326", raster.crs, [lon], [lat])
    col, row = ~raster.transform @ (mx[0], my[0])
    return int(col) + 0.5, int(row) + 0.5  # the marker square is centred on this source pixel


def expected_pixel_of_source_centre(raster: Raster, col: float, row: float, tile: TileId) -> tuple[float, float]:
    x, y = raster.transform @ (col, row)
    (lon,), (lat,) = rasterio.warp.transform(raster.crs, "EPSG:4326", [x], [y])
    _, (px, py) = marker_tile_and_pixel(lon, lat, tile.z)
    return px, py


@pytest.mark.parametrize("mask", ["nodata", "internal", "alpha"])
def test_validity_follows_the_dataset_mask_and_the_raster_edge(tmp_path: Path, mask: str) -> None:
    raster = write_raster(tmp_path / f"{mask}.tif", "EPSG:32632", pixel=(0.5, 0.5), mask=mask)
    # The tile holding the raster's north-west corner: outside, nodata band and data all meet there.
    corner_x, corner_y = raster.transform @ (0, 0)
    (lon,), (lat,) = rasterio.warp.transform(raster.crs, "EPSG:4326", [corner_x + 60], [corner_y - 60])
    tile_id, _ = marker_tile_and_pixel(lon, lat, 17)
    with GeoTiffSource(raster.path) as source:
        tile = source.read_tile(tile_id)
    assert tile is not None
    # Where each tile pixel centre falls in the source raster.
    west, _, east, north = mercator_bounds(tile_id)
    res = (east - west) / 256
    cols, rows = np.meshgrid(np.arange(256) + 0.5, np.arange(256) + 0.5)
    mx, my = west + cols * res, north - rows * res
    sx, sy = rasterio.warp.transform("EPSG:3857", raster.crs, mx.ravel(), my.ravel())
    scol, srow = ~raster.transform @ (np.array(sx), np.array(sy))
    scol, srow = scol.reshape(256, 256), srow.reshape(256, 256)
    margin = 1.0  # the bilinear kernel's reach
    inside = (scol > margin) & (scol < raster.width - margin) & (srow > NODATA_ROWS + margin)
    inside &= srow < raster.height - margin
    outside = (scol < -margin) | (srow < NODATA_ROWS - margin)
    assert inside.any() and outside.any()
    assert tile.valid[inside].all()
    assert not tile.valid[outside].any()
    # Invalid pixels never bleed into valid ones: the data is never black.
    assert tile.rgb[tile.valid].max(axis=1).min() > 0


def test_tiles_outside_the_raster_are_none(rasters: dict[str, Raster]) -> None:
    with GeoTiffSource(rasters["utm"].path) as source:
        far, _ = marker_tile_and_pixel(CENTER[0] + 0.05, CENTER[1], 17)
        assert source.read_tile(far) is None
        assert source.read_tile(TileId(3, 8, 0)) is None  # not in the grid
        west, south, east, north = source.bounds_lonlat()
        assert west < CENTER[0] < east and south < CENTER[1] < north


def test_grey_raster_reads_as_equal_channels(tmp_path: Path, rasters: dict[str, Raster]) -> None:
    grey = write_raster(tmp_path / "grey.tif", "EPSG:32632", pixel=(0.5, 0.5), bands="grey")
    tile_id, _ = marker_tile_and_pixel(*CENTER, 17)
    with GeoTiffSource(grey.path) as g, GeoTiffSource(rasters["utm"].path) as rgb:
        tile, colour = g.read_tile(tile_id), rgb.read_tile(tile_id)
    assert tile is not None and colour is not None
    assert (tile.rgb[..., 0] == tile.rgb[..., 1]).all() and (tile.rgb[..., 1] == tile.rgb[..., 2]).all()
    np.testing.assert_array_equal(tile.rgb[..., 1], colour.rgb[..., 1])  # grey = the green band
    np.testing.assert_array_equal(tile.valid, colour.valid)


def test_palette_raster_is_expanded(tmp_path: Path) -> None:
    path = tmp_path / "palette.tif"
    data = (np.tile(np.arange(64, dtype=np.uint8), (64, 1)) // 16) % 4  # 16 m stripes: warping keeps their cores
    xs, ys = rasterio.warp.transform("EPSG:4326", "EPSG:32632", [CENTER[0]], [CENTER[1]])
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint8", "crs": "EPSG:32632"}
    with rasterio.open(path, "w", transform=Affine(1, 0, xs[0], 0, -1, ys[0]), **profile) as dst:
        dst.write(data, 1)
        dst.write_colormap(1, {0: (255, 0, 0, 255), 1: (0, 255, 0, 255), 2: (0, 0, 255, 255), 3: (9, 9, 9, 255)})
    with GeoTiffSource(path, tile_size=256) as source:
        tile = source.read_tile(TileId(20, *TMS.tile(CENTER[0] + 0.0002, CENTER[1] - 0.0002, 20)[:2]))
    assert tile is not None and tile.valid.any()
    colours = {tuple(int(v) for v in c) for c in tile.rgb[tile.valid].reshape(-1, 3)}
    assert colours & {(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)}


def test_low_zoom_reads_decimated_and_still_geolocated(rasters: dict[str, Raster]) -> None:
    # At z13 the ~450 m raster is ~35 px across (a decimated read); it may straddle tiles, so read a window.
    tile_id, (px, py) = marker_tile_and_pixel(*CENTER, 13)
    gx, gy = tile_id.x * 256 + px, tile_id.y * 256 + py  # global pixel of the raster's centre
    with GeoTiffSource(rasters["utm"].path) as source:
        window = read_window(source, 13, int(gx) - 40, int(gy) - 40, int(gx) + 40, int(gy) + 40)
    rows, cols = np.nonzero(window.valid)
    assert 30 < cols.max() - cols.min() < 40
    assert abs(int(gx) - 40 + cols.mean() + 0.5 - gx) < 1 and abs(int(gy) - 40 + rows.mean() + 0.5 - gy) < 1


# --------------------------------------------------------------------------------------------------
# XYZ and MBTiles, and agreement between all three kinds


@pytest.mark.parametrize("kind", ["geotiff", "xyz", "mbtiles"])
def test_all_sources_return_the_same_pixels(
    all_sources: dict[str, Callable[[], TileSource]], z17_tiles: dict[TileId, Tile], kind: str
) -> None:
    assert len(z17_tiles) >= 4
    with all_sources[kind]() as source:
        assert isinstance(source, TileSource)
        for tile_id, expected in z17_tiles.items():
            tile = source.read_tile(tile_id)
            assert tile is not None, tile_id
            np.testing.assert_array_equal(tile.rgb[expected.valid], expected.rgb[expected.valid])
            np.testing.assert_array_equal(tile.valid, expected.valid)
            assert tile.rgb.dtype == np.uint8 and tile.rgb.shape == (256, 256, 3)
        west, south, east, north = source.bounds_lonlat()
        assert west < CENTER[0] < east and south < CENTER[1] < north
        assert source.describe()


def test_mbtiles_rows_are_tms_flipped(tmp_path: Path) -> None:
    red = Tile(np.full((256, 256, 3), (200, 10, 10), np.uint8), np.ones((256, 256), bool))
    blue = Tile(np.full((256, 256, 3), (10, 10, 200), np.uint8), np.ones((256, 256), bool))
    path = tmp_path / "flip.mbtiles"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        # XYZ (3, 2, 1) is TMS row 8 - 1 - 1 = 6; a tile stored at row 1 belongs to XYZ y = 6.
        db.execute("INSERT INTO tiles VALUES (3, 2, 6, ?)", (png_bytes(red),))
        db.execute("INSERT INTO tiles VALUES (3, 2, 1, ?)", (png_bytes(blue),))
    with MBTilesSource(path) as source:
        a, b = source.read_tile(TileId(3, 2, 1)), source.read_tile(TileId(3, 2, 6))
        assert source.read_tile(TileId(3, 3, 1)) is None
        assert source.bounds_lonlat() == pytest.approx(
            (*TMS.bounds(2, 6, 3)[:2], *TMS.bounds(2, 1, 3)[2:])  # computed from the rows, no metadata
        )
    assert a is not None and b is not None
    assert tuple(a.rgb[0, 0]) == (200, 10, 10) and tuple(b.rgb[0, 0]) == (10, 10, 200)


def test_mbtiles_metadata_bounds_win(tmp_path: Path, z17_tiles: dict[TileId, Tile]) -> None:
    path = write_mbtiles(tmp_path / "meta.mbtiles", z17_tiles, {"bounds": "11.5,48.1,11.6,48.2", "name": "demo"})
    with MBTilesSource(path) as source:
        assert source.bounds_lonlat() == (11.5, 48.1, 11.6, 48.2)
        assert "demo" in source.describe()


def test_xyz_tiles_of_another_size_are_resized_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for y in (0, 1):
        path = tmp_path / "1" / "0" / f"{y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (512, 512), (30, 120, 60)).save(path, quality=95)
    with caplog.at_level(logging.WARNING, logger="navcache.imagery"), XyzFolderSource(tmp_path) as source:
        tiles = [source.read_tile(TileId(1, 0, y)) for y in (0, 1)]
        assert source.bounds_lonlat() == pytest.approx((-180.0, -85.0511287798, 0.0, 85.0511287798))
    assert all(t is not None and t.rgb.shape == (256, 256, 3) and t.valid.all() for t in tiles)
    assert len([r for r in caplog.records if "resizing" in r.getMessage()]) == 1


# --------------------------------------------------------------------------------------------------
# Windows, blank tiles, hashes


@pytest.mark.parametrize("kind", ["geotiff", "xyz"])
def test_read_window_across_tile_boundaries_equals_the_mosaic(
    all_sources: dict[str, Callable[[], TileSource]], z17_tiles: dict[TileId, Tile], kind: str
) -> None:
    xs = sorted({t.x for t in z17_tiles})
    ys = sorted({t.y for t in z17_tiles})
    x0, y0 = xs[0], ys[0]
    with all_sources[kind]() as source:
        # 2x2 storage tiles around the chosen corner, mosaicked by hand; missing tiles are invalid.
        mosaic_rgb = np.zeros((512, 512, 3), np.uint8)
        mosaic_valid = np.zeros((512, 512), bool)
        for dy in (0, 1):
            for dx in (0, 1):
                tile = source.read_tile(TileId(17, x0 + dx, y0 + dy))
                if tile is not None:
                    mosaic_rgb[dy * 256 : (dy + 1) * 256, dx * 256 : (dx + 1) * 256] = tile.rgb
                    mosaic_valid[dy * 256 : (dy + 1) * 256, dx * 256 : (dx + 1) * 256] = tile.valid
        gx, gy = x0 * 256, y0 * 256
        window = read_window(source, 17, gx + 37, gy + 201, gx + 37 + 300, gy + 201 + 250)
    np.testing.assert_array_equal(window.valid, mosaic_valid[201:451, 37:337])
    np.testing.assert_array_equal(window.rgb[window.valid], mosaic_rgb[201:451, 37:337][window.valid])
    assert window.valid.any()


def test_read_window_marks_missing_tiles_and_the_world_edge_invalid(tmp_path: Path) -> None:
    full = Tile(np.full((256, 256, 3), 90, np.uint8), np.ones((256, 256), bool))
    root = write_xyz(tmp_path, {TileId(1, 0, 0): full})
    with XyzFolderSource(root) as source:
        window = read_window(source, 1, -10, 200, 300, 300)
    assert window.rgb.shape == (100, 310, 3)
    assert window.valid[:56, 10:266].all()  # tile (0, 0) spans y < 256
    assert not window.valid[:, :10].any()  # west of the world
    assert not window.valid[:, 266:].any()  # tile (1, 0) is missing
    assert not window.valid[56:].any()  # tile (0, 1) is missing
    with pytest.raises(ValueError):
        read_window(source, 1, 5, 5, 5, 10)


def test_is_blank() -> None:
    rng = np.random.default_rng(0)
    textured = Tile(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), np.ones((64, 64), bool))
    assert not is_blank(textured)
    flat = Tile(np.full((64, 64, 3), 120, np.uint8), np.ones((64, 64), bool))
    assert is_blank(flat)
    almost_flat = Tile((120 + rng.integers(-1, 2, (64, 64, 3))).astype(np.uint8), np.ones((64, 64), bool))  # std ~0.8
    assert is_blank(almost_flat) and not is_blank(almost_flat, min_std=0.5)
    mostly_nodata = Tile(textured.rgb, np.zeros((64, 64), bool))
    mostly_nodata.valid[:20] = True  # 31 % valid
    assert is_blank(mostly_nodata) and not is_blank(mostly_nodata, min_valid_fraction=0.3)
    assert is_blank(Tile(textured.rgb, np.zeros((64, 64), bool)))
    # Texture hidden under nodata does not count.
    masked_flat = Tile(textured.rgb.copy(), np.ones((64, 64), bool))
    masked_flat.rgb[:, :32] = 120
    masked_flat.valid[:, 32:] = False
    assert is_blank(masked_flat, min_valid_fraction=0.4)


@pytest.mark.parametrize("seed", range(40))
def test_is_blank_decides_as_the_plain_definition_near_the_floor(seed: int) -> None:
    """The subsample shortcut only ever answers sooner: around the contrast floor, with and without nodata,
    ``is_blank`` agrees with the definition (largest per-channel std of the valid pixels below ``min_std``)."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(8, 300))
    spread = float(rng.choice([0.5, 1.0, 2.0, 3.0, 8.0, 40.0]))
    rgb = np.clip(120 + rng.normal(0, spread, (size, size, 3)), 0, 255).astype(np.uint8)
    if seed % 3 == 0:  # a stripe of texture in one corner, the rest flat: the subsample may miss it
        rgb[: size // 8, : size // 8] = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    valid = np.ones((size, size), bool) if seed % 2 else rng.random((size, size)) > 0.3
    tile = Tile(rgb, valid)
    for min_std in (0.5, 1.0, 2.0, 3.0, 6.0):
        pixels = rgb[valid].astype(np.float64)
        expected = valid.mean() < 0.5 or pixels.std(axis=0).max() < min_std
        assert is_blank(tile, min_std=min_std) == expected, (seed, min_std)


def test_tile_content_hash() -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    valid = np.ones((8, 8), bool)
    base = tile_content_hash(Tile(rgb, valid))
    assert base == tile_content_hash(Tile(rgb.copy(), valid.copy()))
    assert len(base) == 64
    changed = rgb.copy()
    changed[0, 0, 0] = 1
    assert tile_content_hash(Tile(changed, valid)) != base
    holes = valid.copy()
    holes[3, 3] = False
    assert tile_content_hash(Tile(rgb, holes)) != base
    assert tile_content_hash(Tile(np.zeros((4, 16, 3), np.uint8), np.ones((4, 16), bool))) != base
    assert tile_content_hash(Tile(rgb[:, ::-1], valid)) == base  # non-contiguous views hash their content


# --------------------------------------------------------------------------------------------------
# Errors


def _assert_readable(error: SourceError, path: Path) -> None:
    text = str(error)
    assert str(path) in text and "Traceback" not in text
    assert error.where == str(path)


@pytest.mark.parametrize("kind", ["geotiff", "mbtiles"])
def test_garbage_files_raise_source_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / ("bad.tif" if kind == "geotiff" else "bad.mbtiles")
    path.write_bytes(b"this is not an image, nor a database " * 100)
    with pytest.raises(SourceError) as info:
        open_tile_source(kind, path, 256)
    _assert_readable(info.value, path)
    assert info.value.hint


def test_truncated_geotiff_raises_source_error(tmp_path: Path, rasters: dict[str, Raster]) -> None:
    path = tmp_path / "truncated.tif"
    path.write_bytes(rasters["utm"].path.read_bytes()[:2000])
    # Depending on where the cut falls, opening or reading fails; either way it is a SourceError.
    with pytest.raises(SourceError) as info, GeoTiffSource(path) as source:
        for tile_id in tiles_of(source, 17):
            source.read_tile(tile_id)
    _assert_readable(info.value, path)


# navcache.imagery filters this warning process-wide, but pytest restores the filters it found before
# collection imported the module, so tests that trigger it say so themselves.
IGNORE_NOT_GEOREFERENCED = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@IGNORE_NOT_GEOREFERENCED
def test_geotiff_without_georeferencing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    with pytest.raises(SourceError, match="no georeferencing") as info:
        GeoTiffSource(path)
    _assert_readable(info.value, path)
    assert "gdal_edit" in (info.value.hint or "")


def test_16_bit_geotiff_is_refused_with_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "u16.tif"
    profile = {"driver": "GTiff", "width": 8, "height": 8, "count": 3, "dtype": "uint16", "crs": "EPSG:32632"}
    with rasterio.open(path, "w", transform=Affine(1, 0, 690000, 0, -1, 5334000), **profile) as dst:
        dst.write(np.ones((3, 8, 8), np.uint16))
    with pytest.raises(SourceError, match="8-bit") as info:
        GeoTiffSource(path)
    assert "gdal_translate" in (info.value.hint or "")


def test_missing_files_and_unknown_kinds(tmp_path: Path) -> None:
    for kind in ("geotiff", "xyz", "mbtiles"):
        with pytest.raises(SourceError, match="not found"):
            open_tile_source(kind, tmp_path / "nope", 256)
    with pytest.raises(SourceError, match="unknown orthophoto source kind") as info:
        open_tile_source("wms", tmp_path, 256)
    assert "geotiff" in (info.value.hint or "")


def test_bad_mbtiles_contents(tmp_path: Path) -> None:
    no_table = tmp_path / "no_table.mbtiles"
    sqlite3.connect(no_table).execute("CREATE TABLE other (a)").connection.close()
    with pytest.raises(SourceError, match="no 'tiles' table"):
        MBTilesSource(no_table)
    empty = write_mbtiles(tmp_path / "empty.mbtiles", {})
    with pytest.raises(SourceError, match="holds no tiles"):
        MBTilesSource(empty)
    vector = write_mbtiles(tmp_path / "vector.mbtiles", {}, {"format": "pbf"})
    with pytest.raises(SourceError, match="not a raster"):
        MBTilesSource(vector)
    with pytest.raises(SourceError, match="not found"):
        MBTilesSource(tmp_path / "nope.mbtiles")
    assert not (tmp_path / "nope.mbtiles").exists()  # read-only: never creates a database


def test_corrupt_tile_image_raises_source_error(tmp_path: Path) -> None:
    path = tmp_path / "5" / "3" / "4.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with XyzFolderSource(tmp_path) as source, pytest.raises(SourceError, match="cannot decode") as info:
        source.read_tile(TileId(5, 3, 4))
    _assert_readable(info.value, path)


def test_empty_xyz_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(SourceError, match="no XYZ zoom levels"):
        XyzFolderSource(tmp_path)


# --------------------------------------------------------------------------------------------------
# Fingerprints, lifecycle, threads


def test_fingerprints_change_with_the_bytes(
    tmp_path: Path, rasters: dict[str, Raster], z17_tiles: dict[TileId, Tile]
) -> None:
    tif = tmp_path / "copy.tif"
    tif.write_bytes(rasters["utm"].path.read_bytes())
    xyz = write_xyz(tmp_path / "xyz", dict(list(z17_tiles.items())[:2]))
    mbt = write_mbtiles(tmp_path / "a.mbtiles", dict(list(z17_tiles.items())[:2]))
    for kind, path in (("geotiff", tif), ("xyz", xyz), ("mbtiles", mbt)):
        with open_tile_source(kind, path, 256) as source:
            before = source.fingerprint()
            assert before == source.fingerprint()
            target = path if path.is_file() else next(path.rglob("*.png"))
            stat = target.stat()
            os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
            assert source.fingerprint() != before, kind


def test_closed_source_refuses_reads(rasters: dict[str, Raster]) -> None:
    source = GeoTiffSource(rasters["utm"].path)
    source.close()
    with pytest.raises(SourceError, match="closed"):
        source.read_tile(TileId(17, *TMS.tile(*CENTER, 17)[:2]))


@IGNORE_NOT_GEOREFERENCED  # rasterio's array warping leaks it under threads (see navcache.imagery)
@pytest.mark.parametrize("kind", ["geotiff", "xyz", "mbtiles"])
def test_concurrent_reads_from_two_threads_match_serial_reads(
    all_sources: dict[str, Callable[[], TileSource]], z17_tiles: dict[TileId, Tile], kind: str
) -> None:
    ids = sorted(z17_tiles)
    with all_sources[kind]() as source:
        serial = {t: tile_content_hash(tile) for t in ids if (tile := source.read_tile(t)) is not None}
        barrier = threading.Barrier(2)

        def worker(order: list[TileId]) -> dict[TileId, str]:
            barrier.wait()
            out = {}
            for _ in range(2):
                for t in order:
                    tile = source.read_tile(t)
                    assert tile is not None
                    out[t] = tile_content_hash(tile)
            return out

        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(worker, [ids, ids[::-1]]))
    assert results[0] == serial and results[1] == serial


# --------------------------------------------------------------------------------------------------
# Raw digests: what the scan memo trusts to skip decoding


def _edit_patch(path: Path, lonlat: tuple[float, float], size: int = 20, *, overviews: bool = False) -> None:
    """Overwrite a ``size``-px square of the raster at ``lonlat`` in place (GDAL rewrites only its blocks)."""
    with rasterio.open(path, "r+") as ds:
        (x,), (y,) = rasterio.warp.transform("EPSG:4326", ds.crs, [lonlat[0]], [lonlat[1]])
        row, col = ds.index(x, y)
        noise = np.random.default_rng(11).integers(1, 256, (ds.count, size, size), dtype=np.uint8)
        ds.write(noise, window=rasterio.windows.Window(col - size // 2, row - size // 2, size, size))
        if overviews:
            ds.build_overviews([2, 4, 8], Resampling.average)


def _snapshot(path: Path, tiles: list[TileId]) -> dict[TileId, tuple[str | None, Tile | None]]:
    with GeoTiffSource(path) as source:
        return {t: (source.raw_digest(t), source.read_tile(t)) for t in tiles}


def _same_tile(a: Tile | None, b: Tile | None) -> bool:
    if a is None or b is None:
        return a is b
    return np.array_equal(a.rgb, b.rgb) and np.array_equal(a.valid, b.valid)


@pytest.mark.parametrize("zoom", [17, 18])
def test_geotiff_raw_digest_changes_exactly_where_the_pixels_may_have(
    tmp_path: Path, rasters: dict[str, Raster], zoom: int
) -> None:
    tif = tmp_path / "edited.tif"
    tif.write_bytes(rasters["utm"].path.read_bytes())
    with GeoTiffSource(tif) as source:
        tiles = [*tiles_of(source, zoom), TileId(zoom, 0, 0)]  # plus one far outside the raster
    before = _snapshot(tif, tiles)
    assert all(d is not None for d, _ in before.values())
    assert before[TileId(zoom, 0, 0)] == ("none", None)
    marker = next(iter(MARKERS.values()))
    _edit_patch(tif, marker)
    after = _snapshot(tif, tiles)
    changed = {t for t in tiles if after[t][0] != before[t][0]}
    edited, _ = marker_tile_and_pixel(*marker, zoom)
    assert edited in changed
    assert not _same_tile(before[edited][1], after[edited][1])
    # Sound: an unchanged digest always means unchanged pixels. Local: most tiles keep their digest.
    for tile in set(tiles) - changed:
        assert _same_tile(before[tile][1], after[tile][1]), tile
    assert len(changed) <= len(tiles) // 2


def test_geotiff_raw_digest_covers_overviews_for_decimated_reads(tmp_path: Path, rasters: dict[str, Raster]) -> None:
    tif = tmp_path / "ovr.tif"
    tif.write_bytes(rasters["utm"].path.read_bytes())
    with rasterio.open(tif, "r+") as ds:
        ds.build_overviews([2, 4, 8], Resampling.average)
    low, _ = marker_tile_and_pixel(*CENTER, 13)  # a decimated read
    far_marker = list(MARKERS.values())[-1]
    high, _ = marker_tile_and_pixel(*CENTER, 18)
    before = _snapshot(tif, [low, high])
    _edit_patch(tif, far_marker, overviews=True)  # far from the z18 tile, inside the z13 one
    after = _snapshot(tif, [low, high])
    assert after[low][0] != before[low][0]
    if after[high][0] == before[high][0]:
        assert _same_tile(before[high][1], after[high][1])


def test_geotiff_inputs_digest_moves_with_the_blocks_its_tiles_read_and_only_with_them(
    tmp_path: Path, rasters: dict[str, Raster]
) -> None:
    tif = tmp_path / "edited.tif"
    tif.write_bytes(rasters["utm"].path.read_bytes())
    edited, _ = marker_tile_and_pixel(*next(iter(MARKERS.values())), 19)
    with GeoTiffSource(tif) as source:
        near = [edited]
        far = [t for t in tiles_of(source, 19) if abs(t.x - edited.x) > 3 or abs(t.y - edited.y) > 3]
        found = {name: source.raw_digests_and_inputs(tiles) for name, tiles in (("near", near), ("far", far))}
        assert all(f is not None and f[1] for f in found.values())
        assert source.raw_digests_and_inputs(near) == found["near"]  # the same digests as raw_digests gives
        assert found["near"][0] == source.raw_digests(near)
        before = {name: source.inputs_digest(f[1]) for name, f in found.items() if f is not None}
        assert source.inputs_digest(["not-a-block"]) is None and source.inputs_digest(["9:0:0"]) is None
    _edit_patch(tif, next(iter(MARKERS.values())))
    with GeoTiffSource(tif) as source:
        after = {name: source.inputs_digest(f[1]) for name, f in found.items() if f is not None}
        assert after["near"] != before["near"] and after["far"] == before["far"]
        assert source.raw_digests(far) == found["far"][0]  # the far tiles' own digests did not move either


def test_geotiff_raw_digest_refuses_when_it_cannot_locate_every_byte(tmp_path: Path) -> None:
    internal = write_raster(tmp_path / "internal.tif", "EPSG:32632", pixel=(0.5, 0.5), mask="internal")
    tile, _ = marker_tile_and_pixel(*CENTER, 18)
    with GeoTiffSource(internal.path) as source:
        assert source.raw_digest(tile) is None  # the mask IFD's blocks are not located
        assert source.read_tile(tile) is not None
    alpha = write_raster(tmp_path / "alpha.tif", "EPSG:32632", pixel=(0.5, 0.5), mask="alpha")
    with GeoTiffSource(alpha.path) as source:
        assert source.raw_digest(tile) is not None
        stat = alpha.path.stat()
        os.utime(alpha.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert source.raw_digest(tile) is None  # edited since it was opened: the block offsets may be stale


@pytest.mark.parametrize("kind", ["xyz", "mbtiles"])
def test_tile_store_raw_digest_is_the_encoded_tile(tmp_path: Path, z17_tiles: dict[TileId, Tile], kind: str) -> None:
    tiles = dict(list(z17_tiles.items())[:3])
    first, second, third = tiles
    path = write_xyz(tmp_path / "xyz", tiles) if kind == "xyz" else write_mbtiles(tmp_path / "a.mbtiles", tiles)
    with open_tile_source(kind, path, 256) as source:
        assert source.raw_digest(first) == blake3.blake3(png_bytes(tiles[first])).hexdigest()
        assert source.raw_digest(TileId(17, 0, 0)) == "none"
        before = {t: source.raw_digest(t) for t in tiles}
    tiles[second] = Tile(255 - tiles[second].rgb, tiles[second].valid)
    path = write_xyz(path, tiles) if kind == "xyz" else write_mbtiles(tmp_path / "b.mbtiles", tiles)
    with open_tile_source(kind, path, 256) as source:
        after = {t: source.raw_digest(t) for t in tiles}
    assert after[second] != before[second]
    assert after[first] == before[first] and after[third] == before[third]


def test_geotiff_batch_digests_and_reads_do_not_depend_on_the_order_plans_were_made(
    rasters: dict[str, Raster],
) -> None:
    with GeoTiffSource(rasters["wgs84"].path) as source:
        tiles = [*tiles_of(source, 17), TileId(17, 0, 0)]
    with GeoTiffSource(rasters["wgs84"].path) as one_by_one, GeoTiffSource(rasters["wgs84"].path) as batched:
        singles = [(one_by_one.raw_digest(t), one_by_one.read_tile(t)) for t in tiles]
        digests = batched.raw_digests(list(reversed(tiles)))
        assert digests is not None and list(reversed(digests)) == [d for d, _ in singles]
        for tile, (_, pixels) in zip(tiles, singles, strict=True):
            assert _same_tile(batched.read_tile(tile), pixels), tile


@pytest.mark.parametrize("kind", ["geotiff", "mbtiles"])
def test_handles_of_ended_threads_are_closed(
    kind: str, rasters: dict[str, Raster], z17_tiles: dict[TileId, Tile], tmp_path: Path
) -> None:
    # A source is shared for a process's lifetime while decode threads come and go.
    path = rasters["utm"].path if kind == "geotiff" else write_mbtiles(tmp_path / "a.mbtiles", z17_tiles)
    tile = next(iter(z17_tiles))
    with open_tile_source(kind, path, 256) as source:
        for _ in range(20):
            reader = threading.Thread(target=source.read_tile, args=(tile,))
            reader.start()
            reader.join()
        assert source.read_tile(tile) is not None
        assert len(source._handles) <= 2  # type: ignore[attr-defined]  # this thread's and at most one ended


def test_a_dropped_geotiff_source_releases_its_block_reader(rasters: dict[str, Raster]) -> None:
    import gc

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        source = GeoTiffSource(rasters["utm"].path)
        assert source.raw_digests([TileId(17, 0, 0)]) == ["none"]
        del source  # never closed: tasks drop a stale source when its file changes
        gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 1


# --------------------------------------------------------------------------------------------------
# Window warping: bounded memory, the same tile whichever tiles were read


def test_gdal_block_cache_is_bounded_once_a_geotiff_opens(rasters: dict[str, Raster]) -> None:
    if "GDAL_CACHEMAX" in os.environ:
        pytest.skip("the environment sets GDAL_CACHEMAX; navcache leaves it alone")
    with GeoTiffSource(rasters["utm"].path) as source:
        source.read_tile(marker_tile_and_pixel(*CENTER, 18)[0])
        assert int(rasterio.env.get_gdal_config("GDAL_CACHEMAX")) <= GDAL_CACHE_BYTES


def test_warped_windows_stay_within_their_budget(rasters: dict[str, Raster], monkeypatch: pytest.MonkeyPatch) -> None:
    import navcache.imagery as imagery

    budget = 4 << 20  # a few of this raster's windows (each clipped to the raster)
    monkeypatch.setattr(imagery, "WINDOW_CACHE_BYTES", budget)
    with GeoTiffSource(rasters["wgs84"].path) as source:
        tiles = tiles_of(source, 19)
        windows = {(t.x // WINDOW_TILES[0], t.y // WINDOW_TILES[1]) for t in tiles}
        first = {t: source.read_tile(t) for t in tiles}
        cache = source._windows
        assert 1 <= len(cache._windows) < len(windows) and cache._bytes <= budget
        # Windows dropped and warped again give the very same tiles.
        for tile in reversed(tiles):
            assert _same_tile(source.read_tile(tile), first[tile]), tile
        # Two shards reading at once keep a working set each; closing their scopes gives the memory back.
        with source.reading(), source.reading():
            for tile in tiles:
                source.read_tile(tile)
            assert budget < cache._bytes <= 2 * budget
        assert cache._bytes <= budget


def test_readers_reading_at_once_do_not_evict_each_others_windows() -> None:
    from navcache.imagery import _Window, _WindowCache, _WindowGrid

    size = 1 << 20
    grid = _WindowGrid(17, 0, 0, 4, 16, 256)
    cache: _WindowCache[str] = _WindowCache(2 * size)  # one reader's working set: two windows
    renders: list[str] = []

    def render(key: str) -> _Window:
        renders.append(key)
        return _Window(grid, {None: ((0, 0, 1, 1), np.zeros(size, np.uint8))})

    def interleaved() -> None:  # two readers, each cycling over its own two windows
        for _ in range(5):
            for key in ("a1", "b1", "a2", "b2"):
                cache.get(key, lambda key=key: render(key))

    interleaved()
    assert len(renders) == 20  # one bound for both: each evicts the other's windows, every read warps again
    renders.clear()
    cache.clear()
    with cache.reader(), cache.reader():
        interleaved()
        assert sorted(renders) == ["a1", "a2", "b1", "b2"]  # each warped once
    assert cache._bytes <= 2 * size and len(cache._windows) == 2  # back to one bound


@pytest.mark.parametrize("crs_key", ["utm", "wgs84"])
def test_read_pixels_warps_a_rectangle_as_its_tiles_show_it(rasters: dict[str, Raster], crs_key: str) -> None:
    with GeoTiffSource(rasters[crs_key].path) as source:
        tiles = tiles_of(source, 18)
        # From outside the raster's north-west corner (nodata rows, no raster) to well inside it.
        x0, y0 = min(t.x for t in tiles) * 256 - 40, min(t.y for t in tiles) * 256 - 40
        box = (x0, y0, x0 + 700, y0 + 500)
        tiled = read_window(source, 18, *box)
        direct = read_pixels(source, 18, *box)
    assert direct.rgb.shape == tiled.rgb.shape and not direct.valid.all() and direct.valid.any()
    assert (direct.valid != tiled.valid).mean() <= 0.002
    both = direct.valid & tiled.valid
    diff = np.abs(direct.rgb.astype(np.int16) - tiled.rgb.astype(np.int16))[both]
    assert diff.mean() <= 0.5 and (diff > 4).mean() <= 0.001


def test_read_pixels_of_a_tile_store_is_read_window(tmp_path: Path, z17_tiles: dict[TileId, Tile]) -> None:
    with open_tile_source("xyz", write_xyz(tmp_path / "xyz", z17_tiles), 256) as source:
        tile = next(iter(z17_tiles))
        box = (tile.x * 256 - 30, tile.y * 256 + 10, tile.x * 256 + 300, tile.y * 256 + 400)
        a, b = read_pixels(source, 17, *box), read_window(source, 17, *box)
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.valid, b.valid)
