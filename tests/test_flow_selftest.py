"""The self-test in a real provision (flow, manifest, onboard): figures signed and shown, the gate failing cleanly,
and the drone's own check catching an engine with other weights that the operator re-signed."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds

import navcache_runtime as nr
from navcache.errors import SelfTestError
from navcache.manifest import next_version, sign_manifest
from navcache.selftest import VIEW_MEMO_PREFIX, ViewParams, ViewRenderer
from navcache.tiles import tile_bounds, tile_for_lonlat
from navcache.types import TileId
from navcache_runtime import BuildConfig, InputProfile, RuntimeConfig, build_inference_runtime
from navcache_runtime.integrity import sha256_file, write_artifact
from navcache_runtime.selftest import SelfTestFailedError
from tests.support.selftest_models import thumbnail
from tests.support.sorties import CENTER_LAT, CENTER_LON, Assets, block_tiles, tiles_polygon, write_sortie

pytestmark = pytest.mark.usefixtures("prefect_harness")

SELF_TEST = "[self_test]\nsamples = 24\nonboard_samples = 12\n"


def provision(sortie: Path) -> dict:
    from navcache_flows.provision_sortie import provision_sortie

    return provision_sortie(str(sortie))


def predicate(cache: Path) -> dict:
    envelope = json.loads((cache / "manifest.dsse.json").read_text())
    return json.loads(base64.b64decode(envelope["payload"]))["predicate"]


@pytest.fixture(scope="module")
def healthy_cache(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("selftest-flow")
    first, second = block_tiles()
    sortie = write_sortie(
        root / "selftest-healthy.toml",
        assets,
        area=tiles_polygon(first + second),
        cache_dir=root / "cache",
        vpr_onnx=thumbnail(root / "thumbnail.onnx"),
        extra=SELF_TEST,
    )
    summary = provision(sortie)
    assert summary["verified"]
    figures = summary["self_test"]
    assert figures["samples"] == 8 and 0.0 <= figures["recall_at_1"] <= figures["recall_at_5"] <= 1.0
    assert figures["passed"] and not figures["collapsed"]
    return root / "cache"


def test_the_self_test_is_signed_with_its_onboard_query_set(healthy_cache: Path) -> None:
    block = predicate(healthy_cache)["self_test"]
    assert block["samples"] == 8 and 0 <= block["recall_at_5_x1000"] <= 1000
    onboard = block["onboard"]
    assert onboard["queries"] == 8 and 0 < onboard["min_hits_at_5"] <= 8
    assert onboard["path"] in predicate(healthy_cache)["artifacts"]
    assert (healthy_cache / onboard["path"]).is_file()


def test_open_cache_runs_the_onboard_self_test(healthy_cache: Path, assets: Assets) -> None:
    with nr.open_cache(healthy_cache, assets.trusted_keys, state_path=None, self_test=True) as cache:
        result = cache.self_test()
    assert result.passed and result.queries == 8 and result.hits_at_5 >= result.min_hits_at_5


def test_min_recall_at_5_fails_the_run_before_signing(assets: Assets, tmp_path: Path) -> None:
    centre = tile_for_lonlat(CENTER_LON, CENTER_LAT, 18)
    area = tiles_polygon([TileId(18, centre.x + dx, centre.y + dy) for dx in range(-3, 3) for dy in range(-3, 3)])
    good = write_sortie(
        tmp_path / "selftest-good.toml", assets, area=area, cache_dir=tmp_path / "cache", extra=SELF_TEST
    )
    provision(good)
    manifest = (tmp_path / "cache" / "manifest.dsse.json").read_bytes()
    # views turned all the way round and shifted by a whole chunk: nothing finds its tile at rank 5 every time
    harsh = SELF_TEST + "min_recall_at_5 = 1.0\nmax_rotation_deg = 180.0\nmax_offset = 1.0\n"
    gated = write_sortie(tmp_path / "selftest-gated.toml", assets, area=area, cache_dir=tmp_path / "cache", extra=harsh)
    with pytest.raises(SelfTestError, match=r"self-test recall@5 .* is below min_recall_at_5 1.0"):
        provision(gated)
    assert (tmp_path / "cache" / "manifest.dsse.json").read_bytes() == manifest  # the previous one stays


def test_the_onboard_self_test_refuses_an_engine_with_other_weights_even_when_re_signed(
    healthy_cache: Path, assets: Assets, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(healthy_cache, cache)
    engine = next((cache / "engines").glob("tiny_vpr__*.onnx"))
    # The same architecture with its output dimensions shuffled, compiled as the ground would compile it
    runtime = build_inference_runtime(RuntimeConfig(runtime="onnx_trt_ep", engine_dir=tmp_path / "other"))
    profile = InputProfile("image", (1, 3, 128, 128), (8, 3, 128, 128), (16, 3, 128, 128))
    other = runtime.compile_engine(
        thumbnail(tmp_path / "permuted.onnx", permute_seed=3), BuildConfig(input_shapes=(profile,))
    )
    write_artifact(engine, other.path.read_bytes())
    # The operator re-signs the cache with the swapped engine: integrity alone cannot tell
    envelope = json.loads((cache / "manifest.dsse.json").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    name = engine.relative_to(cache).as_posix()
    for subject in statement["subject"]:
        if subject["name"] in (name, name + ".sha256"):
            path = cache / subject["name"]
            subject["digest"]["sha256"] = sha256_file(path)
            statement["predicate"]["artifacts"][subject["name"]]["length"] = path.stat().st_size
    statement["predicate"]["version"] = next_version(cache)
    sign_manifest(cache, statement, signing_key=assets.signing_key, trusted_keys=assets.trusted_keys)

    with nr.open_cache(cache, assets.trusted_keys, state_path=None) as opened:  # verifies and opens
        assert not opened.self_test().passed
    with pytest.raises(SelfTestFailedError, match="self-test FAILED"):
        nr.open_cache(cache, assets.trusted_keys, state_path=None, self_test=True)


def test_a_warm_run_takes_the_self_test_from_its_memo_and_gc_keeps_only_live_memos(
    assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from navcache.gc import collect_garbage

    first_tiles, _ = block_tiles()
    sortie = write_sortie(
        tmp_path / "selftest-memo.toml",
        assets,
        area=tiles_polygon(first_tiles),
        cache_dir=tmp_path / "cache",
        extra=SELF_TEST,
    )
    cold = provision(sortie)

    def must_not_run(**_: object) -> None:
        raise AssertionError("a warm run rendered and described the views again")

    monkeypatch.setattr("navcache.descriptor_job.run_self_test", must_not_run)
    warm = provision(sortie)
    assert warm["self_test"] == cold["self_test"]

    selftest = tmp_path / "cache" / "selftest"
    (live,) = (p for p in selftest.glob(".navcache-scan-selftest-*") if not p.name.startswith(VIEW_MEMO_PREFIX))
    (live_views,) = selftest.glob(f"{VIEW_MEMO_PREFIX}*")
    assert json.loads(live.read_text())["view_memo_name"] == live_views.name
    stale = selftest / ".navcache-scan-selftest-0000"
    stale.write_text(json.dumps({"onboard_name": "queries-gone.npz", "view_memo_name": f"{VIEW_MEMO_PREFIX}0000"}))
    stale_views = selftest / f"{VIEW_MEMO_PREFIX}0000"
    stale_views.write_bytes(live_views.read_bytes())
    report = collect_garbage(tmp_path / "cache", ttl_days=None)
    removed = [item.path for item in report.removed]
    assert "selftest/.navcache-scan-selftest-0000" in removed and f"selftest/{stale_views.name}" in removed
    assert live.is_file() and live_views.is_file() and not stale.exists() and not stale_views.exists()


def test_a_re_provision_over_changed_imagery_renders_only_the_views_over_the_change(
    assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two 2 x 2 groups of z18 tiles 16 tiles apart (farther than a view's context reaches); then the
    # imagery under the second group changes in place, as a re-flown patch would
    centre = tile_for_lonlat(CENTER_LON, CENTER_LAT, 18)
    kept = [TileId(18, centre.x - 9 + dx, centre.y + dy) for dx in (0, 1) for dy in (0, 1)]
    changed = [TileId(18, centre.x + 7 + dx, centre.y + dy) for dx in (0, 1) for dy in (0, 1)]
    ortho = tmp_path / "ortho.tif"
    shutil.copy(assets.ortho, ortho)
    imagery = dataclasses.replace(assets, ortho=ortho)
    area = tiles_polygon(kept + changed)

    def sortie(cache: str) -> Path:
        return write_sortie(tmp_path / f"{cache}.toml", imagery, area=area, cache_dir=tmp_path / cache, extra=SELF_TEST)

    provision(sortie("cache"))
    west, south = tile_bounds(changed[0])[:2]
    east, north = tile_bounds(changed[-1])[2:]
    with rasterio.open(ortho, "r+") as ds:
        left, bottom, right, top = transform_bounds("EPSG:4326", ds.crs, west, south, east, north)
        window = ds.window(left, bottom, right, top).round_offsets().round_lengths()
        pixels = ds.read(window=window)
        ds.write(np.where(pixels == 0, 0, 255 - pixels).astype(np.uint8), window=window)  # nodata stays nodata

    rendered: list[tuple[int, int]] = []
    render_at = ViewRenderer.render_at

    def counting(renderer: ViewRenderer, chunk: TileId, params: ViewParams) -> tuple[np.ndarray, int]:
        rendered.append((chunk.x, chunk.y))
        return render_at(renderer, chunk, params)

    monkeypatch.setattr(ViewRenderer, "render_at", counting)
    incremental = provision(sortie("cache"))
    assert sorted(rendered) == sorted((t.x, t.y) for t in changed)  # the kept group's views came from the memo
    rendered.clear()
    fresh = provision(sortie("fresh"))
    assert len(rendered) == 8

    def figures(summary: dict) -> dict:
        return {k: v for k, v in summary["self_test"].items() if k != "seconds"}

    assert figures(incremental) == figures(fresh)
    assert predicate(tmp_path / "cache")["self_test"] == predicate(tmp_path / "fresh")["self_test"]
