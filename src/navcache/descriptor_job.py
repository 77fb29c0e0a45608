"""The descriptor job: what describing a run's shards needs, and the state one process shares while it does.

A :class:`DescriptorJob` is frozen and picklable, so the same job goes to the flow's thread pool or to Dask
workers (:meth:`DescriptorJob.for_sortie` builds it from the validated sortie). Each process keeps:

* one loaded engine per engine file and digest (:func:`descriptor_engine`), shared by the shard threads
  (ORT/TensorRT/AOTI runs are re-entrant or locked per handle in the strategy);
* one open orthophoto per version of its files (:func:`tile_source`: every sheet, and the files a VRT
  names), so opening it and digesting its blocks is paid once per run rather than per shard;
* one chunk counter per run (:func:`run_progress`), which reports the share of chunks described through a
  callback (the Prefect layer's progress artifact) at most once per :data:`PROGRESS_UPDATE_S`.

:func:`describe_job_shard` describes one shard of the job; :func:`self_test_for_job` runs the self-test
with the job's engine and imagery (its figures come from the memo when nothing they depend on changed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from navcache_runtime import EngineCacheEntry, RuntimeConfig, build_inference_runtime
from navcache_runtime.coverage import DEFAULT_BLANK_STD
from navcache_runtime.index import load_index, load_tile_table
from navcache_runtime.integrity import read_sidecar
from navcache_runtime.layout import SELFTEST_DIR
from navcache_runtime.preprocessing import Preprocess

from . import progress
from .descriptors import (
    DescriptorEngine,
    Preprocessing,
    ShardResult,
    bound_malloc_arenas,
    describe_shard,
    describing_config,
)
from .errors import SelfTestError
from .imagery import TileSource, open_tile_source, source_version
from .index_build import IndexResult
from .selftest import SelfTestResult, ViewMemo, memo_key, remembered, run_self_test
from .shard_set import described_rows
from .sortie import SelfTestConfig, Sortie
from .tiles import ChunkGrid, ShardPlan

log = logging.getLogger(__name__)

#: At most one progress report (an API round trip, made on the inference thread) per interval.
PROGRESS_UPDATE_S = 1.0


@dataclass(frozen=True)
class DescriptorJob:
    """Everything a shard task needs, picklable (so shards can run on Dask workers)."""

    runtime_config: RuntimeConfig
    engine: EngineCacheEntry
    input_name: str
    output_name: str | None
    input_shape: tuple[int, ...]  # the profile's opt shape (N, 3, H, W)
    min_batch: int
    batch_size: int
    source_kind: str
    source_path: Path
    grid: ChunkGrid
    out_dir: Path
    total_chunks: int
    progress_artifact: UUID | None = None
    # The vpr backbone's declared preprocessing (the sortie's [backbones.preprocess]); None = the defaults
    # at input_shape's size.
    preprocessing: Preprocess | None = None
    # Every file of the orthophoto (GeoTIFF sheets); empty means just source_path.
    source_paths: tuple[Path, ...] = ()
    # The blank rule's contrast floor (the sortie's [orthophoto] blank_std).
    blank_std: float = DEFAULT_BLANK_STD

    @classmethod
    def for_sortie(
        cls,
        sortie: Sortie,
        runtime_config: RuntimeConfig,
        engine: EngineCacheEntry,
        grid: ChunkGrid,
        out_dir: Path,
        total_chunks: int,
        progress_artifact: UUID | None = None,
    ) -> DescriptorJob:
        """The job for the sortie's vpr backbone: its input, output and preprocessing, a batch inside the
        engine's profile, and the orthophoto's files. Bounds the process's malloc arenas before the shard
        threads start (:func:`~navcache.descriptors.bound_malloc_arenas`)."""
        bound_malloc_arenas()
        vpr, profile = sortie.vpr, sortie.vpr.profile
        return cls(
            runtime_config=runtime_config,
            engine=engine,
            input_name=vpr.input_name,
            output_name=vpr.output_name,
            input_shape=profile.opt,
            min_batch=profile.min[0],
            batch_size=max(profile.min[0], min(sortie.batch_size, profile.max[0])),
            source_kind=sortie.orthophoto.kind,
            source_path=sortie.orthophoto.path,
            grid=grid,
            out_dir=out_dir,
            total_chunks=total_chunks,
            progress_artifact=progress_artifact,
            preprocessing=vpr.preprocess,
            source_paths=sortie.orthophoto.paths,
            blank_std=sortie.orthophoto.blank_std,
        )

    @property
    def sources(self) -> tuple[Path, ...]:
        return self.source_paths or (self.source_path,)


_engines: dict[tuple[str, str], DescriptorEngine] = {}
_engines_lock = threading.Lock()


def descriptor_engine(job: DescriptorJob) -> DescriptorEngine:
    """The job's engine, loaded once per process and shared by the shard threads."""
    key = (str(job.engine.path), job.engine.sha256)
    with _engines_lock:
        if key not in _engines:
            bound_malloc_arenas()  # a Dask worker's first shard: before the engine's threads start
            runtime = build_inference_runtime(describing_config(job.runtime_config))
            _engines[key] = DescriptorEngine(
                runtime=runtime,
                handle=runtime.deserialize_engine(job.engine),
                input_name=job.input_name,
                output_name=job.output_name,
                identity=job.engine.sha256,
                batch_size=job.batch_size,
                min_batch=job.min_batch,
            )
        return _engines[key]


_sources: dict[tuple[object, ...], TileSource] = {}
_sources_lock = threading.Lock()


def tile_source(job: DescriptorJob) -> TileSource:
    """The job's orthophoto, opened once per process and version of its files, shared by the shard threads
    (sources are thread-safe)."""
    paths = job.sources
    try:
        version: tuple[tuple[int, ...], ...] | None = source_version(paths)
    except OSError:
        version = None  # let open_tile_source name the problem
    identity = (job.source_kind, tuple(str(p) for p in paths), job.grid.tile_size)
    with _sources_lock:
        source = _sources.get((*identity, version))
        if source is None or version is None:
            for stale in [k for k in _sources if k[:3] == identity]:
                del _sources[stale]  # not closed: a thread of another run may still read it; GC closes it
            source = open_tile_source(job.source_kind, paths, job.grid.tile_size)
            _sources[(*identity, version)] = source
        return source


class ChunkProgress:
    """Chunks described in one run: each count advances the CLI's bar (:mod:`navcache.progress`) and, when
    ``send`` is given, the share done is sent at most once per :data:`PROGRESS_UPDATE_S` and always at the
    end. Sends happen one at a time, each with the count as it is then: counting threads race, and an older
    value must never land after the final 100 %."""

    def __init__(self, total: int, send: Callable[[float], None] | None) -> None:
        self.total = total
        self._send = send
        self._done = 0
        self._last = 0.0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()

    def add(self, n: int) -> None:
        progress.advance("descriptors", n)
        if self._send is None:
            return
        with self._lock:
            self._done += n
            now = time.monotonic()
            if self._done < self.total and now - self._last < PROGRESS_UPDATE_S:
                return
            self._last = now
        with self._send_lock:
            with self._lock:
                done = self._done
            self._send(min(100.0, 100.0 * done / max(1, self.total)))


_run_progress: tuple[object, ChunkProgress] | None = None
_run_progress_lock = threading.Lock()


def run_progress(job: DescriptorJob, send: Callable[[float], None] | None) -> ChunkProgress:
    """The process's counter for the job's run (keyed by its progress artifact), shared by its shard
    threads; a job without one (a Dask worker's) only advances the local bar."""
    global _run_progress
    if job.progress_artifact is None:
        return ChunkProgress(job.total_chunks, None)
    with _run_progress_lock:
        if _run_progress is None or _run_progress[0] != job.progress_artifact:
            _run_progress = (job.progress_artifact, ChunkProgress(job.total_chunks, send))
        return _run_progress[1]


def describe_job_shard(plan: ShardPlan, job: DescriptorJob, on_batch: Callable[[int], None]) -> ShardResult:
    """One shard of the job, computed or reused (:func:`navcache.descriptors.describe_shard`)."""
    result = describe_shard(
        plan,
        source=tile_source(job),
        grid=job.grid,
        engine=descriptor_engine(job),
        preprocessing=job.preprocessing or Preprocessing.for_input_shape(job.input_shape),
        out_dir=job.out_dir,
        on_batch=on_batch,
        blank_std=job.blank_std,
    )
    log.info(
        "shard %s-%s: %s, %d described, %d blank, %d missing (%d chunks through the engine in %d batches)",
        plan.block_x,
        plan.block_y,
        "computed" if result.computed else "reused",
        result.described,
        result.blank,
        result.missing,
        result.inferred,
        result.batches,
    )
    return result


def self_test_for_job(
    job: DescriptorJob,
    shards: list[ShardResult],
    index: IndexResult,
    config: SelfTestConfig,
    upsampling: float | None = None,
    max_upsampling: float | None = None,
) -> SelfTestResult:
    """Render, describe and query the views (:mod:`navcache.selftest`) with the job's engine and imagery;
    writes the onboard query set beside the shards. The figures come from the memo when the index, engine,
    preprocessing, imagery, grid, config and hints are unchanged (a warm run then reads no shard); otherwise
    the views whose imagery, engine and preprocessing are unchanged come from the per-view memo
    (:class:`~navcache.selftest.ViewMemo`) and only the others are rendered and described."""
    chunks = sum(s.described + s.blank + s.missing for s in shards)
    blank_fraction = sum(s.blank for s in shards) / max(1, chunks)
    source = tile_source(job)
    preprocess = job.preprocessing or Preprocess.for_input_shape(job.input_shape)
    out_dir = job.out_dir.parent / SELFTEST_DIR
    key = memo_key(
        index=read_sidecar(index.index_path),
        engine=job.engine.sha256,
        preprocess=preprocess.spec(),
        source=(job.source_kind, source.fingerprint()),
        grid=job.grid,
        config=config,
        upsampling=upsampling,
        max_upsampling=max_upsampling,
        blank_fraction=blank_fraction,
    )

    def run() -> SelfTestResult:
        # The descriptor rows stay in the shards (the self-test reads a few thousand of them), and the index is
        # mapped: an IVF search reads only the lists it probes (at 1e5 chunks ~2 of its 47 MiB), as onboard.
        chunk_xy, descriptors = described_rows(shards)
        return run_self_test(
            grid=job.grid,
            chunks=chunk_xy,
            descriptors=descriptors,
            index=load_index(index.index_path),
            table=load_tile_table(index.table_path),
            describe=descriptor_engine(job).describe,
            batch_size=job.batch_size,
            source=source,
            preprocess=preprocess,
            config=config,
            out_dir=out_dir,
            upsampling=upsampling,
            max_upsampling=max_upsampling,
            blank_fraction=blank_fraction,
            view_memo=ViewMemo(
                out_dir,
                repr((job.engine.sha256, job.engine.runtime_label, job.engine.host, preprocess.spec(), job.grid)),
            ),
        )

    return remembered(out_dir, key, run)


def self_test_failure(result: SelfTestResult) -> SelfTestError:
    """The self-test gate's error: the figures, the finding, and where to change the floor."""
    return SelfTestError(
        f"self-test recall@5 {result.recall_at_5:.3f} is below min_recall_at_5 {result.min_recall_at_5} "
        f"({result.samples} views; {result.finding})",
        where="[self_test].min_recall_at_5",
        hint="fix the cause named above, or lower min_recall_at_5; the previous manifest stays in force",
    )
