from __future__ import annotations

import logging
from datetime import timedelta

from prefect import task
from prefect.tasks import exponential_backoff

from navcache.engines import BackboneBuild, EngineResult, compile_or_reuse
from navcache.host import HostCapabilities
from navcache_runtime import RuntimeConfig, build_inference_runtime

from .cache_policy import EngineContentPolicy
from .runlog import transient_only

BUILD_TIMEOUT_S = 3600

log = logging.getLogger(__name__)


@task(
    name="compile-or-reuse",
    task_run_name="compile-{backbone.name}",
    cache_policy=EngineContentPolicy(),
    cache_expiration=timedelta(days=30),
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    # Out of memory and I/O hiccups are retried; a malformed model or a numerical mismatch fails at once.
    retry_condition_fn=transient_only,
    timeout_seconds=BUILD_TIMEOUT_S,
)
def compile_backbone(backbone: BackboneBuild, runtime_config: RuntimeConfig, host: HostCapabilities) -> EngineResult:
    """One backbone's engine: reused when the gate admits it, else built and checked. ``host`` is part of
    the cache key (a different host is a different engine)."""
    result = compile_or_reuse(build_inference_runtime(runtime_config), backbone)
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
