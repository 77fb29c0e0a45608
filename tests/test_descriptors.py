"""Descriptor batching's scan memo: unchanged imagery is not decoded again, and nothing it remembers can
stand in for pixels that changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import navcache_runtime as nr
from navcache.descriptors import (
    SCAN_VERSION,
    ChunkReader,
    DescriptorEngine,
    Preprocessing,
    ScanMemo,
    ShardResult,
    describe_shard,
    load_shard,
)
from navcache.imagery import GeoTiffSource
from navcache.tiles import ChunkGrid, ShardPlan, plan_shards
from navcache.types import TileId
from navcache_runtime.coverage import DEFAULT_BLANK_STD, TileStatus
from navcache_runtime.integrity import SCAN_MEMO_PREFIX
from tests.conftest import TinyModel
from tests.support.sorties import Assets, block_tiles
from tests.support.sources import CountingSource


@pytest.fixture(scope="module")
def engine(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> DescriptorEngine:
    runtime = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(tmp_path_factory.mktemp("eng"))})
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    return DescriptorEngine(runtime, runtime.deserialize_engine(entry), "image", None, entry.sha256, 4)


GRID = ChunkGrid(18, 256)


def _plans() -> list[ShardPlan]:
    first, second = block_tiles()
    plans = plan_shards(first + second, 8)
    assert len(plans) == 2
    return plans


def _describe(
    assets: Assets,
    engine: DescriptorEngine,
    plan: ShardPlan,
    out: Path,
    *,
    digests: bool = True,
    ortho: Path | None = None,
    blank_std: float = DEFAULT_BLANK_STD,
) -> tuple[ShardResult, CountingSource]:
    progress: list[int] = []
    with GeoTiffSource(ortho or assets.ortho) as inner:
        source = CountingSource(inner, digests)
        result = describe_shard(
            plan,
            source=source,
            grid=GRID,
            engine=engine,
            preprocessing=Preprocessing(64, 64),
            out_dir=out,
            on_batch=progress.append,
            blank_std=blank_std,
        )
    assert sum(progress) == len(plan.chunks), progress  # the progress bar always ends at the shard's size
    return result, source


def _memo_entries(out: Path) -> list[Path]:
    return sorted(out.glob(f"{SCAN_MEMO_PREFIX}*"))


def test_an_unchanged_shard_is_reused_without_decoding_a_tile(
    assets: Assets, engine: DescriptorEngine, tmp_path: Path
) -> None:
    plan = _plans()[0]
    cold, cold_source = _describe(assets, engine, plan, tmp_path)
    assert cold.computed and cold.described == len(plan.chunks) == cold.inferred
    assert sorted(cold_source.reads) == sorted(plan.chunks)  # each chunk decoded once, scan and engine together
    assert len(_memo_entries(tmp_path)) == 1
    warm, warm_source = _describe(assets, engine, plan, tmp_path)
    assert warm_source.reads == []
    assert warm_source.digested == []  # the GeoTIFF blocks the memo names digest the same: no tile is planned
    assert not warm.computed and warm.batches == 0
    assert (warm.key, warm.descriptors_path, warm.described, warm.blank, warm.missing) == (
        cold.key,
        cold.descriptors_path,
        cold.described,
        cold.blank,
        cold.missing,
    )


def test_a_memo_never_vouches_for_a_damaged_shard_or_holds_garbage(
    assets: Assets, engine: DescriptorEngine, tmp_path: Path
) -> None:
    plan = _plans()[0]
    cold, _ = _describe(assets, engine, plan, tmp_path)
    good = np.load(cold.descriptors_path)
    cold.descriptors_path.write_bytes(cold.descriptors_path.read_bytes()[:-2] + b"\x00\x01")
    again, source = _describe(assets, engine, plan, tmp_path)
    assert again.computed and source.reads and again.key == cold.key
    assert np.array_equal(np.load(again.descriptors_path), good)
    (memo,) = _memo_entries(tmp_path)
    written = memo.read_bytes()
    memo.write_text("not a scan memo")
    third, source = _describe(assets, engine, plan, tmp_path)
    assert source.reads and not third.computed and third.key == cold.key  # scanned, then reused by content
    assert memo.read_bytes() == written  # and the entry is repaired


def test_a_source_that_cannot_digest_is_always_scanned(
    assets: Assets, engine: DescriptorEngine, tmp_path: Path
) -> None:
    plan = _plans()[0]
    cold, source = _describe(assets, engine, plan, tmp_path, digests=False)
    assert cold.computed and len(source.reads) == 2 * len(plan.chunks)  # scanned, then re-read for the engine
    warm, source = _describe(assets, engine, plan, tmp_path, digests=False)
    assert not warm.computed and warm.batches == 0 and len(source.reads) == len(plan.chunks)
    assert _memo_entries(tmp_path) == []


def test_editing_imagery_under_one_shard_rescans_only_that_shard(
    assets: Assets, engine: DescriptorEngine, tmp_path: Path
) -> None:
    import rasterio
    from rasterio.warp import transform

    from navcache.tiles import tile_bounds

    ortho = tmp_path / "ortho.tif"
    ortho.write_bytes(assets.ortho.read_bytes())
    first_plan, second_plan = _plans()
    out = tmp_path / "desc"
    before = [_describe(assets, engine, p, out, ortho=ortho)[0] for p in (first_plan, second_plan)]
    # Far corner of the second shard's last tile: GDAL rewrites only the source blocks under it.
    w, s, e, n = tile_bounds(second_plan.chunks[-1])
    with rasterio.open(ortho, "r+") as ds:
        (x,), (y,) = transform("EPSG:4326", ds.crs, [e - (e - w) * 0.2], [s + (n - s) * 0.2])
        row, col = ds.index(x, y)
        noise = np.random.default_rng(3).integers(1, 256, (ds.count, 8, 8), dtype=np.uint8)
        ds.write(noise, window=rasterio.windows.Window(col, row, 8, 8))
    first_again, first_source = _describe(assets, engine, first_plan, out, ortho=ortho)
    second_again, second_source = _describe(assets, engine, second_plan, out, ortho=ortho)
    assert first_source.reads == [] and first_again.key == before[0].key
    assert first_source.digested == []  # none of the blocks its memo names moved
    assert second_source.reads and second_again.computed and second_again.key != before[1].key
    assert set(second_source.digested) == set(second_plan.chunks)  # a block moved: every tile digested again
    # Only chunks over the rewritten source blocks were decoded, and only changed pixels ran the engine.
    assert set(second_source.reads) < set(second_plan.chunks)
    assert 1 <= second_again.inferred < second_again.described
    # The same shard as a from-scratch run without any memo (batch composition may move the last float16 bit).
    scratch, _ = _describe(assets, engine, second_plan, tmp_path / "scratch", ortho=ortho, digests=False)
    assert scratch.key == second_again.key and scratch.inferred == scratch.described
    np.testing.assert_allclose(
        np.load(second_again.descriptors_path).astype(np.float32),
        np.load(scratch.descriptors_path).astype(np.float32),
        atol=2e-3,
    )


def test_nothing_is_remembered_when_the_source_changes_during_the_scan(
    assets: Assets, engine: DescriptorEngine, tmp_path: Path
) -> None:
    class EditedMidScan(CountingSource):
        def raw_digest(self, tile: TileId) -> str | None:
            digest = super().raw_digest(tile)
            return None if digest is None or not self.reads else digest + "-edited"

    plan = _plans()[0]
    with GeoTiffSource(assets.ortho) as inner:
        result = describe_shard(
            plan,
            source=EditedMidScan(inner),
            grid=GRID,
            engine=engine,
            preprocessing=Preprocessing(64, 64),
            out_dir=tmp_path,
        )
    assert result.computed
    assert _memo_entries(tmp_path) == []


@pytest.mark.parametrize("size", [64, 256])
def test_preprocessing_table_is_bit_identical_to_the_formula(size: int) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rgb[0, :256, :] = np.arange(256, dtype=np.uint8)[:, None]  # every level in every channel
    prep = Preprocessing(size, size)
    resized = rgb if size == 256 else np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
    scaled = resized.astype(np.float32) * np.float32(1.0 / 255.0)
    formula = ((scaled - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)).transpose(2, 0, 1)
    got = prep(rgb)
    assert got.dtype == np.float32 and got.shape == (3, size, size) and got.flags.c_contiguous
    assert np.array_equal(got, formula)
    out = np.zeros((2, 3, size, size), np.float32)
    prep(rgb, out=out[1])
    assert np.array_equal(out[1], formula) and not out[0].any()


def test_normalise_of_the_resized_frame_is_the_whole_preprocessing_and_refuses_another_size() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    for prep in (Preprocessing(64, 96), Preprocessing(64, 96, resize="pad", channels="BGR", layout="NHWC")):
        assert np.array_equal(prep.normalise(prep.resized(rgb)), prep(rgb))
        out = np.full((2, *prep.input_shape(1)[1:]), np.nan, np.float32)
        prep.normalise(prep.resized(rgb), out=out[0])
        assert np.array_equal(out[0], prep(rgb)) and np.isnan(out[1]).all()
    with pytest.raises(nr.InferenceError, match="64x96 frame, got 200x300"):
        Preprocessing(64, 96).normalise(rgb)


class _RecordingRuntime:
    """The real runtime, keeping every batch it was handed (the arrays themselves and a copy)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.handed: list[np.ndarray] = []
        self.copies: list[np.ndarray] = []

    def infer(self, handle: object, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.handed.append(inputs["image"])
        self.copies.append(inputs["image"].copy())
        return self.inner.infer(handle, inputs)  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("digests", [True, False], ids=["single pass", "scan then re-read"])
def test_the_engine_sees_each_described_chunk_preprocessed_in_order_in_batches_never_reused(
    tmp_path: Path, assets: Assets, engine: DescriptorEngine, digests: bool
) -> None:
    recording = _RecordingRuntime(engine.runtime)
    watched = DescriptorEngine(recording, engine.handle, engine.input_name, None, engine.identity, batch_size=3)
    plan = _plans()[0]
    result, _ = _describe(assets, watched, plan, tmp_path, digests=digests)
    _, table = load_shard(result)
    described = [TileId(int(r["z"]), int(r["x"]), int(r["y"])) for r in table if r["status"] == TileStatus.DESCRIBED]
    prep = Preprocessing(64, 64)
    with GeoTiffSource(assets.ortho) as source:
        reader = ChunkReader(source, GRID)
        expected = [prep(tile.rgb) for chunk in described if (tile := reader.read(chunk)) is not None]
    assert len(expected) == len(described) == 4
    assert [len(b) for b in recording.copies] == [3, 1]
    assert np.array_equal(np.concatenate(recording.copies), np.stack(expected))
    # A batch the engine was handed is never written again while later batches fill.
    assert all(np.array_equal(a, b) for a, b in zip(recording.handed, recording.copies, strict=True))


def test_the_blank_threshold_decides_statuses_and_keeps_its_own_memo(
    assets: Assets, engine: DescriptorEngine, tmp_path: Path
) -> None:
    """[orthophoto] blank_std: a contrast floor no chunk reaches makes every chunk blank (TileStatus.BLANK, the
    coverage table's code), under another shard key and memo; the default rule's memo still serves it."""
    plan = _plans()[0]
    normal, _ = _describe(assets, engine, plan, tmp_path)
    strict, strict_source = _describe(assets, engine, plan, tmp_path, blank_std=200.0)
    assert strict_source.reads  # a memo of another blank rule is not trusted for statuses
    assert (strict.described, strict.blank, strict.missing) == (0, len(plan.chunks), 0)
    assert strict.key != normal.key and len(_memo_entries(tmp_path)) == 2
    descriptors, table = load_shard(strict)
    assert len(descriptors) == 0 and set(table["status"].tolist()) == {TileStatus.BLANK} == {2}
    _, table = load_shard(normal)
    assert set(table["status"].tolist()) == {TileStatus.DESCRIBED} == {TileStatus.COVERED}
    again, source = _describe(assets, engine, plan, tmp_path)
    assert source.reads == [] and again.key == normal.key


def test_a_memo_of_an_older_status_encoding_is_never_read() -> None:
    """A memo of another scan version is never read: its status codes may mean other statuses (a memo with
    blank = 1 and missing = 2, read as this version, would swap them)."""
    rows = [["d" * 64, 1, "-"]]
    key = "a" * 64
    old = json.dumps({"version": "navcache-scan-v2", "key": key, "rows": rows}).encode()
    assert ScanMemo.from_json(old) is None
    assert ScanMemo.from_json(old.replace(b"navcache-scan-v2", SCAN_VERSION.encode())) is not None
