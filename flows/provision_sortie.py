"""provision-sortie: one flow run per sortie, from a sortie file to a verified, signed onboard cache.

probe host → compile-or-reuse per backbone → plan tiles → describe shards (mapped) → FAISS index →
self-test (gate) → coverage walk (gate) → sign manifest → verify (gate). Everything is validated before
anything is written (once per run: :mod:`navcache.run_input`); every artifact is content-addressed, so a
failure at any step leaves the previous manifest — and everything it names — in place.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
from pathlib import Path
from typing import Any, Optional, TypeVar, cast
from uuid import UUID

import numpy as np
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from navcache import progress
from navcache.descriptor_job import DescriptorJob
from navcache.descriptors import ShardResult, bound_malloc_arenas
from navcache.engines import BackboneBuild, EngineResult, backbone_build, compile_in_order
from navcache.gc import summarise_temps, sweep_orphan_temps
from navcache.host_probe import shards_in_flight as host_shards_in_flight
from navcache.index_build import IndexBudget
from navcache.lock import cache_lock
from navcache.run_input import run_name, take_input
from navcache.sortie import Sortie
from navcache.summary import RunResults
from navcache.tiles import ChunkGrid, ShardPlan, plan_shard_array
from navcache_runtime import RuntimeConfig
from navcache_runtime.layout import COVERAGE_DIR, DESCRIPTORS_DIR, ENGINES_DIR, INDEX_DIR
from navcache_tasks import reporting
from navcache_tasks.coverage_walk import coverage_gate, coverage_task
from navcache_tasks.descriptors import collect_shards, describe_shard_task
from navcache_tasks.engines import compile_backbone
from navcache_tasks.host_probe import probe_host_task
from navcache_tasks.index_build import build_index_task
from navcache_tasks.manifest import sign_manifest_task, verify_task
from navcache_tasks.runlog import clean_failures, install, raise_if_failed
from navcache_tasks.selftest import self_test_gate, self_test_task

log = logging.getLogger(__name__)

# Before Prefect starts this process's threads: glibc only stops *new* malloc arenas (see the function).
bound_malloc_arenas()

# Tag on every compile task run: `prefect concurrency-limit create navcache-compile:<hostname> 1` caps
# engine builds (GPU memory) per companion computer; `navcache-compile` alone caps them fleet-wide.
COMPILE_TAG = "navcache-compile"

install()  # navcache's own lines in the run log; failures as one readable message (see navcache_tasks.runlog)


def shards_in_flight() -> int:
    """How many describe-shard tasks the flow's thread pool runs at once: Prefect's own
    ``PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS`` when set (the user's explicit thread-pool size), else
    :func:`navcache.host_probe.shards_in_flight` (``$NAVCACHE_SHARDS_IN_FLIGHT`` or the host's default)."""
    prefect_workers = get_current_settings().tasks.runner.thread_pool_max_workers
    if prefect_workers is not None:
        return int(prefect_workers)
    return host_shards_in_flight()


class ShardThreadPool(ThreadPoolTaskRunner[Any]):
    """The provision flow's task runner: Prefect's thread pool, sized by :func:`shards_in_flight` each time a
    flow run starts (Prefect duplicates the flow's runner per run), so the run's environment decides, not the
    import's; an explicit ``max_workers`` is kept. Only the mapped describe-shard tasks go through it: every
    other task runs in the flow's own thread, so a full pool never holds back a gate, and shards described on
    Dask go through that sub-flow's own runner."""

    def __init__(self, max_workers: int | None = None):
        self._explicit_workers = max_workers
        super().__init__(max_workers=shards_in_flight() if max_workers is None else max_workers)

    def duplicate(self) -> ShardThreadPool:
        return type(self)(self._explicit_workers)


def _run_name() -> str:
    """Flow runs are named after the sortie id; naming validates the input when the CLI has not."""
    cache_dir = flow_run.parameters.get("cache_dir")
    return run_name(Path(str(flow_run.parameters.get("sortie", "sortie"))), Path(cache_dir) if cache_dir else None)


@task(name="plan-tiles", cache_policy=NO_CACHE)
def plan_tiles(sortie: Sortie) -> tuple[ChunkGrid, np.ndarray, list[ShardPlan]]:
    """The chunk grid, the area's storage tiles as an ``(N, 2)`` [x, y] array (held until the coverage walk:
    an array, not a ``TileId`` per tile), and the shard plans."""
    spec = sortie.tiles
    grid = ChunkGrid(spec.zoom, spec.size, spec.chunk_span, spec.overlap)
    chunks = grid.chunk_array_for_area(sortie.area, spec.budget)
    storage = grid.storage_tile_array_for_area(sortie.area)
    return grid, storage, plan_shard_array(chunks, grid.zoom, spec.shard_block)


def _slot_note(tag: str) -> str:
    """How full the per-host compile limit is, for the run log (the wait itself is Prefect's)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
    except Exception:  # no such limit (or an old server): builds on this host are not capped
        return "no such concurrency limit is set, so it starts at once"
    busy = int(limit.active_slots or 0)
    if busy >= limit.limit:
        return f"all {limit.limit} in use, so it waits (Pending, under this name) until one is free"
    return f"{busy} of {limit.limit} in use"


def _engines(sortie: Sortie, runtime_config: RuntimeConfig) -> list[EngineResult]:
    """One compile task run per backbone, in order (:func:`navcache.engines.compile_in_order`); the engine
    table artifact is written whatever happens."""
    progress.advance("engines", 0, total=len(sortie.backbones))
    host_tag = f"{COMPILE_TAG}:{platform.node()}"
    compile_one = functools.partial(_compile_one, runtime_config=runtime_config, host_tag=host_tag)
    report = functools.partial(reporting.engine_table, sortie.sortie_id)
    return compile_in_order([backbone_build(spec) for spec in sortie.backbones], compile_one, report)


def _compile_one(backbone: BackboneBuild, runtime_config: RuntimeConfig, host_tag: str) -> EngineResult:
    # Named after the backbone from creation: a run waiting for its concurrency slot is Pending under this name
    # (task_run_name applies only once it starts).
    compile_task = compile_backbone.with_options(name=f"compile-{backbone.name}", tags={COMPILE_TAG, host_tag})
    get_run_logger().info("compile-%s takes a `%s` slot: %s", backbone.name, host_tag, _slot_note(host_tag))
    result = compile_task(backbone, runtime_config)
    progress.advance("engines", 1)
    return result


def _descriptor_job(
    sortie: Sortie, runtime_config: RuntimeConfig, engine: EngineResult, grid: ChunkGrid, plans: list[ShardPlan]
) -> DescriptorJob:
    """The vpr engine's job over the planned shards, with the run's progress artifact."""
    total = sum(len(plan) for plan in plans)
    progress.advance("descriptors", 0, total=total)
    artifact = create_progress_artifact(
        0.0,
        key=reporting.artifact_key("descriptors", sortie.sortie_id),
        description=f"Descriptor shards for {sortie.sortie_id}",
    )
    assert isinstance(artifact, UUID)  # called from a sync flow: the id, not a coroutine
    out_dir = sortie.cache_dir / DESCRIPTORS_DIR
    return DescriptorJob.for_sortie(sortie, runtime_config, engine.entry, grid, out_dir, total, artifact)


@flow(name="describe-shards-dask")
def describe_shards_dask(plans: list[ShardPlan], job: DescriptorJob) -> list[ShardResult]:
    """The mapped shard tasks as a sub-flow, so only they go to the Dask cluster (the task runner is set
    with ``with_options`` at call time, the run named after the sortie). The job is a frozen, picklable
    dataclass; each Dask worker process keeps its own engine cache. Descriptor progress is counted here, in
    the flow's process, from the shard results: the workers get the job without the progress artifact."""
    # Not quoted (see _as_is): Dask ships the parameters to its workers, where a quoted plan arrives as a
    # bare tuple.
    workers_job = dataclasses.replace(job, progress_artifact=None)
    return collect_shards(describe_shard_task.map(plans, unmapped(workers_job)), plans, job)


T = TypeVar("T")


def _as_is(value: T) -> T:
    """``value`` wrapped in ``quote``, typed as what the task receives (the plain value): Prefect would
    otherwise walk every element looking for futures (every chunk of every shard plan: 0.9 s of a
    2,000-tile warm run)."""
    return cast(T, quote(value))


def _describe_shards(
    plans: list[ShardPlan], job: DescriptorJob, dask_address: str | None, sortie_id: str = "sortie"
) -> list[ShardResult]:
    if not dask_address:
        return [future.result() for future in describe_shard_task.map([_as_is(plan) for plan in plans], unmapped(job))]
    from prefect_dask import DaskTaskRunner  # optional dependency, only needed for scale-out

    runner = DaskTaskRunner(address=dask_address)
    get_run_logger().info("describing %d shard(s) on the Dask cluster at %s", len(plans), dask_address)
    # with_options is typed for TaskRunner[PrefectFuture]; the Dask runner's futures are a subclass of it.
    subflow = describe_shards_dask.with_options(
        task_runner=runner,  # type: ignore[arg-type]
        flow_run_name=f"{sortie_id}-shards-on-dask",
    )
    return subflow(plans, job)


# task_runner is typed for TaskRunner[PrefectFuture]; the thread pool's futures are a subclass of it.
@flow(name="provision-sortie", flow_run_name=_run_name, log_prints=False, task_runner=ShardThreadPool())  # type: ignore[arg-type]
@clean_failures
def provision_sortie(
    sortie: str,
    cache_dir: Optional[str] = None,  # noqa: UP045  (Optional reads as "may be left empty" in the deployment form)
    lock_timeout_s: float = 600.0,
    dask_address: Optional[str] = None,  # noqa: UP045
) -> dict[str, Any]:
    """Provision one sortie: from its sortie file to a verified, signed onboard cache. Returns the run's
    summary as its JSON document (:class:`navcache.summary.ProvisionSummary`).

    Args:
        sortie: Path of the sortie file (TOML) on the worker, absolute or relative to the working directory
            (the deployment's pull step sets it to the navcache checkout).
        cache_dir: Cache directory to write, overriding the sortie file's `cache_dir`; leave empty to use the
            sortie file's.
        lock_timeout_s: Seconds to wait for another run that holds the same cache's lock before failing.
        dask_address: Address of an existing Dask scheduler (e.g. tcp://dask-scheduler:8786) to describe the
            shards on; leave empty to describe them in this run's thread pool.
    """
    checked = take_input(Path(sortie), Path(cache_dir) if cache_dir else None)
    spec, root = checked.sortie, checked.sortie.cache_dir
    with cache_lock(root, lock_timeout_s):
        swept = sweep_orphan_temps(root)  # what a killed run left half-written; we hold the lock
        if swept:
            log.warning("%s", summarise_temps(swept))  # one line, however many a killed run left
        host = probe_host_task(root)
        runtime_config = RuntimeConfig(runtime=spec.runtime, engine_dir=root / ENGINES_DIR)
        engines = _engines(spec, runtime_config)
        vpr_engine = next(e for e in engines if e.backbone == spec.vpr.name)

        grid, storage_tiles, plans = plan_tiles(spec)
        job = _descriptor_job(spec, runtime_config, vpr_engine, grid, plans)
        shards = _describe_shards(plans, job, dask_address, spec.sortie_id)

        index = build_index_task(shards, grid, root / INDEX_DIR, IndexBudget())
        upsampling, max_upsampling = checked.imagery.upsampling, spec.tiles.max_upsampling
        self_test = self_test_task(job, shards, index, spec.self_test, upsampling, max_upsampling)
        reporting.index_report(spec.sortie_id, index, self_test)
        reporting.self_test_report(spec.sortie_id, self_test)
        raise_if_failed(self_test_gate(_as_is(self_test), return_state=True))  # the self-test gate

        takeoff_lonlat = (spec.takeoff[1], spec.takeoff[0])
        coverage = coverage_task(
            shards,
            grid,
            _as_is(storage_tiles),
            spec.coverage_threshold,
            root / COVERAGE_DIR,
            takeoff_lonlat,
            area=_as_is(spec.area),  # the map's outline (the corridor around a route)
            imagery=(job.source_kind, job.sources),
        )
        reporting.coverage_report(spec.sortie_id, coverage)
        # The coverage gate: a task run of its own, red with the failure's one message when below the threshold.
        failure = functools.partial(coverage.report.failure, where=spec.sortie_id)  # its hint tells blank from missing
        raise_if_failed(coverage_gate(_as_is(coverage.report), failure, return_state=True))

        results = RunResults(
            spec, engines, len(storage_tiles), job.total_chunks, shards, index, self_test, coverage, checked.imagery
        )
        claims = results.manifest_claims(host.identity())
        manifest, version = sign_manifest_task(root, results.artifacts(), **claims)
        reporting.manifest_report(spec.sortie_id, manifest, version, claims["trusted_keys"], platform.node())
        raise_if_failed(verify_task(root, claims["trusted_keys"], return_state=True))  # the verify gate
    return results.summary(manifest, version, verified=True).as_dict()
