"""The provision-sortie flow end to end, on real files, under a temporary Prefect API."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from navcache.errors import CoverageError
from navcache_runtime import verify_cache
from tests.support.models import export_models, make_model
from tests.support.sorties import Assets, block_tiles, private_models, tiles_polygon, write_sortie

pytestmark = pytest.mark.usefixtures("prefect_harness")


def provision(sortie: Path) -> dict:
    from navcache_flows.provision_sortie import provision_sortie

    return provision_sortie(str(sortie))


def provision_state(sortie: Path) -> Any:  # a Prefect State
    from navcache_flows.provision_sortie import provision_sortie

    return provision_sortie(str(sortie), return_state=True)


def descriptor_progress(sortie_id: str) -> float:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from navcache_tasks.reporting import artifact_key

    key = artifact_key("descriptors", sortie_id)
    with get_client(sync_client=True) as client:
        (latest,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1)
    return float(latest.data)  # type: ignore[arg-type]


def outcomes(summary: dict) -> dict[str, str]:
    return {e["backbone"]: e["outcome"] for e in summary["engines"]}


def test_cold_run_builds_everything_and_a_warm_run_reuses_everything(assets: Assets, tmp_path: Path) -> None:
    first, _ = block_tiles()
    sortie = write_sortie(tmp_path / "s.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "cache")
    cold = provision(sortie)
    assert outcomes(cold) == {"tiny_vpr": "BUILT", "local_features": "BUILT"}
    assert all(e["max_abs_error"] is not None and e["max_abs_error"] < 5e-3 for e in cold["engines"])
    assert cold["shards"] == {"total": 1, "computed": 1, "reused": 0, "inference_batches": 1, "inferred_chunks": 4}
    assert cold["tiles"] == {"storage_tiles": 4, "chunks": 4}
    assert cold["index"]["vectors"] == 4 and cold["index"]["type"] == "Flat"
    assert cold["coverage"]["percent"] == 100.0 and cold["verified"]
    report = verify_cache(tmp_path / "cache", assets.trusted_keys, mode="operator")
    assert report.ok, report.summary()

    warm = provision(sortie)
    assert outcomes(warm) == {"tiny_vpr": "REUSED", "local_features": "REUSED"}
    assert warm["shards"] == {"total": 1, "computed": 0, "reused": 1, "inference_batches": 0, "inferred_chunks": 0}
    assert warm["manifest_version"] == cold["manifest_version"] + 1
    assert warm["index"]["path"] == cold["index"]["path"]  # same descriptors → same content-addressed index


def test_a_changed_vpr_model_rebuilds_only_its_engine_descriptors_and_index(assets: Assets, tmp_path: Path) -> None:
    vpr, local = private_models(assets, tmp_path / "models")
    first, _ = block_tiles()
    sortie = write_sortie(
        tmp_path / "s.toml",
        assets,
        area=tiles_polygon(first),
        cache_dir=tmp_path / "cache",
        vpr_onnx=vpr,
        local_onnx=local,
    )
    before = provision(sortie)
    export_models(make_model(seed=5, descriptor_dim=128, width=32, depth=4), vpr.parent, "tiny_vpr", size=128)
    after = provision(sortie)
    assert outcomes(after) == {"tiny_vpr": "BUILT", "local_features": "REUSED"}
    assert after["shards"]["computed"] == 1 and after["shards"]["inference_batches"] > 0
    assert after["index"]["path"] != before["index"]["path"]
    old_engine = tmp_path / "cache" / "engines" / before["engines"][0]["artifact"]
    assert old_engine.exists()  # the old engine stays until gc


def test_adding_tiles_computes_only_the_new_shard(assets: Assets, tmp_path: Path) -> None:
    first, second = block_tiles()
    cache = tmp_path / "cache"
    small = write_sortie(tmp_path / "small.toml", assets, area=tiles_polygon(first), cache_dir=cache)
    provision(small)
    large = write_sortie(tmp_path / "large.toml", assets, area=tiles_polygon(first + second), cache_dir=cache)
    grown = provision(large)
    assert descriptor_progress(grown["sortie_id"]) == 100.0  # updates are throttled, the last one is not
    assert grown["shards"] == {"total": 2, "computed": 1, "reused": 1, "inference_batches": 1, "inferred_chunks": 4}
    assert grown["tiles"]["chunks"] == 8 and grown["index"]["vectors"] == 8


def test_shards_are_described_at_most_the_set_number_at_once(
    assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    first, second = block_tiles()
    sortie = write_sortie(tmp_path / "s.toml", assets, area=tiles_polygon(first + second), cache_dir=tmp_path / "c")
    monkeypatch.setenv("NAVCACHE_SHARDS_IN_FLIGHT", "1")
    state = provision_state(sortie)
    summary = state.result()
    assert summary["shards"]["total"] == 2
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    spans = sorted((r.start_time, r.end_time) for r in runs if r.name.startswith("shard-"))
    assert len(spans) == 2 and all(start and end for start, end in spans)
    assert spans[0][1] <= spans[1][0]  # the second shard starts after the first has finished
    # The coverage table is the canonical compact JSON of its document (written without a list per tile).
    (table_path,) = (tmp_path / "c").rglob("coverage-*.json")
    table = table_path.read_bytes()
    assert table == json.dumps(json.loads(table), separators=(",", ":")).encode()


def test_shards_in_flight_prefers_prefects_setting_then_navcaches_then_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.settings import PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS, temporary_settings

    from navcache.errors import SortieError
    from navcache_flows.provision_sortie import ShardThreadPool, provision_sortie, shards_in_flight

    monkeypatch.delenv("NAVCACHE_SHARDS_IN_FLIGHT", raising=False)
    with temporary_settings(restore_defaults={PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS}):
        assert 2 <= shards_in_flight() <= 4  # bounded whatever the host
        monkeypatch.setenv("NAVCACHE_SHARDS_IN_FLIGHT", "3")
        assert shards_in_flight() == 3
        runner = provision_sortie.task_runner
        assert isinstance(runner, ShardThreadPool)
        assert runner.duplicate()._max_workers == 3  # sized per run, from the run's environment
        assert ShardThreadPool(5).duplicate()._max_workers == 5
        for bad in ("0", "-1", "two"):
            monkeypatch.setenv("NAVCACHE_SHARDS_IN_FLIGHT", bad)
            with pytest.raises(SortieError, match="NAVCACHE_SHARDS_IN_FLIGHT=.* is not a positive integer"):
                shards_in_flight()
    with temporary_settings({PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS: 7}):
        assert shards_in_flight() == 7  # Prefect's own thread-pool setting, when set, wins


def test_coverage_below_threshold_fails_and_keeps_the_previous_manifest(assets: Assets, tmp_path: Path) -> None:
    first, _ = block_tiles()
    cache = tmp_path / "cache"
    good = write_sortie(tmp_path / "good.toml", assets, area=tiles_polygon(first), cache_dir=cache)
    provision(good)
    manifest = (cache / "manifest.dsse.json").read_bytes()
    # Tiles 20 km east: outside the orthophoto, but the area still overlaps it through `first`.
    far = [type(t)(t.z, t.x + 100, t.y) for t in first]
    # A threshold that preflight's estimate (about 50 %) lets through, but the walk does not meet.
    partial = write_sortie(
        tmp_path / "partial.toml", assets, area=tiles_polygon(first + far), cache_dir=cache, threshold=54.0
    )
    with pytest.raises(CoverageError, match=r"coverage 50\.00 % is below the threshold 54 % \(4 missing, 0 blank"):
        provision(partial)
    assert (cache / "manifest.dsse.json").read_bytes() == manifest
    assert verify_cache(cache, assets.trusted_keys).ok


def test_runs_on_different_cache_roots_share_nothing(assets: Assets, tmp_path: Path) -> None:
    first, _ = block_tiles()
    a = provision(write_sortie(tmp_path / "a.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "a"))
    b = provision(write_sortie(tmp_path / "b.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "b"))
    assert outcomes(b) == {"tiny_vpr": "BUILT", "local_features": "BUILT"}
    assert Path(a["manifest"]).parent != Path(b["manifest"]).parent
    shutil.rmtree(tmp_path / "a")
    assert verify_cache(tmp_path / "b", assets.trusted_keys).ok


def test_imagery_that_is_nodata_everywhere_fails_clearly_and_writes_no_manifest(assets: Assets, tmp_path: Path) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_bounds

    from navcache.errors import SourceError
    from navcache.tiles import tile_bounds

    first, _ = block_tiles()
    west, south, east, north = (
        min(tile_bounds(t)[i] for t in first) if i < 2 else max(tile_bounds(t)[i] for t in first) for i in range(4)
    )
    blank = tmp_path / "blank.tif"
    with rasterio.open(
        blank,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=3,
        dtype="uint8",
        crs="EPSG:4326",
        transform=from_bounds(west - 0.01, south - 0.01, east + 0.01, north + 0.01, 64, 64),
        nodata=0,
    ) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    sortie = write_sortie(tmp_path / "s.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "cache")
    sortie.write_text(sortie.read_text().replace(str(assets.ortho), str(blank)))
    with pytest.raises(SourceError, match="no valid pixels over the area"):  # preflight's survey, before any write
        provision(sortie)
    assert not (tmp_path / "cache" / "manifest.dsse.json").exists()


def test_each_run_reads_and_validates_the_sortie_once_and_is_named_after_its_id(
    assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    import navcache.run_input as run_input
    from navcache_flows.provision_sortie import provision_sortie

    first, _ = block_tiles()
    sortie = write_sortie(tmp_path / "file-stem.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "c")
    calls: list[Path] = []
    real = run_input.run_preflight

    def counting(path: Path, cache_dir: Path | None = None, **kwargs: object):  # type: ignore[no-untyped-def]
        calls.append(path)
        return real(path, cache_dir, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(run_input, "run_preflight", counting)
    direct = provision_sortie(str(sortie), return_state=True)  # a deployment's run: naming validates it
    assert direct.is_completed() and len(calls) == 1
    run_input.check_input(sortie)  # the CLI's preflight, before Prefect starts; the run takes its result
    after_cli = provision_sortie(str(sortie), return_state=True)
    assert after_cli.is_completed() and len(calls) == 2
    with get_client(sync_client=True) as client:
        for state in (direct, after_cli):
            assert client.read_flow_run(state.state_details.flow_run_id).name == "test-file-stem"  # not the stem
