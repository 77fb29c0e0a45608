from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import exponential_backoff

from navcache.engines import BackboneBuild, BackboneBuildError, EngineResult, compile_or_reuse
from navcache.host import HostCapabilities
from navcache_runtime import RuntimeConfig, build_inference_runtime

from .cache_policy import EngineContentPolicy

BUILD_TIMEOUT_S = 3600


def _transient_only(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry out-of-memory and similar transient failures; a malformed model fails at once."""
    try:
        state.result()
    except BackboneBuildError as exc:
        return exc.transient
    except Exception:
        return True  # unexpected errors (I/O hiccups) may pass on retry
    return False


@task(
    name="compile-or-reuse",
    task_run_name="compile-{backbone.name}",
    cache_policy=EngineContentPolicy(),
    cache_expiration=timedelta(days=30),
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=_transient_only,
    timeout_seconds=BUILD_TIMEOUT_S,
)
def compile_backbone(backbone: BackboneBuild, runtime_config: RuntimeConfig, host: HostCapabilities) -> EngineResult:
    """One backbone's engine: reused when the gate admits it, else built and checked. ``host`` is part of
    the cache key (a different host is a different engine)."""
    return compile_or_reuse(build_inference_runtime(runtime_config), backbone)
