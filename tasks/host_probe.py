from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from navcache.host_probe import HostCapabilities, probe_host


@task(name="probe-host", cache_policy=NO_CACHE)
def probe_host_task(cache_dir: Path) -> HostCapabilities:
    return probe_host(cache_dir)
