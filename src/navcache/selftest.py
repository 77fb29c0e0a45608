"""The self-test (DAG step after the index): does the cache *localise*, not only verify?

A provision proves the cache intact (hashes, signature, coverage). The self-test proves it works: camera-like
views rendered from the orthophoto itself find their own tile in the built index. It catches what integrity
cannot — a backbone fed the wrong preprocessing, a wrong output chosen, a descriptor space that collapsed
(tiles upsampled until flat, blank imagery, a constant model), and, onboard, an engine that disagrees with the
one the descriptors were made with.

1. **Sample** ``samples`` described chunks (all when there are fewer), stratified: the chunks in grid order
   are cut into ``samples`` equal runs and one is drawn from each, with a seeded generator.
2. **Render** a drone-like view of each from the orthophoto around it (:func:`render_view`): rotation up to
   ``max_rotation_deg``, scale in ``scale_range`` (>1 sees more ground), an offset of up to ``max_offset`` of
   a chunk, brightness and contrast, a Gaussian blur and JPEG artefacts. Every parameter comes from the seeded
   generator in a fixed order, so the same inputs give the same figures.
3. **Describe** the views with the built VPR engine through the same :class:`~navcache_runtime.preprocessing.
   Preprocess` the drone's ``open_cache(...).preprocess`` applies, and **query** the built index through the
   runtime's search (what the drone calls).
4. **Report** recall@1 and recall@5 — the exact chunk, and within one chunk (a neighbour; with overlap or an
   offset view that is still a fix within a chunk's width) — and the health of the descriptor space: the
   median cosine of random pairs of tiles, of neighbouring tiles, and of each view with its own tile. A space
   where random tiles look alike is *collapsed*; the likely cause is named (constant output, upsampling,
   blank imagery, or else the preprocessing).
5. **Onboard set**: the first ``onboard_samples`` views, already resized to the engine's input, go into the
   cache (``selftest/queries-{sha16}.npz``: ``views`` uint8, ``expected`` chunk (x, y)) with the number of
   them the ground found in its top 5. The manifest signs the file and a floor (``min_hits_at_5``, 80 % of
   the ground's hits); ``navcache_runtime.selftest`` re-runs them on the drone's own engine and index.

**Memos.** A warm re-provision (index, engine, preprocessing, imagery, grid, config and hints unchanged)
takes the whole result from a whole-run memo (:func:`remembered`). Otherwise the per-view memo
(:class:`ViewMemo`) supplies every view whose pixels and descriptor cannot have changed — keyed on the
raw digests of the source tiles under its context, its parameters, the engine and the preprocessing — so a
re-provision over partly changed imagery renders and describes only the views over the change and re-runs
the search (milliseconds) for the rest; the figures are those of a run without memos.

**Memory** grows with the area only by the chunks' (x, y) and the index pages a search reads: the health
figures read the few thousand descriptor rows they compare and stream the shards for the spread
(:class:`DescriptorRows`), views are rendered and described a batch at a time, and a tile store's decoded
tiles are kept only while the next views may share them (:data:`RENDER_TILES`).

``min_recall_at_5`` (``[self_test]`` in the sortie) turns the report into a gate: below it the run fails
before signing and the previous manifest stays in force. Without it the figures are reported only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from navcache_runtime.errors import EngineHashMismatchError, EngineSidecarMissingError
from navcache_runtime.index import search
from navcache_runtime.integrity import SCAN_MEMO_PREFIX, atomic_write_bytes, verify_artifact, write_artifact_once
from navcache_runtime.layout import SELFTEST_MEMO_PREFIX
from navcache_runtime.preprocessing import Preprocess

from .imagery import PixelReader, TileSource, read_window
from .sortie import SelfTestConfig
from .tiles import ChunkGrid
from .types import Tile, TileId

log = logging.getLogger(__name__)

#: With fewer described chunks the medians are noise: only a constant output is named.
MIN_CHUNKS_TO_JUDGE = 16
#: Below this separation (see ``_finding``) the descriptor space is called collapsed.
MIN_SEPARATION = 0.25
#: The upsampling factor above which a collapse is blamed on it when the sortie sets no max_upsampling.
DEFAULT_MAX_UPSAMPLING = 4.0
#: Per-dimension standard deviation across tiles below which the model's output is called constant.
CONSTANT_OUTPUT_STD = 1e-3
#: The onboard floor is this fraction of the hits the ground made on the same stored views.
ONBOARD_FLOOR_FRACTION = 0.8
#: Decoded storage tiles a renderer keeps for a tile store (XYZ, MBTiles): a view's context is a few tiles
#: across and a view shares tiles with the views just before it in grid order. 64 tiles of 256 px are 16 MiB;
#: the views of a wide area share none, and kept all, they held about 2 MiB each.
RENDER_TILES = 64
_PAIRS = 2000
_PREVIEW = 6


@dataclass(frozen=True)
class ViewParams:
    rotation_deg: float
    scale: float
    offset: tuple[float, float]  # of a chunk's width
    brightness: float
    contrast: float
    blur_px: float
    jpeg_quality: int

    @property
    def max_shift(self) -> float:
        """The larger offset component, of a chunk's width."""
        return max(abs(self.offset[0]), abs(self.offset[1]))


@dataclass(frozen=True)
class SelfTestResult:
    samples: int
    recall_at_1: float
    recall_at_5: float
    near_recall_at_1: float  # top-k within one chunk of the truth
    near_recall_at_5: float
    random_pair_cosine: float  # median over random pairs of tiles
    neighbour_cosine: float  # median over neighbouring tiles
    self_cosine: float  # median of each view with its own tile
    collapsed: bool
    finding: str  # one line: healthy, or what is wrong and the likely cause
    min_recall_at_5: float | None
    onboard_path: Path | None  # the stored query set (in the cache), None when onboard_samples = 0
    onboard_queries: int
    onboard_min_hits_at_5: int
    seconds: float
    views_rendered: int = 0  # the rest came from the per-view memo
    view_memo_name: str | None = None  # the per-view memo this run wrote (gc keeps it while this result lives)
    preview_png: bytes = field(repr=False, default=b"")

    @property
    def passed(self) -> bool:
        return self.min_recall_at_5 is None or self.recall_at_5 >= self.min_recall_at_5

    def summary(self) -> dict[str, Any]:
        """The figures as the CLI summary, ``--json`` and the index report show them."""
        return {
            "samples": self.samples,
            "recall_at_1": round(self.recall_at_1, 4),
            "recall_at_5": round(self.recall_at_5, 4),
            "near_recall_at_1": round(self.near_recall_at_1, 4),
            "near_recall_at_5": round(self.near_recall_at_5, 4),
            "random_pair_cosine": round(self.random_pair_cosine, 4),
            "neighbour_cosine": round(self.neighbour_cosine, 4),
            "self_cosine": round(self.self_cosine, 4),
            "collapsed": self.collapsed,
            "finding": self.finding,
            "min_recall_at_5": self.min_recall_at_5,
            "passed": self.passed,
            "onboard_queries": self.onboard_queries,
            "onboard_min_hits_at_5": self.onboard_min_hits_at_5,
            "seconds": round(self.seconds, 3),
        }

    def manifest_fields(self, onboard_relpath: str | None) -> dict[str, Any]:
        """The signed record: integers, booleans and strings only (rates x 1000, rounded down)."""

        def milli(value: float) -> int:
            return max(-1000, min(1000, math.floor(value * 1000)))

        block: dict[str, Any] = {
            "samples": self.samples,
            "recall_at_1_x1000": milli(self.recall_at_1),
            "recall_at_5_x1000": milli(self.recall_at_5),
            "near_recall_at_1_x1000": milli(self.near_recall_at_1),
            "near_recall_at_5_x1000": milli(self.near_recall_at_5),
            "random_pair_cosine_x1000": milli(self.random_pair_cosine),
            "neighbour_cosine_x1000": milli(self.neighbour_cosine),
            "collapsed": self.collapsed,
            "finding": self.finding,
        }
        if onboard_relpath is not None:
            block["onboard"] = {
                "path": onboard_relpath,
                "queries": self.onboard_queries,
                "min_hits_at_5": self.onboard_min_hits_at_5,
            }
        return block


# --------------------------------------------------------------------------------------------- descriptor rows


class DescriptorRows(Protocol):
    """The described chunks' stored descriptors as the self-test reads them: the few rows it compares, and one
    statistic over all of them. It never needs all N x D floats at once (49 MiB of float32 at 1e5 chunks of
    128 dims, the temporaries of a standard deviation as much again), so a provision reads them from the
    shards (:class:`navcache.shard_set.ShardRows`); :class:`ArrayRows` holds them in memory."""

    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 ``(len(rows), D)``: the rows numbered ``rows`` (in that order, repeats allowed)."""
        ...

    def spread(self) -> float:
        """The largest per-dimension standard deviation over all rows, exactly as
        ``np.asarray(rows, np.float32).std(axis=0).max()`` computes it."""
        ...


class ArrayRows:
    """:class:`DescriptorRows` over an ``(N, D)`` array (float32, or float16 as the shards store them)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.rows[np.asarray(rows, np.int64)], np.float32)

    def spread(self) -> float:
        return float(np.asarray(self.rows, np.float32).std(axis=0).max()) if len(self.rows) else 0.0


def column_spread(blocks: Callable[[], Iterable[np.ndarray]]) -> float:
    """:meth:`DescriptorRows.spread` of the rows that ``blocks()`` yields in consecutive ``(n, D)`` blocks,
    holding one block at a time, and equal to it bit for bit (tested).

    numpy computes a float32 ``std(axis=0)`` as the column sums (row after row, in float32), the mean
    (divided in float64, stored in float32), the column sums of the squared deviations and their mean; a
    block's sums continue from the previous block's when that sum is stacked as the block's first row. Two
    passes, so ``blocks`` is called twice. With D = 1 numpy sums the single contiguous column pairwise
    instead: those rows (4 bytes each) are gathered and numpy computes it. No rows: 0.0."""
    count, total = 0, None
    for block in blocks():
        rows = np.asarray(block, np.float32)
        if not len(rows):
            continue
        if rows.ndim != 2 or rows.shape[1] < 2:
            parts = [np.asarray(b, np.float32) for b in blocks()]
            return ArrayRows(np.concatenate([b for b in parts if len(b)])).spread()
        count, total = count + len(rows), _column_sums(total, rows)
    if total is None:
        return 0.0
    mean = np.true_divide(total, np.intp(count), out=total, casting="unsafe")
    squares = None
    for block in blocks():
        rows = np.asarray(block, np.float32)
        if len(rows):
            deviations = np.subtract(rows, mean)
            squares = _column_sums(squares, np.square(deviations, out=deviations))
    assert squares is not None
    variance = np.true_divide(squares, np.intp(count), out=squares, casting="unsafe")
    return float(np.sqrt(variance, out=variance).max())


def _column_sums(total: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """float32 column sums of ``rows``, continuing ``total`` (the sums of the rows before them)."""
    if total is None:
        return np.add.reduce(rows, axis=0)
    stacked = np.empty((len(rows) + 1, rows.shape[1]), np.float32)
    stacked[0], stacked[1:] = total, rows
    return np.add.reduce(stacked, axis=0)


# --------------------------------------------------------------------------------------------- sampling


def sample_chunks(chunks: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Indices into ``chunks`` ((N, 2) chunk x, y in any order): all when N <= samples, else one drawn from
    each of ``samples`` equal runs of the chunks in (y, x) order."""
    n = len(chunks)
    order = np.lexsort((chunks[:, 0], chunks[:, 1])) if n else np.zeros(0, np.int64)
    if n <= samples:
        return order
    rng = np.random.default_rng([seed, 1])
    edges = np.linspace(0, n, samples + 1)
    starts, stops = np.floor(edges[:-1]).astype(np.int64), np.floor(edges[1:]).astype(np.int64)
    picks = starts + (rng.random(samples) * (stops - starts)).astype(np.int64)
    return order[picks]


def draw_params(rng: np.random.Generator, config: SelfTestConfig) -> ViewParams:
    """One view's perturbation, drawn in a fixed order (the figures depend on nothing else)."""
    u = [float(v) for v in rng.random(8)]  # plain floats: Pillow compares some parameters to tuples
    lo, hi = config.scale_range
    qlo, qhi = config.jpeg_quality
    return ViewParams(
        rotation_deg=(2 * u[0] - 1) * config.max_rotation_deg,
        scale=lo + (hi - lo) * u[1],
        offset=((2 * u[2] - 1) * config.max_offset, (2 * u[3] - 1) * config.max_offset),
        brightness=(2 * u[4] - 1) * config.brightness,
        contrast=1.0 + (2 * u[5] - 1) * config.contrast,
        blur_px=u[6] * config.max_blur_px,
        jpeg_quality=int(qlo + round((qhi - qlo) * u[7])),
    )


# --------------------------------------------------------------------------------------------- rendering


class ViewRenderer:
    """Renders drone-like views of chunks from a tile source, at about the engine's input resolution.

    The engine sees a view only after it is resized to its input (often half a chunk or less), so the
    context around a chunk is read ``levels`` zoom levels coarser (each level halves the pixels). A GeoTIFF
    warps each view's context rectangle at once (:class:`~navcache.imagery.PixelReader`): the views are
    spread over the area, so warping whole tiles or windows for them would warp mostly pixels no view uses.
    Tile stores (XYZ, MBTiles) mosaic their tiles, the last :data:`RENDER_TILES` of them kept (neighbouring
    views share them)."""

    def __init__(self, source: TileSource, grid: ChunkGrid, input_px: int) -> None:
        self.source = source
        self.grid = grid
        fit = max(0, math.floor(math.log2(max(1, grid.chunk_px) / max(1, input_px))))
        self.levels = min(fit, 3, grid.zoom)
        self._tiles: OrderedDict[TileId, Any] = OrderedDict()
        self.tile_size = source.tile_size
        self.rendered = 0  # views rendered (the per-view memo's hits are not)

    def read_tile(self, tile: TileId) -> Any:
        if tile in self._tiles:
            self._tiles.move_to_end(tile)
            return self._tiles[tile]
        found = self._tiles[tile] = self.source.read_tile(tile)
        if len(self._tiles) > RENDER_TILES:
            self._tiles.popitem(last=False)
        return found

    def _read(self, zoom: int, x0: int, y0: int, x1: int, y1: int) -> Tile:
        if isinstance(self.source, PixelReader):
            return self.source.read_pixels(zoom, x0, y0, x1, y1)
        return read_window(self, zoom, x0, y0, x1, y1)

    def render(self, chunk: TileId, params: ViewParams) -> np.ndarray:
        """A view of ``chunk``: the orthophoto around it rotated, scaled and shifted, then brightness/contrast,
        blur and a JPEG round trip; RGB uint8, ``chunk_px >> levels`` square. Nodata stays black."""
        return self.render_at(chunk, params)[0]

    def render_at(self, chunk: TileId, params: ViewParams) -> tuple[np.ndarray, int]:
        """:meth:`render`'s view and the levels its context was read at (0 when the coarser zoom was missing)."""
        self.rendered += 1
        view = self._render(chunk, params, self.levels)
        levels = self.levels
        if view is None:  # the source lacks the coarser zoom (XYZ/MBTiles cut at one level): full resolution
            view, levels = self._render(chunk, params, 0), 0
        pixels = view if view is not None else np.zeros((self.grid.chunk_px,) * 2 + (3,), np.uint8)
        return _photometric(pixels, params), levels

    def chunk_image(self, chunk: TileId) -> np.ndarray:
        """The chunk itself, unperturbed, at the renderer's resolution (nodata black)."""
        x0, y0, x1, y1 = (v >> self.levels for v in self.grid.chunk_pixel_box(chunk))
        tile = self._read(self.grid.zoom - self.levels, x0, y0, x1, y1)
        return np.where(tile.valid[:, :, None], tile.rgb, 0).astype(np.uint8)

    def context_box(self, chunk: TileId, params: ViewParams, levels: int) -> tuple[int, int, int, int, int]:
        """(zoom, x0, y0, x1, y1): the global pixels a view of ``chunk`` read ``levels`` coarser is cut from."""
        c = self.grid.chunk_px >> levels
        x0, y0, _, _ = (v >> levels for v in self.grid.chunk_pixel_box(chunk))
        reach = c * (params.scale * math.sqrt(2) / 2 + params.max_shift) - c / 2
        margin = max(0, math.ceil(reach)) + 2
        return self.grid.zoom - levels, x0 - margin, y0 - margin, x0 + c + margin, y0 + c + margin

    def input_digest(self, chunk: TileId, params: ViewParams, levels: int) -> str | None:
        """A digest of the encoded source bytes a view read ``levels`` coarser is made from
        (:meth:`TileSource.raw_digests` of the tiles under its context rectangle and one ring of tiles
        around it, which holds any resampling kernel's reach), or None when the source cannot digest them."""
        zoom, x0, y0, x1, y1 = self.context_box(chunk, params, levels)
        size, last = self.tile_size, (1 << zoom) - 1
        xs = range(max(0, x0 // size - 1), min(last, (x1 - 1) // size + 1) + 1)
        ys = range(max(0, y0 // size - 1), min(last, (y1 - 1) // size + 1) + 1)
        tiles = [TileId(zoom, x, y) for y in ys for x in xs]
        digests = self.source.raw_digests(tiles)
        if digests is None:
            return None
        text = f"{self.source.raw_identity()}|{zoom}:{x0}:{y0}:{x1}:{y1}|" + ";".join(
            f"{t.x},{t.y}={d}" for t, d in zip(tiles, digests, strict=True)
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def _render(self, chunk: TileId, params: ViewParams, levels: int) -> np.ndarray | None:
        c = self.grid.chunk_px >> levels
        zoom, x0, y0, x1, y1 = self.context_box(chunk, params, levels)
        margin = (x1 - x0 - c) // 2
        context = self._read(zoom, x0, y0, x1, y1)
        if levels and context.valid_fraction < 0.05:
            return None
        rgb = np.where(context.valid[:, :, None], context.rgb, 0).astype(np.uint8)
        # Output pixel (u, v) maps to context pixel centre + s R(theta) (u - c/2, v - c/2): PIL's inverse affine.
        theta = math.radians(params.rotation_deg)
        a, d = math.cos(theta) * params.scale, math.sin(theta) * params.scale
        b, e = -d, a
        cx = margin + c / 2 + params.offset[0] * c
        cy = margin + c / 2 + params.offset[1] * c
        coeffs = (a, b, cx - a * c / 2 - b * c / 2, d, e, cy - d * c / 2 - e * c / 2)
        view = Image.fromarray(rgb).transform((c, c), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
        return np.asarray(view, np.uint8)


def _photometric(rgb: np.ndarray, params: ViewParams) -> np.ndarray:
    pixels = rgb.astype(np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * params.contrast + mean + params.brightness * 255.0
    view = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if params.blur_px > 0.05:
        view = view.filter(ImageFilter.GaussianBlur(params.blur_px))
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=params.jpeg_quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), np.uint8)


# --------------------------------------------------------------------------------------------- the test


def run_self_test(
    *,
    source: TileSource,
    grid: ChunkGrid,
    chunks: np.ndarray,
    descriptors: np.ndarray | DescriptorRows,
    index: Any,
    table: np.ndarray,
    describe: Callable[[np.ndarray], np.ndarray],
    preprocess: Preprocess,
    config: SelfTestConfig,
    out_dir: Path | None,
    batch_size: int = 16,
    upsampling: float | None = None,
    max_upsampling: float | None = None,
    blank_fraction: float = 0.0,
    view_memo: ViewMemo | None = None,
) -> SelfTestResult:
    """Run the self-test over the built index (see the module docstring).

    ``chunks`` (N, 2) are the described chunks and ``descriptors`` their stored (normalised) rows, an (N, D)
    array or a :class:`DescriptorRows` that reads the few it needs; ``index``/``table`` the built FAISS index
    and its tile table; ``describe`` runs the VPR engine on a preprocessed batch and returns normalised (B, D)
    rows. ``out_dir`` receives the onboard query set (None: none is written). ``upsampling``/``max_upsampling``
    and ``blank_fraction`` only sharpen the finding.
    ``view_memo`` (see :class:`ViewMemo`) supplies the descriptors of views whose inputs are unchanged and
    remembers this run's; without it every view is rendered and described."""
    started = time.perf_counter()
    if len(chunks) == 0:
        raise ValueError("the self-test needs at least one described chunk")
    picked = sample_chunks(chunks, config.samples, config.seed)
    rng = np.random.default_rng([config.seed, 2])
    params = [draw_params(rng, config) for _ in picked]
    targets = chunks[picked]
    renderer = ViewRenderer(source, grid, max(preprocess.height, preprocess.width))
    onboard_n = min(config.onboard_samples, len(picked)) if out_dir is not None else 0
    views = _views(renderer, targets, params, describe, preprocess, batch_size, onboard_n, view_memo)
    query = np.stack([v.query for v in views]).astype(np.float32, copy=False)
    hits = search(index, table, query, 5)
    found = np.full((len(views), 5), -1, np.int64)
    for row, ranked in enumerate(hits):
        for rank, (rid, _score) in enumerate(ranked):
            found[row, rank] = rid
    found_xy = np.where(found[:, :, None] >= 0, np.stack([table["x"], table["y"]], 1)[found], -(10**9))
    exact = np.all(found_xy == targets[:, None, :], axis=2)
    near = np.all(np.abs(found_xy - targets[:, None, :]) <= 1, axis=2)

    rows = ArrayRows(descriptors) if isinstance(descriptors, np.ndarray) else descriptors
    random_cos, neighbour_cos = _space_health(chunks, rows, config.seed)
    own = rows.take(picked)
    self_cos = float(np.median(np.sum(query * own, axis=1)))
    collapsed, finding = _finding(
        len(rows),
        rows.spread() if len(rows) > 1 else 0.0,
        random_cos,
        neighbour_cos,
        self_cos,
        float(np.mean(exact[:, :5].any(1))),
        upsampling,
        max_upsampling,
        blank_fraction,
    )

    onboard_path, floor = None, 0
    if out_dir is not None and onboard_n > 0:
        onboard_path, floor = _write_onboard_set(out_dir, views[:onboard_n], targets[:onboard_n], index, table)
    memo_name = view_memo.save(views) if view_memo is not None else None
    result = SelfTestResult(
        samples=len(views),
        recall_at_1=float(exact[:, 0].mean()),
        recall_at_5=float(exact.any(1).mean()),
        near_recall_at_1=float(near[:, 0].mean()),
        near_recall_at_5=float(near.any(1).mean()),
        random_pair_cosine=random_cos,
        neighbour_cosine=neighbour_cos,
        self_cosine=self_cos,
        collapsed=collapsed,
        finding=finding,
        min_recall_at_5=config.min_recall_at_5,
        onboard_path=onboard_path,
        onboard_queries=onboard_n if onboard_path is not None else 0,
        onboard_min_hits_at_5=floor,
        seconds=time.perf_counter() - started,
        views_rendered=renderer.rendered,
        view_memo_name=memo_name,
        preview_png=preview_png([v.view for v in views], found_xy, exact, renderer),
    )
    log.info(
        "self-test: %d views (%d rendered, the rest from the per-view memo), recall@1 %.3f, recall@5 %.3f "
        "(within one chunk: %.3f / %.3f); %s",
        result.samples,
        result.views_rendered,
        result.recall_at_1,
        result.recall_at_5,
        result.near_recall_at_1,
        result.near_recall_at_5,
        result.finding,
    )
    return result


def _describe_all(
    views: Sequence[np.ndarray], describe: Callable[[np.ndarray], np.ndarray], preprocess: Preprocess, batch: int
) -> np.ndarray:
    rows = [np.zeros((0, 0), np.float32)]
    for start in range(0, len(views), batch):
        inputs = np.stack([preprocess(v) for v in views[start : start + batch]])
        rows.append(np.asarray(describe(inputs), np.float32))
    return np.concatenate(rows[1:]) if len(rows) > 1 else rows[0]


def _space_health(chunks: np.ndarray, rows: DescriptorRows, seed: int) -> tuple[float, float]:
    """Median cosine of random tile pairs and of horizontally/vertically neighbouring tiles (at most
    :data:`_PAIRS` of each, so only those rows are read)."""
    n = len(rows)
    if n < 2:
        return 1.0, 1.0
    rng = np.random.default_rng([seed, 3])
    i, j = rng.integers(0, n, _PAIRS), rng.integers(0, n, _PAIRS)
    keep = i != j
    a, b = neighbour_pairs(chunks)
    if len(a) > _PAIRS:
        chosen = rng.choice(len(a), _PAIRS, replace=False)
        a, b = a[chosen], b[chosen]
    i, j = i[keep], j[keep]
    taken = rows.take(np.concatenate([i, j, a, b]))  # one read of the shards for both medians
    rows_i, rows_j, rows_a, rows_b = np.split(taken, np.cumsum([len(i), len(j), len(a)]))
    random_cos = float(np.median(np.sum(rows_i * rows_j, axis=1))) if keep.any() else 1.0
    if not len(a):
        return random_cos, random_cos
    return random_cos, float(np.median(np.sum(rows_a * rows_b, axis=1)))


def neighbour_pairs(chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` row numbers: each chunk of ``chunks`` ((N, 2) x, y) with the chunk east of it, then with the
    one south of it, where that one is among them (the last of repeated chunks), in the order of ``chunks``."""
    xy = np.asarray(chunks, np.int64).reshape(-1, 2)
    key = xy[:, 0] * (1 << 32) + xy[:, 1]  # one integer per tile coordinate pair: east is + 2**32, south + 1
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    partner = np.full((len(key), 2), -1, np.int64)
    for column, step in enumerate((1 << 32, 1)):
        wanted = key + step
        at = np.searchsorted(ordered, wanted, side="right") - 1
        found = at >= 0
        found[found] = ordered[at[found]] == wanted[found]
        partner[found, column] = order[at[found]]
    kept = partner.ravel() >= 0
    return np.repeat(np.arange(len(key)), 2)[kept], partner.ravel()[kept]


def _finding(
    count: int,
    spread: float,
    random_cos: float,
    neighbour_cos: float,
    self_cos: float,
    recall_at_5: float,
    upsampling: float | None,
    max_upsampling: float | None,
    blank_fraction: float,
) -> tuple[bool, str]:
    figures = (
        f"median cosine: random tiles {random_cos:.3f}, neighbours {neighbour_cos:.3f}, view-to-own {self_cos:.3f}"
    )
    if count > 1 and spread < CONSTANT_OUTPUT_STD:
        return True, (
            f"collapsed descriptor space: the model gives the same descriptor for every tile ({figures}); likely "
            "cause: constant output — check the backbone's output and weights"
        )
    if count < MIN_CHUNKS_TO_JUDGE:
        return False, f"too few chunks ({count}) to judge the descriptor space ({figures})"
    # How much of the spread between unrelated tiles a view's match with its own tile uses: near 1 in a
    # discriminative space, near 0 (or below) when a perturbed view is as far from its tile as any tile is.
    separation = (self_cos - random_cos) / max(1e-9, 1.0 - random_cos)
    figures += f", separation {separation:.2f}"
    if separation < MIN_SEPARATION:
        if upsampling is not None and upsampling > (max_upsampling or DEFAULT_MAX_UPSAMPLING):
            cause = (
                f"upsampling — the tiles are {upsampling:.0f}x finer than the imagery, nearly flat; use a lower zoom"
            )
        elif blank_fraction > 0.5:
            cause = f"blank imagery — {blank_fraction:.0%} of the chunks are nodata or uniform"
        else:
            cause = "preprocessing — check mean/std, scale and channel order against the model's training"
        return True, (
            f"collapsed descriptor space: a view is no closer to its own tile than unrelated tiles are to each "
            f"other ({figures}); likely cause: {cause}"
        )
    if recall_at_5 < 0.5:
        return False, f"weak: fewer than half the views find their own tile in the top 5 ({figures})"
    return False, f"healthy ({figures})"


def _write_onboard_set(
    out_dir: Path, views: Sequence[DescribedView], targets: np.ndarray, index: Any, table: np.ndarray
) -> tuple[Path, int]:
    """Store the views at the engine's input size (so the file stays small and the drone's resize is the
    identity), count the ground's top-5 hits on exactly those arrays, and derive the onboard floor."""
    stored = np.stack([v.stored for v in views if v.stored is not None]).astype(np.uint8)
    query = np.stack([v.onboard for v in views if v.onboard is not None]).astype(np.float32, copy=False)
    if len(stored) != len(views) or len(query) != len(views):
        raise ValueError("every onboard view needs its stored pixels and their descriptor")
    hits = search(index, table, query, 5)
    got = sum(
        any((int(table["x"][rid]), int(table["y"][rid])) == (int(x), int(y)) for rid, _ in ranked)
        for ranked, (x, y) in zip(hits, targets, strict=True)
    )
    floor = math.ceil(ONBOARD_FLOOR_FRACTION * got)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, views=stored, expected=np.asarray(targets, np.int32))
    data = buffer.getvalue()  # deterministic: numpy's zip entries carry a fixed date
    path = out_dir / f"queries-{hashlib.sha256(data).hexdigest()[:16]}.npz"
    write_artifact_once(path, data)
    return path, floor


# --------------------------------------------------------------------------------------------- memo

#: Bump when the figures a memo holds would change for the same inputs (sampling, rendering, finding rules).
SELFTEST_VERSION = "navcache-selftest-v1"


def memo_key(**inputs: Any) -> str:
    """A digest of everything the figures depend on: index and engine digests, preprocessing, the source's
    identity, the grid, the config and the hints. Same key, same figures (the self-test is deterministic)."""
    text = repr(sorted((k, repr(v)) for k, v in inputs.items()))
    return hashlib.sha256(f"{SELFTEST_VERSION}|{text}".encode()).hexdigest()[:40]


def memo_path(out_dir: Path, key: str) -> Path:
    # The scan-memo prefix: ground-side, never in a manifest; the verifier ignores it, gc prunes it.
    return out_dir / f"{SCAN_MEMO_PREFIX}selftest-{key}"


def save_memo(out_dir: Path, key: str, result: SelfTestResult) -> None:
    record = {
        **{f.name: getattr(result, f.name) for f in fields(result) if f.name not in ("onboard_path", "preview_png")},
        "onboard_name": result.onboard_path.name if result.onboard_path is not None else None,
        "preview_png": base64.b64encode(result.preview_png).decode("ascii"),
    }
    atomic_write_bytes(memo_path(out_dir, key), json.dumps(record).encode())


def load_memo(out_dir: Path, key: str) -> SelfTestResult | None:
    """The remembered result, when its memo is intact and its onboard query set still verifies; else None."""
    try:
        record = json.loads(memo_path(out_dir, key).read_bytes())
        onboard = record.pop("onboard_name")
        preview = base64.b64decode(record.pop("preview_png"), validate=True)
        path = None
        if onboard is not None:
            path = out_dir / onboard
            verify_artifact(path)
        return SelfTestResult(**record, onboard_path=path, preview_png=preview)
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        binascii.Error,
        EngineHashMismatchError,
        EngineSidecarMissingError,
    ):
        return None


def remembered(out_dir: Path, key: str, run: Callable[[], SelfTestResult]) -> SelfTestResult:
    """The memo's result for ``key`` when it holds (a warm re-provision renders and infers nothing), else
    ``run()``'s, remembered."""
    result = load_memo(out_dir, key)
    if result is not None:
        log.info("self-test: unchanged index, engine, imagery and config; figures from the memo")
        return result
    result = run()
    save_memo(out_dir, key, result)
    return result


# --------------------------------------------------------------------------------------------- per-view memo

#: Bump when a view's pixels or descriptor would change for the same inputs (rendering, photometrics).
VIEW_MEMO_VERSION = "navcache-selftest-views-v1"
#: Per-view memos are ground-side files beside the whole-run memos (gc keeps those a live whole-run memo names).
VIEW_MEMO_PREFIX = f"{SELFTEST_MEMO_PREFIX}views-"


@dataclass(frozen=True)
class DescribedView:
    """One view as the self-test uses it: its descriptor, and what the onboard set and the preview need."""

    key: str | None  # the per-view memo's key (None: the source cannot digest its bytes; never remembered)
    query: np.ndarray  # (D,) the view's descriptor
    full_digest: str = ""  # the view fell back to full resolution: the input digest of that read
    view: np.ndarray | None = None  # the rendered view, kept for the preview's views
    stored: np.ndarray | None = None  # the view at the engine's input size (onboard views)
    onboard: np.ndarray | None = None  # (D,) the descriptor of ``stored`` (onboard views)


class ViewMemo:
    """Per-view memo: a view's descriptor is reused when everything its pixels and its descriptor depend on
    is unchanged, so a re-provision over partly changed imagery renders and describes only the views over
    the change, and re-runs just the search (milliseconds) against the new index for the others.

    A view's key is a digest of :data:`VIEW_MEMO_VERSION`, ``identity`` (the engine's digest and
    runtime, the preprocessing, the grid — the caller's), the renderer's levels, the chunk, the view's
    parameters (geometry and photometrics, drawn from the seed) and the raw digests of the source tiles
    under its context rectangle plus a ring (:meth:`ViewRenderer.input_digest`). A view that fell back to
    full resolution also records the input digest of that read, checked on reuse. Sources that cannot
    digest their bytes give no keys: every view is rendered.

    Each run writes one content-addressed file ``selftest/.navcache-scan-selftest-views-{sha40}`` (an
    ``.npz``, written atomically) holding its views' entries; a run looks its views up in every such file
    present. The whole-run memo names the file it wrote, and gc removes the files no live whole-run memo
    names."""

    def __init__(self, directory: Path, identity: str) -> None:
        self.directory = directory
        self.identity = identity
        self._entries: dict[str, DescribedView] = {}
        for path in sorted(directory.glob(f"{VIEW_MEMO_PREFIX}*")) if directory.is_dir() else []:
            self._entries.update(_read_view_memo(path))

    def key(self, renderer: ViewRenderer, chunk: TileId, params: ViewParams) -> str | None:
        digest = renderer.input_digest(chunk, params, renderer.levels)
        if digest is None:
            return None
        text = f"{VIEW_MEMO_VERSION}|{self.identity}|{renderer.levels}|{chunk}|{params!r}|{digest}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def lookup(
        self, key: str, renderer: ViewRenderer, chunk: TileId, params: ViewParams, *, view: bool, onboard: bool
    ) -> DescribedView | None:
        """The remembered view for ``key`` when it holds what this run needs of it and, for a view read at
        full resolution, that read's input is unchanged too."""
        entry = self._entries.get(key)
        if entry is None or (view and entry.view is None):
            return None
        if onboard and (entry.onboard is None or entry.stored is None):
            return None
        if entry.full_digest and renderer.input_digest(chunk, params, 0) != entry.full_digest:
            return None
        return entry

    def save(self, views: Sequence[DescribedView]) -> str | None:
        """Remember the views that have keys in one content-addressed file; its name (None: nothing to keep)."""
        kept = [v for v in views if v.key is not None]
        if not kept:
            return None
        dim = kept[0].query.shape[0]
        arrays: dict[str, np.ndarray] = {
            "keys": np.asarray([v.key for v in kept], "U40"),
            "full": np.asarray([v.full_digest for v in kept], "U64"),
            "query": np.stack([v.query for v in kept]).astype(np.float32),
            "onboard": np.stack([v.onboard if v.onboard is not None else np.full(dim, np.nan) for v in kept]).astype(
                np.float32
            ),
        }
        for row, v in enumerate(kept):
            if v.view is not None:
                arrays[f"view_{row}"] = v.view
            if v.stored is not None:
                arrays[f"stored_{row}"] = v.stored
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]  # the stub types allow_pickle into **kwds
        data = buffer.getvalue()  # deterministic: numpy's zip entries carry a fixed date
        name = f"{VIEW_MEMO_PREFIX}{hashlib.sha256(data).hexdigest()[:40]}"
        if not (self.directory / name).is_file():
            atomic_write_bytes(self.directory / name, data)
        return name


def _read_view_memo(path: Path) -> dict[str, DescribedView]:
    """A per-view memo file's entries by key; none when it is unreadable (then its views are rendered)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, full, query, onboard = (data[k] for k in ("keys", "full", "query", "onboard"))
            if not len(keys) == len(full) == len(query) == len(onboard) or query.ndim != 2:
                return {}
            return {
                str(key): DescribedView(
                    key=str(key),
                    query=query[row],
                    full_digest=str(full[row]),
                    view=data[f"view_{row}"] if f"view_{row}" in data.files else None,
                    stored=data[f"stored_{row}"] if f"stored_{row}" in data.files else None,
                    onboard=None if np.isnan(onboard[row]).any() else onboard[row],
                )
                for row, key in enumerate(keys)
            }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        log.warning("self-test: ignoring the unreadable per-view memo %s", path)
        return {}


def _views(
    renderer: ViewRenderer,
    targets: np.ndarray,
    params: Sequence[ViewParams],
    describe: Callable[[np.ndarray], np.ndarray],
    preprocess: Preprocess,
    batch: int,
    onboard_n: int,
    memo: ViewMemo | None,
) -> list[DescribedView]:
    """Every view described: from ``memo`` where its inputs are unchanged, else rendered and described
    (the onboard views' resized pixels described as well), ``batch`` at a time: only the pixels the
    preview and the onboard set keep outlive their batch."""
    shown = set(preview_rows(len(targets)))
    chunks = [TileId(renderer.grid.zoom, int(x), int(y)) for x, y in targets]
    keys = [memo.key(renderer, c, p) if memo is not None else None for c, p in zip(chunks, params, strict=True)]
    views: list[DescribedView | None] = [
        memo.lookup(key, renderer, c, p, view=i in shown, onboard=i < onboard_n)
        if memo is not None and key is not None
        else None
        for i, (key, c, p) in enumerate(zip(keys, chunks, params, strict=True))
    ]
    missing = [i for i, v in enumerate(views) if v is None]
    # The onboard views are the first ones, so the onboard rows of each batch are the same batches a pass over
    # all of them would make: the engine sees the same inputs, and the descriptors are the same.
    for start in range(0, len(missing), batch):
        rows = missing[start : start + batch]
        rendered = [renderer.render_at(chunks[i], params[i]) for i in rows]
        pixels = [view for view, _ in rendered]
        query = _describe_all(pixels, describe, preprocess, batch)
        stored = {
            i: preprocess.resized(view).astype(np.uint8) for i, view in zip(rows, pixels, strict=True) if i < onboard_n
        }
        onboard = dict(zip(stored, _describe_all(list(stored.values()), describe, preprocess, batch), strict=True))
        for row, (i, (view, levels)) in enumerate(zip(rows, rendered, strict=True)):
            key, full_digest = keys[i], ""
            if key is not None and levels != renderer.levels:  # read at full resolution: that input counts too
                full_digest = renderer.input_digest(chunks[i], params[i], 0) or ""
                key = key if full_digest else None
            views[i] = DescribedView(
                key=key,
                query=query[row],
                full_digest=full_digest,
                view=view if i in shown else None,
                stored=stored.get(i),
                onboard=onboard.get(i),
            )
    return [v for v in views if v is not None]


# --------------------------------------------------------------------------------------------- picture


def preview_rows(count: int) -> list[int]:
    """The views (of ``count``) the preview shows: a few spread evenly from the first."""
    shown = min(_PREVIEW, count)
    step = max(1, count // max(1, shown))
    return list(range(0, step * shown, step))


def preview_png(
    views: Sequence[np.ndarray | None],
    found_xy: np.ndarray,
    exact: np.ndarray,
    renderer: ViewRenderer,
    thumb: int = 96,
) -> bytes:
    """A few query views (left, those of :func:`preview_rows`; the others may be None) beside their top-1
    chunks (right), framed green when that is the view's own chunk and red when it is not."""
    rows = preview_rows(len(views))
    if not rows:
        return b""
    canvas = Image.new("RGB", (2 * thumb + 12, len(rows) * (thumb + 6) + 6), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for row, k in enumerate(rows):
        top = 6 + row * (thumb + 6)
        view = views[k]
        if view is None:
            raise ValueError(f"the preview shows view {k}, but its pixels were not kept")
        canvas.paste(Image.fromarray(view).resize((thumb, thumb)), (4, top))
        fx, fy = (int(v) for v in found_xy[k, 0])
        if fx >= 0:
            found = renderer.chunk_image(TileId(renderer.grid.zoom, fx, fy))
            canvas.paste(Image.fromarray(found).resize((thumb, thumb)), (thumb + 8, top))
        colour = (40, 200, 60) if exact[k, 0] else (220, 40, 40)
        draw.rectangle((thumb + 7, top - 1, 2 * thumb + 8, top + thumb), outline=colour, width=3)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
