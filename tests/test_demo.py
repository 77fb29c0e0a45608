"""Demo assets: a deterministic, georeferenced orthophoto; models with the declared interface; a sortie
file whose area the orthophoto covers at the configured zoom."""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from pathlib import Path

import morecantile
import numpy as np
import pytest
import rasterio
import rasterio.warp
from shapely.geometry import Point, shape

from navcache import demo
from navcache.demo import landscape
from navcache.demo import models as demo_models
from navcache.imagery import GeoTiffSource, is_blank
from navcache.types import TileId

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demo"
TMS = morecantile.tms.get("WebMercatorQuad")
SMALL = {"size_m": 360.0}  # ~600 px: fast, same code path as the 2.5 km default


@pytest.fixture(scope="module")
def small_ortho(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.generate_orthophoto(tmp_path_factory.mktemp("ortho") / "ortho.tif", **SMALL)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return demo.generate_demo_models(tmp_path_factory.mktemp("models"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Orthophoto


def test_orthophoto_is_byte_identical_for_the_same_seed(small_ortho: Path, tmp_path: Path) -> None:
    again = demo.generate_orthophoto(tmp_path / "again.tif", **SMALL)
    assert sha256(again) == sha256(small_ortho)
    other = demo.generate_orthophoto(tmp_path / "other.tif", seed=8, **SMALL)
    assert sha256(other) != sha256(small_ortho)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.tif", "other.tif"]  # no temp files left


def test_orthophoto_is_georeferenced_in_utm_with_a_nodata_border(small_ortho: Path) -> None:
    with rasterio.open(small_ortho) as ds:
        assert ds.crs.to_epsg() == 32632 and ds.crs.is_projected
        assert ds.count == 3 and ds.dtypes == ("uint8",) * 3 and ds.nodata == 0
        assert ds.profile["compress"] == "deflate" and ds.profile["tiled"]
        assert ds.res == pytest.approx((0.6, 0.6))
        assert ds.width == ds.height == 600
        (lon,), (lat,) = rasterio.warp.transform(
            ds.crs, "EPSG:4326", [(ds.bounds.left + ds.bounds.right) / 2], [(ds.bounds.bottom + ds.bounds.top) / 2]
        )
        assert lon == pytest.approx(11.575, abs=1e-5) and lat == pytest.approx(48.137, abs=1e-5)
        data = ds.read()
        valid = ds.dataset_mask()
    assert (data[:, :, -landscape.NODATA_BORDER_PX :] == 0).all()
    assert not valid[:, -landscape.NODATA_BORDER_PX :].any()
    assert valid[:, : -landscape.NODATA_BORDER_PX].all()  # 0 is reserved: no hole inside the image
    assert data.std() > 10  # textured, not a flat fill


def test_orthophoto_grid_matches_the_written_file(small_ortho: Path) -> None:
    grid = demo.orthophoto_grid(**SMALL)
    with rasterio.open(small_ortho) as ds:
        assert ds.transform.almost_equals(grid.transform)
        assert tuple(ds.bounds) == pytest.approx(grid.bounds)


def test_orthophoto_reads_as_textured_mercator_tiles(small_ortho: Path) -> None:
    t = TMS.tile(11.575, 48.137, 17)
    with GeoTiffSource(small_ortho) as source:
        tile = source.read_tile(TileId(17, t.x, t.y))
    assert tile is not None and tile.valid_fraction > 0.5 and not is_blank(tile)


def test_default_scene_stays_under_budget_in_size() -> None:
    grid = demo.orthophoto_grid()
    assert 4000 <= grid.width == grid.height <= 4200  # ~17 M px; the written file is ~21 MB


# --------------------------------------------------------------------------------------------------
# The sortie file


@pytest.fixture(scope="module")
def sortie() -> dict:
    with (EXAMPLE / "sortie.toml").open("rb") as handle:
        return tomllib.load(handle)


def test_sortie_points_at_the_generated_files(sortie: dict) -> None:
    assert sortie["orthophoto"]["geotiff"] == f"generated/{demo.ORTHO_NAME}"
    assert sortie["signing_key"] == f"generated/{demo.KEYS_DIR}/{demo.OPERATOR_KEY}"
    assert sortie["trusted_keys"] == f"generated/{demo.KEYS_DIR}/trusted_keys.json"
    assert sortie["runtime"] == "onnx_trt_ep" and sortie["cache_dir"] == "../../cache/demo"
    assert sortie["tiles"] | {"budget": None} == {
        "zoom": 17,
        "size": 256,
        "chunk_span": 1,
        "overlap": 0.0,
        "budget": None,
    }
    backbones = {b["name"]: b for b in sortie["backbones"]}
    assert backbones["tiny_vpr"]["onnx"] == f"generated/{demo.MODELS_DIR}/{demo_models.VPR_STEM}.onnx"
    assert backbones["tiny_vpr"]["role"] == "vpr" and backbones["tiny_vpr"]["shape"] == [16, 3, 128, 128]
    assert backbones["local_features"]["onnx"] == f"generated/{demo.MODELS_DIR}/{demo_models.LOCAL_STEM}.onnx"
    assert backbones["local_features"]["role"] == "local"
    assert backbones["local_features"]["shape"] == [1, 3, 128, 128]
    assert all(b["input"] == "image" for b in backbones.values())


def test_sortie_area_tiles_lie_inside_the_valid_orthophoto(sortie: dict) -> None:
    area = shape(json.loads(sortie["area"]["geojson"]))
    assert area.contains(Point(sortie["takeoff"]["lon"], sortie["takeoff"]["lat"]))
    zoom = sortie["tiles"]["zoom"]
    tiles = list(TMS.tiles(*area.bounds, [zoom]))
    assert 40 <= len(tiles) <= sortie["tiles"]["budget"]
    # Every tile touching the area must be fully valid in the default orthophoto (for 99 % coverage).
    grid = demo.orthophoto_grid()
    left, bottom, right, top = grid.bounds
    right -= (landscape.NODATA_BORDER_PX + 2) * grid.transform.a
    for t in tiles:
        xb = TMS.xy_bounds(t)
        x0, y0, x1, y1 = rasterio.warp.transform_bounds("EPSG:3857", grid.crs, *xb, densify_pts=21)
        assert left < x0 and x1 < right and bottom < y0 and y1 < top, t


# --------------------------------------------------------------------------------------------------
# Models


def test_models_run_in_onnxruntime_with_the_declared_outputs(models: dict[str, Path]) -> None:
    import onnxruntime as ort

    assert set(models) == {"tiny_vpr.onnx", "tiny_vpr.pt2", "local_features.onnx", "local_features.pt2"}
    image = np.random.default_rng(0).standard_normal((3, 3, 128, 128), dtype=np.float32)
    vpr = ort.InferenceSession(str(models["tiny_vpr.onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in vpr.get_inputs()] == ["image"]
    (descriptor,) = vpr.run(["descriptor"], {"image": image})
    assert descriptor.shape == (3, demo_models.VPR_DESCRIPTOR_DIM)
    np.testing.assert_allclose(np.linalg.norm(descriptor, axis=1), 1.0, rtol=1e-5)

    local = ort.InferenceSession(str(models["local_features.onnx"]), providers=["CPUExecutionProvider"])
    assert [o.name for o in local.get_outputs()] == ["heatmap", "features"]
    for batch in (1, 3):  # dynamic batch
        heatmap, features = local.run(None, {"image": image[:batch]})
        assert heatmap.shape == (batch, 1, 128, 128)
        assert features.shape == (batch, demo_models.LOCAL_DESCRIPTOR_DIM, 16, 16)
        assert heatmap.min() >= 0 and heatmap.max() <= 1
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-4)


def test_pt2_programs_match_the_onnx_models(models: dict[str, Path]) -> None:
    import onnxruntime as ort
    import torch

    image = np.random.default_rng(1).standard_normal((2, 3, 128, 128), dtype=np.float32)
    for stem in (demo_models.VPR_STEM, demo_models.LOCAL_STEM):
        program = torch.export.load(models[f"{stem}.pt2"]).module()
        with torch.no_grad():
            out = program(torch.from_numpy(image))
        torch_outputs = [out] if isinstance(out, torch.Tensor) else list(out)
        session = ort.InferenceSession(str(models[f"{stem}.onnx"]), providers=["CPUExecutionProvider"])
        for got, want in zip(torch_outputs, session.run(None, {"image": image}), strict=True):
            np.testing.assert_allclose(got.numpy(), want, atol=1e-4)


def test_models_present_and_valid_are_kept(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for path in models.values():
        shutil.copy(path, tmp_path)
    exported: list[str] = []
    monkeypatch.setattr(demo_models, "_export_atomically", lambda stem, directory: exported.append(stem))
    demo.generate_demo_models(tmp_path)
    assert exported == []
    (tmp_path / "local_features.onnx").write_bytes(b"truncated")
    (tmp_path / "tiny_vpr.pt2").unlink()
    demo.generate_demo_models(tmp_path)
    assert exported == ["tiny_vpr", "local_features"]


# --------------------------------------------------------------------------------------------------
# ensure_demo_assets


def test_ensure_demo_assets_is_idempotent_and_calls_the_key_hook_once(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Path] = []
    real_generate = demo.generate_orthophoto

    def small_generate(path: Path, **kwargs: object) -> Path:
        made.append(path)
        return real_generate(path, **SMALL)

    monkeypatch.setattr(demo, "generate_orthophoto", small_generate)
    target = tmp_path / "generated" / demo.MODELS_DIR
    target.mkdir(parents=True)
    for path in models.values():  # a fresh export costs ~10 s; the model tests cover it
        shutil.copy(path, target)

    def make_keys(keys_dir: Path) -> None:
        keys_dir.joinpath(demo.OPERATOR_KEY).write_text("key")
        keys_dir.joinpath("trusted_keys.json").write_text("{}")

    calls: list[Path] = []
    demo.ensure_demo_assets(tmp_path, make_keys=lambda d: (calls.append(d), make_keys(d)))
    ortho = tmp_path / "generated" / demo.ORTHO_NAME
    first = ortho.stat().st_mtime_ns
    demo.ensure_demo_assets(tmp_path, make_keys=lambda d: calls.append(d))
    assert made == [ortho] and ortho.stat().st_mtime_ns == first
    assert calls == [tmp_path / "generated" / demo.KEYS_DIR]
    demo.ensure_demo_assets(tmp_path)  # no hook: nothing to do, no error


def test_ensure_demo_assets_without_a_key_hook_leaves_keys_alone(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "generate_orthophoto", lambda path, **_: path.write_bytes(b"stub") or path)
    monkeypatch.setattr(demo, "generate_demo_models", lambda directory: {})
    demo.ensure_demo_assets(tmp_path)
    assert (tmp_path / "generated" / demo.ORTHO_NAME).read_bytes() == b"stub"
    assert not (tmp_path / "generated" / demo.KEYS_DIR).exists()
