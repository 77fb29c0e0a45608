"""The coverage map people can read: the orthophoto underneath, each tile tinted by its status (green covered,
grey blank, red and hatched missing), the tile grid, the area or corridor outline, the takeoff, corner
coordinates and a scale bar. The coverage task writes it next to the coverage table; the run's artifact
shows the same picture through :func:`compact_png`.

:func:`compact_png` re-encodes a picture for embedding (base64, in a Prefect markdown artifact): a 256-colour
palette PNG, shrunk until it fits a byte budget. Prefect sends an artifact's whole markdown in its
``prefect.artifact-collection.*`` event, and the server drops any event above
``PREFECT_EVENTS_MAXIMUM_SIZE_BYTES`` (1.5 MB by default); the full-colour map of a 1024 px photo is larger
than that once base64-encoded. :data:`MAX_EMBEDDED_PNG_BYTES` keeps every embedded picture at a third of that
limit, whatever the sortie's size or the photo's detail.

:func:`navcache.coverage_walk.render_coverage_png` stays the flat, exact-colour map (one colour per tile, for
machines and tests); this draws the picture for the crew over the same layout.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .coverage_walk import _BY_PRIORITY, _HEADER_PX, _MIN_WIDTH_PX, _PRIORITY, COLORS, CoverageReport, _layout
from .imagery import TileSource, read_pixels
from .tiles import lat_to_px, lon_to_px, tile_bounds
from .types import TileId

#: At most this many imagery tiles are read for the thumbnail (at a lower zoom when the area is larger).
MAX_BACKGROUND_TILES = 256
_FOOTER_PX = 38
_TINT_ALPHA = 0.45
_EARTH_CIRCUMFERENCE_M = 40_075_016.686
#: The most bytes :func:`compact_png` returns (before base64, which adds a third).
MAX_EMBEDDED_PNG_BYTES = 400_000
#: Each shrinking step of :func:`compact_png` scales both sides by this much.
_SHRINK = 0.75


def render_coverage_map(
    report: CoverageReport,
    grid: Any = None,
    takeoff_lonlat: tuple[float, float] | None = None,
    *,
    area: Any = None,
    source: TileSource | None = None,
    max_px: int = 1024,
) -> bytes:
    """PNG bytes of the map. ``area`` is a shapely geometry in lon/lat (the area, or the corridor around a
    route); ``source`` the orthophoto (omitted: a white background). Same inputs → same bytes."""
    zoom = report.zoom
    xy = report.tile_xy
    x_min, y_min, reduce, scale, cells_w, cells_h = _layout(report, max_px)
    map_w, map_h = cells_w * scale, cells_h * scale
    prio = np.zeros((cells_h, cells_w), dtype=np.uint8)
    if len(xy):
        np.maximum.at(prio, ((xy[:, 1] - y_min) // reduce, (xy[:, 0] - x_min) // reduce), _PRIORITY[report.codes])
    cells = prio.repeat(scale, axis=0).repeat(scale, axis=1)

    photo = _thumbnail(source, zoom, x_min, y_min, cells_w * reduce, cells_h * reduce, (map_w, map_h))
    # One float image, blended in place (the map's size, whatever the number of tiles): the photo tinted by
    # each tile's status inside the area, faded outside it.
    rgb = photo.astype(np.float32) if photo is not None else np.full((map_h, map_w, 3), 255.0, np.float32)
    palette = np.array([COLORS[name] for name in _BY_PRIORITY], dtype=np.float32)
    inside = cells > 0
    rgb[inside] = (1 - _TINT_ALPHA) * rgb[inside] + _TINT_ALPHA * palette[cells[inside]]
    outside = ~inside
    rgb[outside] = 0.5 * rgb[outside] + 0.5 * 255.0
    del inside, outside
    if scale >= 6:  # hatch missing tiles, so they read without colour too
        diagonal = (np.arange(map_h, dtype=np.int32)[:, None] + np.arange(map_w, dtype=np.int32)[None, :]) % 8 < 2
        rgb[diagonal & (cells == _BY_PRIORITY.index("missing"))] = COLORS["missing"]
    width = max(map_w, _MIN_WIDTH_PX)
    canvas = Image.new("RGB", (width, _HEADER_PX + map_h + _FOOTER_PX), COLORS["outside"])
    canvas.paste(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB"), (0, _HEADER_PX))
    draw = ImageDraw.Draw(canvas, "RGBA")
    font = ImageFont.load_default()

    def to_px(lon: float, lat: float) -> tuple[float, float]:
        n = 1 << zoom
        return (
            (float(lon_to_px(lon, n)) - x_min) / reduce * scale,
            (float(lat_to_px(lat, n)) - y_min) / reduce * scale + _HEADER_PX,
        )

    _grid_lines(draw, cells_w, cells_h, scale, reduce)
    if area is not None:
        _outline(draw, area, to_px)
    _header(draw, font, report, grid, takeoff_lonlat is not None)
    if takeoff_lonlat is not None:
        px, py = to_px(*takeoff_lonlat)
        r = max(5, min(12, scale // 2))
        draw.ellipse((px - r, py - r, px + r, py + r), outline=(255, 255, 255), width=5)
        draw.ellipse((px - r, py - r, px + r, py + r), outline=COLORS["takeoff"], width=3)
        draw.line((px - r - 4, py, px + r + 4, py), fill=COLORS["takeoff"], width=1)
        draw.line((px, py - r - 4, px, py + r + 4), fill=COLORS["takeoff"], width=1)
        draw.text((px + r + 3, py - r - 2), "takeoff", fill=COLORS["takeoff"], font=font)
    _footer(draw, font, zoom, x_min, y_min, cells_w * reduce, cells_h * reduce, map_w, map_h, reduce, scale)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def compact_png(png: bytes, max_bytes: int = MAX_EMBEDDED_PNG_BYTES) -> bytes:
    """``png`` as a 256-colour palette PNG (no dithering: flat tints and text stay crisp) of at most
    ``max_bytes``: at full size when it fits, else shrunk step by step (a noisy 1024 px photo needs one or
    two steps). Same input → same bytes. Raises ValueError when ``max_bytes`` cannot hold even a 16 px
    picture."""
    original = Image.open(io.BytesIO(png)).convert("RGB")
    image, (width, height) = original, original.size
    while True:
        palette = image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        # zlib's default level: a 1000 px coverage map in 0.1 s and 3 % more bytes than level 9 (0.6 s),
        # which every run, warm ones included, would pay again.
        palette.save(buffer, format="PNG", compress_level=6)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
        width, height = int(width * _SHRINK), int(height * _SHRINK)
        if min(width, height) < 16:
            raise ValueError(
                f"compact_png: a {original.width}x{original.height} picture does not fit {max_bytes} bytes even at "
                "16 px; raise max_bytes"
            )
        image = original.resize((width, height), Image.Resampling.LANCZOS)


def _thumbnail(
    source: TileSource | None, zoom: int, x0: int, y0: int, width_t: int, height_t: int, size: tuple[int, int]
) -> np.ndarray | None:
    """The orthophoto under the map's tiles, resized to ``size``: read at the coarsest zoom still at least as
    fine as the map, over at most MAX_BACKGROUND_TILES of its tiles (a large area is read at a lower zoom, never
    tile by tile), as one pixel rectangle (:func:`navcache.imagery.read_pixels`: a GeoTIFF warps just that,
    keeping no warped windows; a tile store mosaics its tiles). Nodata is white."""
    if source is None:
        return None

    def tiles_at(level: int) -> int:
        k = zoom - level
        return (((x0 + width_t - 1) >> k) - (x0 >> k) + 1) * (((y0 + height_t - 1) >> k) - (y0 >> k) + 1)

    def as_fine_as_the_map(level: int) -> bool:
        step = source.tile_size / (1 << (zoom - level))
        return width_t * step >= size[0] and height_t * step >= size[1]

    level = zoom
    while level > 0 and (tiles_at(level) > MAX_BACKGROUND_TILES or as_fine_as_the_map(level - 1)):
        level -= 1
    step = source.tile_size / (1 << (zoom - level))  # level-`level` pixels per map tile
    left, top = x0 * step, y0 * step
    box = (int(left), int(top), math.ceil(left + width_t * step), math.ceil(top + height_t * step))
    try:
        photo = read_pixels(source, level, *box)
    except Exception:  # a picture, not a check: the map is drawn without the photo underneath
        return None
    if not photo.valid.any():
        return None
    pixels = np.where(photo.valid[..., None], photo.rgb, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(pixels, "RGB").resize(size, Image.Resampling.BILINEAR))


def _grid_lines(draw: ImageDraw.ImageDraw, cells_w: int, cells_h: int, scale: int, reduce: int) -> None:
    """Tile boundaries; on a dense map every n-th one, at least 16 px apart."""
    every = max(1, math.ceil(16 / scale))
    colour = (30, 30, 30, 90)
    for cx in range(0, cells_w + 1, every):
        x = min(cx * scale, cells_w * scale - 1)
        draw.line((x, _HEADER_PX, x, _HEADER_PX + cells_h * scale - 1), fill=colour, width=1)
    for cy in range(0, cells_h + 1, every):
        y = min(cy * scale, cells_h * scale - 1) + _HEADER_PX
        draw.line((0, y, cells_w * scale - 1, y), fill=colour, width=1)


def _rings(geometry: Any) -> list[list[tuple[float, float]]]:
    kind = geometry.geom_type
    if kind == "Polygon":
        return [list(geometry.exterior.coords), *[list(ring.coords) for ring in geometry.interiors]]
    if kind in ("LineString", "LinearRing"):
        return [list(geometry.coords)]
    if hasattr(geometry, "geoms"):
        return [ring for part in geometry.geoms for ring in _rings(part)]
    return []


def _outline(draw: ImageDraw.ImageDraw, area: Any, to_px: Any) -> None:
    for ring in _rings(area):
        points = [to_px(lon, lat) for lon, lat, *_ in ring]
        if len(points) > 1:
            draw.line(points, fill=(255, 255, 255, 255), width=4)
            draw.line(points, fill=(255, 200, 0, 255), width=2)


def _header(draw: ImageDraw.ImageDraw, font: Any, report: CoverageReport, grid: Any, takeoff: bool) -> None:
    verdict = "PASS" if report.passed else "FAIL"
    layout = f", span {grid.span}, overlap {grid.overlap:g}" if grid is not None else ""
    title = f"coverage z{report.zoom}{layout}: {report.percent:.2f}% (threshold {report.threshold:g}%) {verdict}"
    draw.text((4, 2), title, fill=COLORS["text"], font=font)
    x = 4
    legend = [
        ("covered", report.covered),
        ("blank (no detail)", report.blank),
        ("missing (no imagery)", report.missing),
    ]
    for (name, count), key in zip(legend, ("covered", "blank", "missing"), strict=True):
        draw.rectangle((x, 20, x + 9, 29), fill=COLORS[key], outline=COLORS["text"])
        label = f"{name} {count:,}"
        draw.text((x + 13, 18), label, fill=COLORS["text"], font=font)
        x += 13 + int(draw.textlength(label, font=font)) + 12
    draw.rectangle((x, 20, x + 9, 29), outline=(255, 200, 0), width=2)
    draw.text((x + 13, 18), "area", fill=COLORS["text"], font=font)
    x += 13 + int(draw.textlength("area", font=font)) + 12
    if takeoff:
        draw.ellipse((x, 20, x + 9, 29), outline=COLORS["takeoff"], width=2)
        draw.text((x + 13, 18), "takeoff", fill=COLORS["text"], font=font)


def _nice_length(max_m: float) -> float:
    """The largest 1, 2 or 5 times 10^k metres not above ``max_m``."""
    exponent = math.floor(math.log10(max_m))
    for step in (5, 2, 1):
        if step * 10**exponent <= max_m:
            return float(step * 10**exponent)
    return float(10 ** (exponent - 1) * 5)


def _footer(
    draw: ImageDraw.ImageDraw,
    font: Any,
    zoom: int,
    x0: int,
    y0: int,
    width_t: int,
    height_t: int,
    map_w: int,
    map_h: int,
    reduce: int,
    scale: int,
) -> None:
    n = (1 << zoom) - 1
    west, _, _, north = tile_bounds(TileId(zoom, x0, y0))
    _, south, east, _ = tile_bounds(TileId(zoom, min(n, x0 + width_t - 1), min(n, y0 + height_t - 1)))
    top = _HEADER_PX + map_h + 4
    lat = (north + south) / 2
    metres_per_px = _EARTH_CIRCUMFERENCE_M * math.cos(math.radians(lat)) / (1 << zoom) * reduce / scale
    length_m = _nice_length(max(1e-3, metres_per_px * min(map_w, 400) / 3))
    bar = round(length_m / metres_per_px)
    draw.rectangle((4, top + 4, 4 + bar, top + 9), fill=COLORS["text"])
    draw.rectangle((4 + bar // 2, top + 5, 4 + bar, top + 8), fill=(255, 255, 255))
    label = f"{length_m / 1000:g} km" if length_m >= 1000 else f"{length_m:g} m"
    draw.text((8 + bar, top + 1), label, fill=COLORS["text"], font=font)
    corners = f"NW {_lat(north)} {_lon(west)}   SE {_lat(south)} {_lon(east)}   z{zoom}"
    draw.text((4, top + 16), corners, fill=COLORS["text"], font=font)


def _lat(value: float) -> str:
    return f"{abs(value):.5f} {'N' if value >= 0 else 'S'}"


def _lon(value: float) -> str:
    return f"{abs(value):.5f} {'E' if value >= 0 else 'W'}"
