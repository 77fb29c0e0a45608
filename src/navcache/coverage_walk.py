"""The coverage walk: classify every storage tile of the area as covered, blank or missing.

* **covered** — at least one chunk that overlaps the tile has a descriptor;
* **blank** — not covered, and the imagery step looked at a chunk over it and found it blank (mostly nodata,
  or near-uniform: see :class:`navcache_runtime.coverage.TileStatus`): there is nothing to localise against,
  and more of the same imagery will not help;
* **missing** — anything else: no chunk over the tile was described or found blank (no imagery there).

``percent = covered / total * 100`` is compared with the sortie's threshold. The report's digest is
:func:`navcache_runtime.coverage.coverage_digest` over every (tile, status), the same function the
onboard verifier re-derives in operator mode.

JSON form (``CoverageReport.to_json``)::

    {"format": "navcache.coverage_walk/1", "zoom": 17,
     "counts": {"total": N, "covered": C, "blank": B, "missing": M},
     "percent": 99.2, "threshold": 99.0, "passed": true, "digest": "<sha256 hex>",
     "status_codes": {"0": "covered", "1": "missing", "2": "blank"},
     "tiles": [[z, x, y, code], ...]}            # sorted by (z, x, y)

Status codes are :class:`navcache_runtime.coverage.TileStatus` values, the same encoding as the shards'
``.tiles.npy`` (where ``DESCRIBED`` = ``COVERED`` = 0).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from navcache_runtime.coverage import COVERAGE_STATUSES, TileStatus, coverage_digest_arrays

from .errors import CoverageError
from .tiles import ChunkGrid, array_to_tiles, lat_to_px, lon_to_px, tiles_to_array
from .types import TileId

logger = logging.getLogger(__name__)

FORMAT = "navcache.coverage_walk/1"
COVERED, MISSING, BLANK = TileStatus.COVERED, TileStatus.MISSING, TileStatus.BLANK
STATUS_CODES: dict[int, str] = {int(status): status.label for status in TileStatus}
_JSON_ROWS = 65_536  # tile rows formatted per block by CoverageReport.to_json_bytes

# map colours (RGB)
COLORS: dict[str, tuple[int, int, int]] = {
    "covered": (46, 160, 67),
    "blank": (160, 160, 160),
    "missing": (214, 39, 40),
    "outside": (255, 255, 255),
    "takeoff": (31, 90, 230),
    "text": (20, 20, 20),
}


@dataclass(frozen=True, eq=False)
class CoverageReport:
    """Coverage of one zoom's storage tiles. Tile arrays are sorted by (x, y) and read-only."""

    zoom: int
    total: int
    covered: int
    blank: int
    missing: int
    percent: float
    threshold: float
    passed: bool
    digest: str
    tile_xy: np.ndarray = field(repr=False)  # (N, 2) int64 [x, y]
    codes: np.ndarray = field(repr=False)  # (N,) uint8 status codes (see STATUS_CODES)

    @cached_property
    def missing_tiles(self) -> tuple[TileId, ...]:
        return tuple(array_to_tiles(self.tile_xy[self.codes == MISSING], self.zoom))

    @cached_property
    def blank_tiles(self) -> tuple[TileId, ...]:
        return tuple(array_to_tiles(self.tile_xy[self.codes == BLANK], self.zoom))

    def statuses(self) -> Iterator[tuple[tuple[int, int, int], str]]:
        """``((z, x, y), status)`` for every tile, sorted: the rows the digest is computed over."""
        names = [STATUS_CODES[c] for c in self.codes.tolist()]
        tiles = zip(itertools.repeat(self.zoom), self.tile_xy[:, 0].tolist(), self.tile_xy[:, 1].tolist())
        return zip(tiles, names, strict=True)

    def status_of(self, tile: TileId) -> str | None:
        """The status of one tile, or None when it is not part of the area."""
        if tile.z != self.zoom or not len(self.codes):
            return None
        keys = _keys(self.tile_xy, self.zoom)
        key = (tile.x << self.zoom) | tile.y
        i = int(np.searchsorted(keys, key))
        return STATUS_CODES[int(self.codes[i])] if i < len(keys) and keys[i] == key else None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CoverageReport):
            return NotImplemented
        return (
            (self.zoom, self.digest, self.threshold, self.passed)
            == (other.zoom, other.digest, other.threshold, other.passed)
            and np.array_equal(self.tile_xy, other.tile_xy)
            and np.array_equal(self.codes, other.codes)
        )

    __hash__ = None  # type: ignore[assignment]

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"coverage {self.percent:.2f}% (threshold {self.threshold:g}%) {verdict}: "
            f"{self.covered:,} covered, {self.blank:,} blank, {self.missing:,} missing of {self.total:,} tiles"
        )

    def failure(self, where: str | None = None) -> CoverageError:
        """The error a run below the threshold stops with; its hint tells blank tiles (the imagery is there
        but nodata or near-uniform: more of it will not help) from missing ones (no imagery there)."""

        def tiles(n: int) -> str:
            return f"{n:,} tile" + ("" if n == 1 else "s")

        fixes = []
        if self.missing:
            fixes.append(f"extend the orthophoto over the {tiles(self.missing)} it does not reach (missing)")
        if self.blank:
            fixes.append(
                f"the imagery is nodata or near-uniform over {tiles(self.blank)} (blank): use imagery with "
                "detail there, or lower [orthophoto] blank_std if it is faint but usable"
            )
        fixes.append("or lower coverage_threshold (the previous manifest stays in force)")
        return CoverageError(
            f"coverage {self.percent:.2f} % is below the threshold {self.threshold:g} % "
            f"({self.missing:,} missing, {self.blank:,} blank of {tiles(self.total)})",
            where=where,
            hint="; ".join(fixes),
        )

    def manifest_fields(self, table_relpath: str) -> dict[str, Any]:
        """The signed aggregate (integers only) the manifest carries; ``table_relpath`` names the table."""
        return {
            "digest": self.digest,
            "total": self.total,
            "covered": self.covered,
            "percent_x100": round(self.percent * 100),
            "path": table_relpath,
        }

    def to_json(self) -> dict[str, Any]:
        rows = self._rows()
        return {**self.to_json_header(), "tiles": rows.tolist()}

    def to_json_bytes(self) -> bytes:
        """``json.dumps(self.to_json(), separators=(",", ":")).encode()``, byte for byte (the table's
        on-disk form), without a Python list per tile: rows are formatted ``_JSON_ROWS`` at a time, so the
        step holds little more than the output itself (about 20 bytes per tile)."""
        rows = self._rows()
        blocks = [
            json.dumps(rows[i : i + _JSON_ROWS].tolist(), separators=(",", ":"))[1:-1]
            for i in range(0, len(rows), _JSON_ROWS)
        ]
        # "tiles" is the last key of to_json: its rows go just before the header's closing brace.
        text = json.dumps(self.to_json_header(), separators=(",", ":"))
        return (text[:-1] + ',"tiles":[' + ",".join(blocks) + "]}").encode()

    def _rows(self) -> np.ndarray:
        """(N, 4) int64 [z, x, y, code]: the table's rows."""
        zooms = np.full(len(self.codes), self.zoom, dtype=np.int64)
        return np.column_stack((zooms, self.tile_xy, self.codes.astype(np.int64)))

    def to_json_header(self) -> dict[str, Any]:
        """:meth:`to_json` without the ``tiles`` rows."""
        return {
            "format": FORMAT,
            "zoom": self.zoom,
            "counts": {"total": self.total, "covered": self.covered, "blank": self.blank, "missing": self.missing},
            "percent": self.percent,
            "threshold": self.threshold,
            "passed": self.passed,
            "digest": self.digest,
            "status_codes": {str(k): v for k, v in STATUS_CODES.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, verify: bool = True) -> CoverageReport:
        """Rebuild a report. Counts are recomputed and must match; with ``verify`` the digest too
        (about 1 s per million tiles), without it the stored digest is kept as is."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a coverage report of format {FORMAT!r}: {data.get('format')!r}")
        expected_codes = {str(k): v for k, v in STATUS_CODES.items()}
        if data.get("status_codes", expected_codes) != expected_codes:
            raise ValueError(f"coverage report uses status codes {data.get('status_codes')}, expected {expected_codes}")
        zoom = int(data["zoom"])
        rows = np.asarray(data["tiles"], dtype=np.int64).reshape(-1, 4)
        if rows.size and np.any(rows[:, 0] != zoom):
            raise ValueError(f"coverage report mixes zoom levels; expected only zoom {zoom}")
        if rows.size and (rows[:, 3].min() < 0 or rows[:, 3].max() >= len(COVERAGE_STATUSES)):
            raise ValueError(f"unknown status code in coverage report; codes are {STATUS_CODES}")
        stored = str(data.get("digest"))
        codes = rows[:, 3].astype(np.uint8)
        report = _build(zoom, rows[:, 1:3], codes, float(data["threshold"]), digest=None if verify else stored)
        counts = data.get("counts", {})
        mine = {"total": report.total, "covered": report.covered, "blank": report.blank, "missing": report.missing}
        if {k: counts.get(k) for k in mine} != mine:
            raise ValueError(f"coverage counts {dict(counts)} do not match the tiles {mine}")
        if report.digest != stored:
            raise ValueError("coverage digest does not match the tiles")
        return report


def _keys(xy: np.ndarray, zoom: int) -> np.ndarray:
    return (xy[:, 0] << zoom) | xy[:, 1]


def _build(zoom: int, xy: np.ndarray, codes: np.ndarray, threshold: float, digest: str | None) -> CoverageReport:
    """Sort, check uniqueness, count and digest. ``digest=None`` computes it."""
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 100.0):
        raise ValueError(f"threshold must be a percentage in [0, 100], got {threshold!r}")
    xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    keys = _keys(xy, zoom)
    order = np.argsort(keys, kind="stable")
    keys, xy, codes = keys[order], xy[order], np.asarray(codes, dtype=np.uint8)[order]
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if dup.size:
        x, y = xy[dup[0]]
        raise ValueError(f"tile {zoom}/{x}/{y} appears twice in the storage tiles")
    counts = np.bincount(codes, minlength=len(COVERAGE_STATUSES))
    total = len(codes)
    covered = int(counts[COVERED])
    percent = covered / total * 100.0 if total else 0.0  # an empty area proves nothing: 0 %
    if digest is None:
        digest = coverage_digest_arrays(zoom, xy, codes)  # vectorised: same bytes as coverage_digest
    xy.flags.writeable = False
    codes.flags.writeable = False
    return CoverageReport(
        zoom=zoom,
        total=total,
        covered=covered,
        blank=int(counts[BLANK]),
        missing=int(counts[MISSING]),
        percent=percent,
        threshold=float(threshold),
        passed=bool(total) and percent >= threshold,
        digest=digest,
        tile_xy=xy,
        codes=codes,
    )


def _chunk_footprint_keys(grid: ChunkGrid, chunks: np.ndarray) -> np.ndarray:
    """Keys of every storage tile each chunk overlaps (a chunk spans at most span+1 tiles per axis)."""
    if not len(chunks):
        return np.zeros(0, dtype=np.int64)
    n = grid.chunks_per_axis
    if chunks.min() < 0 or chunks.max() >= n:
        raise ValueError(f"chunk index outside the zoom-{grid.zoom} chunk grid (0..{n - 1})")
    s, c, t, last = grid.stride_px, grid.chunk_px, grid.tile_size, grid.tiles_per_axis - 1
    x0 = chunks[:, 0] * s // t
    y0 = chunks[:, 1] * s // t
    x1 = np.minimum((chunks[:, 0] * s + c - 1) // t, last)
    y1 = np.minimum((chunks[:, 1] * s + c - 1) // t, last)
    reach = -(-c // t) + 1  # most tiles one chunk can overlap per axis
    out = []
    for dx in range(reach):
        for dy in range(reach):
            ok = (x0 + dx <= x1) & (y0 + dy <= y1)
            out.append(((x0[ok] + dx) << grid.zoom) | (y0[ok] + dy))
    return np.concatenate(out)  # duplicates are harmless to _hits; np.unique would cost more than it saves


def _hits(sorted_keys: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """Boolean mask over ``sorted_keys``: which of them occur in ``probe``."""
    mask = np.zeros(len(sorted_keys), dtype=bool)
    if not len(sorted_keys) or not len(probe):
        return mask
    idx = np.searchsorted(sorted_keys, probe)
    ok = idx < len(sorted_keys)
    idx = idx[ok]
    idx = idx[sorted_keys[idx] == probe[ok]]
    mask[idx] = True
    return mask


def coverage_walk(
    grid: ChunkGrid,
    storage_tiles: Sequence[TileId] | np.ndarray,
    described: Iterable[TileId] | np.ndarray,
    blank: Iterable[TileId] | np.ndarray,
    threshold: float,
) -> CoverageReport:
    """Classify every storage tile of the area (see the module docstring).

    ``storage_tiles`` are the area's XYZ tiles (``grid.storage_tiles_for_area``); ``described`` the chunks
    that have a descriptor; ``blank`` the chunks the imagery step found blank. All at ``grid.zoom``;
    arrays of ``[x, y]`` or ``[z, x, y]`` rows are accepted too (the fast path for large areas)."""
    zoom = grid.zoom
    tiles = tiles_to_array(storage_tiles, zoom)
    if len(tiles) and (tiles.min() < 0 or tiles.max() >= grid.tiles_per_axis):
        raise ValueError(f"storage tile index outside the zoom-{zoom} grid (0..{grid.tiles_per_axis - 1})")
    keys = np.sort(_keys(tiles, zoom))
    covered = _hits(keys, _chunk_footprint_keys(grid, tiles_to_array(described, zoom)))
    blanked = _hits(keys, _chunk_footprint_keys(grid, tiles_to_array(blank, zoom))) & ~covered
    codes = np.full(len(keys), MISSING, dtype=np.uint8)
    codes[covered] = COVERED
    codes[blanked] = BLANK
    xy = np.column_stack((keys >> zoom, keys & ((1 << zoom) - 1)))
    report = _build(zoom, xy, codes, threshold, digest=None)
    logger.info("coverage z%d: %s", zoom, report.summary())
    return report


# --- picture ------------------------------------------------------------------------------------------------

_PRIORITY = np.zeros(len(TileStatus), dtype=np.uint8)  # by status code: covered < blank < missing (0 = outside)
_PRIORITY[[COVERED, BLANK, MISSING]] = (1, 2, 3)
_BY_PRIORITY = ("outside", "covered", "blank", "missing")
_HEADER_PX = 34
_MIN_WIDTH_PX = 420


def render_coverage_png(
    report: CoverageReport,
    grid: ChunkGrid | None = None,
    takeoff_lonlat: tuple[float, float] | None = None,
    max_px: int = 1024,
) -> bytes:
    """A PNG map of the tiles: green covered, grey blank, red missing, a blue ring at the takeoff, and a
    title/legend line. Small areas are upscaled to about ``max_px``; large ones are reduced so that a
    missing tile is never hidden (each pixel shows its worst tile). Same report → same bytes."""
    if max_px < 16:
        raise ValueError(f"max_px must be at least 16, got {max_px}")
    zoom = report.zoom
    xy = report.tile_xy
    x_min, y_min, reduce, scale, cells_w, cells_h = _layout(report, max_px)
    prio = np.zeros((cells_h, cells_w), dtype=np.uint8)
    if len(xy):
        np.maximum.at(prio, ((xy[:, 1] - y_min) // reduce, (xy[:, 0] - x_min) // reduce), _PRIORITY[report.codes])
    palette = np.array([COLORS[name] for name in _BY_PRIORITY], dtype=np.uint8)
    rgb = palette[prio].repeat(scale, axis=0).repeat(scale, axis=1)
    map_w, map_h = rgb.shape[1], rgb.shape[0]

    canvas = Image.new("RGB", (max(map_w, _MIN_WIDTH_PX), map_h + _HEADER_PX), COLORS["outside"])
    canvas.paste(Image.fromarray(rgb, "RGB"), (0, _HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    verdict = "PASS" if report.passed else "FAIL"
    layout = f", span {grid.span}, overlap {grid.overlap:g}" if grid is not None else ""
    title = f"coverage z{zoom}{layout}: {report.percent:.2f}% (threshold {report.threshold:g}%) {verdict}"
    draw.text((4, 2), title, fill=COLORS["text"], font=font)
    x = 4
    for name, count in (("covered", report.covered), ("blank", report.blank), ("missing", report.missing)):
        draw.rectangle((x, 20, x + 9, 29), fill=COLORS[name], outline=COLORS["text"])
        label = f"{name} {count:,}"
        draw.text((x + 13, 18), label, fill=COLORS["text"], font=font)
        x += 13 + int(draw.textlength(label, font=font)) + 12
    if takeoff_lonlat is not None:
        n = 1 << zoom
        lon, lat = takeoff_lonlat
        tx, ty = float(lon_to_px(lon, n)), float(lat_to_px(lat, n))
        px = (tx - x_min) / reduce * scale
        py = (ty - y_min) / reduce * scale + _HEADER_PX
        r = max(4, min(12, scale // 2))
        draw.ellipse((px - r, py - r, px + r, py + r), outline=COLORS["takeoff"], width=3)
        draw.line((px - r - 3, py, px + r + 3, py), fill=COLORS["takeoff"], width=1)
        draw.line((px, py - r - 3, px, py + r + 3), fill=COLORS["takeoff"], width=1)
        draw.rectangle((x, 20, x + 9, 29), outline=COLORS["takeoff"], width=2)
        draw.text((x + 13, 18), "takeoff", fill=COLORS["text"], font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _layout(report: CoverageReport, max_px: int) -> tuple[int, int, int, int, int, int]:
    """(x_min, y_min, tiles per cell, pixels per cell, cells wide, cells high) of the map."""
    xy = report.tile_xy
    if len(xy):
        x_min, y_min = (int(v) for v in xy.min(axis=0))
        width_t, height_t = (int(v) + 1 for v in xy.max(axis=0) - (x_min, y_min))
    else:
        x_min = y_min = 0
        width_t = height_t = 1
    reduce = max(1, math.ceil(max(width_t, height_t) / max_px))  # large areas: several tiles per pixel
    cells_w, cells_h = -(-width_t // reduce), -(-height_t // reduce)
    scale = max(1, max_px // max(cells_w, cells_h))  # small areas: several pixels per tile
    return x_min, y_min, reduce, scale, cells_w, cells_h


def map_pixel_of_tile(report: CoverageReport, tile: TileId, max_px: int = 1024) -> tuple[int, int]:
    """Centre pixel of ``tile`` in ``render_coverage_png(report, max_px=max_px)`` (for tests and overlays)."""
    x_min, y_min, reduce, scale, _, _ = _layout(report, max_px)
    cx = ((tile.x - x_min) // reduce) * scale + scale // 2
    cy = ((tile.y - y_min) // reduce) * scale + scale // 2 + _HEADER_PX
    return cx, cy
