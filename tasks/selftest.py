"""The self-test and its gate as Prefect tasks: red in the UI when the cache cannot localise well enough."""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from navcache.descriptor_job import DescriptorJob, self_test_failure, self_test_for_job
from navcache.descriptors import ShardResult
from navcache.index_build import IndexResult
from navcache.selftest import SelfTestResult
from navcache.sortie import SelfTestConfig

from .runlog import gate


@task(name="self-test", cache_policy=NO_CACHE)
def self_test_task(
    job: DescriptorJob,
    shards: list[ShardResult],
    index: IndexResult,
    config: SelfTestConfig,
    upsampling: float | None = None,
    max_upsampling: float | None = None,
) -> SelfTestResult:
    """Green whatever the figures: the gate below judges them."""
    return self_test_for_job(job, shards, index, config, upsampling, max_upsampling)


@task(name="self-test-gate", task_run_name="self-test-gate", cache_policy=NO_CACHE)
def self_test_gate(result: SelfTestResult) -> State[None]:
    """The self-test quality gate: green when [self_test] min_recall_at_5 is met (or unset), red with one message."""
    floor = "report only" if result.min_recall_at_5 is None else f"≥ {result.min_recall_at_5}"
    return gate(
        result.passed,
        functools.partial(self_test_failure, result),
        f"self-test gate passed: recall@5 {result.recall_at_5:.3f} ({floor}) over {result.samples} views",
    )
