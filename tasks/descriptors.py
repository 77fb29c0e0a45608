from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect import task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from navcache import progress
from navcache.descriptors import DescriptorEngine, Preprocessing, ShardResult, describe_shard
from navcache.imagery import TileSource, open_tile_source, source_version
from navcache.tiles import ChunkGrid, ShardPlan
from navcache_runtime import EngineCacheEntry, RuntimeConfig, build_inference_runtime
from navcache_runtime.coverage import DEFAULT_BLANK_STD
from navcache_runtime.preprocessing import Preprocess

from .runlog import transient_only

log = logging.getLogger(__name__)


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

    @property
    def sources(self) -> tuple[Path, ...]:
        return self.source_paths or (self.source_path,)


_engines: dict[tuple[str, str], DescriptorEngine] = {}
_engines_lock = threading.Lock()
_done = 0
_done_lock = threading.Lock()


def _engine(job: DescriptorJob) -> DescriptorEngine:
    """One loaded engine per process, shared by the shard threads (ORT/TensorRT/AOTI runs are re-entrant
    or locked per handle in the strategy)."""
    key = (str(job.engine.path), job.engine.sha256)
    with _engines_lock:
        if key not in _engines:
            runtime = build_inference_runtime(job.runtime_config)
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


def _source(job: DescriptorJob) -> TileSource:
    """One open orthophoto per process and version of its files (every sheet, and the files a VRT names),
    shared by the shard threads (sources are thread-safe), so opening it and digesting its blocks is paid
    once per run rather than per shard."""
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


#: At most one progress-artifact update (an API round trip, made on the inference thread) per interval.
PROGRESS_UPDATE_S = 1.0
_last_update = 0.0
_send_lock = threading.Lock()


def _count(job: DescriptorJob, n: int) -> None:
    global _done, _last_update
    progress.advance("descriptors", n)
    if job.progress_artifact is None:
        return
    with _done_lock:
        _done += n
        now = time.monotonic()
        if _done < job.total_chunks and now - _last_update < PROGRESS_UPDATE_S:
            return
        _last_update = now
    # One update at a time, each sending the count as it is then: shard threads race, and an older value
    # must never land after the final 100 %.
    with _send_lock:
        with _done_lock:
            done = _done
        update_progress_artifact(job.progress_artifact, progress=min(100.0, 100.0 * done / max(1, job.total_chunks)))


@task(
    name="describe-shard",
    task_run_name="shard-{plan.block_x}-{plan.block_y}",
    cache_policy=NO_CACHE,
    retries=1,
    # A read hiccup on a shared filesystem is retried once; bad imagery or a failing engine is not.
    retry_condition_fn=transient_only,
)
def describe_shard_task(plan: ShardPlan, job: DescriptorJob) -> ShardResult:
    result = describe_shard(
        plan,
        source=_source(job),
        grid=job.grid,
        engine=_engine(job),
        preprocessing=job.preprocessing or Preprocessing.for_input_shape(job.input_shape),
        out_dir=job.out_dir,
        on_batch=lambda n: _count(job, n),
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


def collect_shards(
    futures: Iterable[PrefectFuture[ShardResult]], plans: list[ShardPlan], job: DescriptorJob
) -> list[ShardResult]:
    """Each shard's result, in plan order, with the descriptor progress counted here in the flow from the shard
    results: a Dask worker's per-batch counter only sees the shards of its own process. ``job`` is the flow's
    (with the progress artifact); the workers get one without it, so no stale count lands after 100 %."""
    results: list[ShardResult] = []
    done, last = 0, 0.0
    for future, plan in zip(futures, plans, strict=True):
        results.append(future.result())
        done += len(plan.chunks)
        progress.advance("descriptors", len(plan.chunks))
        now = time.monotonic()
        if job.progress_artifact is not None and (done >= job.total_chunks or now - last >= PROGRESS_UPDATE_S):
            last = now
            update_progress_artifact(
                job.progress_artifact, progress=min(100.0, 100.0 * done / max(1, job.total_chunks))
            )
    return results


def reset_progress() -> None:
    global _done, _last_update
    with _done_lock:
        _done = 0
        _last_update = 0.0
