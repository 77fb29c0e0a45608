"""The self-test as a library (navcache.selftest): real tiles, a real compiled engine, a real FAISS index.

Healthy, constant and upsampled-until-flat cases; determinism; the onboard query set."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds
from shapely.geometry import box

from navcache.descriptors import DESCRIBED, ChunkReader, DescriptorEngine, classify
from navcache.imagery import open_tile_source
from navcache.index_build import build_index
from navcache.selftest import (
    SelfTestConfig,
    SelfTestResult,
    ViewMemo,
    ViewParams,
    ViewRenderer,
    run_self_test,
    sample_chunks,
)
from navcache.tiles import ChunkGrid
from navcache.types import TileId
from navcache_runtime import BuildConfig, InputProfile, RuntimeConfig, build_inference_runtime
from navcache_runtime.index import load_index, load_tile_table
from navcache_runtime.preprocessing import Preprocess
from navcache_runtime.selftest import load_queries
from tests.support.realistic import coarse_orthophoto
from tests.support.selftest_models import constant, first_channel, thumbnail
from tests.support.sorties import CENTER_LAT, CENTER_LON, Assets

HALF = 0.006  # degrees: ~900 m x 1300 m around the centre, about 50 z17 tiles


@dataclass
class Built:
    source: Any
    grid: ChunkGrid
    chunks: np.ndarray
    descriptors: np.ndarray
    index: Any
    table: np.ndarray
    engine: DescriptorEngine
    preprocess: Preprocess
    blank_fraction: float


def build(model: Path, ortho: Path, tmp: Path, zoom: int = 17, half: float = HALF, **options: Any) -> Built:
    """Describe every chunk of the area with the compiled engine and index them, as a provision would."""
    runtime = build_inference_runtime(RuntimeConfig(runtime="onnx_trt_ep", engine_dir=tmp / "engines"))
    profile = InputProfile("image", (1, 3, 128, 128), (8, 3, 128, 128), (16, 3, 128, 128))
    entry = runtime.compile_engine(model, BuildConfig(input_shapes=(profile,), model_name=model.stem))
    engine = DescriptorEngine(runtime, runtime.deserialize_engine(entry), "image", None, entry.sha256, 16)
    preprocess = Preprocess.for_input_shape(profile.opt, **options)  # channels="BGR", ...: as a sortie declares
    source = open_tile_source("geotiff", ortho)
    grid = ChunkGrid(zoom)
    area = box(CENTER_LON - half, CENTER_LAT - half, CENTER_LON + half, CENTER_LAT + half)
    reader = ChunkReader(source, grid)
    chunks, images, blank = [], [], 0
    for chunk in grid.chunks_for_area(area):
        tile = reader.read(chunk)
        if classify(tile) == DESCRIBED:
            assert tile is not None
            chunks.append((chunk.x, chunk.y))
            images.append(preprocess(np.where(tile.valid[:, :, None], tile.rgb, 0).astype(np.uint8)))
        else:
            blank += 1
    xy = np.asarray(chunks, np.int64)
    rows = np.concatenate([engine.describe(np.stack(images[i : i + 16])) for i in range(0, len(images), 16)])
    ids = np.column_stack([np.full(len(xy), zoom), xy])
    result = build_index(rows, ids, grid.chunk_bounds_array(xy), tmp / "index")
    index, table = load_index(result.index_path, mmap=False), load_tile_table(result.table_path)
    return Built(source, grid, xy, rows, index, table, engine, preprocess, blank / max(1, blank + len(xy)))


def self_test(
    built: Built,
    out_dir: Path | None = None,
    *,
    upsampling: float | None = None,
    view_memo: ViewMemo | None = None,
    **options: Any,
) -> SelfTestResult:
    return run_self_test(
        source=built.source,
        grid=built.grid,
        chunks=built.chunks,
        descriptors=built.descriptors,
        index=built.index,
        table=built.table,
        describe=built.engine.describe,
        preprocess=built.preprocess,
        config=SelfTestConfig(**{"samples": 48, **options}),
        out_dir=out_dir,
        upsampling=upsampling,
        blank_fraction=built.blank_fraction,
        view_memo=view_memo,
    )


@pytest.fixture(scope="module")
def healthy(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("healthy")
    return build(thumbnail(tmp / "thumbnail.onnx"), assets.ortho, tmp)


def test_a_healthy_model_finds_its_tiles_and_the_space_is_not_collapsed(healthy: Built, tmp_path: Path) -> None:
    result = self_test(healthy, tmp_path / "selftest")
    assert result.samples == min(48, len(healthy.chunks)) == 40  # fewer chunks than samples: all of them
    assert result.recall_at_5 >= 0.8 and result.near_recall_at_5 >= 0.95, result.summary()
    assert result.recall_at_1 <= result.recall_at_5 and result.near_recall_at_1 >= result.recall_at_1
    assert not result.collapsed and result.finding.startswith("healthy"), result.finding
    assert result.passed


def test_the_same_inputs_give_the_same_figures(healthy: Built) -> None:
    first, second = self_test(healthy), self_test(healthy)
    assert {k: v for k, v in first.summary().items() if k != "seconds"} == {
        k: v for k, v in second.summary().items() if k != "seconds"
    }
    assert first.preview_png == second.preview_png and first.preview_png.startswith(b"\x89PNG")
    other_seed = self_test(healthy, seed=5)
    assert other_seed.summary() != first.summary()


def test_min_recall_at_5_decides_passed(healthy: Built) -> None:
    assert self_test(healthy, min_recall_at_5=0.5).passed
    assert not self_test(healthy, min_recall_at_5=1.0, max_rotation_deg=180.0, max_offset=1.0).passed


def test_a_constant_model_is_named_as_a_collapsed_space(assets: Assets, tmp_path: Path) -> None:
    built = build(constant(tmp_path / "constant.onnx"), assets.ortho, tmp_path)
    result = self_test(built)
    assert result.collapsed and "constant output" in result.finding, result.finding
    assert result.random_pair_cosine > 0.999


def test_imagery_upsampled_until_flat_is_a_collapsed_space_blamed_on_upsampling(assets: Assets, tmp_path: Path) -> None:
    # 130 m per pixel seen at zoom 17 (~0.8 m per pixel), as a crew's coarse orthophoto was: every tile is a
    # smooth, nearly flat gradient, and a CNN backbone (the demo's) describes them all alike
    ortho = coarse_orthophoto(
        tmp_path / "coarse.tif",
        west=CENTER_LON - 0.5,
        south=CENTER_LAT - 0.5,
        east=CENTER_LON + 0.5,
        north=CENTER_LAT + 0.5,
        m_per_px=130.0,
        ragged=False,
    )
    flat = self_test(build(assets.vpr_onnx, ortho, tmp_path / "flat"), upsampling=162.0)
    assert flat.collapsed and "likely cause: upsampling" in flat.finding, flat.finding
    sharp = self_test(build(assets.vpr_onnx, assets.ortho, tmp_path / "sharp"))
    assert not sharp.collapsed, sharp.finding
    assert flat.recall_at_5 < sharp.recall_at_5


def test_shuffled_channels_collapse_the_space(assets: Assets, tmp_path: Path) -> None:
    # The demo's imagery with its blue channel made nearly flat (within one grey level); a model that reads red
    ortho = tmp_path / "ortho.tif"
    shutil.copy(assets.ortho, ortho)
    with rasterio.open(ortho, "r+") as ds:
        blue = 90 + np.random.default_rng(0).integers(0, 2, (ds.height, ds.width))
        ds.write(np.where(ds.read(3) == 0, 0, blue).astype(np.uint8), 3)  # nodata stays nodata
    model = first_channel(tmp_path / "red.onnx")
    right = self_test(build(model, ortho, tmp_path / "rgb"))
    wrong = self_test(build(model, ortho, tmp_path / "bgr", channels="BGR"))
    assert not right.collapsed and right.recall_at_5 >= 0.6, right.summary()
    assert wrong.collapsed and "channel order" in wrong.finding and wrong.recall_at_5 < 0.2, wrong.summary()
    assert wrong.recall_at_5 < right.recall_at_5


def test_the_onboard_query_set_is_small_signed_material(healthy: Built, tmp_path: Path) -> None:
    result = self_test(healthy, tmp_path / "selftest", onboard_samples=16)
    assert result.onboard_path is not None and result.onboard_path.parent == tmp_path / "selftest"
    assert result.onboard_path.stat().st_size < 1 << 20
    assert result.onboard_path.with_name(result.onboard_path.name + ".sha256").is_file()
    views, expected = load_queries(result.onboard_path.read_bytes(), 16, result.onboard_path.name)
    assert views.shape == (16, 128, 128, 3) and expected.shape == (16, 2)
    assert 0 < result.onboard_min_hits_at_5 <= 16
    assert result.manifest_fields("selftest/x.npz")["onboard"] == {
        "path": "selftest/x.npz",
        "queries": 16,
        "min_hits_at_5": result.onboard_min_hits_at_5,
    }
    again = self_test(healthy, tmp_path / "selftest", onboard_samples=16)
    assert again.onboard_path == result.onboard_path  # content-addressed and deterministic


def test_stratified_sampling_spreads_over_the_area_and_takes_all_when_few() -> None:
    xy = np.array([(x, y) for y in range(20) for x in range(20)])
    assert sorted(sample_chunks(xy[:10], 256, 0)) == list(range(10))
    picked = xy[sample_chunks(xy, 20, 0)]
    assert len({tuple(p) for p in picked}) == 20
    assert sorted(set(picked[:, 1])) == list(range(20))  # one per row of the grid: stratified in (y, x) order


def figures(result: SelfTestResult) -> dict[str, Any]:
    """What a memoised run must reproduce exactly: every figure, the onboard set and the preview."""
    summary = {k: v for k, v in result.summary().items() if k != "seconds"}
    onboard = result.onboard_path.name if result.onboard_path is not None else None
    return {**summary, "onboard": onboard, "preview": result.preview_png}


def test_the_per_view_memo_renders_only_the_views_over_changed_imagery(
    assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole demo orthophoto at z17 (~12 x 12 chunks); then one corner chunk's imagery changes
    model = thumbnail(tmp_path / "thumbnail.onnx")
    before_ortho, after_ortho = tmp_path / "before.tif", tmp_path / "after.tif"
    shutil.copy(assets.ortho, before_ortho)
    shutil.copy(assets.ortho, after_ortho)
    options = {"samples": 64, "onboard_samples": 8}
    before = build(model, before_ortho, tmp_path / "before", half=0.02)
    memo_dir = tmp_path / "memo"
    cold = self_test(before, memo_dir, view_memo=ViewMemo(memo_dir, "thumbnail"), **options)
    assert cold.views_rendered == cold.samples == 64 and cold.view_memo_name is not None
    warm = self_test(before, memo_dir, view_memo=ViewMemo(memo_dir, "thumbnail"), **options)
    assert warm.views_rendered == 0 and figures(warm) == figures(cold)
    assert warm.view_memo_name == cold.view_memo_name  # content-addressed

    corner = before.chunks[np.lexsort((before.chunks[:, 0], before.chunks[:, 1]))[-1]]
    west, south, east, north = before.grid.chunk_bounds(TileId(17, int(corner[0]), int(corner[1])))
    with rasterio.open(after_ortho, "r+") as ds:
        left, bottom, right, top = transform_bounds("EPSG:4326", ds.crs, west, south, east, north)
        window = ds.window(left, bottom, right, top).round_offsets().round_lengths()
        pixels = ds.read(window=window)
        ds.write(np.where(pixels == 0, 0, 255 - pixels).astype(np.uint8), window=window)  # nodata stays nodata
    after = build(model, after_ortho, tmp_path / "after", half=0.02)
    rendered: list[tuple[int, int]] = []
    render_at = ViewRenderer.render_at

    def counting(renderer: ViewRenderer, chunk: TileId, params: ViewParams) -> tuple[np.ndarray, int]:
        rendered.append((chunk.x, chunk.y))
        return render_at(renderer, chunk, params)

    monkeypatch.setattr(ViewRenderer, "render_at", counting)
    incremental = self_test(after, memo_dir, view_memo=ViewMemo(memo_dir, "thumbnail"), **options)
    assert incremental.views_rendered == len(rendered)
    assert 0 < len(rendered) < 64 // 2, rendered  # the views near the changed corner only
    assert all(max(abs(x - int(corner[0])), abs(y - int(corner[1]))) <= 6 for x, y in rendered), rendered
    rendered.clear()
    fresh = self_test(after, tmp_path / "fresh", **options)
    assert len(rendered) == 64
    assert figures(incremental) == figures(fresh)
