"""Descriptor batching: retrieval chunks of one shard → the VPR engine → a content-addressed shard.

A shard is two files in ``descriptors/``: ``{key}.desc.npy`` (float16, one row per described chunk) and
``{key}.tiles.npy`` (every chunk of the shard with its status: described / blank / missing), each with a
``.sha256`` sidecar. ``key`` hashes every chunk's pixel content, the engine's identity (artifact sha256)
and the preprocessing, so a re-run computes only shards whose tiles, engine or preprocessing changed, and an
interrupted run resumes: finished shards are complete files, unfinished ones never got a name.

Two passes per shard: the first reads and hashes the chunks (decides reuse), the second — only for a
shard that must be computed — re-reads them in a background thread that decodes and preprocesses the next
batch while the engine runs the current one.

The first pass decodes (and, for a GeoTIFF, warps) every chunk, which costs more than the inference of a
small backbone. So a **scan memo** skips it: when the source can digest its still-encoded bytes
(:meth:`TileSource.raw_digest`), the digest of everything a shard reads maps to the shard key that scan
produced last time (a ``.navcache-scan-*`` file next to the shards). Unchanged imagery then costs one pass
over the encoded bytes plus the hash check of the shard files; changed blocks re-scan only their shards.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from navcache_runtime import EngineHashMismatchError, EngineSidecarMissingError, verify_artifact, write_artifact
from navcache_runtime.integrity import SCAN_MEMO_PREFIX, atomic_write_bytes

from .errors import ProvisionError
from .imagery import TileSource, is_blank, tile_content_hash
from .tiles import ChunkGrid, ShardPlan
from .types import Tile, TileId

log = logging.getLogger(__name__)

DESCRIBED, BLANK, MISSING = 0, 1, 2
STATUS_NAMES = {DESCRIBED: "described", BLANK: "blank", MISSING: "missing"}
TABLE_DTYPE = np.dtype([("z", "<i4"), ("x", "<i4"), ("y", "<i4"), ("status", "u1")])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PREFETCH_BATCHES = 2
#: Bump when pass 1's decisions change (blank rule, content hash): older memo entries then never match.
SCAN_VERSION = "navcache-scan-v1"
_SHARD_KEY_CHARS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Preprocessing:
    """RGB uint8 chunk → normalised float32 CHW at the backbone's input size."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_input_shape(cls, shape: Sequence[int]) -> Preprocessing:
        if len(shape) != 4 or shape[1] != 3:
            raise ProvisionError(
                f"the VPR backbone input must be NCHW with 3 channels, got shape {list(shape)}",
                hint="export the model with an [N, 3, H, W] image input",
            )
        return cls(int(shape[2]), int(shape[3]))

    def spec(self) -> str:
        """Everything that changes the tensors the engine sees; part of every shard key."""
        return f"v1|rgb|bilinear|{self.height}x{self.width}|mean={self.mean}|std={self.std}"

    @cached_property
    def _lut(self) -> np.ndarray:
        """(3, 256) float32: the normalised value of every uint8 level per channel, computed with the same
        float32 operations as the per-pixel formula, so a table lookup gives bit-identical tensors at a
        third of the cost (this runs for every chunk)."""
        scaled = np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255.0)
        normalised = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normalised.T, dtype=np.float32)

    def __call__(self, rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """CHW float32, written into ``out`` (shape (3, H, W)) when given."""
        if rgb.shape[:2] != (self.height, self.width):
            rgb = np.asarray(Image.fromarray(rgb).resize((self.width, self.height), Image.Resampling.BILINEAR))
        if out is None:
            out = np.empty((3, self.height, self.width), np.float32)
        lut = self._lut
        for channel in range(3):
            np.take(lut[channel], rgb[..., channel], out=out[channel])
        return out


@dataclass
class DescriptorEngine:
    """The loaded VPR engine as descriptor batching uses it."""

    runtime: Any
    handle: Any
    input_name: str
    output_name: str | None
    identity: str  # engine artifact sha256: part of every shard key
    batch_size: int
    min_batch: int = 1

    def describe(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if n < self.min_batch:  # fixed-batch engines: pad the last batch
            pad = np.zeros((self.min_batch - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        outputs: Mapping[str, np.ndarray] = self.runtime.infer(self.handle, {self.input_name: batch})
        name = self.output_name
        out = outputs[name] if name is not None and name in outputs else next(iter(outputs.values()))
        return np.asarray(out[:n]).reshape(n, -1)


@dataclass(frozen=True)
class ShardResult:
    block: tuple[int, int]
    key: str
    descriptors_path: Path
    table_path: Path
    described: int
    blank: int
    missing: int
    computed: bool
    seconds: float
    batches: int  # inference calls made for this shard (0 when reused)


class ChunkReader:
    """Reads retrieval chunks by mosaicking storage tiles; a small LRU keeps tiles that overlapping chunks
    share. Thread-confined: each pass creates its own."""

    def __init__(self, source: TileSource, grid: ChunkGrid, cache_tiles: int = 64) -> None:
        self.source = source
        self.grid = grid
        self._cache: OrderedDict[TileId, Tile | None] = OrderedDict()
        self._cache_tiles = cache_tiles

    def _tile(self, tile: TileId) -> Tile | None:
        if tile in self._cache:
            self._cache.move_to_end(tile)
            return self._cache[tile]
        value = self.source.read_tile(tile)
        self._cache[tile] = value
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return value

    def read(self, chunk: TileId) -> Tile | None:
        """The chunk's pixels, or None when the source has none of its storage tiles."""
        tiles = self.grid.storage_tiles_of_chunk(chunk)
        if len(tiles) == 1 and self.grid.chunk_px == self.grid.tile_size and self.grid.stride_px == self.grid.tile_size:
            return self._tile(tiles[0])  # span 1, no overlap: the chunk is the storage tile
        x0, y0, x1, y1 = self.grid.chunk_pixel_box(chunk)
        size = self.grid.tile_size
        rgb = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        valid = np.zeros((y1 - y0, x1 - x0), bool)
        found = False
        for tile in tiles:
            data = self._tile(tile)
            if data is None:
                continue
            found = True
            tx0, ty0 = tile.x * size, tile.y * size
            ax0, ay0 = max(x0, tx0), max(y0, ty0)
            ax1, ay1 = min(x1, tx0 + size), min(y1, ty0 + size)
            if ax0 >= ax1 or ay0 >= ay1:
                continue
            rgb[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = data.rgb[ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0]
            valid[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = data.valid[ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0]
        return Tile(rgb, valid) if found else None


def classify(tile: Tile | None) -> int:
    if tile is None:
        return MISSING
    return BLANK if is_blank(tile) else DESCRIBED


def scan_shard(plan: ShardPlan, reader: ChunkReader) -> list[tuple[TileId, int, str]]:
    """Pass 1: (chunk, status, content hash) for every chunk of the shard."""
    rows = []
    for chunk in plan.chunks:
        tile = reader.read(chunk)
        rows.append((chunk, classify(tile), tile_content_hash(tile) if tile is not None else "-"))
    return rows


def shard_key(scan: Sequence[tuple[TileId, int, str]], engine_identity: str, preprocessing: Preprocessing) -> str:
    digest = hashlib.sha256()
    digest.update(f"navcache-shard-v1\n{engine_identity}\n{preprocessing.spec()}\n".encode())
    for chunk, status, content in scan:
        digest.update(f"{chunk} {status} {content}\n".encode())
    return digest.hexdigest()


def shard_source_digest(
    plan: ShardPlan, source: TileSource, grid: ChunkGrid, engine_identity: str, preprocessing: Preprocessing
) -> str | None:
    """Digest of everything the shard key depends on, from the source's encoded bytes (no decoding); None
    when the source cannot digest its bytes."""
    digest = hashlib.sha256(
        f"{SCAN_VERSION}\n{source.raw_identity()}\n{grid!r}\n{engine_identity}\n{preprocessing.spec()}\n".encode()
    )
    seen: dict[TileId, str] = {}
    for chunk in plan.chunks:
        digest.update(f"{chunk}:".encode())
        for tile in grid.storage_tiles_of_chunk(chunk):
            raw = seen.get(tile)
            if raw is None:
                raw = source.raw_digest(tile)
                if raw is None:
                    return None
                seen[tile] = raw
            digest.update(f"{tile}={raw};".encode())
    return digest.hexdigest()


def _memo_path(out_dir: Path, source_digest: str) -> Path:
    return out_dir / f"{SCAN_MEMO_PREFIX}{source_digest[:40]}"


def recall_shard_key(out_dir: Path, source_digest: str) -> str | None:
    try:
        key = _memo_path(out_dir, source_digest).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return key if len(key) == 64 and set(key) <= _SHARD_KEY_CHARS else None


def remember_shard_key(out_dir: Path, source_digest: str, key: str) -> None:
    try:
        atomic_write_bytes(_memo_path(out_dir, source_digest), key.encode("ascii"))
    except OSError as exc:  # the memo only saves time; the shard itself is written and verified
        log.warning("could not write the scan memo for shard %s: %s", key[:12], exc)


def shard_paths(out_dir: Path, key: str) -> tuple[Path, Path]:
    stem = key[:32]
    return out_dir / f"{stem}.desc.npy", out_dir / f"{stem}.tiles.npy"


def _is_complete(desc_path: Path, table_path: Path) -> bool:
    for path in (desc_path, table_path):
        if not path.exists():
            return False
        try:
            verify_artifact(path)
        except (EngineSidecarMissingError, EngineHashMismatchError) as exc:
            log.warning("shard file %s failed verification (%s); recomputing the shard", path.name, exc.message)
            return False
    return True


def _batches(
    chunks: Sequence[TileId], reader: ChunkReader, preprocessing: Preprocessing, batch_size: int
) -> Iterator[np.ndarray]:
    """Pass 2 producer: decoded, preprocessed batches, computed in a background thread."""
    pending: queue.Queue[np.ndarray | BaseException | None] = queue.Queue(maxsize=_PREFETCH_BATCHES)
    stop = threading.Event()

    def produce() -> None:
        try:
            for start in range(0, len(chunks), batch_size):
                members = chunks[start : start + batch_size]
                batch = np.empty((len(members), 3, preprocessing.height, preprocessing.width), np.float32)
                for row, chunk in enumerate(members):
                    tile = reader.read(chunk)
                    if tile is None:  # the source changed between the passes
                        raise ProvisionError(f"chunk {chunk} disappeared from the orthophoto source during the run")
                    preprocessing(tile.rgb, out=batch[row])
                while not stop.is_set():
                    try:
                        pending.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            pending.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            pending.put(exc)

    worker = threading.Thread(target=produce, name="navcache-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = pending.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def describe_shard(
    plan: ShardPlan,
    *,
    source: TileSource,
    grid: ChunkGrid,
    engine: DescriptorEngine,
    preprocessing: Preprocessing,
    out_dir: Path,
    on_batch: Callable[[int], None] | None = None,
) -> ShardResult:
    """Compute (or reuse) the descriptors of one shard. ``on_batch(n)`` is told about every batch."""
    started = time.perf_counter()
    block = (plan.block_x, plan.block_y)
    source_digest = shard_source_digest(plan, source, grid, engine.identity, preprocessing)
    if source_digest is not None:
        remembered = _reuse_remembered(plan, out_dir, source_digest)
        if remembered is not None:
            key, desc_path, table_path, counts = remembered
            return ShardResult(
                block,
                key,
                desc_path,
                table_path,
                counts[DESCRIBED],
                counts[BLANK],
                counts[MISSING],
                computed=False,
                seconds=time.perf_counter() - started,
                batches=0,
            )
    result = _scan_and_describe(plan, source, grid, engine, preprocessing, out_dir, on_batch, started)
    # Remember only what this run read: a source edited while the shard was scanned digests differently.
    if source_digest is not None and shard_source_digest(plan, source, grid, engine.identity, preprocessing) == (
        source_digest
    ):
        remember_shard_key(out_dir, source_digest, result.key)
    return result


def _reuse_remembered(
    plan: ShardPlan, out_dir: Path, source_digest: str
) -> tuple[str, Path, Path, dict[int, int]] | None:
    key = recall_shard_key(out_dir, source_digest)
    if key is None:
        return None
    desc_path, table_path = shard_paths(out_dir, key)
    if not _is_complete(desc_path, table_path):
        return None
    table = np.load(table_path, allow_pickle=False)
    if len(table) != len(plan.chunks):  # cannot happen for a key this memo wrote; never trust it blindly
        return None
    return key, desc_path, table_path, {s: int((table["status"] == s).sum()) for s in STATUS_NAMES}


def _scan_and_describe(
    plan: ShardPlan,
    source: TileSource,
    grid: ChunkGrid,
    engine: DescriptorEngine,
    preprocessing: Preprocessing,
    out_dir: Path,
    on_batch: Callable[[int], None] | None,
    started: float,
) -> ShardResult:
    scan = scan_shard(plan, ChunkReader(source, grid))
    key = shard_key(scan, engine.identity, preprocessing)
    desc_path, table_path = shard_paths(out_dir, key)
    counts = {s: sum(1 for _, status, _ in scan if status == s) for s in STATUS_NAMES}
    block = (plan.block_x, plan.block_y)

    def result(computed: bool, batches: int) -> ShardResult:
        return ShardResult(
            block,
            key,
            desc_path,
            table_path,
            counts[DESCRIBED],
            counts[BLANK],
            counts[MISSING],
            computed=computed,
            seconds=time.perf_counter() - started,
            batches=batches,
        )

    if _is_complete(desc_path, table_path):
        return result(computed=False, batches=0)
    to_describe = [chunk for chunk, status, _ in scan if status == DESCRIBED]
    parts, batches = [], 0
    for batch in _batches(to_describe, ChunkReader(source, grid), preprocessing, engine.batch_size):
        parts.append(engine.describe(batch).astype(np.float16))
        batches += 1
        if on_batch is not None:
            on_batch(len(batch))
    descriptors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float16)
    if not np.isfinite(descriptors).all():
        raise ProvisionError(
            f"shard {block}: the VPR engine produced non-finite descriptors",
            hint="check the model's numerical stability at this precision (try fp32)",
        )
    table = np.array([(c.z, c.x, c.y, status) for c, status, _ in scan], dtype=TABLE_DTYPE)
    # Descriptors first, table last: a table on disk means its shard is complete.
    write_artifact(desc_path, _npy_bytes(descriptors))
    write_artifact(table_path, _npy_bytes(table))
    return result(computed=True, batches=batches)


def load_shard(result: ShardResult) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors float16 (n, D), table rows) of a finished shard; rows of status DESCRIBED align with
    descriptor rows in order."""
    return np.load(result.descriptors_path, allow_pickle=False), np.load(result.table_path, allow_pickle=False)
