from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect import task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE

from navcache import progress
from navcache.descriptors import DescriptorEngine, Preprocessing, ShardResult, describe_shard
from navcache.imagery import open_tile_source
from navcache.tiles import ChunkGrid, ShardPlan
from navcache_runtime import EngineCacheEntry, RuntimeConfig, build_inference_runtime


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


def _count(job: DescriptorJob, n: int) -> None:
    global _done
    progress.advance("descriptors", n)
    if job.progress_artifact is None:
        return
    with _done_lock:
        _done += n
        done = _done
    update_progress_artifact(job.progress_artifact, progress=min(100.0, 100.0 * done / max(1, job.total_chunks)))


@task(name="describe-shard", task_run_name="shard-{plan.block_x}-{plan.block_y}", cache_policy=NO_CACHE, retries=1)
def describe_shard_task(plan: ShardPlan, job: DescriptorJob) -> ShardResult:
    with open_tile_source(job.source_kind, job.source_path, job.grid.tile_size) as source:
        result = describe_shard(
            plan,
            source=source,
            grid=job.grid,
            engine=_engine(job),
            preprocessing=Preprocessing.for_input_shape(job.input_shape),
            out_dir=job.out_dir,
            on_batch=lambda n: _count(job, n),
        )
    return result


def reset_progress() -> None:
    global _done
    with _done_lock:
        _done = 0
