from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

import navcache
from navcache.errors import ProvisionError
from navcache.manifest import build_statement, next_version, sign_manifest
from navcache_runtime.integrity import sidecar_path
from navcache_runtime.preprocessing import Preprocess
from navcache_runtime.verify import VerificationReport, verify_cache

from .runlog import gate

log = logging.getLogger(__name__)

PASSPHRASE_ENV = "NAVCACHE_KEY_PASSPHRASE"


def with_sidecars(cache_root: Path, paths: list[Path]) -> list[Path]:
    """Relative paths of the artifacts and their sidecars (the engine gate needs the sidecars onboard)."""
    listed = []
    for path in paths:
        for file in (path, sidecar_path(path)):
            if file.exists():
                listed.append(file.relative_to(cache_root))
    return sorted(set(listed))


@task(name="sign-manifest", task_run_name="sign-manifest", cache_policy=NO_CACHE)
def sign_manifest_task(
    cache_root: Path,
    artifacts: list[Path],
    *,
    sortie_id: str,
    takeoff: tuple[float, float],
    area_geojson: dict[str, Any],
    route_geojson: dict[str, Any] | None = None,
    corridor_m: float | None = None,
    host: dict[str, str],
    coverage: dict[str, Any],
    expires_hours: int,
    preprocess: Mapping[str, Preprocess] | None = None,
    self_test: dict[str, Any] | None = None,
    signing_key: Path | str,
    trusted_keys: Path,
) -> tuple[Path, int]:
    issued = datetime.now(UTC).replace(microsecond=0)
    version = next_version(cache_root)
    statement = build_statement(
        cache_root,
        with_sidecars(cache_root, artifacts),
        sortie_id=sortie_id,
        takeoff=takeoff,
        area_geojson=area_geojson,
        route=route_geojson,
        corridor_m=corridor_m,
        host=host,
        coverage=coverage,
        preprocess=preprocess,
        self_test=self_test,
        version=version,
        issued_at=issued,
        expires=issued + timedelta(hours=expires_hours),
        tool_version=navcache.__version__,
    )
    passphrase = os.environ.get(PASSPHRASE_ENV)
    path = sign_manifest(
        cache_root,
        statement,
        signing_key=signing_key,
        trusted_keys=trusted_keys,
        passphrase=passphrase.encode() if passphrase else None,
    )
    log.info(
        "manifest v%d signed for %s (expires %s): %s", version, sortie_id, statement_expiry(issued, expires_hours), path
    )
    return path, version


def statement_expiry(issued: datetime, expires_hours: int) -> str:
    return (issued + timedelta(hours=expires_hours)).isoformat().replace("+00:00", "Z")


@task(name="verify-cache", task_run_name="verify-cache", cache_policy=NO_CACHE)
def verify_task(cache_root: Path, trusted_keys: Path) -> VerificationReport | State[VerificationReport]:
    """The verify quality gate: the report when the new cache verifies (``.fn`` returns it as is); under
    Prefect, a red task run whose message lists the failures when it does not."""
    report = verify_cache(cache_root, trusted_keys, mode="operator")
    if report.ok:
        log.info("verify: the new cache verifies against %s", trusted_keys)
        return report
    return gate(
        False,
        lambda: ProvisionError("the new cache does not verify: " + "; ".join(f.message for f in report.failures)),
        "",
    )
