"""The self-test gate as a Prefect task: red in the UI when the cache cannot localise well enough."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from navcache.descriptors import DESCRIBED, ShardResult, load_shard
from navcache.errors import SelfTestError
from navcache.index import IndexResult
from navcache.selftest import SelfTestResult, memo_key, remembered, run_self_test
from navcache.sortie import SelfTestConfig
from navcache_runtime.index import load_index, load_tile_table
from navcache_runtime.integrity import read_sidecar
from navcache_runtime.preprocessing import Preprocess
from navcache_tasks.descriptors import DescriptorJob, _engine, _source

from .runlog import gate


def described_rows(shards: list[ShardResult]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk x, y) and descriptor rows of every described chunk."""
    xy, rows = [], []
    for shard in shards:
        descriptors, table = load_shard(shard)
        described = table["status"] == DESCRIBED
        if described.any():  # a shard with nothing described (no imagery there) has a shapeless empty array
            xy.append(np.stack([table["x"][described], table["y"][described]], 1))
            rows.append(np.asarray(descriptors, np.float32))
    return np.concatenate(xy), np.concatenate(rows)


def _run(job: DescriptorJob, shards: list[ShardResult], index: IndexResult, **kwargs: Any) -> SelfTestResult:
    chunks, descriptors = described_rows(shards)  # only when the memo cannot answer: a warm run reads no shard
    return run_self_test(
        grid=job.grid,
        chunks=chunks,
        descriptors=descriptors,
        index=load_index(index.index_path, mmap=False),
        table=load_tile_table(index.table_path),
        describe=_engine(job).describe,
        batch_size=job.batch_size,
        **kwargs,
    )


@task(name="self-test", cache_policy=NO_CACHE)
def self_test_task(
    job: DescriptorJob,
    shards: list[ShardResult],
    index: IndexResult,
    config: SelfTestConfig,
    upsampling: float | None = None,
    max_upsampling: float | None = None,
) -> SelfTestResult:
    """Render, describe and query the views (navcache.selftest); writes the onboard query set beside the
    shards. Green whatever the figures: the gate below judges them."""
    chunks = sum(s.described + s.blank + s.missing for s in shards)
    blank_fraction = sum(s.blank for s in shards) / max(1, chunks)
    source = _source(job)
    preprocess = job.preprocessing or Preprocess.for_input_shape(job.input_shape)
    out_dir = job.out_dir.parent / "selftest"
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
    return remembered(
        out_dir,
        key,
        lambda: _run(
            job,
            shards,
            index,
            source=source,
            preprocess=preprocess,
            config=config,
            out_dir=out_dir,
            upsampling=upsampling,
            max_upsampling=max_upsampling,
            blank_fraction=blank_fraction,
        ),
    )


def self_test_failure(result: SelfTestResult) -> SelfTestError:
    return SelfTestError(
        f"self-test recall@5 {result.recall_at_5:.3f} is below min_recall_at_5 {result.min_recall_at_5} "
        f"({result.samples} views; {result.finding})",
        where="[self_test].min_recall_at_5",
        hint="fix the cause named above, or lower min_recall_at_5; the previous manifest stays in force",
    )


@task(name="self-test-gate", task_run_name="self-test-gate", cache_policy=NO_CACHE)
def self_test_gate(result: SelfTestResult) -> State[None]:
    """The self-test quality gate: green when [self_test] min_recall_at_5 is met (or unset), red with one message."""
    floor = "report only" if result.min_recall_at_5 is None else f"≥ {result.min_recall_at_5}"
    return gate(
        result.passed,
        functools.partial(self_test_failure, result),
        f"self-test gate passed: recall@5 {result.recall_at_5:.3f} ({floor}) over {result.samples} views",
    )
