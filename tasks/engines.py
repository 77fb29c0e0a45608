"""The compile-or-reuse task: one backbone's engine, with retries and a time-out around the library call.

No Prefect cache: whether the engine is reused is decided by :func:`navcache.engines.compile_or_reuse`
alone (the engine gate admits the file a build would produce), which costs one streamed digest of the
engine on a warm run.
"""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from navcache.engines import BackboneBuild, EngineResult, compile_or_reuse, provisioning_runtime
from navcache_runtime import RuntimeConfig

from .runlog import transient_only

BUILD_TIMEOUT_S = 3600

log = logging.getLogger(__name__)


@task(
    name="compile-or-reuse",
    task_run_name="compile-{backbone.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    # Out of memory and I/O hiccups are retried; a malformed model or a numerical mismatch fails at once.
    retry_condition_fn=transient_only,
    timeout_seconds=BUILD_TIMEOUT_S,
)
def compile_backbone(backbone: BackboneBuild, runtime_config: RuntimeConfig) -> EngineResult:
    """One backbone's engine: reused when the gate admits it, else built and checked (the strategy pins
    the host's fields in the engine's filename, so another host never reuses it)."""
    result = compile_or_reuse(provisioning_runtime(runtime_config), backbone)
    error = f", max abs error {result.max_abs_error:.2g}" if result.max_abs_error is not None else ""
    log.info(
        "engine %s: %s in %.2f s (%s%s): %s",
        result.backbone,
        result.outcome,
        result.seconds,
        result.reason,
        error,
        result.entry.path,
    )
    return result
