"""Inputs shaped like a real crew's: coarse EPSG:4326 orthophotos with a ragged nodata border,
long bending LineString routes with a corridor, truncated GeoTIFFs, and sortie files over them (with the
demo's models and keys). Small and seeded, so tests stay fast and repeatable."""

from __future__ import annotations

import io
import json
import math
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from tests.support.sortie_files import write_document
from tests.support.sorties import Assets, demo_backbones

M_PER_DEG_LAT = 110_574.0
M_PER_DEG_LON_EQUATOR = 111_320.0


def degrees_per_px(m_per_px: float, lat: float) -> tuple[float, float]:
    """(dx, dy): the longitude and latitude steps of ``m_per_px`` on the ground at latitude ``lat``."""
    return m_per_px / (M_PER_DEG_LON_EQUATOR * math.cos(math.radians(lat))), m_per_px / M_PER_DEG_LAT


def rgb_geotiff_profile(
    width: int, height: int, *, west: float, north: float, dx: float, dy: float, nodata: int
) -> dict[str, Any]:
    """The rasterio profile of a north-up RGB uint8 GeoTIFF in EPSG:4326, tiled 256 x 256, DEFLATE, with
    ``nodata`` declared: how real orthophotos are delivered."""
    return {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": from_origin(west, north, dx, dy),
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "photometric": "RGB",
    }


def _smooth(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1): a coarse random grid resized bilinearly."""
    coarse = rng.random((max(2, height // cells), max(2, width // cells)), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def coarse_orthophoto(
    path: Path,
    *,
    west: float,
    south: float,
    east: float,
    north: float,
    m_per_px: float = 100.0,
    nodata: int = 255,
    ragged: bool = True,
    all_nodata: bool = False,
    seed: int = 0,
) -> Path:
    """An RGB uint8 GeoTIFF in EPSG:4326 over the box, ``m_per_px`` on the ground (square at the box's
    centre latitude), textured (fields, lakes), with ``nodata`` (declared in the file) outside a ragged
    ellipse when ``ragged`` and everywhere when ``all_nodata``. Tiled 256 x 256, DEFLATE."""
    lat_c = (south + north) / 2
    dx, dy = degrees_per_px(m_per_px, lat_c)
    width, height = max(4, math.ceil((east - west) / dx)), max(4, math.ceil((north - south) / dy))
    rng = np.random.default_rng(seed)
    base = _smooth(rng, height, width, 8) * 150 + _smooth(rng, height, width, 2) * 60 + rng.random((height, width)) * 40
    rgb = np.stack([base * 0.8, base, base * 0.6]).astype(np.float32)
    lakes = _smooth(rng, height, width, 16) > 0.8
    rgb[:, lakes] = np.array([30, 60, 110], np.float32)[:, None]
    pixels = np.clip(rgb, 0, 254).astype(np.uint8)
    if nodata != 255:
        pixels[pixels == nodata] = (nodata + 1) % 256
    if ragged:
        rows, cols = np.mgrid[0:height, 0:width]
        u, v = (cols + 0.5) / width * 2 - 1, (rows + 0.5) / height * 2 - 1
        angle = np.arctan2(v, u)
        wobble = 0.85 + 0.08 * np.sin(5 * angle + seed) + 0.05 * np.sin(13 * angle)
        pixels[:, np.hypot(u, v) > wobble] = nodata
    if all_nodata:
        pixels[:] = nodata
    profile = rgb_geotiff_profile(width, height, west=west, north=north, dx=dx, dy=dy, nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


def truncated_copy(source: Path, target: Path, keep: float = 0.5) -> Path:
    """The first ``keep`` of ``source``'s bytes: a download or copy that stopped early (the header is
    intact, so GDAL opens it; the blocks past the cut are gone)."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def bending_route(
    start_lon: float,
    start_lat: float,
    length_km: float,
    *,
    heading_deg: float = 80.0,
    bend_km: float = 6.0,
    swing_deg: float = 50.0,
    step_km: float = 0.5,
) -> dict[str, Any]:
    """A GeoJSON LineString that winds like a trail: ``length_km`` long, its heading swinging by up to
    ``swing_deg`` around ``heading_deg`` every ``bend_km``."""
    points = [(start_lon, start_lat)]
    lon, lat = start_lon, start_lat
    steps = max(2, round(length_km / step_km))
    for i in range(1, steps + 1):
        along = i * step_km
        heading = math.radians(heading_deg + swing_deg * math.sin(2 * math.pi * along / bend_km))
        lat += step_km * 1000 * math.cos(heading) / M_PER_DEG_LAT
        lon += step_km * 1000 * math.sin(heading) / (M_PER_DEG_LON_EQUATOR * math.cos(math.radians(lat)))
        points.append((round(lon, 7), round(lat, 7)))
    return {"type": "LineString", "coordinates": [list(p) for p in points]}


def route_sortie(
    path: Path,
    assets: Assets,
    *,
    route: dict[str, Any],
    corridor_m: float,
    orthophoto: Path,
    cache_dir: Path,
    kind: str = "geotiff",
    zoom: int = 14,
    threshold: float = 99.0,
    budget: int = 250_000,
    tiles_extra: str = "",
) -> Path:
    """A sortie file flying ``route`` (takeoff at its first point) over ``orthophoto`` (``kind``: geotiff,
    xyz or mbtiles) with the demo's two backbones and keys; ``tiles_extra`` is TOML text whose keys are
    added to ``[tiles]``."""
    lon, lat = route["coordinates"][0]
    doc: dict[str, Any] = {
        "sortie_id": f"route-{path.stem}",
        "runtime": "onnx_trt_ep",
        "cache_dir": str(cache_dir),
        "signing_key": str(assets.signing_key),
        "trusted_keys": str(assets.trusted_keys),
        "coverage_threshold": threshold,
        "takeoff": {"lat": lat, "lon": lon},
        "area": {"corridor_m": corridor_m, "geojson": json.dumps(route)},
        "tiles": {"zoom": zoom, "size": 256, "budget": budget} | tomllib.loads(tiles_extra),
        "orthophoto": {kind: str(orthophoto)},
        "backbones": demo_backbones(assets.vpr_onnx, assets.local_onnx),
    }
    return write_document(path, doc)


TilePngs = dict[tuple[int, int, int], bytes]


def cut_tiles(orthophoto: Path, zooms: range, tile_size: int = 256) -> TilePngs:
    """What ``gdal2tiles.py --xyz`` makes of ``orthophoto``: RGBA PNGs of every tile with valid pixels,
    by (z, x, y)."""
    from navcache.imagery import GeoTiffSource
    from navcache.tiles import tile_for_lonlat
    from navcache.types import TileId

    out = {}
    with GeoTiffSource(orthophoto, tile_size) as source:
        west, south, east, north = source.bounds_lonlat()
        for z in zooms:
            top_left, bottom_right = tile_for_lonlat(west, north, z), tile_for_lonlat(east, south, z)
            for x in range(top_left.x, bottom_right.x + 1):
                for y in range(top_left.y, bottom_right.y + 1):
                    tile = source.read_tile(TileId(z, x, y))
                    if tile is None or not tile.valid.any():
                        continue
                    rgba = np.dstack([tile.rgb, tile.valid.astype(np.uint8) * 255])
                    buffer = io.BytesIO()
                    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=1)
                    out[(z, x, y)] = buffer.getvalue()
    return out


def xyz_folder(tiles: TilePngs, folder: Path) -> Path:
    """An XYZ tile folder ``{z}/{x}/{y}.png`` of ``tiles`` (see :func:`cut_tiles`)."""
    for (z, x, y), data in tiles.items():
        target = folder / str(z) / str(x) / f"{y}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder


def mbtiles_file(tiles: TilePngs, path: Path) -> Path:
    """An MBTiles file (TMS rows, png) of ``tiles`` (see :func:`cut_tiles`)."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        db.executemany("INSERT INTO metadata VALUES (?, ?)", [("name", path.stem), ("format", "png")])
        db.executemany(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)",
            [(z, x, (1 << z) - 1 - y, data) for (z, x, y), data in tiles.items()],
        )
    return path
