"""Descriptor batching: retrieval chunks of one shard → the VPR engine → a content-addressed shard.

A shard is two files in ``descriptors/``: ``{key}.desc.npy`` (float16, one row per described chunk) and
``{key}.tiles.npy`` (every chunk of the shard with its :class:`~navcache_runtime.coverage.TileStatus`:
described 0 / missing 1 / blank 2, the coverage table's encoding), each with a
``.sha256`` sidecar. ``key`` hashes every chunk's pixel content, the engine's identity (artifact sha256)
and the preprocessing, so a re-run computes only shards whose tiles, engine or preprocessing changed, and an
interrupted run resumes: finished shards are complete files, unfinished ones never got a name.

Decoding (and, for a GeoTIFF, warping) a chunk costs more than a small backbone's inference, so each chunk
is decoded at most once per run, in a background thread that overlaps the engine. When the source can digest
its still-encoded bytes (:meth:`TileSource.raw_digest`), each shard keeps a **scan memo** (a ground-side
``.navcache-scan-*`` file next to the shards, never in a manifest): per chunk, the raw digest, the status and
the pixel content hash the last scan found, plus the shard key. A run then digests the raw bytes, decodes
only chunks whose raw digest moved (none on a warm run, all on a cold one), and feeds the described ones
whose content the previous shard lacks straight to the engine; the other rows are copied from the previous
shard. The key is the same pixel-content key as without a memo, so the memo only ever saves work. A source
that names the encoded inputs of its raw digests (a GeoTIFF's blocks: :class:`~navcache.imagery.DigestsItsInputs`)
has them in the memo too, and a run whose inputs digest the same takes the memo's raw digests without planning
a tile. A source without raw digests is scanned first and re-read only for a shard that must be computed.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import os
import platform
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from navcache_runtime import (
    EngineHashMismatchError,
    EngineSidecarMissingError,
    RuntimeConfig,
    verify_artifact,
    write_artifact,
)
from navcache_runtime.coverage import DEFAULT_BLANK_STD, TileStatus
from navcache_runtime.integrity import SCAN_MEMO_PREFIX, atomic_write_bytes
from navcache_runtime.preprocessing import Preprocess

from .errors import ProvisionError
from .imagery import DigestsItsInputs, TileSource, is_blank, tile_content_hash
from .tiles import ChunkGrid, ShardPlan
from .types import Tile, TileId

log = logging.getLogger(__name__)

# Shard tables and scan memos store TileStatus codes, the coverage table's encoding. The codes are part of the
# shard key and SCAN_VERSION, so a table or memo written with any other encoding is recomputed, never misread.
DESCRIBED, BLANK, MISSING = TileStatus.DESCRIBED, TileStatus.BLANK, TileStatus.MISSING
STATUS_CODES = frozenset(TileStatus)
TABLE_DTYPE = np.dtype([("z", "<i4"), ("x", "<i4"), ("y", "<i4"), ("status", "u1")])
_PREFETCH_BATCHES = 2
#: Threads decoding chunks for one shard (GDAL/Pillow/numpy release the GIL; more than 4 gains little).
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Names the memo format and what its rows mean: bump it when pass 1's decisions (blank rule, content hash,
#: status codes) or the shard rows a memo points at change, so a memo of another format never matches.
SCAN_VERSION = "navcache-scan-v5"
_HEX = frozenset("0123456789abcdef")


#: The backbone's declared preprocessing, under the name provisioning code imports it by: the same class as the
#: drone's ``open_cache(...).preprocess`` (:mod:`navcache_runtime.preprocessing` holds the one definition).
#: Chunks are resized on the decode threads and normalised into the batch (:func:`_filled_batches`).
Preprocessing = Preprocess


def describing_config(config: RuntimeConfig) -> RuntimeConfig:
    """The runtime configuration a VPR engine describes shards under: ``config`` with ONNX Runtime's
    threads sleeping between batches. The shard's decode threads want the cores those threads would
    spin-wait on; letting them run took the tiny backbone from 0.70x to 0.93x a bare ONNX Runtime loop
    with the same preprocessing (bench/RESULTS.md, descriptor batching)."""
    return replace(config, intra_op_spinning=False)


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
        chosen = name if name is not None and name in outputs else next(iter(outputs))
        out = np.asarray(outputs[chosen])
        if out.ndim != 2:
            # A feature map flattened into a descriptor would index garbage; preflight refuses such models,
            # this catches engines whose output shape only shows at run time.
            raise ProvisionError(
                f"the VPR engine's output {chosen!r} has shape {list(out.shape)}; a descriptor must be [N, D]",
                hint='set output = "<the [N, D] output>" for this backbone, or pool the feature map in the model',
            )
        return l2_normalise(out[:n])


def l2_normalise(descriptors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in float32 (norms in float64: raw outputs of ~1e6 would overflow float16 and
    their squares lose digits in float32). Retrieval is by cosine, so this changes no ranking; it keeps
    float16 shards finite whatever the model's output scale. All-zero and non-finite rows stay as they are
    (the index and the shard check name them)."""
    values = np.asarray(descriptors, np.float32)
    norms = np.linalg.norm(values.astype(np.float64), axis=1, keepdims=True)
    usable = np.isfinite(norms) & (norms > 0)
    return np.where(usable, values / np.where(usable, norms, 1.0), values).astype(np.float32)


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
    inferred: int = 0  # chunks the engine ran on (described chunks not copied from the previous shard)


class ChunkReader:
    """Reads retrieval chunks by mosaicking storage tiles; a small LRU keeps tiles that overlapping chunks
    share. Thread-confined: each decode thread of a pass has its own."""

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
        if self.grid.is_storage_grid:
            return self._tile(chunk)
        tiles = self.grid.storage_tiles_of_chunk(chunk)
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


def classify(tile: Tile | None, blank_std: float = DEFAULT_BLANK_STD) -> TileStatus:
    if tile is None:
        return MISSING
    return BLANK if is_blank(tile, min_std=blank_std) else DESCRIBED


def scan_shard(
    chunks: Sequence[TileId], reader: ChunkReader, blank_std: float = DEFAULT_BLANK_STD
) -> list[tuple[TileId, int, str]]:
    """Pass 1 for a source without raw digests: (chunk, status, content hash) for every chunk."""
    rows: list[tuple[TileId, int, str]] = []
    for chunk in chunks:
        tile = reader.read(chunk)
        rows.append((chunk, classify(tile, blank_std), tile_content_hash(tile) if tile is not None else "-"))
    return rows


def shard_key(scan: Sequence[tuple[TileId, int, str]], engine_identity: str, preprocessing: Preprocess) -> str:
    digest = hashlib.sha256()
    # The version names the shard format (L2-normalised float16 rows, TileStatus codes in the table): bump it
    # when either changes, so a shard of another format gets another key and is recomputed, never reused.
    digest.update(f"navcache-shard-v4\n{engine_identity}\n{preprocessing.spec()}\n".encode())
    for chunk, status, content in scan:
        digest.update(f"{chunk} {status} {content}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ScanMemo:
    """What the last scan of one shard found: the shard key and, per chunk in plan order, (raw digest,
    status, pixel content hash); for a source that names its encoded inputs (:class:`DigestsItsInputs`),
    the inputs those raw digests covered and their digest."""

    key: str
    rows: tuple[tuple[str, int, str], ...]
    inputs: tuple[str, ...] = ()
    inputs_digest: str = ""

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": SCAN_VERSION,
                "key": self.key,
                "rows": self.rows,
                "inputs": self.inputs,
                "inputs_digest": self.inputs_digest,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, n_chunks: int | None = None) -> ScanMemo | None:
        """None for anything but a well-formed memo (of ``n_chunks`` chunks when given): a damaged memo
        costs a scan."""
        try:
            raw = json.loads(data)
            key = raw["key"]
            rows = tuple((str(d), int(s), str(c)) for d, s, c in raw["rows"])
            inputs = tuple(str(name) for name in raw.get("inputs", ()))
            inputs_digest = raw.get("inputs_digest", "")
        except (ValueError, KeyError, TypeError):
            return None
        if raw.get("version") != SCAN_VERSION or not _is_hex64(key):
            return None
        if n_chunks is not None and len(rows) != n_chunks:
            return None
        if any(status not in STATUS_CODES for _, status, _ in rows):
            return None
        if not (inputs_digest == "" or _is_hex64(inputs_digest)):
            return None
        return cls(key, rows, inputs, inputs_digest)


def _is_hex64(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and set(text) <= _HEX


def chunk_raw_digests(chunks: Sequence[TileId], source: TileSource, grid: ChunkGrid) -> list[str] | None:
    """Per chunk, a digest of the encoded source bytes of its storage tiles (no decoding); None when the
    source cannot digest its bytes. A chunk that is one storage tile has that tile's digest."""
    found = _chunk_raw_digests(chunks, source, grid, with_inputs=False)
    return None if found is None else found[0]


def _chunk_raw_digests(
    chunks: Sequence[TileId], source: TileSource, grid: ChunkGrid, with_inputs: bool
) -> tuple[list[str], tuple[str, ...] | None] | None:
    """:func:`chunk_raw_digests` and, ``with_inputs`` from a :class:`DigestsItsInputs` source, the inputs
    they cover (else None)."""

    def tile_digests(tiles: Sequence[TileId]) -> tuple[list[str], tuple[str, ...] | None] | None:
        if with_inputs and isinstance(source, DigestsItsInputs):
            found = source.raw_digests_and_inputs(tiles)
            if found is not None:
                return found
        digests = source.raw_digests(tiles)  # a source that cannot name its inputs may still digest them
        return None if digests is None else (digests, None)

    if grid.is_storage_grid:
        return tile_digests(chunks)
    per_chunk = [grid.storage_tiles_of_chunk(chunk) for chunk in chunks]
    tiles = list(dict.fromkeys(t for chunk_tiles in per_chunk for t in chunk_tiles))
    found = tile_digests(tiles)
    if found is None:
        return None
    by_tile = dict(zip(tiles, found[0], strict=True))
    digests = [
        hashlib.sha256("".join(f"{t}={by_tile[t]};" for t in chunk_tiles).encode()).hexdigest()
        for chunk_tiles in per_chunk
    ]
    return digests, found[1]


def _inputs_unchanged(memo: ScanMemo | None, source: TileSource) -> bool:
    """True when the memo names the inputs of its raw digests and they still digest the same: every chunk's
    raw digest is then the memo's, without planning or digesting a tile (an unchanged shard of a warm or
    incremental run)."""
    if memo is None or not memo.inputs_digest or not isinstance(source, DigestsItsInputs):
        return False
    return source.inputs_digest(memo.inputs) == memo.inputs_digest


def memo_path(
    out_dir: Path,
    chunks: Sequence[TileId],
    source: TileSource,
    grid: ChunkGrid,
    engine_identity: str,
    prep: Preprocess,
    blank_std: float = DEFAULT_BLANK_STD,
) -> Path:
    """One memo per shard plan, engine, preprocessing, blank rule and source format: rows align with
    ``chunks``, the plan's (a memo's statuses hold only for the blank rule that decided them)."""
    ident = hashlib.sha256(
        f"{SCAN_VERSION}\n{source.raw_identity()}\n{grid!r}\n{engine_identity}\n{prep.spec()}\n".encode()
    )
    ident.update(f"blank_std={blank_std!r}\n".encode())
    ident.update(";".join(str(c) for c in chunks).encode())
    return out_dir / f"{SCAN_MEMO_PREFIX}{ident.hexdigest()[:40]}"


def _read_memo(path: Path, n_chunks: int) -> ScanMemo | None:
    try:
        return ScanMemo.from_json(path.read_bytes(), n_chunks)
    except OSError:
        return None


def _write_memo(path: Path, memo: ScanMemo) -> None:
    try:
        atomic_write_bytes(path, memo.to_json())
    except OSError as exc:  # the memo only saves time; the shard itself is written and verified
        log.warning("could not write the scan memo %s: %s", path.name, exc)


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


T = TypeVar("T")


#: glibc's ``M_ARENA_MAX`` (malloc.h) and the bound :func:`bound_malloc_arenas` sets.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2
_arenas_bounded = False


def bound_malloc_arenas() -> None:
    """Bound glibc's malloc arenas for this provisioning process (once; a no-op off glibc, and where the
    user set ``MALLOC_ARENA_MAX``). glibc gives threads up to 8 arenas per core, and a thread's freed
    decode buffers, warped windows and engine batches stay in its arena, fragmented, not returned to the
    OS: at 1e5 tiles, two shards at a time, resident memory grew ~20 MB per shard to 1.5 GB without a
    bound and stayed at 720-790 MiB with two arenas (bench/RESULTS.md, Scale). The bound only stops new
    arenas: called once Prefect's threads have made theirs, a flow run still ended with 8 (measured with
    ``malloc_info``), so the command line's ``main`` and the flow module (when imported) call it before any
    thread starts; the job (:mod:`navcache.descriptor_job`) and every shard's decode pool call it again for
    processes that never import the flow (a Dask worker). The provisioning library only: the onboard runtime
    never calls it."""
    global _arenas_bounded
    if _arenas_bounded:
        return
    _arenas_bounded = True
    if os.environ.get("MALLOC_ARENA_MAX") or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(None)
        if libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS) != 1:
            log.debug("mallopt(M_ARENA_MAX, %d) was refused", MALLOC_ARENAS)
    except (OSError, AttributeError) as exc:  # not the C library we expected: memory is only less flat
        log.debug("cannot bound malloc arenas: %s", exc)


def _in_background(items: Iterator[T]) -> Iterator[T]:
    """``items``, produced in a background thread up to _PREFETCH_BATCHES ahead (decoding, warping and
    preprocessing release the GIL, so they overlap the engine)."""
    pending: queue.Queue[tuple[T] | BaseException | None] = queue.Queue(maxsize=_PREFETCH_BATCHES)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        pending.put((item,), timeout=0.1)
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
            got = pending.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got[0]
    finally:
        stop.set()
        worker.join(timeout=5)


def _decoded(items: Sequence[int], work: Callable[[int], T], threads: int) -> Iterator[T]:
    """``work(item)`` for every item, in order, on ``threads`` threads with a bounded lookahead: GDAL's read
    and warp, Pillow's decode and numpy's hashing release the GIL, so decoding scales with cores (measured
    1.55x on 2 cores) while the engine runs on the consumer side."""
    if threads <= 1 or len(items) <= 1:
        yield from map(work, items)
        return
    bound_malloc_arenas()  # before the first decode threads of a process start
    with ThreadPoolExecutor(threads, thread_name_prefix="navcache-decode") as pool:
        pending: deque[Future[T]] = deque()
        upcoming = iter(items)
        for item in islice(upcoming, threads * 4):
            pending.append(pool.submit(work, item))
        try:
            while pending:
                result = pending.popleft().result()
                for item in islice(upcoming, 1):
                    pending.append(pool.submit(work, item))
                yield result
        finally:
            for future in pending:
                future.cancel()


def _thread_reader(readers: threading.local, source: TileSource, grid: ChunkGrid) -> ChunkReader:
    """A ChunkReader per decode thread (its tile cache is not thread-safe; the source is)."""
    reader: ChunkReader | None = getattr(readers, "reader", None)
    if reader is None:
        reader = readers.reader = ChunkReader(source, grid)
    return reader


def _filled_batches(
    frames: Iterator[tuple[T, np.ndarray]], preprocessing: Preprocess, batch_size: int
) -> Iterator[tuple[list[T], np.ndarray]]:
    """(tags, float32 batch) for every ``batch_size`` (tag, resized frame) pairs, the last batch shorter.
    Each frame is normalised straight into its row of a freshly allocated batch: a batch handed on is never
    written again (the engine may still hold it while the next one fills), and no per-image float array is
    made only to be copied into a stack."""
    shape = preprocessing.input_shape(batch_size)
    tags: list[T] = []
    batch = np.empty(shape, np.float32)
    for tag, frame in frames:
        preprocessing.normalise(frame, out=batch[len(tags)])
        tags.append(tag)
        if len(tags) == batch_size:
            yield tags, batch
            tags, batch = [], np.empty(shape, np.float32)
    if tags:
        yield tags, batch[: len(tags)]


def _reread_batches(
    chunks: Sequence[TileId], source: TileSource, grid: ChunkGrid, preprocessing: Preprocess, batch_size: int
) -> Iterator[np.ndarray]:
    """Pass 2: batches of the chunks pass 1 did not keep, decoded and resized on the decode threads,
    normalised into the batch (:func:`_filled_batches`)."""
    readers = threading.local()

    def load(k: int) -> tuple[int, np.ndarray]:
        tile = _thread_reader(readers, source, grid).read(chunks[k])
        if tile is None:  # the source changed between the passes
            raise ProvisionError(f"chunk {chunks[k]} disappeared from the orthophoto source during the run")
        return k, preprocessing.resized(tile.rgb)

    for _, batch in _filled_batches(_decoded(range(len(chunks)), load, DECODE_THREADS), preprocessing, batch_size):
        yield batch


def _scan_batches(
    chunks: Sequence[TileId],
    source: TileSource,
    grid: ChunkGrid,
    raw: Sequence[str],
    memo: ScanMemo | None,
    known: Mapping[str, np.ndarray],
    preprocessing: Preprocess,
    batch_size: int,
    scan: list[tuple[TileId, int, str]],
    blank_std: float = DEFAULT_BLANK_STD,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Pass 1 for a source with raw digests, with inference folded in: fills ``scan`` with every chunk's
    row (when exhausted) and yields (chunk indices, preprocessed batch) of the described chunks it decoded
    whose content ``known`` lacks. Those are the chunks the shard needs computed unless its key turns out to
    be stored already (only if imagery reverts to an earlier version), so decoding each chunk once beats
    reading the shard twice. Chunks whose raw digest matches the memo take its row without decoding."""
    rows: list[tuple[TileId, int, str] | None] = [None] * len(chunks)
    todo = []
    for i, chunk in enumerate(chunks):
        if memo is not None and memo.rows[i][0] == raw[i]:
            rows[i] = (chunk, memo.rows[i][1], memo.rows[i][2])
        else:
            todo.append(i)
    readers = threading.local()

    def examine(i: int) -> tuple[int, int, str, np.ndarray | None]:
        tile = _thread_reader(readers, source, grid).read(chunks[i])
        status = classify(tile, blank_std)
        content = tile_content_hash(tile) if tile is not None else "-"
        wanted = tile is not None and status == DESCRIBED and content not in known
        return i, status, content, preprocessing.resized(tile.rgb) if wanted and tile is not None else None

    def wanted_frames() -> Iterator[tuple[int, np.ndarray]]:
        for i, status, content, frame in _decoded(todo, examine, DECODE_THREADS):
            rows[i] = (chunks[i], status, content)
            if frame is not None:
                yield i, frame

    yield from _filled_batches(wanted_frames(), preprocessing, batch_size)
    scan.extend(row for row in rows if row is not None)


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
    preprocessing: Preprocess,
    out_dir: Path,
    on_batch: Callable[[int], None] | None = None,
    blank_std: float = DEFAULT_BLANK_STD,
) -> ShardResult:
    """Compute (or reuse) the descriptors of one shard. ``on_batch(n)`` is told as chunks are done; over one
    call the ``n`` add up to the shard's chunk count. ``blank_std`` is the blank rule's contrast floor
    (``[orthophoto] blank_std``); the statuses it decides are part of the shard key. The shard reads inside
    its own :meth:`~navcache.imagery.TileSource.reading` scope, so shards described at once keep a working set
    each."""
    with source.reading():
        started = time.perf_counter()
        block = (plan.block_x, plan.block_y)
        reported = 0

        def report(n: int) -> None:
            nonlocal reported
            reported += n
            if on_batch is not None and n:
                on_batch(n)

        chunks = plan.chunks  # the shard's TileIds, made once here and let go with the shard
        memo_file = memo_path(out_dir, chunks, source, grid, engine.identity, preprocessing, blank_std)
        memo = _read_memo(memo_file, len(chunks))
        inputs: tuple[str, ...] | None = None
        if _inputs_unchanged(memo, source):
            assert memo is not None
            raw: list[str] | None = [row[0] for row in memo.rows]
            inputs = memo.inputs
        else:
            found = _chunk_raw_digests(chunks, source, grid, with_inputs=True)
            raw, inputs = (None, None) if found is None else found
        if raw is None:  # a source that cannot digest its bytes keeps no memo
            memo = None
        # The previous shard's rows matter only where raw bytes moved (an unchanged shard is checked once, below).
        moved = memo is None or raw is None or any(row[0] != r for row, r in zip(memo.rows, raw, strict=True))
        known = _previous_rows(out_dir, memo) if memo is not None and moved else {}
        fresh: dict[int, np.ndarray] = {}
        batches = 0
        if raw is not None:
            scan: list[tuple[TileId, int, str]] = []
            for indices, batch in _in_background(
                _scan_batches(chunks, source, grid, raw, memo, known, preprocessing, engine.batch_size, scan, blank_std)
            ):
                fresh.update(zip(indices, engine.describe(batch).astype(np.float16), strict=True))
                batches += 1
                report(len(indices))
        else:  # no memo possible: scan first, so a stored shard costs no inference
            scan = scan_shard(chunks, ChunkReader(source, grid), blank_std)
        key = shard_key(scan, engine.identity, preprocessing)
        desc_path, table_path = shard_paths(out_dir, key)
        counts = {s: sum(1 for _, status, _ in scan if status == s) for s in STATUS_CODES}
        computed = not _is_complete(desc_path, table_path)
        inferred = len(fresh)
        if computed:
            descriptors, more_batches, more_inferred = _compute_descriptors(
                scan, known, fresh, source, grid, engine, preprocessing, report, block
            )
            batches, inferred = batches + more_batches, inferred + more_inferred
            _write_shard(desc_path, table_path, descriptors, scan)
        report(len(chunks) - reported)
        if raw is not None and moved:  # unmoved, the scan is the memo's rows and key
            inputs_digest = source.inputs_digest(inputs) if inputs and isinstance(source, DigestsItsInputs) else None
            rows = tuple((r, s, c) for r, (_, s, c) in zip(raw, scan, strict=True))
            remembered = ScanMemo(key, rows, inputs or (), inputs_digest or "")
            # Remember only what this run read: a source edited while the shard was scanned digests differently.
            if remembered != memo and chunk_raw_digests(chunks, source, grid) == raw:
                _write_memo(memo_file, remembered)
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
            inferred=inferred,
        )


def _previous_rows(out_dir: Path, memo: ScanMemo) -> dict[str, np.ndarray]:
    """Descriptor rows of the shard the memo points at, by pixel content hash (same engine and
    preprocessing: both are part of the memo's name). Empty when that shard is gone or fails its check."""
    desc_path, table_path = shard_paths(out_dir, memo.key)
    if not _is_complete(desc_path, table_path):
        return {}
    descriptors = np.load(desc_path, allow_pickle=False)
    described = [content for _, status, content in memo.rows if status == DESCRIBED]
    if len(described) != len(descriptors):
        return {}
    return dict(zip(described, descriptors, strict=True))


def _compute_descriptors(
    scan: Sequence[tuple[TileId, int, str]],
    known: Mapping[str, np.ndarray],
    fresh: Mapping[int, np.ndarray],
    source: TileSource,
    grid: ChunkGrid,
    engine: DescriptorEngine,
    preprocessing: Preprocess,
    report: Callable[[int], None],
    block: tuple[int, int],
) -> tuple[np.ndarray, int, int]:
    """(float16 descriptors of the described chunks in scan order, extra inference batches, chunks they
    ran on). Rows come from the previous shard (same content), from pass 1 (``fresh``, by chunk index) or
    from re-reading the rest."""
    described = [(i, chunk, content) for i, (chunk, status, content) in enumerate(scan) if status == DESCRIBED]
    rows: list[np.ndarray | None] = [
        known[content] if content in known else fresh.get(i) for i, _, content in described
    ]
    todo = [k for k, row in enumerate(rows) if row is None]
    batches = done = 0
    chunks = [described[k][1] for k in todo]
    reread = _reread_batches(chunks, source, grid, preprocessing, engine.batch_size)
    for batch in _in_background(reread):
        for row in engine.describe(batch).astype(np.float16):
            rows[todo[done]] = row
            done += 1
        batches += 1
        report(len(batch))
    filled = [row for row in rows if row is not None]
    assert len(filled) == len(rows), "every described chunk has a row"
    descriptors = np.stack(filled) if filled else np.zeros((0, 0), np.float16)
    if not np.isfinite(descriptors).all():
        raise ProvisionError(
            f"shard {block}: the VPR engine produced non-finite descriptors",
            hint="check the model's numerical stability at this precision (try fp32)",
        )
    return descriptors, batches, len(todo)


def _write_shard(
    desc_path: Path, table_path: Path, descriptors: np.ndarray, scan: Sequence[tuple[TileId, int, str]]
) -> None:
    table = np.array([(c.z, c.x, c.y, status) for c, status, _ in scan], dtype=TABLE_DTYPE)
    # Descriptors first, table last: a table on disk means its shard is complete.
    write_artifact(desc_path, _npy_bytes(descriptors))
    write_artifact(table_path, _npy_bytes(table))


def load_shard(result: ShardResult) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors float16 (n, D), table rows) of a finished shard; rows of status DESCRIBED align with
    descriptor rows in order."""
    return np.load(result.descriptors_path, allow_pickle=False), np.load(result.table_path, allow_pickle=False)
