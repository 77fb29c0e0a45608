"""provision-sortie: one flow run per sortie, from a sortie file to a verified, signed onboard cache.

probe host → compile-or-reuse per backbone → plan tiles → describe shards (mapped) → FAISS index →
self-test (gate) → coverage walk (gate) → sign manifest → verify (gate). Everything is validated before
anything is written; every artifact is content-addressed, so a failure at any step leaves the previous
manifest — and everything it names — in place.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import tomllib
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from navcache import progress
from navcache.descriptors import ShardResult
from navcache.engines import EngineResult, Outcome, backbone_build
from navcache.errors import ProvisionError
from navcache.gc import summarise_temps, sweep_orphan_temps
from navcache.index import IndexBudget
from navcache.lock import cache_lock
from navcache.preflight import run_preflight
from navcache.sortie import Sortie
from navcache.tiles import ChunkGrid, ShardPlan, plan_shards
from navcache.types import TileId
from navcache_runtime import RuntimeConfig, sidecar_path
from navcache_tasks import reporting
from navcache_tasks.coverage import coverage_gate, coverage_task
from navcache_tasks.descriptors import DescriptorJob, collect_shards, describe_shard_task, reset_progress
from navcache_tasks.engines import compile_backbone
from navcache_tasks.host import probe_host_task
from navcache_tasks.index import build_index_task
from navcache_tasks.manifest import sign_manifest_task, verify_task
from navcache_tasks.runlog import clean_failures, install, raise_if_failed
from navcache_tasks.selftest import self_test_gate, self_test_task

log = logging.getLogger(__name__)

# Tag on every compile task run: `prefect concurrency-limit create navcache-compile:<hostname> 1` caps
# engine builds (GPU memory) per companion computer; `navcache-compile` alone caps them fleet-wide.
COMPILE_TAG = "navcache-compile"

install()  # navcache's own lines in the run log; failures as one readable message (see navcache_tasks.runlog)


def _run_name() -> str:
    """Flow runs are named after the sortie id (read leniently; validation happens in the run)."""
    path = Path(str(flow_run.parameters.get("sortie", "sortie")))
    try:
        return str(tomllib.loads(path.read_text())["sortie_id"])
    except (OSError, KeyError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return path.stem


@task(name="plan-tiles", cache_policy=NO_CACHE)
def plan_tiles(sortie: Sortie) -> tuple[ChunkGrid, list[TileId], list[ShardPlan]]:
    spec = sortie.tiles
    grid = ChunkGrid(spec.zoom, spec.size, spec.chunk_span, spec.overlap)
    chunks = grid.chunks_for_area(sortie.area, spec.budget)
    storage = grid.storage_tiles_for_area(sortie.area)
    return grid, storage, plan_shards(chunks, spec.shard_block)


def _describes_engine_in(result: EngineResult, runtime_config: RuntimeConfig) -> bool:
    path = result.entry.path
    side = sidecar_path(path)
    return (
        path.parent.resolve() == runtime_config.engine_dir.resolve()
        and path.is_file()
        and side.is_file()
        and side.read_text().strip() == result.entry.sha256
    )


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


def _engines(sortie: Sortie, runtime_config: RuntimeConfig, host: Any) -> list[EngineResult]:
    """Sequential on purpose: a failure stops the corpus (later backbones are not attempted), and one
    build at a time keeps GPU memory predictable. The engine table artifact is written whatever happens:
    a compile that fails (after its retries) is a FAILED row with its error, the backbones after it SKIPPED."""
    results: list[EngineResult] = []
    rows: list[dict[str, Any]] = []
    host_tag = f"{COMPILE_TAG}:{platform.node()}"
    try:
        for spec in sortie.backbones:
            results.append(_compile_one(spec, sortie, runtime_config, host, host_tag))
            rows.append(results[-1].summary())
    except Exception as exc:
        rows.append(reporting.failed_engine_row(sortie.backbones[len(results)].name, "FAILED", str(exc)))
        rows += [
            reporting.failed_engine_row(spec.name, "SKIPPED", "not attempted: an earlier backbone failed")
            for spec in sortie.backbones[len(rows) :]
        ]
        raise
    finally:
        reporting.engine_table(sortie.sortie_id, rows)
    return results


def _compile_one(spec: Any, sortie: Sortie, runtime_config: RuntimeConfig, host: Any, host_tag: str) -> EngineResult:
    # Named after the backbone from creation: a run waiting for its concurrency slot is Pending under this name
    # (task_run_name applies only once it starts).
    compile_task = compile_backbone.with_options(name=f"compile-{spec.name}", tags={COMPILE_TAG, host_tag})
    get_run_logger().info("compile-%s takes a `%s` slot: %s", spec.name, host_tag, _slot_note(host_tag))
    state = compile_task(backbone_build(spec, sortie.runtime), runtime_config, host, return_state=True)
    result: EngineResult = state.result()  # raises the task's error
    if state.name == "Cached":
        # The key covers the engine's digest and cache root; still, a record must never vouch for a file
        # it does not describe: check once more, and run the task body if it does not hold.
        if _describes_engine_in(result, runtime_config):
            result = dataclasses.replace(
                result,
                outcome=Outcome.REUSED,
                seconds=0.0,
                reason="Prefect cache hit (engine verified in the cache key)",
            )
            log.info("engine %s: REUSED (%s): %s", spec.name, result.reason, result.entry.path)
        else:
            result = compile_backbone.fn(backbone_build(spec, sortie.runtime), runtime_config, host)
    progress.advance("engines", 1)
    return result


@flow(name="describe-shards-dask")
def describe_shards_dask(plans: list[ShardPlan], job: DescriptorJob) -> list[ShardResult]:
    """The mapped shard tasks as a sub-flow, so only they go to the Dask cluster (the task runner is set
    with ``with_options`` at call time, the run named after the sortie). The job is a frozen, picklable
    dataclass; each Dask worker process keeps its own engine cache. Descriptor progress is counted here, in
    the flow's process, from the shard results: the workers get the job without the progress artifact."""
    # Not quoted (see _quoted): Dask ships the parameters to its workers, where a quoted plan arrives as a
    # bare tuple.
    workers_job = dataclasses.replace(job, progress_artifact=None)
    return collect_shards(describe_shard_task.map(plans, unmapped(workers_job)), plans, job)


def _quoted(items: list[ShardPlan]) -> list[Any]:
    """Each shard plan wrapped in ``quote``: Prefect would otherwise walk every chunk of every plan looking
    for futures (0.9 s of a 2,000-tile warm run); the tasks still receive the plain plans."""
    return [quote(item) for item in items]


def _describe_shards(
    plans: list[ShardPlan], job: DescriptorJob, dask_address: str | None, sortie_id: str = "sortie"
) -> list[ShardResult]:
    if not dask_address:
        return [future.result() for future in describe_shard_task.map(_quoted(plans), unmapped(job))]
    from prefect_dask import DaskTaskRunner  # optional dependency, only needed for scale-out

    runner = DaskTaskRunner(address=dask_address)
    get_run_logger().info("describing %d shard(s) on the Dask cluster at %s", len(plans), dask_address)
    # with_options is typed for TaskRunner[PrefectFuture]; the Dask runner's futures are a subclass of it.
    subflow = describe_shards_dask.with_options(
        task_runner=runner,  # type: ignore[arg-type]
        flow_run_name=f"{sortie_id}-shards-on-dask",
    )
    return subflow(plans, job)


@flow(name="provision-sortie", flow_run_name=_run_name, log_prints=False)
@clean_failures
def provision_sortie(
    sortie: str,
    cache_dir: Optional[str] = None,  # noqa: UP045  (Optional reads as "may be left empty" in the deployment form)
    lock_timeout_s: float = 600.0,
    dask_address: Optional[str] = None,  # noqa: UP045
) -> dict[str, Any]:
    """Provision one sortie: from its sortie file to a verified, signed onboard cache.

    Args:
        sortie: Path of the sortie file (TOML) on the worker, absolute or relative to the working directory
            (the deployment's pull step sets it to the navcache checkout).
        cache_dir: Cache directory to write, overriding the sortie file's `cache_dir`; leave empty to use the
            sortie file's.
        lock_timeout_s: Seconds to wait for another run that holds the same cache's lock before failing.
        dask_address: Address of an existing Dask scheduler (e.g. tcp://dask-scheduler:8786) to describe the
            shards on; leave empty to describe them in this run's thread pool.
    """
    checked = run_preflight(Path(sortie), Path(cache_dir) if cache_dir else None)
    spec = checked.sortie
    cache_root = spec.cache_dir
    with cache_lock(cache_root, lock_timeout_s):
        swept = sweep_orphan_temps(cache_root)  # what a killed run left half-written; we hold the lock
        if swept:
            log.warning("%s", summarise_temps(swept))  # one line, however many a killed run left
        host = probe_host_task(cache_root)
        runtime_config = RuntimeConfig(runtime=spec.runtime, engine_dir=cache_root / "engines")
        progress.advance("engines", 0, total=len(spec.backbones))
        engines = _engines(spec, runtime_config, host)
        vpr_engine = next(e for e in engines if e.backbone == spec.vpr.name)

        grid, storage_tiles, plans = plan_tiles(spec)
        total_chunks = sum(len(p.chunks) for p in plans)
        progress.advance("descriptors", 0, total=total_chunks)
        reset_progress()
        progress_id = create_progress_artifact(
            0.0,
            key=reporting.artifact_key("descriptors", spec.sortie_id),
            description=f"Descriptor shards for {spec.sortie_id}",
        )
        profile = spec.vpr.profile
        job = DescriptorJob(
            runtime_config=runtime_config,
            engine=vpr_engine.entry,
            input_name=spec.vpr.input_name,
            output_name=spec.vpr.output_name,
            input_shape=profile.opt,
            min_batch=profile.min[0],
            batch_size=max(profile.min[0], min(spec.batch_size, profile.max[0])),
            source_kind=spec.orthophoto.kind,
            source_path=spec.orthophoto.path,
            grid=grid,
            out_dir=cache_root / "descriptors",
            total_chunks=total_chunks,
            progress_artifact=progress_id,
            preprocessing=spec.vpr.preprocess,
            source_paths=spec.orthophoto.paths,
            blank_std=spec.orthophoto.blank_std,
        )
        shards = _describe_shards(plans, job, dask_address, spec.sortie_id)

        index = build_index_task(shards, grid, cache_root / "index", IndexBudget())
        self_test = self_test_task(
            job, shards, index, spec.self_test, checked.imagery.upsampling, spec.tiles.max_upsampling
        )
        reporting.index_report(
            spec.sortie_id,
            {
                "type": index.index_type,
                "reason": index.reason,
                "vectors": index.n,
                "dim": index.dim,
                "recall@1": round(index.recall_at_1, 4),
                "recall@10": round(index.recall_at_10, 4),
                "size (bytes)": index.size_bytes,
                "build (s)": round(index.build_s, 2),
                "gpu": index.gpu,
                "self-test recall@1 / @5": f"{self_test.recall_at_1:.3f} / {self_test.recall_at_5:.3f}",
                "self-test descriptor space": self_test.finding,
            },
        )
        reporting.self_test_report(spec.sortie_id, self_test.summary(), self_test.preview_png)
        raise_if_failed(self_test_gate(quote(self_test), return_state=True))  # the self-test gate

        takeoff_lonlat = (spec.takeoff[1], spec.takeoff[0])
        coverage, coverage_path, png = coverage_task(
            shards,
            grid,
            quote(storage_tiles),
            spec.coverage_threshold,
            cache_root / "coverage",
            takeoff_lonlat,
            area=quote(spec.area),  # the map's outline (the corridor around a route)
            imagery=(spec.orthophoto.kind, tuple(spec.orthophoto.paths) or (spec.orthophoto.path,)),
        )
        summary_cov = {
            "percent": coverage.percent,
            "threshold": coverage.threshold,
            "covered": coverage.covered,
            "blank": coverage.blank,
            "missing": coverage.missing,
            "total": coverage.total,
            "passed": coverage.passed,
        }
        reporting.coverage_report(spec.sortie_id, summary_cov, png, [str(t) for t in coverage.missing_tiles])
        # The coverage gate: a task run of its own, red with the failure's one message when below the threshold.
        failure = functools.partial(coverage.failure, where=spec.sortie_id)  # its hint tells blank from missing
        raise_if_failed(coverage_gate(quote(coverage), failure, return_state=True))

        artifacts = [e.entry.path for e in engines]
        artifacts += [p for s in shards for p in (s.descriptors_path, s.table_path)]
        artifacts += [
            index.index_path,
            index.table_path,
            index.report_path,
            coverage_path,
            coverage_path.with_suffix(".png"),
        ]
        onboard_set = self_test.onboard_path
        if onboard_set is not None:
            artifacts.append(onboard_set)
        trusted = spec.trusted_keys or spec.signing_key.with_name("trusted_keys.json")
        manifest_path, version = sign_manifest_task(
            cache_root,
            artifacts,
            sortie_id=spec.sortie_id,
            takeoff=spec.takeoff,
            area_geojson=spec.signed_area_geojson,
            route_geojson=spec.area_geojson if spec.corridor_m is not None else None,
            corridor_m=spec.corridor_m,
            host=host.identity(),
            preprocess={spec.vpr.name: spec.vpr.preprocess},
            coverage=coverage.manifest_fields(coverage_path.relative_to(cache_root).as_posix()),
            self_test=self_test.manifest_fields(
                onboard_set.relative_to(cache_root).as_posix() if onboard_set is not None else None
            ),
            expires_hours=spec.expires_hours,
            signing_key=spec.signing_key,
            trusted_keys=trusted,
        )
        reporting.manifest_report(spec.sortie_id, manifest_path, version, trusted, platform.node())
        report = raise_if_failed(verify_task(cache_root, trusted, return_state=True))  # the verify gate
        if not report.ok:
            raise ProvisionError("the new cache does not verify: " + "; ".join(f.message for f in report.failures))

    computed = sum(s.computed for s in shards)
    return {
        "sortie_id": spec.sortie_id,
        "cache_dir": str(cache_root),
        "manifest": str(manifest_path),
        "manifest_version": version,
        "trusted_keys": str(trusted),
        "runtime": spec.runtime,
        "engines": [e.summary() for e in engines],
        "tiles": {"storage_tiles": len(storage_tiles), "chunks": total_chunks},
        "shards": {
            "total": len(shards),
            "computed": computed,
            "reused": len(shards) - computed,
            "inference_batches": sum(s.batches for s in shards),
            "inferred_chunks": sum(s.inferred for s in shards),
        },
        "index": {
            "type": index.index_type,
            "vectors": index.n,
            "recall_at_1": index.recall_at_1,
            "recall_at_10": index.recall_at_10,
            "path": str(index.index_path),
        },
        "coverage": summary_cov,
        "self_test": self_test.summary(),
        "imagery": checked.imagery.summary(),  # preflight's estimate and upsampling factor
        "verified": report.ok,
    }
