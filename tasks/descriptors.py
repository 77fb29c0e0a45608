"""The describe-shard task (mapped over a run's shard plans) and the flow-side collection of Dask results;
the job, its per-process engine and imagery, and the chunk counter are :mod:`navcache.descriptor_job`'s."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from uuid import UUID

from prefect import task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from navcache.descriptor_job import ChunkProgress, DescriptorJob, describe_job_shard, run_progress
from navcache.descriptors import ShardResult
from navcache.tiles import ShardPlan

from .runlog import transient_only


def _sender(artifact: UUID | None) -> Callable[[float], None] | None:
    """The progress artifact's update, as a ``send(percent)`` callback."""
    if artifact is None:
        return None

    def send(percent: float) -> None:
        update_progress_artifact(artifact, progress=percent)

    return send


@task(
    name="describe-shard",
    task_run_name="shard-{plan.block_x}-{plan.block_y}",
    cache_policy=NO_CACHE,
    retries=1,
    # A read hiccup on a shared filesystem is retried once; bad imagery or a failing engine is not.
    retry_condition_fn=transient_only,
)
def describe_shard_task(plan: ShardPlan, job: DescriptorJob) -> ShardResult:
    return describe_job_shard(plan, job, run_progress(job, _sender(job.progress_artifact)).add)


def collect_shards(
    futures: Iterable[PrefectFuture[ShardResult]], plans: list[ShardPlan], job: DescriptorJob
) -> list[ShardResult]:
    """Each shard's result, in plan order, with the descriptor progress counted here in the flow from the shard
    results: a Dask worker's per-batch counter only sees the shards of its own process. ``job`` is the flow's
    (with the progress artifact); the workers get one without it, so no stale count lands after 100 %."""
    counter = ChunkProgress(job.total_chunks, _sender(job.progress_artifact))
    results: list[ShardResult] = []
    for future, plan in zip(futures, plans, strict=True):
        results.append(future.result())
        counter.add(len(plan))
    return results
