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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from navcache_runtime.errors import EngineHashMismatchError, EngineSidecarMissingError
from navcache_runtime.index import search
from navcache_runtime.integrity import SCAN_MEMO_PREFIX, atomic_write_bytes, verify_artifact, write_artifact_once
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
    Tile stores (XYZ, MBTiles) mosaic their tiles, kept for the whole self-test (neighbouring views share
    them)."""

    def __init__(self, source: TileSource, grid: ChunkGrid, input_px: int) -> None:
        self.source = source
        self.grid = grid
        fit = max(0, math.floor(math.log2(max(1, grid.chunk_px) / max(1, input_px))))
        self.levels = min(fit, 3, grid.zoom)
        self._tiles: dict[TileId, Any] = {}
        self.tile_size = source.tile_size

    def read_tile(self, tile: TileId) -> Any:
        if tile not in self._tiles:
            self._tiles[tile] = self.source.read_tile(tile)
        return self._tiles[tile]

    def _read(self, zoom: int, x0: int, y0: int, x1: int, y1: int) -> Tile:
        if isinstance(self.source, PixelReader):
            return self.source.read_pixels(zoom, x0, y0, x1, y1)
        return read_window(self, zoom, x0, y0, x1, y1)

    def render(self, chunk: TileId, params: ViewParams) -> np.ndarray:
        """A view of ``chunk``: the orthophoto around it rotated, scaled and shifted, then brightness/contrast,
        blur and a JPEG round trip; RGB uint8, ``chunk_px >> levels`` square. Nodata stays black."""
        view = self._render(chunk, params, self.levels)
        if view is None:  # the source lacks the coarser zoom (XYZ/MBTiles cut at one level): full resolution
            view = self._render(chunk, params, 0)
        return _photometric(view if view is not None else np.zeros((self.grid.chunk_px,) * 2 + (3,), np.uint8), params)

    def chunk_image(self, chunk: TileId) -> np.ndarray:
        """The chunk itself, unperturbed, at the renderer's resolution (nodata black)."""
        x0, y0, x1, y1 = (v >> self.levels for v in self.grid.chunk_pixel_box(chunk))
        tile = self._read(self.grid.zoom - self.levels, x0, y0, x1, y1)
        return np.where(tile.valid[:, :, None], tile.rgb, 0).astype(np.uint8)

    def _render(self, chunk: TileId, params: ViewParams, levels: int) -> np.ndarray | None:
        c = self.grid.chunk_px >> levels
        x0, y0, _, _ = (v >> levels for v in self.grid.chunk_pixel_box(chunk))
        reach = c * (params.scale * math.sqrt(2) / 2 + params.max_shift) - c / 2
        margin = max(0, math.ceil(reach)) + 2
        context = self._read(self.grid.zoom - levels, x0 - margin, y0 - margin, x0 + c + margin, y0 + c + margin)
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
    descriptors: np.ndarray,
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
) -> SelfTestResult:
    """Run the self-test over the built index (see the module docstring).

    ``chunks`` (N, 2) and ``descriptors`` (N, D) are the described chunks and their stored (normalised)
    rows; ``index``/``table`` the built FAISS index and its tile table; ``describe`` runs the VPR engine on a
    preprocessed batch and returns normalised (B, D) rows. ``out_dir`` receives the onboard query set (None:
    none is written). ``upsampling``/``max_upsampling`` and ``blank_fraction`` only sharpen the finding."""
    started = time.perf_counter()
    if len(chunks) == 0:
        raise ValueError("the self-test needs at least one described chunk")
    picked = sample_chunks(chunks, config.samples, config.seed)
    rng = np.random.default_rng([config.seed, 2])
    params = [draw_params(rng, config) for _ in picked]
    targets = chunks[picked]
    renderer = ViewRenderer(source, grid, max(preprocess.height, preprocess.width))
    views = [renderer.render(TileId(grid.zoom, int(x), int(y)), p) for (x, y), p in zip(targets, params, strict=True)]
    query = _describe_all(views, describe, preprocess, batch_size)
    hits = search(index, table, query, 5)
    found = np.full((len(views), 5), -1, np.int64)
    for row, ranked in enumerate(hits):
        for rank, (rid, _score) in enumerate(ranked):
            found[row, rank] = rid
    found_xy = np.where(found[:, :, None] >= 0, np.stack([table["x"], table["y"]], 1)[found], -(10**9))
    exact = np.all(found_xy == targets[:, None, :], axis=2)
    near = np.all(np.abs(found_xy - targets[:, None, :]) <= 1, axis=2)

    random_cos, neighbour_cos = _space_health(chunks, descriptors, config.seed)
    own = descriptors[picked]
    self_cos = float(np.median(np.sum(query * own, axis=1)))
    collapsed, finding = _finding(
        descriptors,
        random_cos,
        neighbour_cos,
        self_cos,
        float(np.mean(exact[:, :5].any(1))),
        upsampling,
        max_upsampling,
        blank_fraction,
    )

    onboard_path, onboard_n, floor = None, 0, 0
    if out_dir is not None and config.onboard_samples > 0:
        onboard_path, onboard_n, floor = _write_onboard_set(
            out_dir,
            views[: config.onboard_samples],
            targets[: config.onboard_samples],
            describe,
            preprocess,
            index,
            table,
            batch_size,
        )
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
        onboard_queries=onboard_n,
        onboard_min_hits_at_5=floor,
        seconds=time.perf_counter() - started,
        preview_png=preview_png(views, found_xy, exact, renderer),
    )
    log.info(
        "self-test: %d views, recall@1 %.3f, recall@5 %.3f (within one chunk: %.3f / %.3f); %s",
        result.samples,
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
    rows = []
    for start in range(0, len(views), batch):
        inputs = np.stack([preprocess(v) for v in views[start : start + batch]])
        rows.append(np.asarray(describe(inputs), np.float32))
    return np.concatenate(rows)


def _space_health(chunks: np.ndarray, descriptors: np.ndarray, seed: int) -> tuple[float, float]:
    """Median cosine of random tile pairs and of horizontally/vertically neighbouring tiles."""
    n = len(descriptors)
    rows = np.asarray(descriptors, np.float32)
    if n < 2:
        return 1.0, 1.0
    rng = np.random.default_rng([seed, 3])
    i, j = rng.integers(0, n, _PAIRS), rng.integers(0, n, _PAIRS)
    keep = i != j
    random_cos = float(np.median(np.sum(rows[i[keep]] * rows[j[keep]], axis=1))) if keep.any() else 1.0
    position = {(int(x), int(y)): k for k, (x, y) in enumerate(chunks)}
    pairs = [
        (k, position[(int(x) + dx, int(y) + dy)])
        for k, (x, y) in enumerate(chunks)
        for dx, dy in ((1, 0), (0, 1))
        if (int(x) + dx, int(y) + dy) in position
    ]
    if len(pairs) > _PAIRS:
        pairs = [pairs[k] for k in rng.choice(len(pairs), _PAIRS, replace=False)]
    if not pairs:
        return random_cos, random_cos
    a, b = np.asarray(pairs).T
    return random_cos, float(np.median(np.sum(rows[a] * rows[b], axis=1)))


def _finding(
    descriptors: np.ndarray,
    random_cos: float,
    neighbour_cos: float,
    self_cos: float,
    recall_at_5: float,
    upsampling: float | None,
    max_upsampling: float | None,
    blank_fraction: float,
) -> tuple[bool, str]:
    spread = float(np.asarray(descriptors, np.float32).std(axis=0).max()) if len(descriptors) > 1 else 0.0
    figures = (
        f"median cosine: random tiles {random_cos:.3f}, neighbours {neighbour_cos:.3f}, view-to-own {self_cos:.3f}"
    )
    if len(descriptors) > 1 and spread < CONSTANT_OUTPUT_STD:
        return True, (
            f"collapsed descriptor space: the model gives the same descriptor for every tile ({figures}); likely "
            "cause: constant output — check the backbone's output and weights"
        )
    if len(descriptors) < MIN_CHUNKS_TO_JUDGE:
        return False, f"too few chunks ({len(descriptors)}) to judge the descriptor space ({figures})"
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
    out_dir: Path,
    views: Sequence[np.ndarray],
    targets: np.ndarray,
    describe: Callable[[np.ndarray], np.ndarray],
    preprocess: Preprocess,
    index: Any,
    table: np.ndarray,
    batch: int,
) -> tuple[Path, int, int]:
    """Store the views at the engine's input size (so the file stays small and the drone's resize is the
    identity), count the ground's top-5 hits on exactly those arrays, and derive the onboard floor."""
    stored = np.stack([preprocess.resized(v) for v in views]).astype(np.uint8)
    query = _describe_all(list(stored), describe, preprocess, batch)
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
    return path, len(stored), floor


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


# --------------------------------------------------------------------------------------------- picture


def preview_png(
    views: Sequence[np.ndarray], found_xy: np.ndarray, exact: np.ndarray, renderer: ViewRenderer, thumb: int = 96
) -> bytes:
    """A few query views (left) beside their top-1 chunks (right), framed green when that is the view's own
    chunk and red when it is not."""
    count = min(_PREVIEW, len(views))
    if count == 0:
        return b""
    canvas = Image.new("RGB", (2 * thumb + 12, count * (thumb + 6) + 6), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    step = max(1, len(views) // count)
    for row, k in enumerate(range(0, step * count, step)):
        top = 6 + row * (thumb + 6)
        canvas.paste(Image.fromarray(views[k]).resize((thumb, thumb)), (4, top))
        fx, fy = (int(v) for v in found_xy[k, 0])
        if fx >= 0:
            found = renderer.chunk_image(TileId(renderer.grid.zoom, fx, fy))
            canvas.paste(Image.fromarray(found).resize((thumb, thumb)), (thumb + 8, top))
        colour = (40, 200, 60) if exact[k, 0] else (220, 40, 40)
        draw.rectangle((thumb + 7, top - 1, 2 * thumb + 8, top + thumb), outline=colour, width=3)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
