"""SIGKILL `navcache provision` at seeded moments, then re-run: nothing lost, nothing half-written left.

Scenarios: "cold" provisions the two-shard sortie into an empty cache; "extend" provisions it over a good
cache of the one-shard sortie (so a new shard, index, coverage table and manifest v2 are written while the
previous manifest is in force). Full run: ``pytest tests/reliability -m slow`` (or ``make test-all``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from navcache_runtime.layout import MANIFEST_NAME
from tests.reliability.conftest import copy_cache
from tests.reliability.harness import (
    STAGES,
    KillResult,
    Navcache,
    cache_state,
    manifest_subjects,
    seeded_trigger,
    verifies,
)
from tests.support.sorties import Assets

COLD_STAGES = [*STAGES, "delay"]
EXTEND_STAGES = [s for s in COLD_STAGES if not s.startswith(("compile", "engine"))]
# The default (CI) subset: one kill in each scenario; `make test-reliability` runs all of them.
FAST = {("cold", "shard-table", 0), ("extend", "manifest-temp", 0)}


def _cases() -> list[object]:
    cases = []
    for scenario, stages, seeds in (("cold", COLD_STAGES, 3), ("extend", EXTEND_STAGES, 2)):
        for stage in stages:
            for seed in range(seeds):
                marks = () if (scenario, stage, seed) in FAST else (pytest.mark.slow,)
                cases.append(pytest.param(scenario, stage, seed, marks=marks, id=f"{scenario}-{stage}-{seed}"))
    return cases


def check_recovery(
    navcache: Navcache, sortie: Path, cache: Path, trusted: Path, kill: KillResult, had_manifest: bool
) -> dict[str, object]:
    """The checks every kill must pass; returns facts for the record."""
    # 1. The last good cache is never lost: whatever manifest is in place still verifies, right after the kill.
    if had_manifest:
        assert (cache / MANIFEST_NAME).is_file(), "the kill lost the previous manifest"
    if (cache / MANIFEST_NAME).is_file():
        ok, why = verifies(cache, trusted)
        assert ok, f"after the kill the manifest in place does not verify: {why}"
    before = cache_state(cache)

    # 2. The re-run completes without waiting for the dead run's lock (the kernel released the flock).
    code, summary, stderr = navcache.provision(sortie, cache, "--lock-timeout", "5")
    assert code == 0 and summary is not None, stderr
    assert "Traceback" not in stderr and "locked by" not in stderr, stderr
    assert summary["verified"] is True

    # 3. Everything complete before the kill is reused; exactly the rest is rebuilt.
    for engine in summary["engines"]:
        expected = "REUSED" if f"engines/{engine['artifact']}" in before.complete else "BUILT"
        assert engine["outcome"] == expected, (engine, sorted(before.complete))
    subjects = manifest_subjects(cache)
    tables = {s for s in subjects if s.startswith("descriptors/") and s.endswith(".tiles.npy")}
    complete = {t for t in tables if t in before.complete and t.replace(".tiles.npy", ".desc.npy") in before.complete}
    assert summary["shards"]["reused"] == len(complete), (summary["shards"], sorted(before.complete))
    assert summary["shards"]["computed"] == len(tables) - len(complete)

    # 4. The onboard verifier accepts it, and no partial artifact remains.
    verify = navcache.verify_cli(cache, trusted)
    assert verify.returncode == 0 and "VERIFIED" in verify.stdout, verify.stdout + verify.stderr
    after = cache_state(cache)
    assert not after.incomplete, f"partial files remain: {sorted(after.incomplete)}"

    # 5. No temp file remains: the re-run sweeps what the killed run left (it holds the lock) and leaves
    # none of its own.
    assert not after.temps, f"temp files remain after the re-run: {sorted(after.temps)}"
    orphans = len(after.temps)
    return {
        "incomplete_before": len(before.incomplete),
        "temps_before": len(before.temps),
        "orphans_after_rerun": orphans,
        "engines_built": sum(e["outcome"] == "BUILT" for e in summary["engines"]),
        "shards_reused": summary["shards"]["reused"],
    }


@pytest.mark.parametrize(("scenario", "stage", "seed"), _cases())
def test_kill_then_rerun(
    scenario: str,
    stage: str,
    seed: int,
    navcache: Navcache,
    sorties: dict[str, Path],
    assets: Assets,
    warm_small: Path,
    tmp_path: Path,
    record: Callable[..., None],
) -> None:
    cache = tmp_path / "cache"
    if scenario == "extend":
        copy_cache(warm_small, cache)
    had_manifest = (cache / MANIFEST_NAME).exists()
    trigger = seeded_trigger(stage, seed)
    kill = navcache.provision_and_kill(sorties["both"], cache, trigger)
    facts = check_recovery(navcache, sorties["both"], cache, assets.trusted_keys, kill, had_manifest)
    record(
        suite="kill",
        scenario=scenario,
        stage=stage,
        seed=seed,
        landed=kill.landed,
        matched=kill.matched,
        kill_after_s=round(kill.seconds, 3),
        failures=0,
        **facts,
    )
