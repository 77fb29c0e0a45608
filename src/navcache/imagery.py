"""Orthophoto tile sources: a GeoTIFF (any CRS; or a GDAL VRT), GeoTIFF sheets (many files, any CRSs,
composited), an XYZ tile folder or an MBTiles file, all read as Web-Mercator (EPSG:3857, XYZ /
WebMercatorQuad) tiles of ``tile_size`` pixels.

Every source returns ``Tile(rgb uint8 (H, W, 3), valid bool (H, W))``; ``None`` means the source has
nothing at that tile at all. Failures the ground crew can fix raise :class:`SourceError` naming the file.

Thread safety: descriptor batching reads tiles from a background thread. GeoTIFF and MBTiles sources
keep **one handle per thread** (a rasterio dataset or an sqlite3 connection in a ``threading.local``),
opened on the thread's first read and closed together by :meth:`close`; an XYZ folder holds no handle.
No lock is held while reading, so threads do not serialise on IO or decoding; threads asking for tiles of
one GeoTIFF window wait for the one thread warping it. Do not call :meth:`close` while other threads still
read.

GeoTIFF sources warp **windows, not tiles**: the tile grid is cut into fixed windows of :data:`WINDOW_TILES`
tiles (the same for every run, so a tile's pixels never depend on which tiles were asked for), each window's
source pixels are read in one call and resampled to the Web-Mercator grid in one pass (Pillow, bilinear on
premultiplied alpha; :func:`_warp_to_window`), and tiles are cut from it. Warping tile by tile with GDAL's
warper would pay its set-up (datasets, transformer, source read) per tile and its general-case kernel for
alpha bands per pixel: about 3x the cost (13-14 ms against 4-5 ms per z17 tile over EPSG:4326 imagery, on 2
cores). Warped windows are kept in a small LRU (:data:`WINDOW_CACHE_BYTES`), and GDAL's block cache is
bounded (:data:`GDAL_CACHE_BYTES`): the working set is a few windows, not the area. Sparse reads (the
self-test's views) warp just their rectangle (:func:`read_pixels`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sqlite3
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar, runtime_checkable
from urllib.parse import quote
from xml.etree import ElementTree

import blake3
import numpy as np
import pyproj
import rasterio
import rasterio.env
import rasterio.errors
import rasterio.warp
from affine import Affine
from PIL import Image, UnidentifiedImageError
from rasterio.enums import ColorInterp, Interleaving, MaskFlags, Resampling
from rasterio.windows import Window

from navcache_runtime.coverage import BLANK_MIN_VALID_FRACTION, DEFAULT_BLANK_STD

from .errors import SourceError
from .tiles import MAX_LATITUDE, MERCATOR_HALF_WORLD, in_grid, mercator_bounds, tile_bounds
from .types import Bounds, Tile, TileId

logger = logging.getLogger(__name__)

SOURCE_KINDS: tuple[str, ...] = ("geotiff", "xyz", "mbtiles")
IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
MBTILES_FORMATS: frozenset[str] = frozenset({"png", "jpg", "jpeg", "webp"})

_MERCATOR_CRS = rasterio.crs.CRS.from_epsg(3857)
_WGS84_CRS = rasterio.crs.CRS.from_epsg(4326)
# Warped alpha >= this counts as valid (GDAL's warper writes 0/255; PNG edges may be partial).
_ALPHA_VALID = 128
# rasterio warns "Dataset has no geotransform" (a) when opening an unreferenced file, which navcache reports
# as a SourceError instead, and (b) for the in-memory datasets of array warping, which rasterio hides with
# warnings.catch_warnings - not thread-safe, so concurrent tile reads leak it. Neither helps the crew; a
# process-wide filter (narrowed to rasterio's own modules) replaces per-call catch_warnings, which races.
warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning, module=r"rasterio(\.warp)?$")
# Points added along each edge of a box when projecting it into the source CRS (curved edges, e.g. UTM).
_DENSIFY_PTS = 21
_ReadPlan = tuple[Window, int, int, bool]  # source window, output width and height, decimated
# Above this many source pixels per tile pixel, read decimated (overviews / average) before warping,
# so low zooms neither alias nor read the whole raster at full resolution.
_DECIMATE_ABOVE = 2.0
# Mesh cells of the window warp (pixels) and the most a cell's bilinear map may stray from the projection
# at its centre (source pixels: GDAL's approximate-transformer default).
_MESH_CELL = 64
_MESH_ERROR = 0.125

#: (columns, rows) of tiles a GeoTIFF warps at once. Descriptor shards and coverage read chunks column by
#: column (x, then y down the column), so tall windows are reused by the next columns while a shard's
#: column (64 tiles at the default shard block) touches only four of them. 64 tiles per source read and
#: resample make their set-up (dataset reads, projected mesh, Pillow images) a few percent of the work.
WINDOW_TILES: tuple[int, int] = (4, 16)
#: Warped windows a GeoTIFF source keeps per reader scope (:meth:`TileSource.reading`, one per shard being
#: described; RGBA, 256 KiB per 256-px tile): six 4 x 16 windows, so one shard column's four and the next
#: window of each decode thread stay while the column moves east. With one bound for two shards at once, each
#: evicted the other's windows: 2.3x the warps of a 1e4-tile cold run (bench/RESULTS.md, Scale).
WINDOW_CACHE_BYTES = 96 << 20
#: GDAL's raster block cache, set when the first GeoTIFF source opens (unless GDAL_CACHEMAX is set in the
#: environment). GDAL's default is 5 % of RAM (6 GB on a 128 GB host), which a large area fills with blocks
#: it never reads again; a window reads its source blocks once (at the decimation limit a 1,024 x 4,096 px
#: window reads about 2,048 x 8,192 source px, 48 MB of RGB), so twice that keeps the blocks that
#: neighbouring windows share without letting the cache grow with the area.
GDAL_CACHE_BYTES = 128 << 20
#: Tiles whose read plans (and a mosaic's sheet covers) a source remembers: 16 shards of 64 x 64 chunks, about
#: 25 MB; a run asks for a tile's plan within one shard's work.
MEMO_TILES = 1 << 16


# --------------------------------------------------------------------------------------------------
# The protocol and small tile utilities


@runtime_checkable
class TileReader(Protocol):
    """What :func:`read_window` needs: Web-Mercator tiles of ``tile_size`` pixels, by id."""

    tile_size: int

    def read_tile(self, tile: TileId) -> Tile | None:
        """The tile's pixels, or None when the source has nothing there at all."""
        ...


class TileSource(TileReader, Protocol):
    """Something that yields Web-Mercator tiles of ``tile_size`` pixels."""

    def bounds_lonlat(self) -> Bounds:
        """WGS84 (west, south, east, north) of the source's data."""
        ...

    def describe(self) -> str: ...

    def fingerprint(self) -> str:
        """A cheap identity of the source bytes (file stats, or a digest of a folder listing)."""
        ...

    def raw_identity(self) -> str:
        """Everything besides a tile's encoded bytes that decides what :meth:`read_tile` returns (format
        header, decoder versions, tile size); part of every :meth:`raw_digest` comparison."""
        ...

    def raw_digest(self, tile: TileId) -> str | None:
        """:func:`content_digest` of the still-encoded source bytes :meth:`read_tile` decodes for ``tile``
        (``"none"`` when it would return None): under one :meth:`raw_identity`, equal digests mean equal
        tiles, so callers can skip decoding tiles they have seen. None when this source cannot tell (then
        decode and hash the pixels)."""
        ...

    def raw_digests(self, tiles: Sequence[TileId]) -> list[str] | None:
        """:meth:`raw_digest` of many tiles at once (a GeoTIFF plans their windows in one vectorised
        transform); None when any is unknown."""
        ...

    def reading(self) -> AbstractContextManager[None]:
        """A scope in which one consumer (a shard's decode threads) reads many tiles in order. A source that
        keeps a bounded working set (a GeoTIFF's warped windows) keeps one per open scope, so consumers
        reading at once do not evict each other's; outside any scope it keeps one."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@runtime_checkable
class DigestsItsInputs(Protocol):
    """A source whose raw digests are a function of a few encoded inputs it can name (a GeoTIFF's blocks): a
    re-provision checks those inputs once per shard instead of planning and digesting every tile again."""

    def raw_digests_and_inputs(self, tiles: Sequence[TileId]) -> tuple[list[str], tuple[str, ...]] | None:
        """:meth:`TileSource.raw_digests` and the names of every encoded input they cover; None when it cannot
        name them (a GeoTIFF over a VRT), though :meth:`TileSource.raw_digests` may still digest the tiles."""
        ...

    def inputs_digest(self, inputs: Sequence[str]) -> str | None:
        """One digest of the named inputs' current bytes (and the source's raw identity): equal digests mean
        equal raw digests for every tile those inputs were named for. None when the source cannot tell."""
        ...


def empty_tile(height: int, width: int) -> Tile:
    return Tile(rgb=np.zeros((height, width, 3), np.uint8), valid=np.zeros((height, width), bool))


#: Every ``_SUBSAMPLE``-th pixel along each axis is what :func:`_clearly_textured` looks at first.
_SUBSAMPLE = 4
_LEVELS = np.arange(256, dtype=np.float64)
_LEVELS_SQUARED = _LEVELS * _LEVELS


def is_blank(
    tile: Tile, min_valid_fraction: float = BLANK_MIN_VALID_FRACTION, min_std: float = DEFAULT_BLANK_STD
) -> bool:
    """True when ``tile`` is *blank* (:class:`navcache_runtime.coverage.TileStatus`): nodata-dominated (valid
    fraction below ``min_valid_fraction``) or featureless (the largest per-channel standard deviation of its
    valid pixels is below ``min_std``, the sortie's ``[orthophoto] blank_std``)."""
    if tile.valid.size == 0 or tile.valid_fraction < min_valid_fraction:
        return True
    all_valid = bool(tile.valid.all())
    if _clearly_textured(tile, all_valid, min_std):
        return False
    pixels = tile.rgb.reshape(-1, 3) if all_valid else tile.rgb[tile.valid]
    # Per-channel variance from a 256-bin histogram: exact for uint8 and ~20x cheaper than a column-wise
    # std over a float copy (this runs for every chunk of every provision).
    return all(_variance(pixels[:, channel]) < min_std * min_std for channel in range(3))


def _variance(values: np.ndarray) -> float:
    """The variance of uint8 ``values``, from their 256-bin histogram (exact for uint8)."""
    counts = np.bincount(values, minlength=256).astype(np.float64)
    n = len(values)
    mean = counts @ _LEVELS / n
    return max(0.0, float(counts @ _LEVELS_SQUARED / n - mean * mean))


def _clearly_textured(tile: Tile, all_valid: bool, min_std: float) -> bool:
    """True when a subsample alone proves some channel's variance over the valid pixels reaches
    ``min_std**2``, so :func:`is_blank` can skip the full histogram (it is the same decision, only sooner).
    For a subset S of the N valid pixels, N·var(all) = Σ_all (p - mean_all)² ≥ Σ_S (p - mean_all)²
    ≥ Σ_S (p - mean_S)² = n·var(S), so var(all) ≥ (n/N)·var(S). Any real texture clears that bound; a
    tile near the floor falls through to the exact computation."""
    step = _SUBSAMPLE
    picked = None if all_valid else tile.valid[::step, ::step]
    n_all = tile.valid.size if all_valid else int(np.count_nonzero(tile.valid))
    # The margin keeps float rounding (relative ~1e-15 on sums below 2**53) from ever deciding a borderline tile.
    floor = (min_std * min_std * (1 + 1e-9) + 1e-9) * n_all
    for channel in range(3):
        plane = tile.rgb[::step, ::step, channel]
        sample = plane.ravel() if picked is None else plane[picked]
        if len(sample) < 2:
            return False
        if _variance(sample) * len(sample) >= floor:
            return True
    return False


def content_digest(*parts: bytes | memoryview) -> str:
    """The digest navcache keys ground-side content by (tile pixels, encoded source bytes): BLAKE3, 256 bits,
    hex. It runs for every tile of every provision, twice or three times, and BLAKE3 hashes ~4x faster
    than sha256 here (0.03 against 0.14 ms for a 256 px RGB tile); it releases the GIL like hashlib.
    Nothing signed or verified onboard uses it: manifests and artifact sidecars stay sha256."""
    digest = blake3.blake3()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def tile_content_hash(tile: Tile) -> str:
    """:func:`content_digest` over the shape, the RGB bytes and the validity bytes (as 0/1)."""
    rgb = np.ascontiguousarray(tile.rgb, dtype=np.uint8)
    valid = np.ascontiguousarray(tile.valid, dtype=np.bool_)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or valid.shape != rgb.shape[:2]:
        raise ValueError(f"tile arrays have inconsistent shapes: rgb {rgb.shape}, valid {valid.shape}")
    header = f"navcache-tile:{rgb.shape[0]}x{rgb.shape[1]}:".encode()
    return content_digest(header, rgb.data, valid.view(np.uint8).data)


def read_window(source: TileReader, zoom: int, x0: int, y0: int, x1: int, y1: int) -> Tile:
    """Pixels ``[x0, x1) x [y0, y1)`` in global pixel coordinates at ``zoom`` (tile (x, y) covers
    ``x*tile_size ...``), mosaicked from the storage tiles they touch. Tiles the source lacks, and pixels
    outside the world, are invalid."""
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty window: x {x0}..{x1}, y {y0}..{y1}")
    size = source.tile_size
    out = empty_tile(y1 - y0, x1 - x0)
    for ty in range(y0 // size, (y1 - 1) // size + 1):
        for tx in range(x0 // size, (x1 - 1) // size + 1):
            tile_id = TileId(zoom, tx, ty)
            if not in_grid(tile_id):
                continue
            tile = source.read_tile(tile_id)
            if tile is None:
                continue
            # Intersection of this tile with the window, in global pixels.
            gx0, gy0 = max(x0, tx * size), max(y0, ty * size)
            gx1, gy1 = min(x1, (tx + 1) * size), min(y1, (ty + 1) * size)
            src = np.s_[gy0 - ty * size : gy1 - ty * size, gx0 - tx * size : gx1 - tx * size]
            dst = np.s_[gy0 - y0 : gy1 - y0, gx0 - x0 : gx1 - x0]
            out.rgb[dst] = tile.rgb[src]
            out.valid[dst] = tile.valid[src]
    return out


@runtime_checkable
class PixelReader(Protocol):
    """A source that warps any pixel rectangle at once (GeoTIFF sources)."""

    def read_pixels(self, zoom: int, x0: int, y0: int, x1: int, y1: int) -> Tile: ...


def read_pixels(source: TileReader, zoom: int, x0: int, y0: int, x1: int, y1: int) -> Tile:
    """:func:`read_window`'s pixels, but a :class:`PixelReader` (a GeoTIFF) warps just the rectangle in one
    call, cutting and keeping no tiles: for sparse reads, such as the self-test's views, that touch a few
    pixels of many windows. The pixels agree with the tiles' within the warp's resampling (the mesh cells
    are placed per call), not bit for bit."""
    if isinstance(source, PixelReader):
        return source.read_pixels(zoom, x0, y0, x1, y1)
    return read_window(source, zoom, x0, y0, x1, y1)


def open_tile_source(kind: str, path: Path | Sequence[Path], tile_size: int = 256) -> TileSource:
    """Open an orthophoto source of ``kind`` (one of :data:`SOURCE_KINDS`). A ``geotiff`` may be several
    sheets (a sequence of paths: a :class:`GeoTiffMosaicSource`, composited in the given order) or one file,
    a GDAL ``.vrt`` included; the other kinds take one path."""
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise SourceError(f"no {kind} orthophoto path given", where="[orthophoto]", hint="name at least one file")
    if kind == "geotiff" and len(paths) > 1:
        return GeoTiffMosaicSource(paths, tile_size)
    if len(paths) > 1:
        raise SourceError(
            f"an orthophoto of kind {kind!r} is one path, got {len(paths)}",
            where=str(paths[0]),
            hint="only geotiff sources may be several sheets",
        )
    path = paths[0]
    if kind == "geotiff":
        return GeoTiffSource(path, tile_size)
    if kind == "xyz":
        return XyzFolderSource(path, tile_size)
    if kind == "mbtiles":
        return MBTilesSource(path, tile_size)
    raise SourceError(
        f"unknown orthophoto source kind {kind!r}",
        where=str(path),
        hint=f"use one of: {', '.join(SOURCE_KINDS)}",
    )


# --------------------------------------------------------------------------------------------------
# Shared machinery: per-thread handles, file fingerprints, image decoding

H = TypeVar("H")


class _PerThread(Generic[H]):
    """One handle per thread, created on first use, all closed together. A source lives as long as its
    process (one per orthophoto, shared by shard tasks) while decode threads come and go, so opening a
    handle first closes those of threads that have ended: open handles stay bounded by live threads."""

    def __init__(self, opener: Callable[[], H], closer: Callable[[H], None]) -> None:
        self._opener = opener
        self._closer = closer
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the registry only, never held while reading
        self._handles: list[tuple[threading.Thread, H]] = []
        self._closed = False

    def get(self, where: str) -> H:
        handle: H | None = getattr(self._local, "handle", None)
        if handle is None:
            if self._closed:
                raise SourceError("the tile source is closed", where=where, hint="open it again")
            handle = self._opener()
            with self._lock:
                ended = [h for thread, h in self._handles if not thread.is_alive()]
                self._handles = [(t, h) for t, h in self._handles if t.is_alive()]
                self._handles.append((threading.current_thread(), handle))
            self._close_all(ended)
            self._local.handle = handle
        return handle

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)

    def _close_all(self, handles: list[H]) -> None:
        for handle in handles:
            try:
                self._closer(handle)
            except Exception:  # closing is best effort; the source is unusable either way
                logger.debug("closing a tile source handle failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles, self._handles = [h for _, h in self._handles], []
        self._close_all(handles)
        self._local = threading.local()


class _SourceBase:
    tile_size: int

    def __init__(self, tile_size: int) -> None:
        if not isinstance(tile_size, int) or tile_size <= 0:
            raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
        self.tile_size = tile_size
        self._warned_resize = False
        self._warn_lock = threading.Lock()

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def reading(self) -> AbstractContextManager[None]:
        """:meth:`TileSource.reading`: nothing to keep per reader (tile stores decode each tile alone)."""
        return nullcontext()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def raw_digest(self, tile: TileId) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def raw_digests(self, tiles: Sequence[TileId]) -> list[str] | None:
        """:meth:`raw_digest` tile by tile (stores of encoded tiles); GeoTIFF plans them all at once."""
        digests = []
        for tile in tiles:
            digest = self.raw_digest(tile)
            if digest is None:
                return None
            digests.append(digest)
        return digests

    def _warn_resize_once(self, where: str, size: tuple[int, int]) -> None:
        with self._warn_lock:
            if self._warned_resize:
                return
            self._warned_resize = True
        logger.warning(
            "tile %s is %dx%d px, not %d px; resizing such tiles (warned once per source)",
            where,
            size[0],
            size[1],
            self.tile_size,
        )

    def _decode(self, data: bytes, where: str) -> Tile:
        return _decode_image(data, self.tile_size, where, self._warn_resize_once)


def _gdal_reason(exc: BaseException) -> str:
    """rasterio's message, plus GDAL's own when rasterio only says "see previous exception"."""
    cause = exc.__cause__ or exc.__context__
    if cause is not None and "previous exception" in str(exc):
        return f"{exc} {cause}".replace("See previous exception for details. ", "")
    return str(exc)


def _stat_fingerprint(paths: list[Path]) -> str:
    """sha256 over (resolved path, size, mtime_ns, inode) of each existing file."""
    records = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        records.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()


def file_version(path: Path | str | int) -> tuple[int, ...]:
    """(size, mtime, ctime, inode) of a path or an open file descriptor: changes with every write, rename or
    replacement of the file (ctime cannot be set back from user space). OSError when the file is gone."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


#: Bump when read_tile's decoding changes: raw digests taken by an older navcache must not match.
RAW_DIGEST_VERSION = "navcache-raw-v2"
NO_TILE_DIGEST = "none"


def _bytes_digest(data: bytes | None) -> str:
    return NO_TILE_DIGEST if data is None else content_digest(data)


def _decoder_identity(kind: str, tile_size: int, extra: Any = None) -> str:
    return json.dumps(
        [RAW_DIGEST_VERSION, kind, tile_size, Image.__version__, np.__version__, _ALPHA_VALID, extra],
        sort_keys=True,
        default=str,
    )


def _decode_image(data: bytes, tile_size: int, where: str, on_resize: Callable[[str, tuple[int, int]], None]) -> Tile:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
            converted = image.convert("RGBA" if has_alpha else "RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise SourceError(
            f"cannot decode tile image ({exc})",
            where=where,
            hint="the tile is corrupt or not PNG/JPEG/WebP; re-export the tiles",
        ) from exc
    if converted.size != (tile_size, tile_size):
        on_resize(where, converted.size)
        converted = converted.resize((tile_size, tile_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted)
    rgb = np.ascontiguousarray(pixels[..., :3])
    valid = pixels[..., 3] >= _ALPHA_VALID if has_alpha else np.ones(rgb.shape[:2], bool)
    return Tile(rgb=rgb, valid=valid)


def _lonlat_bounds_of_tiles(zoom: int, xmin: int, ymin: int, xmax: int, ymax: int) -> Bounds:
    west, _, _, north = tile_bounds(TileId(zoom, xmin, ymin))
    _, south, east, _ = tile_bounds(TileId(zoom, xmax, ymax))
    return west, south, east, north


@dataclass(frozen=True)
class _WindowGrid:
    """A rectangle of tiles at one zoom warped as one image: tiles ``[x0, x0 + columns) x [y0, y0 + rows)``,
    pixel (0, 0) at the north-west corner of tile (x0, y0). Boxes are (col0, row0, col1, row1) pixels."""

    zoom: int
    x0: int
    y0: int
    columns: int
    rows: int
    tile_size: int

    @classmethod
    def of(cls, tile: TileId, tile_size: int, shape: tuple[int, int]) -> _WindowGrid:
        """The fixed window of ``shape`` (columns, rows) holding ``tile``, clipped to the world."""
        columns, rows = shape
        n = 1 << tile.z
        x0, y0 = tile.x // columns * columns, tile.y // rows * rows
        return cls(tile.z, x0, y0, min(columns, n - x0), min(rows, n - y0), tile_size)

    @classmethod
    def around(
        cls, zoom: int, x0: int, y0: int, x1: int, y1: int, tile_size: int
    ) -> tuple[_WindowGrid, tuple[int, int, int, int], tuple[int, int, int, int]]:
        """The tiles under global pixels ``[x0, x1) x [y0, y1)`` at ``zoom``, that rectangle as a box of them,
        and the part of it inside the world (pixels beyond the world's edge are never warped)."""
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"empty window: x {x0}..{x1}, y {y0}..{y1}")
        tx0, ty0 = x0 // tile_size, y0 // tile_size
        grid = cls(zoom, tx0, ty0, -(-x1 // tile_size) - tx0, -(-y1 // tile_size) - ty0, tile_size)
        ox, oy, world = tx0 * tile_size, ty0 * tile_size, tile_size << zoom
        box = (x0 - ox, y0 - oy, x1 - ox, y1 - oy)
        inside = (max(x0, 0) - ox, max(y0, 0) - oy, min(x1, world) - ox, min(y1, world) - oy)
        return grid, box, inside

    @property
    def res(self) -> float:
        """EPSG:3857 metres per pixel."""
        return 2 * MERCATOR_HALF_WORLD / ((1 << self.zoom) * self.tile_size)

    def transform(self, box: tuple[int, int, int, int]) -> Affine:
        res = self.res
        west, _, _, north = mercator_bounds(TileId(self.zoom, self.x0, self.y0))
        return Affine(res, 0.0, west + box[0] * res, 0.0, -res, north - box[1] * res)

    def box_bounds(self, box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """(west, south, east, north) of ``box`` in EPSG:3857 metres."""
        t = self.transform(box)
        return t.c, t.f - (box[3] - box[1]) * self.res, t.c + (box[2] - box[0]) * self.res, t.f

    def box_under(self, footprint: Sequence[float]) -> tuple[int, int, int, int]:
        """The window's pixels under a (west, south, east, north) EPSG:3857 footprint, padded by 2 px and
        clipped to the window (empty when they do not meet)."""
        t, res = self.transform((0, 0, 0, 0)), self.res
        west, south, east, north = (float(v) for v in footprint)
        width, height = self.columns * self.tile_size, self.rows * self.tile_size
        col0 = max(0, math.floor((west - t.c) / res) - 2)
        col1 = min(width, math.ceil((east - t.c) / res) + 2)
        row0 = max(0, math.floor((t.f - north) / res) - 2)
        row1 = min(height, math.ceil((t.f - south) / res) + 2)
        return col0, row0, max(col0, col1), max(row0, row1)

    def tile_box(self, tile: TileId) -> tuple[int, int, int, int]:
        col0, row0 = (tile.x - self.x0) * self.tile_size, (tile.y - self.y0) * self.tile_size
        return col0, row0, col0 + self.tile_size, row0 + self.tile_size

    def describe(self) -> str:
        return f"z{self.zoom} x {self.x0}..{self.x0 + self.columns - 1}, y {self.y0}..{self.y0 + self.rows - 1}"


#: One warped layer of a window: its box in window pixels and (rows, cols, 4) uint8 RGB + alpha.
_Layer = tuple[tuple[int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class _Window:
    """A warped window: layers by key (one for a raster; per sheet group or sheet for a mosaic)."""

    grid: _WindowGrid
    layers: dict[Hashable, _Layer]

    @property
    def nbytes(self) -> int:
        return sum(pixels.nbytes for _, pixels in self.layers.values())

    def cut(self, tile: TileId, keys: Sequence[Hashable], *, first_valid: bool) -> Tile:
        """``tile``'s pixels from the layers ``keys`` (see :meth:`cut_box`)."""
        return self.cut_box(self.grid.tile_box(tile), keys, first_valid=first_valid)

    def cut_box(self, box: tuple[int, int, int, int], keys: Sequence[Hashable], *, first_valid: bool) -> Tile:
        """The pixels ``box`` from the layers ``keys``, invalid pixels black (a warp's partly covered edge
        pixels carry colour below the validity threshold) and pixels no layer covers invalid.
        ``first_valid``: composite the layers, the first valid pixel winning; otherwise one layer is copied."""
        tc0, tr0, tc1, tr1 = box
        width, height = tc1 - tc0, tr1 - tr0
        if len(keys) == 1 and (layer := self.layers.get(keys[0])) is not None:
            (c0, r0, c1, r1), pixels = layer
            if c0 <= tc0 and r0 <= tr0 and tc1 <= c1 and tr1 <= r1:  # the common case: one layer under it all
                part = pixels[tr0 - r0 : tr1 - r0, tc0 - c0 : tc1 - c0]
                alpha = part[..., 3] >= _ALPHA_VALID
                rgb = np.empty((height, width, 3), np.uint8)
                for channel in range(3):  # 3-4x faster than one copy of the 3-of-4-bytes view
                    rgb[..., channel] = part[..., channel]
                return Tile(rgb=rgb if alpha.all() else np.where(alpha[..., None], rgb, 0), valid=alpha)
        rgb = np.zeros((height, width, 3), np.uint8)
        valid = np.zeros((height, width), bool)
        for key in keys:
            layer = self.layers.get(key)
            if layer is None:
                continue
            (c0, r0, c1, r1), pixels = layer
            ic0, ir0, ic1, ir1 = max(c0, tc0), max(r0, tr0), min(c1, tc1), min(r1, tr1)
            if ic0 >= ic1 or ir0 >= ir1:
                continue
            part = pixels[ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0]
            region = np.s_[ir0 - tr0 : ir1 - tr0, ic0 - tc0 : ic1 - tc0]
            if first_valid:
                take = (part[..., 3] >= _ALPHA_VALID) & ~valid[region]
                # copyto with a broadcast mask: half the cost of boolean fancy indexing on this layout
                np.copyto(rgb[region], part[..., :3], where=take[..., None])
                valid[region] |= take
            else:
                alpha = part[..., 3] >= _ALPHA_VALID
                rgb[region] = np.where(alpha[..., None], part[..., :3], 0)
                valid[region] = alpha
        return Tile(rgb=rgb, valid=valid)


K = TypeVar("K", bound=Hashable)


class _WindowCache(Generic[K]):
    """Warped windows by key, least recently used dropped past ``max_bytes`` per open reader scope
    (:meth:`reader`; one bound when none is open; the newest window always stays). A window several threads
    ask for at once is warped by the first; the others wait for it."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._lock = threading.Lock()  # guards the maps only, never held while warping
        self._windows: OrderedDict[K, _Window] = OrderedDict()
        self._pending: dict[K, Future[_Window]] = {}
        self._bytes = 0
        self._readers = 0

    @contextmanager
    def reader(self) -> Iterator[None]:
        """One more reader's working set kept while the scope is open (:meth:`TileSource.reading`)."""
        with self._lock:
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1
                self._trim()

    def _trim(self) -> None:
        """Drop the least recently used windows past the bound (the lock held)."""
        bound = self._max_bytes * max(1, self._readers)
        while self._bytes > bound and len(self._windows) > 1:
            _, dropped = self._windows.popitem(last=False)
            self._bytes -= dropped.nbytes

    def get(self, key: K, render: Callable[[], _Window]) -> _Window:
        with self._lock:
            window = self._windows.get(key)
            if window is not None:
                self._windows.move_to_end(key)
                return window
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not owner:
            return pending.result()
        try:
            window = render()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._windows[key] = window
            self._bytes += window.nbytes
            self._trim()
        pending.set_result(window)
        return window

    def clear(self) -> None:
        with self._lock:
            self._windows.clear()
            self._bytes = 0


V = TypeVar("V")


class _Memo(Generic[K, V]):
    """Values by key for the latest ``size`` keys (oldest dropped first), so a source's per-tile plans stay
    bounded however large the area. Thread-safe; a race only computes a value twice, with the same result."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[K, V] = OrderedDict()

    def get_many(self, keys: Sequence[K], compute: Callable[[list[K]], list[V]]) -> list[V]:
        """The value of every key, ``compute`` called once with the keys not remembered (in order, unique)."""
        unique = list(dict.fromkeys(keys))
        with self._lock:
            found = {k: self._items[k] for k in unique if k in self._items}
        missing = [k for k in unique if k not in found]
        if missing:
            values = compute(missing)
            found.update(zip(missing, values, strict=True))
            with self._lock:
                self._items.update(zip(missing, values, strict=True))
                while len(self._items) > self._size:
                    self._items.popitem(last=False)
        return [found[k] for k in keys]


def _warp_to_window(
    src: np.ndarray,
    src_transform: Affine,
    src_crs: Any,
    to_source: Any,
    grid: _WindowGrid,
    box: tuple[int, int, int, int],
    gdal_only: bool = False,
) -> np.ndarray:
    """Warp (4, h, w) RGB + alpha source pixels into ``box`` of ``grid``: bilinear on premultiplied alpha, so
    invalid pixels never blend into valid ones. (rows, cols, 4) uint8. ``to_source`` maps EPSG:3857 to
    ``src_crs`` (a pyproj Transformer).

    Pillow resamples: the box is cut into cells of :data:`_MESH_CELL` pixels whose corners are projected
    exactly and which map bilinearly in between - GDAL's approximate transformer, with the same 0.125 px
    bound, checked at every cell centre. Where the map is separable (source columns follow the box's
    columns linearly, source rows its rows: a north-up raster in a geographic or cylindrical CRS, such as
    EPSG:4326), each row of cells is one separable resize (Pillow's fastest path); otherwise Pillow's mesh
    transform warps cell by cell. GDAL's own warper takes over where the check fails or a corner does not
    project, and wherever ``gdal_only`` (it is 3-5x slower per pixel: its kernel for alpha bands is the
    general case)."""
    col0, row0, col1, row1 = box
    cols, rows = col1 - col0, row1 - row0
    # Cell edges on the window's own lattice, not the box's: a pixel gets the same map whatever box holds it
    # (the sheets cut from one raster then give its very pixels).
    xs = np.unique(np.r_[0, np.arange(-col0 % _MESH_CELL, cols, _MESH_CELL), cols]).astype(np.float64)
    ys = np.unique(np.r_[0, np.arange(-row0 % _MESH_CELL, rows, _MESH_CELL), rows]).astype(np.float64)
    mid_x, mid_y = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    dst = grid.transform(box)
    inverse = ~src_transform

    def source_px(px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mx, my = np.meshgrid(dst.c + px * dst.a, dst.f + py * dst.e)
        sx, sy = to_source.transform(mx, my, errcheck=False)
        sx, sy = np.asarray(sx, np.float64), np.asarray(sy, np.float64)
        return inverse.a * sx + inverse.b * sy + inverse.c, inverse.d * sx + inverse.e * sy + inverse.f

    u, v = source_px(xs, ys)
    exact_u, exact_v = source_px(mid_x, mid_y)
    corners_u = (u[:-1, :-1] + u[1:, :-1] + u[:-1, 1:] + u[1:, 1:]) / 4
    corners_v = (v[:-1, :-1] + v[1:, :-1] + v[:-1, 1:] + v[1:, 1:]) / 4
    error = np.maximum(np.abs(corners_u - exact_u), np.abs(corners_v - exact_v))
    projects = np.isfinite(u).all() and np.isfinite(v).all() and np.isfinite(error).all()
    if gdal_only or not projects or error.max() > _MESH_ERROR:
        return _gdal_warp(src, src_transform, src_crs, grid, box)
    pixels = np.ascontiguousarray(np.moveaxis(src, 0, -1))
    out = np.zeros((rows, cols, 4), np.uint8)
    # All-valid source pixels (a window inside the raster) need no premultiplied alpha: resample them as RGBX,
    # whose fourth byte Pillow keeps at 255 wherever it samples the image, and paste without conversion.
    opaque = bool(pixels[..., 3].min() == 255)
    image = Image.fromarray(pixels, "RGBA").convert("RGBX" if opaque else "RGBa")
    if _resize_strips(image, _array_image(out, "RGBX" if opaque else "RGBA"), xs, ys, u, v):
        return out
    mesh = [
        (
            (int(xs[i]), int(ys[j]), int(xs[i + 1]), int(ys[j + 1])),
            (u[j, i], v[j, i], u[j + 1, i], v[j + 1, i], u[j + 1, i + 1], v[j + 1, i + 1], u[j, i + 1], v[j, i + 1]),
        )
        for j in range(len(ys) - 1)
        for i in range(len(xs) - 1)
    ]
    # Pixels mapped off the image are filled with zeros: alpha (or X) 0, invalid.
    warped = image.transform((cols, rows), Image.Transform.MESH, mesh, Image.Resampling.BILINEAR)
    _array_image(out, "RGBX" if opaque else "RGBA").paste(warped)
    return out


def _array_image(pixels: np.ndarray, mode: str) -> Image.Image:
    """A Pillow image of ``mode`` ("RGBA" or "RGBX") over the memory of (rows, cols, 4) uint8 ``pixels``:
    pasting into it writes the array (an RGBa paste is un-premultiplied on the way), with no copy out of
    Pillow. frombuffer marks such images read-only to protect foreign buffers; this one is ours to write."""
    image = Image.frombuffer(mode, (pixels.shape[1], pixels.shape[0]), pixels, "raw", mode, 0, 1)
    image.readonly = 0
    return image


def _resize_strips(
    image: Image.Image, target: Image.Image, xs: np.ndarray, ys: np.ndarray, u: np.ndarray, v: np.ndarray
) -> bool:
    """The separable case of :func:`_warp_to_window`, pasted into ``target``: one resize per row of mesh
    cells. False (nothing written) unless source column ``u`` is one linear function of the box column at
    every corner and source row ``v`` depends on the box row alone (both increasing). Pixels whose footprint
    leaves the source image stay zero (invalid), as in GDAL's warp."""
    cols = int(xs[-1])
    width, height = image.size
    du = (u[0, -1] - u[0, 0]) / cols
    if du <= 0 or np.abs(u - (u[0, 0] + xs[None, :] * du)).max() > _MESH_ERROR:
        return False
    if np.abs(v - v[:, :1]).max() > _MESH_ERROR or np.any(np.diff(v[:, 0]) <= 0):
        return False
    # Columns whose whole footprint lies on the image (Pillow's resize box must).
    col0 = max(0, math.ceil(-u[0, 0] / du - 1e-9))
    col1 = min(cols, math.floor((width - u[0, 0]) / du + 1e-9))
    if col1 <= col0:
        return True
    left, right = u[0, 0] + col0 * du, u[0, 0] + col1 * du
    for j in range(len(ys) - 1):
        top, bottom = float(v[j, 0]), float(v[j + 1, 0])
        dv = (bottom - top) / (ys[j + 1] - ys[j])
        row0 = max(0, math.ceil(-top / dv - 1e-9))
        row1 = min(int(ys[j + 1] - ys[j]), math.floor((height - top) / dv + 1e-9))
        if row1 <= row0:
            continue
        box = (
            min(max(left, 0.0), width),
            min(max(top + row0 * dv, 0.0), height),
            min(max(right, 0.0), width),
            min(max(top + row1 * dv, 0.0), height),
        )
        strip = image.resize((col1 - col0, row1 - row0), Image.Resampling.BILINEAR, box=box)
        target.paste(strip, (col0, int(ys[j]) + row0))
    return True


def _gdal_warp(
    src: np.ndarray, src_transform: Affine, src_crs: Any, grid: _WindowGrid, box: tuple[int, int, int, int]
) -> np.ndarray:
    """:func:`_warp_to_window` by GDAL's warper (bilinear, the alpha band carried)."""
    col0, row0, col1, row1 = box
    dst = np.zeros((4, row1 - row0, col1 - col0), np.uint8)
    rasterio.warp.reproject(
        src,
        dst,
        src_transform=src_transform,
        src_crs=src_crs,
        dst_transform=grid.transform(box),
        dst_crs=_MERCATOR_CRS,
        resampling=Resampling.bilinear,
        src_alpha=4,
        dst_alpha=4,
        num_threads=1,
    )
    return np.ascontiguousarray(np.moveaxis(dst, 0, -1))


_gdal_cache_bounded = False


def _bound_gdal_block_cache() -> None:
    """Set GDAL's block cache to :data:`GDAL_CACHE_BYTES` once per process, unless the environment sets
    GDAL_CACHEMAX (a crew's own choice wins) or it is already smaller."""
    global _gdal_cache_bounded
    if _gdal_cache_bounded or "GDAL_CACHEMAX" in os.environ:
        return
    _gdal_cache_bounded = True
    try:
        current = int(rasterio.env.get_gdal_config("GDAL_CACHEMAX"))
    except (TypeError, ValueError):
        current = GDAL_CACHE_BYTES + 1
    if current > GDAL_CACHE_BYTES:
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_BYTES)


# --------------------------------------------------------------------------------------------------
# GeoTIFF (any CRS), reprojected window by window


class GeoTiffSource(_SourceBase):
    """A georeferenced raster (GeoTIFF or anything GDAL reads) in any CRS, warped to Web-Mercator tiles.

    A tile is cut from its window (:data:`WINDOW_TILES`, module docstring): the window's part over the
    raster reads the source pixels under its footprint (decimated via overviews/average when the source is
    much finer than the tiles) and warps them with bilinear resampling into the exact EPSG:3857 grid in one
    call. Validity comes from the dataset mask (nodata value, internal mask or alpha band), carried through
    the warp as an alpha band so invalid pixels never blend into valid ones; pixels outside the raster are
    invalid. Whether a tile exists (None: outside the raster) and its raw digest come from the tile's own
    read plan. ``window_tiles=(1, 1), gdal_warp=True`` warps tile by tile with GDAL's warper: the reference
    the window warp is tested and measured against. Thread safety: one rasterio dataset handle per thread;
    one warp per window.

    A GDAL VRT (``.vrt``, e.g. from ``gdalbuildvrt sheets/*.tif``) reads as one raster too. Its raw digests
    (:class:`_VrtSources`) cover, per tile, the *file versions* of the source files under it rather than
    their block bytes: editing one sheet re-decodes the tiles over that sheet, but so does merely touching
    it, and a copy of the imagery is decoded again. Sheets listed directly (a glob) digest block bytes.
    """

    def __init__(
        self,
        path: Path | str,
        tile_size: int = 256,
        window_tiles: tuple[int, int] = WINDOW_TILES,
        gdal_warp: bool = False,
    ) -> None:
        super().__init__(tile_size)
        self.path = Path(path)
        self._where = str(self.path)
        if not self.path.is_file():
            raise SourceError(
                "orthophoto GeoTIFF not found", where=self._where, hint="check the [orthophoto] path in the sortie"
            )
        if len(window_tiles) != 2 or min(window_tiles) < 1:
            raise ValueError(f"window_tiles must be two positive integers, got {window_tiles!r}")
        self._window_shape = (int(window_tiles[0]), int(window_tiles[1]))
        self._gdal_warp = gdal_warp
        self._windows: _WindowCache[tuple[int, int, int]] = _WindowCache(WINDOW_CACHE_BYTES)
        _bound_gdal_block_cache()
        self._handles: _PerThread[Any] = _PerThread(self._open, lambda ds: ds.close())
        self._blocks: _TiffBlocks | _VrtSources | None = None
        self._plans: _Memo[TileId, _ReadPlan | None] = _Memo(MEMO_TILES)
        self._transformers = threading.local()
        ds = self._handles.get(self._where)
        try:
            self._check_vrt_sources(ds)
            self._inspect(ds)
            self._blocks = _TiffBlocks.open(ds, self.path, self._handles, self._decoder_header())
            if self._blocks is None:
                self._blocks = _VrtSources.open(ds, self.path, self._decoder_header())
        except BaseException:
            self._handles.close()
            raise

    def _open(self) -> Any:
        try:
            return rasterio.open(self.path)
        except rasterio.errors.RasterioError as exc:
            raise SourceError(
                f"cannot open the orthophoto ({_gdal_reason(exc)})",
                where=self._where,
                hint="the file is corrupt or not a raster GDAL reads; re-export it as a GeoTIFF",
            ) from exc

    def _check_vrt_sources(self, ds: Any) -> None:
        """GDAL opens a VRT whose source files are gone and fails only when a tile reads them: name them now."""
        if ds.driver != "VRT":
            return
        missing = [f for f in vrt_source_files(self.path) if not f.is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise SourceError(
                f"the VRT names source file {missing[0]}{more}, which does not exist",
                where=self._where,
                hint="restore the sheets, or rebuild the VRT over the files you have (gdalbuildvrt)",
            )

    def _inspect(self, ds: Any) -> None:
        if ds.transform.is_identity and ds.gcps[0]:
            raise SourceError(
                "the raster is georeferenced by ground control points only",
                where=self._where,
                hint="warp it to a grid first: gdalwarp -t_srs EPSG:3857 in.tif out.tif",
            )
        if ds.crs is None or ds.transform.is_identity:
            raise SourceError(
                "the raster has no georeferencing (no CRS or geotransform)",
                where=self._where,
                hint="export it with georeferencing, or assign it: gdal_edit.py -a_srs EPSG:xxxx -a_ullr ...",
            )
        if ds.dtypes[0] != "uint8":
            raise SourceError(
                f"the raster is {ds.dtypes[0]}; only 8-bit imagery is supported",
                where=self._where,
                hint="scale it to 8 bit: gdal_translate -ot Byte -scale in.tif out.tif",
            )
        interp = list(ds.colorinterp)
        self._palette: np.ndarray | None = None
        if ds.count in (1, 2):  # grey (+ alpha) or palette
            self._indexes: list[int] = [1]
            if interp[0] == ColorInterp.palette:
                colormap = ds.colormap(1)
                lut = np.zeros((256, 3), np.uint8)
                for value, rgba in colormap.items():
                    lut[value] = rgba[:3]
                self._palette = lut
        elif ds.count >= 3:
            by_interp = {ci: i + 1 for i, ci in enumerate(interp)}
            wanted = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
            self._indexes = [by_interp[c] for c in wanted] if all(c in by_interp for c in wanted) else [1, 2, 3]
        else:  # pragma: no cover - GDAL rasters have at least one band
            raise SourceError("the raster has no bands", where=self._where)
        self._crs = ds.crs
        self._transform = ds.transform
        self._inverse = ~ds.transform
        self._width, self._height, self._count = ds.width, ds.height, ds.count
        try:
            west, south, east, north = rasterio.warp.transform_bounds(ds.crs, _WGS84_CRS, *ds.bounds, densify_pts=21)
        except Exception as exc:
            raise SourceError(
                f"cannot transform the raster's bounds to WGS84 ({exc})",
                where=self._where,
                hint="check the raster's CRS",
            ) from exc
        self._lonlat: Bounds = (west, south, east, north)
        # Web-Mercator stops at ±85.05°; clamp so the footprint stays finite.
        south_m, north_m = (max(-MAX_LATITUDE, min(MAX_LATITUDE, v)) for v in (south, north))
        self._mercator = rasterio.warp.transform_bounds(_WGS84_CRS, _MERCATOR_CRS, west, south_m, east, north_m)
        logger.debug("opened %s", self.describe())

    # -- TileSource

    def _read_plan(self, tile: TileId) -> _ReadPlan | None:
        return self._read_plans([tile])[0]

    def _read_plans(self, tiles: Sequence[TileId]) -> list[_ReadPlan | None]:
        """Per tile, the source window ``read_tile`` reads, its output size and whether the read is
        decimated; None when the tile lies outside the raster. Remembered for the latest :data:`MEMO_TILES`
        tiles (a plan depends only on the raster's georeferencing, and a shard asks up to three times: digest,
        read, digest again) and computed for all missing tiles in one vectorised transform."""
        return self._plans.get_many(tiles, self._plan_many)

    def _plan_many(self, tiles: list[TileId]) -> list[_ReadPlan | None]:
        plans: list[_ReadPlan | None] = [None] * len(tiles)
        mw, ms, me, mn = self._mercator
        inside, boxes = [], []
        for i, tile in enumerate(tiles):
            if not in_grid(tile):
                continue
            bounds = mercator_bounds(tile)
            if bounds[0] >= me or bounds[2] <= mw or bounds[1] >= mn or bounds[3] <= ms:
                continue
            inside.append(i)
            boxes.append(bounds)
        if inside:
            pixels = np.full((len(inside), 2), self.tile_size)
            for i, plan in zip(inside, self._box_plans(np.asarray(boxes), pixels), strict=True):
                plans[i] = plan
        return plans

    def _box_plans(self, boxes: np.ndarray, pixels: np.ndarray) -> list[_ReadPlan | None]:
        """Per EPSG:3857 box (west, south, east, north) of (width, height) output pixels: the source window
        under it, the size it is read at, and whether that read is decimated; None outside the raster."""
        plans: list[_ReadPlan | None] = []
        for (window, footprint), (width, height) in zip(self._source_windows(boxes), pixels, strict=True):
            if window is None:
                plans.append(None)
                continue
            # Source pixels per output pixel; decimate the read when the source is much finer.
            scale = min(footprint[0] / width, footprint[1] / height)
            out_w, out_h = int(window.width), int(window.height)
            decimated = scale > _DECIMATE_ABOVE
            if decimated:
                out_w, out_h = max(1, round(out_w / scale)), max(1, round(out_h / scale))
            plans.append((window, out_w, out_h, decimated))
        return plans

    def read_tile(self, tile: TileId) -> Tile | None:
        if self._read_plan(tile) is None:
            return None
        return self._window(tile).cut(tile, (None,), first_valid=False)

    def reading(self) -> AbstractContextManager[None]:
        """:meth:`TileSource.reading`: one more reader's warped windows kept while the scope is open."""
        return self._windows.reader()

    def _window(self, tile: TileId) -> _Window:
        grid = _WindowGrid.of(tile, self.tile_size, self._window_shape)
        return self._windows.get((grid.zoom, grid.x0, grid.y0), lambda: self._render(grid))

    def read_pixels(self, zoom: int, x0: int, y0: int, x1: int, y1: int) -> Tile:
        """Global pixels ``[x0, x1) x [y0, y1)`` at ``zoom`` warped at once (:func:`read_pixels`)."""
        grid, box, inside = _WindowGrid.around(zoom, x0, y0, x1, y1, self.tile_size)
        return self._render(grid, inside).cut_box(box, (None,), first_valid=False)

    def _render(self, grid: _WindowGrid, region: tuple[int, int, int, int] | None = None) -> _Window:
        box = _intersect(grid.box_under(self._mercator), region)
        pixels = self._warp(grid, box) if _nonempty(box) else None
        return _Window(grid, {} if pixels is None else {None: (box, pixels)})

    def _warp(self, grid: _WindowGrid, box: tuple[int, int, int, int]) -> np.ndarray | None:
        """``box`` of ``grid`` as (rows, cols, 4) uint8: RGB and alpha (>= _ALPHA_VALID is valid); None when
        no source pixel lies under it. A sheet of a mosaic warps only the part of the window its
        footprint covers."""
        plan = self._plan_of_box(grid, box)
        if plan is None:
            return None
        window, out_w, out_h, _ = plan
        src = self._source_pixels(grid.describe(), plan)
        src_transform = (
            self._transform
            @ Affine.translation(window.col_off, window.row_off)
            @ Affine.scale(window.width / out_w, window.height / out_h)
        )
        return _warp_to_window(src, src_transform, self._crs, self._to_source(), grid, box, self._gdal_warp)

    def _plan_of_box(self, grid: _WindowGrid, box: tuple[int, int, int, int]) -> _ReadPlan | None:
        size = np.asarray([[box[2] - box[0], box[3] - box[1]]])
        return self._box_plans(np.asarray([grid.box_bounds(box)]), size)[0]

    def _source_pixels(self, tiles: str, plan: _ReadPlan) -> np.ndarray:
        """(4, out_h, out_w) uint8 of the plan's source window: RGB (palette applied) and the dataset mask."""
        window, out_w, out_h, _ = plan
        ds = self._handles.get(self._where)
        try:
            bands = ds.read(
                self._indexes,
                window=window,
                out_shape=(len(self._indexes), out_h, out_w),
                # Palette indices are labels: averaging them would invent colours.
                resampling=Resampling.nearest if self._palette is not None else Resampling.average,
            )
            mask = ds.dataset_mask(window=window, out_shape=(out_h, out_w))
        except rasterio.errors.RasterioError as exc:
            raise SourceError(
                f"reading the source pixels of tiles {tiles} failed ({_gdal_reason(exc)})",
                where=self._where,
                hint="the file may be truncated or corrupt; check it with gdalinfo -checksum",
            ) from exc
        src = np.empty((4, out_h, out_w), np.uint8)
        if self._palette is not None:
            src[:3] = np.moveaxis(self._palette[bands[0]], -1, 0)
        else:
            src[:3] = bands if len(self._indexes) == 3 else bands[0]
        src[3] = mask
        return src

    def _source_windows(self, boxes: np.ndarray) -> list[tuple[Window | None, tuple[float, float]]]:
        """Per mercator box (west, south, east, north): the source pixel window under it (its edges
        densified, projected, padded for the resampling kernel, clipped to the raster) and the box's
        unclipped footprint size in source pixels."""
        steps = np.linspace(0.0, 1.0, _DENSIFY_PTS + 2)
        w, s_, e, n = (boxes[:, k : k + 1] for k in range(4))
        along_x = w + (e - w) * steps
        along_y = s_ + (n - s_) * steps
        xs = np.concatenate([along_x, along_x, np.repeat(w, steps.size, 1), np.repeat(e, steps.size, 1)], axis=1)
        ys = np.concatenate([np.repeat(s_, steps.size, 1), np.repeat(n, steps.size, 1), along_y, along_y], axis=1)
        px, py = self._to_source().transform(xs.ravel(), ys.ravel(), errcheck=False)
        px, py = np.asarray(px).reshape(xs.shape), np.asarray(py).reshape(xs.shape)
        finite = np.isfinite(px).all(axis=1) & np.isfinite(py).all(axis=1)
        left, right, bottom, top = px.min(axis=1), px.max(axis=1), py.min(axis=1), py.max(axis=1)
        # The four corners through the inverse geotransform, vectorised (the same products and sums, in the
        # same order, as ``Affine @ (x, y)``: bit-identical windows, ~2x faster for a shard's boxes).
        inv = self._inverse
        xs4 = np.stack([left, left, right, right], axis=1)
        ys4 = np.stack([bottom, top, bottom, top], axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            cols = xs4 * inv.a + ys4 * inv.b + inv.c
            rows = xs4 * inv.d + ys4 * inv.e + inv.f
            usable = finite & np.isfinite(cols).all(axis=1) & np.isfinite(rows).all(axis=1)
            col_min, col_max = cols.min(axis=1), cols.max(axis=1)
            row_min, row_max = rows.min(axis=1), rows.max(axis=1)
            pad = 2
            c0 = np.maximum(0, np.floor(col_min) - pad)
            r0 = np.maximum(0, np.floor(row_min) - pad)
            c1 = np.minimum(self._width, np.ceil(col_max) + pad)
            r1 = np.minimum(self._height, np.ceil(row_max) + pad)
        out: list[tuple[Window | None, tuple[float, float]]] = []
        rows_of = zip(
            usable.tolist(),
            (col_max - col_min).tolist(),
            (row_max - row_min).tolist(),
            *(np.where(usable, v, 0).astype(np.int64).tolist() for v in (c0, r0, c1, r1)),
            strict=True,
        )
        for ok, width, height, left_col, top_row, right_col, bottom_row in rows_of:
            if not ok:  # the box does not project into the source CRS (far outside its domain)
                out.append((None, (0.0, 0.0)))
            elif right_col <= left_col or bottom_row <= top_row:
                out.append((None, (width, height)))
            else:
                window = Window(left_col, top_row, right_col - left_col, bottom_row - top_row)
                out.append((window, (width, height)))
        return out

    def _to_source(self) -> Any:
        """EPSG:3857 → the raster's CRS, one pyproj Transformer per thread (they are not shared)."""
        transformer = getattr(self._transformers, "value", None)
        if transformer is None:
            transformer = pyproj.Transformer.from_crs(3857, self._crs.to_wkt(), always_xy=True)
            self._transformers.value = transformer
        return transformer

    def bounds_lonlat(self) -> Bounds:
        return self._lonlat

    def describe(self) -> str:
        gsd = math.hypot(self._transform.a, self._transform.d)
        return (
            f"GeoTIFF {self.path} ({self._crs.to_string()}, {self._width}x{self._height} px, "
            f"{gsd:.3g} units/px, {self._count} band(s))"
        )

    def fingerprint(self) -> str:
        ds = self._handles.get(self._where)
        # Sidecars (.ovr, .msk, .aux.xml) change what is read, so they are part of the identity.
        return _stat_fingerprint([Path(f) for f in ds.files] or [self.path])

    def raw_identity(self) -> str:
        if self._blocks is not None:
            return self._blocks.identity
        return _decoder_identity("geotiff", self.tile_size, self._decoder_header())

    def raw_digest(self, tile: TileId) -> str | None:
        digests = self.raw_digests([tile])
        return None if digests is None else digests[0]

    def raw_digests(self, tiles: Sequence[TileId]) -> list[str] | None:
        blocks = self._blocks
        if blocks is None or not blocks.unchanged():
            return None
        return [
            NO_TILE_DIGEST if plan is None else blocks.digest(self._digest_window(plan), with_overviews=plan[3])
            for plan in self._read_plans(tiles)
        ]

    def raw_digests_and_inputs(self, tiles: Sequence[TileId]) -> tuple[list[str], tuple[str, ...]] | None:
        """:class:`DigestsItsInputs`: the inputs are the file's blocks (and its overviews) under the tiles'
        windows. A VRT's digests are not (its sources are digested whole): None."""
        blocks = self._blocks
        if not isinstance(blocks, _TiffBlocks) or not blocks.unchanged():
            return None
        used: set[str] = set()
        digests = [
            NO_TILE_DIGEST if plan is None else blocks.digest(self._digest_window(plan), plan[3], used)
            for plan in self._read_plans(tiles)
        ]
        return digests, tuple(sorted(used))

    def inputs_digest(self, inputs: Sequence[str]) -> str | None:
        blocks = self._blocks
        if not isinstance(blocks, _TiffBlocks) or not blocks.unchanged():
            return None
        return blocks.inputs_digest(inputs)

    def _digest_window(self, plan: _ReadPlan) -> Window:
        """The source pixels a tile's warped pixels may depend on: its read window, widened by the reach of
        the kernels of its window's warp (one more source pixel for the transformer's approximation; two
        decimated pixels for a decimated read, whose averaging cells another tile of the window sets)."""
        window, out_w, _, decimated = plan
        reach = 1 + (2 * math.ceil(window.width / out_w) if decimated else 0)
        c0, r0 = max(0, int(window.col_off) - reach), max(0, int(window.row_off) - reach)
        c1 = min(self._width, int(window.col_off + window.width) + reach)
        r1 = min(self._height, int(window.row_off + window.height) + reach)
        return Window(c0, r0, c1 - c0, r1 - r0)

    def _decoder_header(self) -> dict[str, Any]:
        """What besides the file decides a tile's pixels: tile size, palette and the warp's window shape."""
        palette = self._palette
        return {
            "tile_size": self.tile_size,
            "palette": hashlib.sha256(palette.tobytes()).hexdigest() if palette is not None else None,
            "window_tiles": list(self._window_shape),
            "warper": "gdal" if self._gdal_warp else "pillow",
        }

    def close(self) -> None:
        self._handles.close()
        self._windows.clear()
        if self._blocks is not None:
            self._blocks.close()


class _VrtSources:
    """Raw digests of a GDAL VRT: a tile's digest covers the VRT itself (its XML and sidecars, in
    :attr:`identity`) and the version (:func:`file_version`: size, times, inode) of every source file whose
    destination rectangle meets the tile's read window. File versions, not block bytes: any write to a sheet
    moves the digests of the tiles over that sheet (a touched but unchanged sheet costs a re-decode, never a
    wrong reuse), and a copy of the imagery elsewhere is decoded once. Sources, the VRT and its sidecars are
    checked for changes on every :meth:`unchanged` (one stat each)."""

    def __init__(self, identity: str, files: list[Path], sources: list[tuple[float, float, float, float, int]]) -> None:
        self.identity = identity
        self._files = files  # the VRT, its sidecars, then every source file
        self._versions = [file_version(f) for f in files]
        self._sources = sources  # (x0, y0, x1, y1) destination rectangle in VRT pixels, index into files

    @classmethod
    def open(cls, ds: Any, path: Path, decoder: dict[str, Any]) -> _VrtSources | None:
        """None unless every source is a plain file (not ``/vsi…``, not another VRT) that exists."""
        if ds.driver != "VRT":
            return None
        try:
            xml = path.read_bytes()
            root = ElementTree.fromstring(xml)
        except (OSError, ElementTree.ParseError):
            return None
        sidecars = [Path(f) for f in ds.files if Path(f).resolve() != path.resolve()]
        files = [path]
        sources: list[tuple[float, float, float, float, int]] = []
        for band in root.iter("VRTRasterBand"):
            for element in band:
                name_element = element.find("SourceFilename")
                if name_element is None:
                    continue
                name = (name_element.text or "").strip()
                if not name or name.startswith("/vsi") or name.lower().endswith(".vrt"):
                    return None
                relative = name_element.get("relativeToVRT", "0").strip() == "1"
                source = (path.parent / name if relative else Path(name)).resolve()
                if not source.is_file():
                    return None
                if source not in files:
                    files.append(source)
                rect = element.find("DstRect")
                try:
                    x0, y0 = (float(rect.get(k, "0")) for k in ("xOff", "yOff")) if rect is not None else (0.0, 0.0)
                    w, h = (
                        (float(rect.get(k, "0")) for k in ("xSize", "ySize"))
                        if rect is not None
                        else (float(ds.width), float(ds.height))
                    )
                except ValueError:
                    return None
                sources.append((x0, y0, x0 + w, y0 + h, files.index(source)))
        sidecars = [f for f in sidecars if f.resolve() not in files]
        header = {
            "vrt": hashlib.sha256(xml).hexdigest(),
            "sidecars": [[str(f), *file_version(f)] for f in sidecars if f.is_file()],
            "profile": {k: v for k, v in ds.profile.items() if k != "crs"},
            "crs": ds.crs.to_wkt() if ds.crs else None,
            "colorinterp": [c.name for c in ds.colorinterp],
            "mask_flags": [[f.name for f in flags] for flags in ds.mask_flag_enums],
            "overviews": [ds.overviews(b) for b in range(1, ds.count + 1)],
            "gdal": rasterio.__gdal_version__,
            "rasterio": rasterio.__version__,
            **decoder,
        }
        try:
            return cls(_decoder_identity("geotiff-vrt", decoder["tile_size"], header), files + sidecars, sources)
        except OSError:
            return None

    def unchanged(self) -> bool:
        try:
            return [file_version(f) for f in self._files] == self._versions
        except OSError:
            return False

    def digest(self, window: Window, with_overviews: bool) -> str:
        c0, r0 = float(window.col_off), float(window.row_off)
        c1, r1 = c0 + float(window.width), r0 + float(window.height)
        digest = hashlib.sha256(f"vrt-window:{c0}:{r0}:{c1}:{r1}".encode())
        for x0, y0, x1, y1, k in self._sources:
            if x0 < c1 and x1 > c0 and y0 < r1 and y1 > r0:
                digest.update(f"|{x0},{y0},{x1},{y1}:{self._files[k]}:{self._versions[k]}".encode())
        return digest.hexdigest()

    def close(self) -> None:
        pass  # holds no handle


#: The name :meth:`_TiffBlocks.digest` gives the overviews among a tile's inputs.
_OVERVIEWS_INPUT = "overviews"


class _TiffBlocks:
    """Digests of a single-file GeoTIFF's still-encoded blocks, so a re-provision can tell which tiles'
    source pixels changed without decoding and warping them (GDAL rewrites only the blocks an edit
    touches). A tile's digest covers every full-resolution block under its padded read window, plus a
    digest of every block of every overview level when its read is decimated (GDAL may pick any of
    them). Block digests are remembered for the source's lifetime; a file whose size or change times
    moved since it was opened gives no digests at all (the file was edited mid-run)."""

    def __init__(self, path: Path, handles: _PerThread[Any], bands: list[int], identity: str) -> None:
        self.path = path
        self.identity = identity
        self._handles = handles
        self._bands = bands
        self._fd = os.open(path, os.O_RDONLY)
        # Closed by close(), or when the source is dropped (a process keeps one source per file version).
        self._close_fd = weakref.finalize(self, os.close, self._fd)
        self._version = file_version(self._fd)  # the file this descriptor reads, not whatever the path holds now
        self._block_digests: dict[tuple[int, int, int], bytes] = {}
        self._overview_digest: bytes | None = None

    @classmethod
    def open(cls, ds: Any, path: Path, handles: _PerThread[Any], decoder: dict[str, Any]) -> _TiffBlocks | None:
        """None unless the raster is one plain GeoTIFF file whose validity comes from nodata, an alpha band
        or nothing: masks and overviews in sidecar files, or an internal mask IFD, have blocks this
        cannot locate."""
        if ds.driver != "GTiff" or [Path(f).resolve() for f in ds.files] != [path.resolve()]:
            return None
        for flags in ds.mask_flag_enums:
            if MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags:
                return None
        # Pixel-interleaved: band 1's blocks hold every band.
        bands = [1] if ds.interleaving == Interleaving.pixel else list(range(1, ds.count + 1))
        header = {
            "profile": {k: v for k, v in ds.profile.items() if k != "crs"},
            "crs": ds.crs.to_wkt() if ds.crs else None,
            "colorinterp": [c.name for c in ds.colorinterp],
            "mask_flags": [[f.name for f in flags] for flags in ds.mask_flag_enums],
            "overviews": [ds.overviews(b) for b in bands],
            "image_structure": ds.tags(ns="IMAGE_STRUCTURE"),
            "gdal": rasterio.__gdal_version__,
            "rasterio": rasterio.__version__,
            **decoder,
        }
        try:
            return cls(path, handles, bands, _decoder_identity("geotiff", decoder["tile_size"], header))
        except OSError:
            return None

    def unchanged(self) -> bool:
        try:
            return file_version(self.path) == self._version
        except OSError:
            return False

    def _block(self, ds: Any, band: int, col: int, row: int, overview: int | None = None) -> bytes:
        key = (band if overview is None else -(band * 1000 + overview), col, row)
        cached = self._block_digests.get(key)
        if cached is not None:
            return cached
        kwargs = {} if overview is None else {"ovr": overview}
        offset = ds.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band, **kwargs)
        size = ds.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band, **kwargs)
        header = f"{band}:{overview}:{col}:{row}:".encode()
        if offset and size and int(offset) > 0:  # absent or sparse blocks decode as nodata/zero
            value = bytes.fromhex(content_digest(header, os.pread(self._fd, int(size), int(offset))))
        else:
            value = bytes.fromhex(content_digest(header, b"sparse"))
        self._block_digests[key] = value  # dict assignment is atomic; a race only hashes twice
        return value

    def _overviews(self, ds: Any) -> bytes:
        if self._overview_digest is None:
            digest = hashlib.sha256(b"overviews")
            for band in self._bands:
                for level, factor in enumerate(ds.overviews(band)):
                    block_w, block_h = ds.block_shapes[band - 1][1], ds.block_shapes[band - 1][0]
                    cols = math.ceil(math.ceil(ds.width / factor) / block_w)
                    rows = math.ceil(math.ceil(ds.height / factor) / block_h)
                    for row in range(rows + 1):  # one past GDAL's own rounding; absent blocks hash as such
                        for col in range(cols + 1):
                            digest.update(self._block(ds, band, col, row, overview=level))
            self._overview_digest = digest.digest()
        return self._overview_digest

    def digest(self, window: Window, with_overviews: bool, used: set[str] | None = None) -> str:
        """The digest of every block under ``window`` (and of the overviews when ``with_overviews``); the
        names of those inputs are added to ``used`` when given (:meth:`inputs_digest` reads them)."""
        ds = self._handles.get(str(self.path))
        digest = hashlib.sha256(f"window:{window.col_off}:{window.row_off}:{window.width}:{window.height}".encode())
        for band in self._bands:
            block_h, block_w = ds.block_shapes[band - 1]
            c0, r0 = int(window.col_off), int(window.row_off)
            c1, r1 = c0 + int(window.width), r0 + int(window.height)
            for row in range(r0 // block_h, (r1 - 1) // block_h + 1):
                for col in range(c0 // block_w, (c1 - 1) // block_w + 1):
                    digest.update(self._block(ds, band, col, row))
                    if used is not None:
                        used.add(f"{band}:{col}:{row}")
        if with_overviews:
            digest.update(self._overviews(ds))
            if used is not None:
                used.add(_OVERVIEWS_INPUT)
        return digest.hexdigest()

    def inputs_digest(self, inputs: Sequence[str]) -> str | None:
        """:meth:`DigestsItsInputs.inputs_digest` over names :meth:`digest` gave; None for a name it never
        gives (a memo of another format)."""
        ds = self._handles.get(str(self.path))
        digest = hashlib.sha256(f"inputs:{self.identity}\n".encode())
        for name in inputs:
            if name == _OVERVIEWS_INPUT:
                digest.update(self._overviews(ds))
                continue
            try:
                band, col, row = (int(part) for part in name.split(":"))
            except ValueError:
                return None
            if band not in self._bands:
                return None
            digest.update(self._block(ds, band, col, row))
        return digest.hexdigest()

    def close(self) -> None:
        try:
            self._close_fd()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------
# Sheets: many GeoTIFFs (any CRSs) composited into one source; GDAL VRTs


def vrt_source_files(path: Path) -> list[Path]:
    """The files a GDAL VRT names (``SourceFilename``, relative to the VRT when ``relativeToVRT="1"``);
    ``/vsi…`` virtual paths are left out. Empty for an unparseable file (GDAL then names the problem)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError):
        return []
    files = []
    for element in root.iter("SourceFilename"):
        name = (element.text or "").strip()
        if not name or name.startswith("/vsi"):
            continue
        relative = element.get("relativeToVRT", "0").strip() == "1"
        files.append(path.parent / name if relative else Path(name))
    return list(dict.fromkeys(files))


def source_version(paths: Sequence[Path]) -> tuple[tuple[int, ...], ...]:
    """:func:`file_version` of every path, and of every file a ``.vrt`` among them names: changes whenever
    any byte the source reads may have changed. OSError when a file is gone."""
    files: list[Path] = []
    for path in paths:
        files.append(path)
        if path.suffix.lower() == ".vrt":
            files.extend(vrt_source_files(path))
    return tuple(file_version(f) for f in files)


def _raise_fd_limit(wanted: int) -> None:
    """Raise this process's soft open-file limit towards ``wanted`` (within the hard limit): every sheet
    holds a block-digest descriptor plus one GDAL handle per reading thread, and Linux's usual soft limit
    (1024) is below what a few hundred sheets need. Best effort; a warning says when it stays too low."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < wanted:
        logger.warning(
            "the open-file limit is %d but %d orthophoto handles may be needed; raise it (ulimit -n) if reads fail",
            soft,
            wanted,
        )


def _nonempty(box: tuple[int, int, int, int]) -> bool:
    return box[2] > box[0] and box[3] > box[1]


def _intersect(box: tuple[int, int, int, int], region: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    if region is None:
        return box
    col0, row0 = max(box[0], region[0]), max(box[1], region[1])
    return col0, row0, max(col0, min(box[2], region[2])), max(row0, min(box[3], region[3]))


def _pixel_grid(sheet: GeoTiffSource) -> tuple[object, ...] | None:
    """What sheets must share to be mosaicked in their own CRS before warping: CRS, pixel size and the
    grid's phase (origins a whole number of pixels apart). None for rotated grids and palette sheets."""
    t = sheet._transform
    if t.b != 0 or t.d != 0 or sheet._palette is not None:
        return None
    phase_x, phase_y = t.c / t.a - round(t.c / t.a), t.f / t.e - round(t.f / t.e)
    return (sheet._crs.to_wkt(), t.a, t.e, round(phase_x, 4), round(phase_y, 4))


class GeoTiffMosaicSource(_SourceBase):
    """Orthophoto sheets (GeoTIFFs in any CRSs, e.g. 1 km² sheets on both sides of a UTM zone boundary)
    read as one source.

    Tiles are cut from warped windows (:data:`WINDOW_TILES`, as :class:`GeoTiffSource`), and each tile
    composites only the sheets whose footprint (padded read window) it touches. Sheets on one pixel grid
    (same CRS, pixel size and grid phase: sheets cut from one raster) are mosaicked in their CRS and warped
    once per window, as GDAL does for a VRT, so they give exactly the tiles of the raster they were cut
    from; other sheets (another CRS, e.g. the next UTM zone; decimated low-zoom reads) are warped one by one.
    The first valid pixel wins, groups in the order of their first sheet under the tile and sheets in the
    order given inside a group (the sortie sorts them by path, so the result is deterministic). A tile no
    sheet touches is None.

    Raw digests: a tile's digest covers, in compositing order, each sheet under it (its decoder identity:
    CRS, georeferencing, format) and that sheet's block digest for the tile, so editing or replacing one
    sheet moves only the digests of tiles over it; adding or removing a sheet, only those of tiles it
    touches. None when any sheet under the requested tiles cannot digest its blocks.

    Thread safety: as :class:`GeoTiffSource` (one GDAL handle per sheet and thread, opened on first read).
    """

    def __init__(
        self,
        paths: Sequence[Path | str],
        tile_size: int = 256,
        window_tiles: tuple[int, int] = WINDOW_TILES,
        gdal_warp: bool = False,
    ) -> None:
        super().__init__(tile_size)
        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        if not self.paths:
            raise SourceError("no orthophoto sheets given", where="[orthophoto]", hint="name at least one GeoTIFF")
        _raise_fd_limit(len(self.paths) * 6 + 256)
        self._sheets: list[GeoTiffSource] = []
        try:
            for path in self.paths:
                sheet = GeoTiffSource(path, tile_size, window_tiles, gdal_warp)
                self._sheets.append(sheet)
        except BaseException:
            self.close()
            raise
        # (west, south, east, north) in EPSG:3857 per sheet: the cheap first test of which sheets a tile touches.
        self._mercator = np.asarray([sheet._mercator for sheet in self._sheets], np.float64)
        # Per sheet, a short digest of everything but its blocks that decides what it contributes.
        self._sheet_ids = [
            hashlib.sha256(sheet.raw_identity().encode()).hexdigest()[:32].encode() for sheet in self._sheets
        ]
        self._covers: _Memo[TileId, tuple[int, ...]] = _Memo(MEMO_TILES)
        self._grids = [_pixel_grid(sheet) for sheet in self._sheets]
        west, south, east, north = zip(*(sheet.bounds_lonlat() for sheet in self._sheets), strict=True)
        self._lonlat: Bounds = (min(west), min(south), max(east), max(north))
        self._window_shape = self._sheets[0]._window_shape
        # Compositing order of window layers when no tile's cover decides it: by first sheet.
        self._layer_order: dict[Hashable, int] = {("sheet", k): k for k in range(len(self._sheets))}
        for k in reversed(range(len(self._sheets))):
            self._layer_order[("grid", self._grids[k])] = k
        self._windows: _WindowCache[tuple[int, int, int]] = _WindowCache(WINDOW_CACHE_BYTES)

    def _cover(self, tiles: Sequence[TileId]) -> list[tuple[int, ...]]:
        """Per tile, the indices of the sheets it reads (those with a read window under it), in order.
        Remembered for the latest :data:`MEMO_TILES` tiles; computed for all missing tiles at once, one
        vectorised plan per sheet."""
        return self._covers.get_many(tiles, self._find_covers)

    def _find_covers(self, tiles: list[TileId]) -> list[tuple[int, ...]]:
        inside = [t for t in tiles if in_grid(t)]
        found: dict[TileId, list[int]] = {t: [] for t in inside}
        if inside:
            boxes = np.asarray([mercator_bounds(t) for t in inside], np.float64)
            sheets = self._mercator
            touches = (
                (boxes[:, None, 0] < sheets[None, :, 2])
                & (boxes[:, None, 2] > sheets[None, :, 0])
                & (boxes[:, None, 1] < sheets[None, :, 3])
                & (boxes[:, None, 3] > sheets[None, :, 1])
            )
            for k in np.flatnonzero(touches.any(axis=0)):
                rows = np.flatnonzero(touches[:, k])
                candidates = [inside[i] for i in rows]
                for tile, plan in zip(candidates, self._sheets[k]._read_plans(candidates), strict=True):
                    if plan is not None:
                        found[tile].append(int(k))
        return [tuple(sorted(found.get(t, ()))) for t in tiles]

    def reading(self) -> AbstractContextManager[None]:
        """:meth:`TileSource.reading`: one more reader's warped windows kept while the scope is open."""
        return self._windows.reader()

    def read_tile(self, tile: TileId) -> Tile | None:
        cover = self._cover([tile])[0]
        if not cover:
            return None
        grid = _WindowGrid.of(tile, self.tile_size, self._window_shape)
        window = self._windows.get((grid.zoom, grid.x0, grid.y0), lambda: self._render(grid))
        keys: list[Hashable] = []
        for group in self._groups(cover):
            merged = ("grid", self._grids[group[0]])
            keys.extend([merged] if merged in window.layers else [("sheet", k) for k in group])
        return window.cut(tile, keys, first_valid=True)

    def read_pixels(self, zoom: int, x0: int, y0: int, x1: int, y1: int) -> Tile:
        """Global pixels ``[x0, x1) x [y0, y1)`` at ``zoom`` warped at once (:func:`read_pixels`), every sheet
        group under them composited in the order of its first sheet."""
        grid, box, inside = _WindowGrid.around(zoom, x0, y0, x1, y1, self.tile_size)
        window = self._render(grid, inside)
        under = sorted(window.layers, key=lambda key: self._layer_order[key])
        return window.cut_box(box, under, first_valid=True)

    def _render(self, grid: _WindowGrid, region: tuple[int, int, int, int] | None = None) -> _Window:
        """The window's layers: per group of sheets on one pixel grid, their mosaic warped once (key
        ``("grid", key)``); per sheet of a group that cannot be mosaicked (a decimated read) or of no shared
        grid, its own warp (key ``("sheet", k)``). Each covers only the window's part under its sheets."""
        west, south, east, north = grid.box_bounds((0, 0, grid.columns * grid.tile_size, grid.rows * grid.tile_size))
        sheets = self._mercator
        under = (sheets[:, 0] < east) & (sheets[:, 2] > west) & (sheets[:, 1] < north) & (sheets[:, 3] > south)
        layers: dict[Hashable, _Layer] = {}
        for group in self._groups(tuple(int(k) for k in np.flatnonzero(under))):
            box = _intersect(grid.box_under(self._footprint(group)), region)
            if not _nonempty(box):
                continue
            merged = self._warp_group(grid, group, box) if len(group) > 1 else None
            if merged is not None:
                layers[("grid", self._grids[group[0]])] = (box, merged)
                continue
            for k in group:
                sheet_box = _intersect(grid.box_under(self._footprint([k])), region)
                pixels = self._sheets[k]._warp(grid, sheet_box) if _nonempty(sheet_box) else None
                if pixels is not None:
                    layers[("sheet", k)] = (sheet_box, pixels)
        return _Window(grid, layers)

    def _groups(self, cover: tuple[int, ...]) -> list[list[int]]:
        """The cover's sheets grouped by pixel grid (sheets cut from one raster share one), each group in
        order of its first sheet and keeping the cover's order inside."""
        groups: dict[object, list[int]] = {}
        for k in cover:
            key = self._grids[k]
            groups.setdefault(key if key is not None else ("alone", k), []).append(k)
        return list(groups.values())

    def _footprint(self, group: Sequence[int]) -> tuple[float, float, float, float]:
        """(west, south, east, north) EPSG:3857 bounding box of the sheets ``group``."""
        boxes = self._mercator[list(group)]
        return boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()

    def _warp_group(self, grid: _WindowGrid, group: list[int], box: tuple[int, int, int, int]) -> np.ndarray | None:
        """Sheets on one pixel grid mosaicked in their CRS (first valid pixel wins) and warped once, as GDAL
        does for a VRT: one warp per window instead of one per sheet, and interpolation across seams. None
        when a read is decimated (overview levels of different sheets do not share a grid)."""
        found = [(sheet, sheet._plan_of_box(grid, box)) for sheet in (self._sheets[k] for k in group)]
        used = [(sheet, plan) for sheet, plan in found if plan is not None]
        if not used or any(plan[3] for _, plan in used):
            return None
        origin = used[0][0]._transform
        spans = []
        for sheet, plan in used:
            window = plan[0]
            dx = round((sheet._transform.c - origin.c) / origin.a)
            dy = round((sheet._transform.f - origin.f) / origin.e)
            c0, r0 = int(window.col_off) + dx, int(window.row_off) + dy
            spans.append((c0, r0, c0 + int(window.width), r0 + int(window.height)))
        gc0, gr0 = min(s[0] for s in spans), min(s[1] for s in spans)
        gc1, gr1 = max(s[2] for s in spans), max(s[3] for s in spans)
        src = np.zeros((4, gr1 - gr0, gc1 - gc0), np.uint8)
        for (sheet, plan), (c0, r0, c1, r1) in zip(used, spans, strict=True):
            pixels = sheet._source_pixels(grid.describe(), plan)
            region = src[:, r0 - gr0 : r1 - gr0, c0 - gc0 : c1 - gc0]
            take = (pixels[3] > 0) & (region[3] == 0)
            np.copyto(region, pixels, where=take[None])
        src_transform = origin @ Affine.translation(gc0, gr0)
        first = used[0][0]
        return _warp_to_window(src, src_transform, first._crs, first._to_source(), grid, box, first._gdal_warp)

    def sheets_of(self, tile: TileId) -> list[Path]:
        """The sheets ``tile`` reads, in compositing order."""
        return [self.paths[k] for k in self._cover([tile])[0]]

    def raw_identity(self) -> str:
        # Per-sheet identities are inside each tile's digest, so one sheet's new header moves only its tiles.
        return _decoder_identity(
            "geotiff-sheets", self.tile_size, {"composite": "first-valid", "window_tiles": list(self._window_shape)}
        )

    def raw_digest(self, tile: TileId) -> str | None:
        digests = self.raw_digests([tile])
        return None if digests is None else digests[0]

    def raw_digests(self, tiles: Sequence[TileId]) -> list[str] | None:
        covers = self._cover(tiles)
        by_sheet: dict[int, list[TileId]] = {}
        for tile, cover in zip(tiles, covers, strict=True):
            for k in cover:
                by_sheet.setdefault(k, []).append(tile)
        sheet_digests: dict[tuple[int, TileId], str] = {}
        for k, sheet_tiles in by_sheet.items():
            unique = list(dict.fromkeys(sheet_tiles))
            digests = self._sheets[k].raw_digests(unique)
            if digests is None:
                return None
            sheet_digests.update(((k, t), d) for t, d in zip(unique, digests, strict=True))
        out = []
        for tile, cover in zip(tiles, covers, strict=True):
            if not cover:
                out.append(NO_TILE_DIGEST)
                continue
            digest = hashlib.sha256(b"sheets")
            for k in cover:
                digest.update(b"|" + self._sheet_ids[k] + b":" + sheet_digests[(k, tile)].encode())
            out.append(digest.hexdigest())
        return out

    def bounds_lonlat(self) -> Bounds:
        return self._lonlat

    def describe(self) -> str:
        crss = sorted({sheet._crs.to_string() for sheet in self._sheets})
        return f"{len(self._sheets)} GeoTIFF sheets ({self.paths[0].name} ... {self.paths[-1].name}; {', '.join(crss)})"

    def fingerprint(self) -> str:
        return hashlib.sha256("".join(sheet.fingerprint() for sheet in self._sheets).encode()).hexdigest()

    def close(self) -> None:
        self._windows.clear()
        for sheet in self._sheets:
            sheet.close()


# --------------------------------------------------------------------------------------------------
# XYZ folder: {root}/{z}/{x}/{y}.{png,jpg,jpeg,webp}


class XyzFolderSource(_SourceBase):
    """A folder of XYZ tiles ``{root}/{z}/{x}/{y}.{png,jpg,jpeg,webp}`` (Google/OSM row order).

    Alpha becomes validity. Tiles of another size are resized (bilinear), with one warning per source.
    Thread safety: stateless reads (each call opens its file), so any number of threads may read.
    """

    def __init__(self, root: Path | str, tile_size: int = 256) -> None:
        super().__init__(tile_size)
        self.root = Path(root)
        self._where = str(self.root)
        if not self.root.is_dir():
            raise SourceError(
                "XYZ tile folder not found", where=self._where, hint="point the sortie at the folder holding {z}/"
            )
        self._zooms = sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())
        if not self._zooms:
            raise SourceError(
                "the folder holds no XYZ zoom levels (no numeric {z} sub-folders)",
                where=self._where,
                hint="the expected layout is {root}/{z}/{x}/{y}.png",
            )
        self._bounds: Bounds | None = None

    def _tile_path(self, tile: TileId) -> Path | None:
        folder = self.root / str(tile.z) / str(tile.x)
        for ext in IMAGE_EXTENSIONS:
            candidate = folder / f"{tile.y}.{ext}"
            if candidate.is_file():
                return candidate
        return None

    def _tile_bytes(self, tile: TileId) -> tuple[bytes, Path] | None:
        if not in_grid(tile):
            return None
        path = self._tile_path(tile)
        if path is None:
            return None
        try:
            return path.read_bytes(), path
        except OSError as exc:
            raise SourceError(f"cannot read tile {tile} ({exc})", where=str(path)) from exc

    def read_tile(self, tile: TileId) -> Tile | None:
        found = self._tile_bytes(tile)
        return None if found is None else self._decode(found[0], str(found[1]))

    def raw_identity(self) -> str:
        return _decoder_identity("xyz", self.tile_size)

    def raw_digest(self, tile: TileId) -> str | None:
        found = self._tile_bytes(tile)
        return _bytes_digest(None if found is None else found[0])

    def _tiles_at(self, zoom: int) -> Iterator[tuple[int, int]]:
        zdir = self.root / str(zoom)
        for xdir in zdir.iterdir():
            if not (xdir.is_dir() and xdir.name.isdigit()):
                continue
            for entry in xdir.iterdir():
                stem, _, ext = entry.name.partition(".")
                if stem.isdigit() and ext.lower() in IMAGE_EXTENSIONS:
                    yield int(xdir.name), int(stem)

    def bounds_lonlat(self) -> Bounds:
        if self._bounds is None:
            for zoom in reversed(self._zooms):  # the finest level that holds tiles
                xy = list(self._tiles_at(zoom))
                if xy:
                    xs, ys = [x for x, _ in xy], [y for _, y in xy]
                    self._bounds = _lonlat_bounds_of_tiles(zoom, min(xs), min(ys), max(xs), max(ys))
                    break
            else:
                raise SourceError(
                    "the XYZ folder holds no tile images", where=self._where, hint="expected {z}/{x}/{y}.png files"
                )
        return self._bounds

    def describe(self) -> str:
        return f"XYZ folder {self.root} (zoom {self._zooms[0]}-{self._zooms[-1]}, {self.tile_size} px)"

    def fingerprint(self) -> str:
        """sha256 over the sorted listing (relative path, size, mtime_ns) of every tile file."""
        records = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                st = path.stat()
                records.append([path.relative_to(self.root).as_posix(), st.st_size, st.st_mtime_ns])
        payload = json.dumps([str(self.root.resolve()), records]).encode()
        return hashlib.sha256(payload).hexdigest()

    def close(self) -> None:
        pass  # nothing held between reads


# --------------------------------------------------------------------------------------------------
# MBTiles (sqlite, TMS rows)


class MBTilesSource(_SourceBase):
    """An MBTiles file (raster: png/jpg/webp), opened read-only. Rows are TMS (flipped):
    ``tile_row = 2**z - 1 - y``. Thread safety: one sqlite3 connection per thread."""

    def __init__(self, path: Path | str, tile_size: int = 256) -> None:
        super().__init__(tile_size)
        self.path = Path(path)
        self._where = str(self.path)
        if not self.path.is_file():
            raise SourceError("MBTiles file not found", where=self._where, hint="check the path in the sortie")
        self._handles: _PerThread[sqlite3.Connection] = _PerThread(self._connect, lambda c: c.close())
        try:
            self._inspect(self._handles.get(self._where))
        except BaseException:
            self._handles.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            # check_same_thread=False only so close() may run on another thread; reads stay per-thread.
            return sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SourceError(f"cannot open the MBTiles file ({exc})", where=self._where) from exc

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._handles.get(self._where).execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise SourceError(
                f"the MBTiles file cannot be read ({exc})",
                where=self._where,
                hint="the file is corrupt or not an MBTiles (sqlite) file; re-export it",
            ) from exc

    def _inspect(self, _conn: sqlite3.Connection) -> None:
        names = {row[0] for row in self._query("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        if "tiles" not in names:
            raise SourceError(
                "the file has no 'tiles' table, so it is not an MBTiles file",
                where=self._where,
                hint="export the orthophoto as MBTiles (e.g. gdal_translate -of MBTiles)",
            )
        self._metadata: dict[str, str] = {}
        if "metadata" in names:
            self._metadata = {str(k): str(v) for k, v in self._query("SELECT name, value FROM metadata")}
        fmt = self._metadata.get("format", "").lower()
        if fmt and fmt not in MBTILES_FORMATS:
            raise SourceError(
                f"MBTiles format {fmt!r} is not a raster image format",
                where=self._where,
                hint=f"use raster tiles ({', '.join(sorted(MBTILES_FORMATS))}); vector tiles cannot be matched",
            )
        if not self._query("SELECT 1 FROM tiles LIMIT 1"):
            raise SourceError("the MBTiles file holds no tiles", where=self._where, hint="re-export the area")
        zooms = self._query("SELECT MIN(zoom_level), MAX(zoom_level) FROM tiles")[0]
        self._zoom_range = (int(zooms[0]), int(zooms[1]))
        self._bounds = self._read_bounds()

    def _read_bounds(self) -> Bounds:
        text = self._metadata.get("bounds")
        if text:
            try:
                west, south, east, north = (float(v) for v in text.split(","))
                if west < east and south < north:
                    return west, south, east, north
            except ValueError:
                pass
            logger.warning("%s: ignoring malformed metadata bounds %r; computing them from the tiles", self.path, text)
        zoom = self._zoom_range[1]
        xmin, xmax, rmin, rmax = self._query(
            "SELECT MIN(tile_column), MAX(tile_column), MIN(tile_row), MAX(tile_row) FROM tiles WHERE zoom_level = ?",
            (zoom,),
        )[0]
        n = 1 << zoom
        return _lonlat_bounds_of_tiles(zoom, int(xmin), n - 1 - int(rmax), int(xmax), n - 1 - int(rmin))

    def _tile_bytes(self, tile: TileId) -> bytes | None:
        if not in_grid(tile):
            return None
        row = (1 << tile.z) - 1 - tile.y  # XYZ → TMS
        rows = self._query(
            "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?",
            (tile.z, tile.x, row),
        )
        if not rows or rows[0][0] is None:
            return None
        return bytes(rows[0][0])

    def read_tile(self, tile: TileId) -> Tile | None:
        data = self._tile_bytes(tile)
        return None if data is None else self._decode(data, f"{self.path} tile {tile}")

    def raw_identity(self) -> str:
        return _decoder_identity("mbtiles", self.tile_size)

    def raw_digest(self, tile: TileId) -> str | None:
        return _bytes_digest(self._tile_bytes(tile))

    def bounds_lonlat(self) -> Bounds:
        return self._bounds

    def describe(self) -> str:
        name = self._metadata.get("name", self.path.stem)
        fmt = self._metadata.get("format", "?")
        return f"MBTiles {self.path} ({name!r}, {fmt}, zoom {self._zoom_range[0]}-{self._zoom_range[1]})"

    def fingerprint(self) -> str:
        # A WAL file holds committed pages not yet in the main file.
        return _stat_fingerprint([self.path, self.path.with_name(self.path.name + "-wal")])

    def close(self) -> None:
        self._handles.close()


# --------------------------------------------------------------------------------------------------
# Looks before a run (preflight, plan): cheap, read-only estimates of what a source holds over an area

#: Pixels of one decimated mask read over the area's window (GDAL serves it from an overview when the
#: raster has one): enough to place a corridor's samples, small enough to read in well under a second.
SURVEY_MAX_PIXELS = 1 << 20
#: Blocks whose on-disk extent is checked against the file's size (evenly spaced beyond this many).
SURVEY_MAX_BLOCKS = 50_000
_EARTH_CIRCUMFERENCE_M = 2 * math.pi * 6378137.0


def ground_m_per_px(lat: float, zoom: int, tile_size: int) -> float:
    """Ground metres per pixel of a Web-Mercator tile of ``tile_size`` pixels at ``zoom`` and ``lat``."""
    return _EARTH_CIRCUMFERENCE_M * math.cos(math.radians(lat)) / (tile_size * (1 << zoom))


def valid_at(source: TileSource, lon: np.ndarray, lat: np.ndarray) -> np.ndarray | None:
    """Whether a GeoTIFF source (one file, a VRT, or sheets) holds a valid pixel at each WGS84 point, from
    one decimated read of each raster's dataset mask under the points. Raises :class:`SourceError` when
    the blocks under them cannot be read (a truncated or corrupt file). None for tile stores (XYZ,
    MBTiles: see :func:`tiles_present`) and sources this does not know."""
    lon, lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
    if isinstance(source, GeoTiffSource):
        return _raster_valid_at(source, lon, lat)
    if isinstance(source, GeoTiffMosaicSource):
        found = np.zeros(lon.shape, bool)
        for sheet in source._sheets:
            found |= _raster_valid_at(sheet, lon, lat)
        return found
    return None


def _raster_valid_at(source: GeoTiffSource, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    found = np.zeros(lon.shape, bool)
    to_source = pyproj.Transformer.from_crs(4326, source._crs.to_wkt(), always_xy=True)
    x, y = to_source.transform(lon, lat, errcheck=False)
    x, y, inv = np.asarray(x, np.float64), np.asarray(y, np.float64), source._inverse
    col, row = inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f
    inside = np.isfinite(col) & np.isfinite(row)
    inside &= (col >= 0) & (col < source._width) & (row >= 0) & (row < source._height)
    if not inside.any():
        return found
    c0, r0 = int(col[inside].min()), int(row[inside].min())
    c1, r1 = int(col[inside].max()) + 1, int(row[inside].max()) + 1
    window = Window(c0, r0, c1 - c0, r1 - r0)
    ds = source._handles.get(source._where)
    _check_blocks_on_disk(source, ds, window)
    factor = max(1.0, math.sqrt(window.width * window.height / SURVEY_MAX_PIXELS))
    out_w, out_h = max(1, math.ceil(window.width / factor)), max(1, math.ceil(window.height / factor))
    try:
        mask = ds.dataset_mask(window=window, out_shape=(out_h, out_w))
        # A mask from nodata reads the pixels; an all-valid mask reads nothing: read the bands too.
        ds.read(source._indexes, window=window, out_shape=(len(source._indexes), out_h, out_w))
    except rasterio.errors.RasterioError as exc:
        raise SourceError(
            f"the blocks under the area cannot be read ({_gdal_reason(exc)})",
            where=source._where,
            hint="the file is truncated or corrupt; copy or export it again (check it with gdalinfo -checksum)",
        ) from exc
    ci = np.clip(((col[inside] - c0) * out_w / window.width).astype(np.int64), 0, out_w - 1)
    ri = np.clip(((row[inside] - r0) * out_h / window.height).astype(np.int64), 0, out_h - 1)
    found[inside] = mask[ri, ci] > 0
    return found


def _check_blocks_on_disk(source: GeoTiffSource, ds: Any, window: Window) -> None:
    """A GeoTIFF cut short (an interrupted copy or download) still opens: its header is at the start. Its
    blocks past the cut point beyond the end of the file; find them from the block table alone."""
    if ds.driver != "GTiff":
        return
    try:
        size = os.stat(source.path).st_size
    except OSError:
        return
    bands = [1] if ds.interleaving == Interleaving.pixel else list(range(1, ds.count + 1))
    block_h, block_w = ds.block_shapes[0]
    rows = range(int(window.row_off) // block_h, (int(window.row_off + window.height) - 1) // block_h + 1)
    cols = range(int(window.col_off) // block_w, (int(window.col_off + window.width) - 1) // block_w + 1)
    blocks = [(c, r) for r in rows for c in cols]
    if len(blocks) > SURVEY_MAX_BLOCKS:  # evenly spaced, always including the last (written last)
        step = len(blocks) / SURVEY_MAX_BLOCKS
        blocks = [blocks[int(i * step)] for i in range(SURVEY_MAX_BLOCKS)] + [blocks[-1]]
    for band in bands:
        for c, r in blocks:
            offset = ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=band)
            length = ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=band)
            if offset and length and int(offset) + int(length) > size:
                raise SourceError(
                    f"the file is truncated: it is {size:,} bytes, but block ({c}, {r}) of band {band} under "
                    f"the area ends at byte {int(offset) + int(length):,}",
                    where=source._where,
                    hint="the copy or download stopped early; copy or export the orthophoto again",
                )


def tiles_present(source: TileSource, zoom: int, xy: np.ndarray) -> np.ndarray | None:
    """Whether an XYZ folder or MBTiles file holds each tile ``(x, y)`` (an (N, 2) array) at ``zoom``:
    tile existence, no decoding. None for other sources."""
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    if isinstance(source, XyzFolderSource):
        return np.fromiter((source._tile_path(TileId(zoom, int(x), int(y))) is not None for x, y in xy), bool, len(xy))
    if isinstance(source, MBTilesSource):
        if not len(xy):
            return np.zeros(0, bool)
        n = 1 << zoom
        rows = source._query(
            "SELECT tile_column, tile_row FROM tiles WHERE zoom_level = ? AND tile_column BETWEEN ? AND ? "
            "AND tile_row BETWEEN ? AND ?",
            (zoom, int(xy[:, 0].min()), int(xy[:, 0].max()), n - 1 - int(xy[:, 1].max()), n - 1 - int(xy[:, 1].min())),
        )
        held = np.asarray([c * n + (n - 1 - r) for c, r in rows], np.int64)
        return np.isin(xy[:, 0] * n + xy[:, 1], held)
    return None


def zoom_levels(source: TileSource) -> tuple[int, ...] | None:
    """The zoom levels a tile store holds (XYZ folder, MBTiles); None for rasters."""
    if isinstance(source, XyzFolderSource):
        return tuple(source._zooms)
    if isinstance(source, MBTilesSource):
        return tuple(int(z) for (z,) in source._query("SELECT DISTINCT zoom_level FROM tiles ORDER BY zoom_level"))
    return None


def native_m_per_px(source: TileSource, lon: float, lat: float) -> float | None:
    """The imagery's own ground resolution (metres per pixel) near (``lon``, ``lat``): a raster's pixel
    measured on the ellipsoid (the geometric mean of its two sides); a tile store's finest zoom level at
    its tiles' pixel size. None when unknown."""
    if isinstance(source, GeoTiffMosaicSource):
        return min((r for s in source._sheets if (r := native_m_per_px(s, lon, lat)) is not None), default=None)
    if isinstance(source, GeoTiffSource):
        return _raster_m_per_px(source, lon, lat)
    zooms = zoom_levels(source)
    if not zooms:
        return None
    size = _stored_tile_px(source, zooms[-1])
    return None if size is None else ground_m_per_px(lat, zooms[-1], size)


def _raster_m_per_px(source: GeoTiffSource, lon: float, lat: float) -> float | None:
    to_source = pyproj.Transformer.from_crs(4326, source._crs.to_wkt(), always_xy=True)
    geod = pyproj.Geod(ellps="WGS84")
    t = source._transform
    candidates = [(lon, lat)]
    west, south, east, north = source._lonlat
    candidates.append(((west + east) / 2, (south + north) / 2))  # the raster's centre, if the point fails
    for plon, plat in candidates:
        x, y = to_source.transform(plon, plat, errcheck=False)
        lons, lats = to_source.transform([x + t.a, x + t.b], [y + t.d, y + t.e], direction="INVERSE", errcheck=False)
        values = [x, y, *lons, *lats]
        if not all(math.isfinite(v) for v in values):
            continue
        along_x = geod.inv(plon, plat, lons[0], lats[0])[2]
        along_y = geod.inv(plon, plat, lons[1], lats[1])[2]
        if along_x > 0 and along_y > 0:
            return math.sqrt(along_x * along_y)
    return None


def _stored_tile_px(source: TileSource, zoom: int) -> int | None:
    """The pixel width of one stored tile at ``zoom`` (its image header only)."""
    data: bytes | None = None
    if isinstance(source, XyzFolderSource):
        for x, y in source._tiles_at(zoom):
            found = source._tile_bytes(TileId(zoom, x, y))
            data = found[0] if found else None
            break
    elif isinstance(source, MBTilesSource):
        rows = source._query("SELECT tile_data FROM tiles WHERE zoom_level = ? LIMIT 1", (zoom,))
        data = bytes(rows[0][0]) if rows and rows[0][0] is not None else None
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.size[0])
    except (UnidentifiedImageError, OSError, ValueError):
        return None
