"""Tile and retrieval-chunk grids on Web Mercator (the XYZ / ``WebMercatorQuad`` scheme).

Two grids share one zoom and one pixel space (``tile_size * 2**zoom`` pixels per axis):

* **storage tiles** — the XYZ tiles the orthophoto is cut into (``TileId(z, x, y)``, north-up, y down);
* **retrieval chunks** — the images a descriptor is computed from: ``span x span`` tiles, laid out with
  a stride of ``round(chunk_px * (1 - overlap))`` pixels, so neighbouring chunks overlap. Chunk
  ``(z, i, j)`` covers global pixels ``[i*stride, i*stride + chunk_px) x [j*stride, j*stride + chunk_px)``.
  With ``span=1, overlap=0`` chunk ids are XYZ tile ids.

"Intersects" means overlapping with positive area throughout: a box that only touches the area's
boundary, or a chunk that only touches a tile's edge, does not count. So an area drawn exactly on tile
edges gets exactly those tiles, and ``chunks_covering`` is the inverse of ``storage_tiles_of_chunk``.

Areas are shapely geometries in lon/lat degrees; footprints are lon/lat boxes (Mercator boxes are
lon/lat boxes), so every test runs in degree space with the area's edges as drawn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from .errors import TileBudgetError
from .types import Bounds, TileId

logger = logging.getLogger(__name__)

MAX_LATITUDE = 85.0511287798066  # Web-Mercator limit: atan(sinh(pi))
#: EPSG:3857 metres from the origin to the world's edge (pi x the WGS84 semi-major axis): the square world
#: spans [-MERCATOR_HALF_WORLD, MERCATOR_HALF_WORLD] on both axes.
MERCATOR_HALF_WORLD = 20037508.342789244
MAX_ZOOM = 30  # keys pack x * 2**zoom + y into int64

_EPS = 1e-7  # in strides: tolerance for lon/lat <-> pixel round trips on exact tile edges
_ROW_BATCH = 512  # chunk rows clipped per vectorised shapely call
_EXACT_ROWS = 16_384  # past this many rows over budget, stop counting (the message then says "more than")


# --- Web-Mercator pixel math (vectorised; agrees with morecantile's WebMercatorQuad to ~1e-13 deg) -------


def lon_to_px(lon: np.ndarray | float, world_px: int) -> np.ndarray:
    return (np.asarray(lon, dtype=np.float64) + 180.0) / 360.0 * world_px


def lat_to_px(lat: np.ndarray | float, world_px: int) -> np.ndarray:
    lat = np.clip(np.asarray(lat, dtype=np.float64), -MAX_LATITUDE, MAX_LATITUDE)
    return (1.0 - np.arcsinh(np.tan(np.radians(lat))) / math.pi) / 2.0 * world_px


def px_to_lon(px: np.ndarray | float, world_px: int) -> np.ndarray:
    return np.asarray(px, dtype=np.float64) / world_px * 360.0 - 180.0


def px_to_lat(py: np.ndarray | float, world_px: int) -> np.ndarray:
    return np.degrees(np.arctan(np.sinh(math.pi * (1.0 - 2.0 * np.asarray(py, dtype=np.float64) / world_px))))


def tile_bounds(tile: TileId) -> Bounds:
    """(west, south, east, north) in degrees of an XYZ tile."""
    n = 1 << tile.z
    if not (0 <= tile.x < n and 0 <= tile.y < n):
        raise ValueError(f"tile {tile} is outside the zoom-{tile.z} grid (0..{n - 1})")
    return (
        float(px_to_lon(tile.x, n)),
        float(px_to_lat(tile.y + 1, n)),
        float(px_to_lon(tile.x + 1, n)),
        float(px_to_lat(tile.y, n)),
    )


def in_grid(tile: TileId) -> bool:
    """Whether ``tile`` exists in the XYZ grid (0 <= x, y < 2**z)."""
    n = 1 << tile.z if tile.z >= 0 else 0
    return 0 <= tile.x < n and 0 <= tile.y < n


def mercator_bounds(tile: TileId) -> tuple[float, float, float, float]:
    """(west, south, east, north) of an XYZ tile in EPSG:3857 metres (not checked against the grid: the
    imagery reads windows of tiles that may run past the world's edge)."""
    size = 2 * MERCATOR_HALF_WORLD / (1 << tile.z)
    west = -MERCATOR_HALF_WORLD + tile.x * size
    north = MERCATOR_HALF_WORLD - tile.y * size
    return west, north - size, west + size, north


def tile_for_lonlat(lon: float, lat: float, zoom: int) -> TileId:
    """The XYZ tile containing a point (edges belong to the tile east/south of them)."""
    n = 1 << zoom
    x = min(max(math.floor(float(lon_to_px(lon, n))), 0), n - 1)
    y = min(max(math.floor(float(lat_to_px(lat, n))), 0), n - 1)
    return TileId(zoom, x, y)


def tiles_to_array(tiles: Iterable[TileId] | np.ndarray, zoom: int | None = None) -> np.ndarray:
    """``(N, 2)`` int64 array of (x, y); every tile must be at ``zoom`` when it is given."""
    if isinstance(tiles, np.ndarray):
        arr = np.asarray(tiles, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] not in (2, 3):
            raise ValueError(f"expected an (N, 2) [x, y] or (N, 3) [z, x, y] array, got shape {arr.shape}")
        if arr.shape[1] == 3:
            if zoom is not None and arr.size and np.any(arr[:, 0] != zoom):
                raise ValueError(f"tiles at a zoom other than {zoom} in the input")
            arr = arr[:, 1:]
        return np.ascontiguousarray(arr)
    seq = tiles if isinstance(tiles, Sequence) else list(tiles)
    # one attrgetter pass per field: ~3x faster than a generator over (z, x, y) for 1e6 tiles
    z, x, y = (np.fromiter(map(attrgetter(f), seq), dtype=np.int64, count=len(seq)) for f in ("z", "x", "y"))
    if zoom is not None and z.size and np.any(z != zoom):
        i = int(np.argmax(z != zoom))
        raise ValueError(f"tile {z[i]}/{x[i]}/{y[i]} is not at zoom {zoom}")
    return np.column_stack((x, y))


def array_to_tiles(xy: np.ndarray, zoom: int) -> list[TileId]:
    return [TileId(zoom, x, y) for x, y in zip(xy[:, 0].tolist(), xy[:, 1].tolist(), strict=True)]


# --- grids ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkGrid:
    """The retrieval-chunk grid at one zoom (see the module docstring for the layout)."""

    zoom: int
    tile_size: int = 256
    span: int = 1
    overlap: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.zoom, bool) or not isinstance(self.zoom, int) or not 0 <= self.zoom <= MAX_ZOOM:
            raise ValueError(f"zoom must be an integer in 0..{MAX_ZOOM}, got {self.zoom!r}")
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {self.tile_size!r}")
        if isinstance(self.span, bool) or not isinstance(self.span, int) or self.span < 1:
            raise ValueError(f"span must be a positive integer, got {self.span!r}")
        if not isinstance(self.overlap, (int, float)) or not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")

    # geometry of the grid
    @property
    def chunk_px(self) -> int:
        return self.span * self.tile_size

    @property
    def stride_px(self) -> int:
        return max(1, round(self.chunk_px * (1.0 - self.overlap)))

    @property
    def world_px(self) -> int:
        return self.tile_size << self.zoom

    @property
    def tiles_per_axis(self) -> int:
        return 1 << self.zoom

    @property
    def chunks_per_axis(self) -> int:
        """Chunks needed to cover the world; the last one may hang over the edge (it is clipped)."""
        excess = self.world_px - self.chunk_px
        return 1 if excess <= 0 else -(-excess // self.stride_px) + 1

    @property
    def is_storage_grid(self) -> bool:
        """True when every chunk is exactly one storage tile (span 1, no overlap): chunk ids are tile ids."""
        return self.span == 1 and self.stride_px == self.tile_size

    @property
    def storage_grid(self) -> ChunkGrid:
        """The storage-tile grid at this zoom (span 1, no overlap: chunk ids are XYZ tile ids)."""
        return ChunkGrid(self.zoom, self.tile_size, 1, 0.0)

    def _check_chunk(self, chunk: TileId) -> None:
        n = self.chunks_per_axis
        if chunk.z != self.zoom or not (0 <= chunk.x < n and 0 <= chunk.y < n):
            raise ValueError(f"chunk {chunk} is not in this grid (zoom {self.zoom}, indices 0..{n - 1})")

    def _check_tile(self, tile: TileId) -> None:
        n = self.tiles_per_axis
        if tile.z != self.zoom or not (0 <= tile.x < n and 0 <= tile.y < n):
            raise ValueError(f"tile {tile} is not a zoom-{self.zoom} storage tile (indices 0..{n - 1})")

    def chunk_pixel_box(self, chunk: TileId) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) global pixels at this zoom, end exclusive, not clipped to the world."""
        self._check_chunk(chunk)
        s, c = self.stride_px, self.chunk_px
        return (chunk.x * s, chunk.y * s, chunk.x * s + c, chunk.y * s + c)

    def chunk_bounds(self, chunk: TileId) -> Bounds:
        """(west, south, east, north) in degrees, clipped to the world."""
        self._check_chunk(chunk)
        west, south, east, north = self.chunk_bounds_array(np.array([[chunk.x, chunk.y]]))[0]
        return (float(west), float(south), float(east), float(north))

    def chunk_bounds_array(self, xy: np.ndarray) -> np.ndarray:
        """:meth:`chunk_bounds` for an (N, 2) array of chunk (x, y) indices at once: (N, 4) degrees."""
        xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        s, c, w = self.stride_px, self.chunk_px, self.world_px
        x0, y0 = xy[:, 0] * s, xy[:, 1] * s
        return np.stack(
            [
                px_to_lon(x0, w),
                px_to_lat(np.minimum(y0 + c, w), w),
                px_to_lon(np.minimum(x0 + c, w), w),
                px_to_lat(y0, w),
            ],
            axis=1,
        ).astype(np.float64)

    def storage_tiles_of_chunk(self, chunk: TileId) -> list[TileId]:
        """The XYZ tiles a chunk's pixels come from (sorted), clipped to the world."""
        x0, y0, x1, y1 = self.chunk_pixel_box(chunk)
        t, last = self.tile_size, self.tiles_per_axis - 1
        xs = range(x0 // t, min((x1 - 1) // t, last) + 1)
        ys = range(y0 // t, min((y1 - 1) // t, last) + 1)
        return [TileId(self.zoom, x, y) for x in xs for y in ys]

    def chunks_covering(self, tile: TileId) -> list[TileId]:
        """The chunks whose pixels overlap an XYZ tile (sorted): the inverse of ``storage_tiles_of_chunk``."""
        self._check_tile(tile)
        lo_x, hi_x = self._chunk_range(tile.x * self.tile_size, (tile.x + 1) * self.tile_size)
        lo_y, hi_y = self._chunk_range(tile.y * self.tile_size, (tile.y + 1) * self.tile_size)
        return [TileId(self.zoom, i, j) for i in range(lo_x, hi_x + 1) for j in range(lo_y, hi_y + 1)]

    def _chunk_range(self, p0: int, p1: int) -> tuple[int, int]:
        """Chunk indices whose pixel interval overlaps the integer interval [p0, p1)."""
        s, c = self.stride_px, self.chunk_px
        lo = max(0, (p0 - c) // s + 1)
        hi = min(self.chunks_per_axis - 1, -(-p1 // s) - 1)
        return lo, hi

    # --- areas --------------------------------------------------------------------------------------------

    def chunks_for_area(self, area: BaseGeometry, budget: int | None = None) -> list[TileId]:
        """Chunks whose footprint overlaps ``area`` (lon/lat), sorted by (z, x, y).

        Raises :class:`TileBudgetError` before building the list when more than ``budget`` chunks are
        needed."""
        return array_to_tiles(self.chunk_array_for_area(area, budget), self.zoom)

    def storage_tiles_for_area(self, area: BaseGeometry, budget: int | None = None) -> list[TileId]:
        """XYZ tiles whose footprint overlaps ``area``, sorted by (z, x, y)."""
        return self.storage_grid.chunks_for_area(area, budget)

    def storage_tile_array_for_area(self, area: BaseGeometry, budget: int | None = None) -> np.ndarray:
        """``storage_tiles_for_area`` as an ``(N, 2)`` int64 array of (x, y), in the same order: 16 bytes a
        tile instead of a ``TileId`` each (what the coverage walk takes for large areas)."""
        return self.storage_grid.chunk_array_for_area(area, budget)

    def count_chunks(self, area: BaseGeometry, budget: int | None = None) -> int:
        """How many chunks ``chunks_for_area`` would return; raises :class:`TileBudgetError` past ``budget``."""
        _, starts, ends = self._row_intervals(area, budget)
        return int((ends - starts + 1).sum())

    def chunk_array_for_area(self, area: BaseGeometry, budget: int | None = None) -> np.ndarray:
        """``chunks_for_area`` as an ``(N, 2)`` int64 array of (x, y), sorted by x then y."""
        rows, starts, ends = self._row_intervals(area, budget)
        lengths = ends - starts + 1
        total = int(lengths.sum())
        if total == 0:
            return np.zeros((0, 2), dtype=np.int64)
        first = np.cumsum(lengths) - lengths
        xs = np.arange(total, dtype=np.int64) - np.repeat(first - starts, lengths)
        ys = np.repeat(rows, lengths)
        order = np.lexsort((ys, xs))
        return np.column_stack((xs[order], ys[order]))

    def _row_intervals(self, area: BaseGeometry, budget: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scanline over chunk rows: per row, the merged column intervals whose boxes overlap the area.

        Returns (row, first column, last column) arrays (inclusive). A chunk box overlaps the area with
        positive area exactly when its open column interval meets the x-extent of a polygon piece of
        (area ∩ row strip): pieces are connected, so their projection is that interval."""
        empty = (np.zeros(0, np.int64),) * 3
        if area is None or area.is_empty:
            return empty
        if shapely.get_dimensions(area) < 2:
            raise ValueError(f"the area must be polygonal, got a {area.geom_type}")
        if not area.is_valid:  # GEOS overlays fail or mislead on invalid input
            raise ValueError(f"the area is not a valid geometry: {shapely.is_valid_reason(area)}")
        w = self.world_px
        west, south, east, north = area.bounds
        col_lo, col_hi = self._float_range(float(lon_to_px(west, w)), float(lon_to_px(east, w)))
        row_lo, row_hi = self._float_range(float(lat_to_px(north, w)), float(lat_to_px(south, w)))
        if col_lo > col_hi or row_lo > row_hi:
            return empty
        upper = (col_hi - col_lo + 1) * (row_hi - row_lo + 1)  # bbox estimate: an upper bound
        check = budget is not None and upper > budget
        if check:
            logger.debug("bbox allows up to %d chunks > budget %d; counting exactly", upper, budget)
        out_rows: list[np.ndarray] = []
        out_lo: list[np.ndarray] = []
        out_hi: list[np.ndarray] = []
        count = 0
        for first in range(row_lo, row_hi + 1, _ROW_BATCH):
            rows = np.arange(first, min(first + _ROW_BATCH, row_hi + 1), dtype=np.int64)
            r, lo, hi = self._batch_intervals(area, rows, west, east)
            out_rows.append(r)
            out_lo.append(lo)
            out_hi.append(hi)
            count += int((hi - lo + 1).sum())
            if check and budget is not None and count > budget and rows[-1] - row_lo >= _EXACT_ROWS:
                self._raise_budget(count, budget, exact=rows[-1] == row_hi)
        if check and budget is not None and count > budget:
            self._raise_budget(count, budget, exact=True)
        return np.concatenate(out_rows), np.concatenate(out_lo), np.concatenate(out_hi)

    def _float_range(self, p0: float, p1: float) -> tuple[int, int]:
        """Chunk indices whose open pixel interval meets the open interval (p0, p1), within the world."""
        s, c = self.stride_px, self.chunk_px
        lo = max(0, math.floor((p0 - c) / s + _EPS) + 1)
        hi = min(self.chunks_per_axis - 1, math.ceil(p1 / s - _EPS) - 1)
        return lo, hi

    def _batch_intervals(
        self, area: BaseGeometry, rows: np.ndarray, west: float, east: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w, s, c = self.world_px, self.stride_px, self.chunk_px
        tops = px_to_lat(rows * s, w)
        bottoms = px_to_lat(np.minimum(rows * s + c, w), w)
        pad = 1e-9 + (east - west) * 1e-9
        strips = shapely.box(west - pad, bottoms, east + pad, tops)
        try:  # clip to the batch's band first: each strip then only meets the vertices near it
            band = shapely.intersection(area, shapely.box(west - pad, bottoms.min(), east + pad, tops.max()))
            pieces = shapely.intersection(strips, band)
        except shapely.errors.GEOSException:  # a robustness failure on the band: go without it
            pieces = shapely.intersection(strips, area)
        parts, index = shapely.get_parts(pieces, return_index=True)
        while parts.size:  # flatten nested collections (GEOS may return polygons + lines together)
            types = shapely.get_type_id(parts)
            multi = types >= 4
            if not multi.any():
                break
            sub, sub_index = shapely.get_parts(parts[multi], return_index=True)
            parts = np.concatenate([parts[~multi], sub])
            index = np.concatenate([index[~multi], index[multi][sub_index]])
        keep = (shapely.get_type_id(parts) == 3) & (shapely.area(parts) > 0)
        parts, index = parts[keep], index[keep]
        if not parts.size:
            return (np.zeros(0, np.int64),) * 3
        b = shapely.bounds(parts)
        px0, px1 = lon_to_px(b[:, 0], w), lon_to_px(b[:, 2], w)
        py0, py1 = lat_to_px(b[:, 3], w), lat_to_px(b[:, 1], w)
        # slivers from an area edge lying on a strip edge: no interior inside the strip
        solid = ((px1 - px0) > _EPS * s) & ((py1 - py0) > _EPS * s)
        px0, px1, index = px0[solid], px1[solid], index[solid]
        lo = np.maximum(np.floor((px0 - c) / s + _EPS).astype(np.int64) + 1, 0)
        hi = np.minimum(np.ceil(px1 / s - _EPS).astype(np.int64) - 1, self.chunks_per_axis - 1)
        row = rows[index]
        valid = lo <= hi
        return _merge_intervals(row[valid], lo[valid], hi[valid])

    def _raise_budget(self, count: int, budget: int, *, exact: bool) -> None:
        amount = f"{count:,}" if exact else f"more than {count:,}"
        raise TileBudgetError(
            f"the area needs {amount} retrieval chunks at zoom {self.zoom} "
            f"(span {self.span}, overlap {self.overlap:g}); the budget is {budget:,}",
            hint="raise [tiles].budget, or lower [tiles].zoom (one level down needs about 4x fewer chunks), "
            "or shrink the area",
        )


def _merge_intervals(row: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of inclusive integer intervals per row, vectorised: rows are offset so that a running
    maximum of interval ends never leaks from one row into the next."""
    if not row.size:
        return row, lo, hi
    order = np.lexsort((lo, row))
    row, lo, hi = row[order], lo[order], hi[order]
    offset = row * (int(hi.max()) + 2)
    s, e = lo + offset, hi + offset
    reach = np.maximum.accumulate(e)
    new = np.ones(row.size, dtype=bool)
    new[1:] = s[1:] > reach[:-1] + 1  # starts a new run unless it touches or overlaps the previous reach
    group = np.cumsum(new) - 1
    ends = np.zeros(int(group[-1]) + 1, dtype=np.int64)
    np.maximum.at(ends, group, e)
    starts = s[new]
    grow = row[new]
    off = grow * (int(hi.max()) + 2)
    return grow, starts - off, ends - off


# --- shards -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """The chunks of one descriptor shard: a ``block x block`` square of the chunk grid, held as an
    ``(n, 2)`` int32 array of chunk (x, y), sorted (8 bytes a chunk: a 1e6-chunk plan is 8 MB, where a
    ``TileId`` per chunk held for the whole run was ~0.5 GB)."""

    block_x: int
    block_y: int
    zoom: int
    xy: np.ndarray

    @property
    def chunks(self) -> tuple[TileId, ...]:
        """The chunks as ``TileId``s, built on every access: a shard's work takes them once and lets them go."""
        return tuple(array_to_tiles(self.xy, self.zoom))

    def __len__(self) -> int:
        return len(self.xy)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardPlan):
            return NotImplemented
        same_block = (self.block_x, self.block_y, self.zoom) == (other.block_x, other.block_y, other.zoom)
        return same_block and np.array_equal(self.xy, other.xy)

    def __hash__(self) -> int:
        return hash((self.block_x, self.block_y, self.zoom, self.xy.tobytes()))

    def __repr__(self) -> str:
        return f"ShardPlan(block=({self.block_x}, {self.block_y}), zoom={self.zoom}, chunks={len(self)})"


def plan_shards(chunks: Iterable[TileId], block: int) -> list[ShardPlan]:
    """Group chunks by ``(x // block, y // block)``; shards sorted by block, chunks sorted, duplicates
    dropped. Membership depends only on a chunk's own position, so adding chunks elsewhere never moves
    a chunk to another shard (shard keys stay stable across re-plans)."""
    items = list(chunks)
    if not items:
        _check_block(block)
        return []
    zooms = {t.z for t in items}
    if len(zooms) > 1:
        raise ValueError(f"chunks from several zoom levels {sorted(zooms)} cannot share a shard plan")
    (zoom,) = zooms
    return plan_shard_array(tiles_to_array(items), zoom, block)


def plan_shard_array(xy: np.ndarray, zoom: int, block: int) -> list[ShardPlan]:
    """:func:`plan_shards` for an ``(N, 2)`` array of chunk (x, y) at ``zoom`` (what
    :meth:`ChunkGrid.chunk_array_for_area` returns): no ``TileId`` is made."""
    _check_block(block)
    xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    if not len(xy):
        return []
    bx, by = xy[:, 0] // block, xy[:, 1] // block
    order = np.lexsort((xy[:, 1], xy[:, 0], by, bx))
    xy, bx, by = xy[order], bx[order], by[order]
    fresh = np.ones(len(xy), dtype=bool)
    fresh[1:] = np.any(xy[1:] != xy[:-1], axis=1)  # drop duplicates (they sort next to each other)
    xy, bx, by = xy[fresh], bx[fresh], by[fresh]
    cut = np.flatnonzero((np.diff(bx) != 0) | (np.diff(by) != 0)) + 1
    compact = xy.astype(np.int32)  # chunk indices are below 2**MAX_ZOOM = 2**30
    plans = []
    for part in np.split(np.arange(len(xy)), cut):
        k = int(part[0])
        plans.append(ShardPlan(int(bx[k]), int(by[k]), zoom, compact[part[0] : part[-1] + 1].copy()))
    return plans


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
