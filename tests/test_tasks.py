"""Each task on its own: `.fn` without Prefect, and as a real task run under a temporary Prefect API."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prefect import flow

from navcache.descriptor_job import DescriptorJob
from navcache.engines import Outcome, backbone_build
from navcache.host_probe import HostCapabilities
from navcache.index_build import IndexBudget
from navcache.preflight import preflight
from navcache_flows.provision_sortie import plan_tiles
from navcache_runtime import RuntimeConfig
from navcache_runtime.integrity import sidecar_path
from navcache_tasks.coverage_walk import coverage_task
from navcache_tasks.descriptors import describe_shard_task
from navcache_tasks.engines import compile_backbone
from navcache_tasks.host_probe import probe_host_task
from navcache_tasks.index_build import build_index_task
from navcache_tasks.manifest import sign_manifest_task, verify_task
from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie


def test_the_whole_chain_runs_through_task_fn_without_prefect(assets: Assets, tmp_path: Path) -> None:
    first, _ = block_tiles()
    sortie = preflight(write_sortie(tmp_path / "s.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "c"))
    root = sortie.cache_dir
    host = probe_host_task.fn(root)
    assert isinstance(host, HostCapabilities) and host.cpu_cores >= 1
    config = RuntimeConfig(runtime=sortie.runtime, engine_dir=root / "engines")
    engines = [compile_backbone.fn(backbone_build(b), config) for b in sortie.backbones]
    assert [e.outcome for e in engines] == [Outcome.BUILT, Outcome.BUILT]
    grid, storage, plans = plan_tiles.fn(sortie)
    profile = sortie.vpr.profile
    job = DescriptorJob(
        config,
        engines[0].entry,
        "image",
        None,
        profile.opt,
        profile.min[0],
        8,
        sortie.orthophoto.kind,
        sortie.orthophoto.path,
        grid,
        root / "descriptors",
        4,
    )
    shards = [describe_shard_task.fn(plan, job) for plan in plans]
    assert [s.described for s in shards] == [4]
    index = build_index_task.fn(shards, grid, root / "index", IndexBudget())
    assert index.n == 4
    coverage, table, png = coverage_task.fn(shards, grid, storage, 99.0, root / "coverage", (11.575, 48.137))
    assert coverage.passed and table.exists() and png.startswith(b"\x89PNG")
    artifacts = [e.entry.path for e in engines] + [p for s in shards for p in (s.descriptors_path, s.table_path)]
    artifacts += [index.index_path, index.table_path, index.report_path, table, table.with_suffix(".png")]
    manifest, version = sign_manifest_task.fn(
        root,
        artifacts,
        sortie_id=sortie.sortie_id,
        takeoff=sortie.takeoff,
        area_geojson=sortie.area_geojson,
        host=host.identity(),
        coverage=coverage.manifest_fields(table.relative_to(root).as_posix()),
        expires_hours=1,
        signing_key=assets.signing_key,
        trusted_keys=assets.trusted_keys,
    )
    assert version == 1 and manifest.exists()
    assert verify_task.fn(root, assets.trusted_keys).ok


@pytest.mark.usefixtures("prefect_harness")
def test_the_compile_task_reuses_only_an_engine_the_gate_admits_on_the_same_cache(
    assets: Assets, tmp_path: Path
) -> None:
    first, _ = block_tiles()
    sortie = preflight(write_sortie(tmp_path / "s.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "c"))
    backbone = backbone_build(sortie.vpr)
    config = RuntimeConfig(runtime=sortie.runtime, engine_dir=tmp_path / "c" / "engines")
    other = dataclasses.replace(config, engine_dir=tmp_path / "other" / "engines")

    @flow
    def compile_outcomes(config: RuntimeConfig) -> list[tuple[str, Outcome]]:
        states = [compile_backbone(backbone, config, return_state=True) for _ in range(2)]
        return [(state.name, state.result().outcome) for state in states]

    # No Prefect cache: every run asks the engine gate, which admits what the first build wrote.
    assert compile_outcomes(config) == [("Completed", Outcome.BUILT), ("Completed", Outcome.REUSED)]
    assert compile_outcomes(config) == [("Completed", Outcome.REUSED)] * 2
    assert compile_outcomes(other)[0] == ("Completed", Outcome.BUILT)  # another cache root never reuses
    engine = next((tmp_path / "c" / "engines").glob("tiny_vpr__*.onnx"))
    engine.write_bytes(engine.read_bytes()[:-4] + b"evil")  # tampered: the gate refuses it, the task rebuilds
    assert compile_outcomes(config)[0] == ("Completed", Outcome.BUILT)
    assert sidecar_path(engine).read_text() == __import__("hashlib").sha256(engine.read_bytes()).hexdigest()


@pytest.mark.usefixtures("prefect_harness")
def test_only_transient_failures_are_retried(assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import navcache_tasks.engines as engine_tasks
    from navcache.engines import BackboneBuildError

    first, _ = block_tiles()
    sortie = preflight(write_sortie(tmp_path / "s.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "c"))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(sortie.vpr.onnx.read_bytes()[:5000])
    malformed = dataclasses.replace(backbone_build(sortie.vpr), onnx=broken)
    config = RuntimeConfig(runtime=sortie.runtime, engine_dir=tmp_path / "c" / "engines")
    calls: list[str] = []
    real = engine_tasks.compile_or_reuse

    def counting(runtime, backbone, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(backbone.name)
        if backbone.onnx.name == "transient.onnx":
            raise BackboneBuildError(backbone.name, RuntimeError("CUDA out of memory"), transient=True)
        return real(runtime, backbone, **kwargs)

    monkeypatch.setattr(engine_tasks, "compile_or_reuse", counting)
    fast = compile_backbone.with_options(retry_delay_seconds=0, retry_jitter_factor=None)

    @flow
    def run(backbone) -> str:  # type: ignore[no-untyped-def]
        return fast(backbone, config, return_state=True).name

    assert run(malformed) == "Failed"
    assert len(calls) == 1  # a malformed model fails at once
    assert not list((tmp_path / "c" / "engines").glob("*.onnx"))
    calls.clear()
    transient = dataclasses.replace(malformed, onnx=tmp_path / "transient.onnx")
    assert run(transient) == "Failed"
    assert len(calls) == 3  # one try and two retries
