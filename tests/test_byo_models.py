"""Bring-your-own backbones as crews bring them (a ViT-S/14-like model, channels-last input, unnormalised
output, two outputs, a fixed batch): the declared preprocessing is one definition on the ground and onboard,
signed into the manifest; preflight refuses in about a second what would fail later; huge outputs still give
valid float16 descriptors."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import navcache_runtime as nr
from navcache.descriptors import DescriptorEngine, Preprocessing, l2_normalise
from navcache.errors import ProvisionError, SortieError
from navcache.imagery import open_tile_source
from navcache.manifest import build_statement
from navcache.model_checks import validate_models
from navcache.preflight import preflight
from navcache.sortie import load_sortie
from navcache_runtime.preprocessing import CHANNEL_ORDERS, LAYOUTS, RESIZE_MODES, SCALES, Preprocess
from navcache_runtime.verify import FailureCode
from tests.support.byo_models import vit_like
from tests.support.cli import navcache
from tests.support.sortie_files import write_document
from tests.support.sorties import Assets, block_tiles, tiles_polygon
from tests.test_manifest import AREA, EXPIRES, HOST, ISSUED, TAKEOFF, make_cache

# --- the preprocessing contract ------------------------------------------------------------------------------


def _frame(height: int = 300, width: int = 211, seed: int = 3) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rgb[0, : min(width, 256)] = np.arange(min(width, 256), dtype=np.uint8)[:, None]  # many levels per channel
    return rgb


@pytest.mark.parametrize(
    ("resize", "scale", "channels", "layout"), list(itertools.product(RESIZE_MODES, SCALES, CHANNEL_ORDERS, LAYOUTS))
)
def test_ground_and_onboard_preprocessing_are_identical_for_every_option(
    resize: str, scale: str, channels: str, layout: str
) -> None:
    declared = Preprocessing(96, 160, resize=resize, scale=scale, channels=channels, layout=layout)
    onboard = Preprocess.from_signed(json.loads(json.dumps(declared.to_signed())))  # through the manifest
    assert onboard == declared and onboard.spec() == declared.spec()
    for rgb in (_frame(), _frame(160, 400, seed=4), _frame(96, 160, seed=5)):
        ground = declared(rgb)
        assert ground.dtype == np.float32 and ground.shape == declared.input_shape(1)[1:]
        assert np.array_equal(onboard(rgb), ground)
        assert np.array_equal(declared.formula(rgb), ground)  # the table is the per-pixel arithmetic, bit for bit
        batch = np.zeros((2, *ground.shape), np.float32)
        declared(rgb, out=batch[1])
        assert np.array_equal(batch[1], ground) and not batch[0].any()


def test_every_option_is_part_of_the_shard_key() -> None:
    combos = list(itertools.product(RESIZE_MODES, SCALES, CHANNEL_ORDERS, LAYOUTS))
    specs = {Preprocess(96, 160, resize=r, scale=s, channels=c, layout=lay).spec() for r, s, c, lay in combos}
    assert len(specs) == len(combos)
    assert Preprocess(96, 160, mean=(0.5, 0.5, 0.5)).spec() != Preprocess(96, 160).spec()


def test_each_option_does_what_it_says() -> None:
    rgb = _frame()
    base = Preprocess(96, 160)
    nchw = base(rgb)
    assert np.array_equal(Preprocess(96, 160, layout="NHWC")(rgb), nchw.transpose(1, 2, 0))
    assert np.array_equal(
        Preprocess(96, 160, channels="BGR", mean=base.mean[::-1], std=base.std[::-1])(rgb), nchw[::-1]
    )
    byte = Preprocess(96, 160, scale="byte")
    assert byte.mean == (123.675, 116.28, 103.53) and byte.std == (58.395, 57.12, 57.375)
    np.testing.assert_allclose(byte(rgb), nchw, atol=1e-5)  # ImageNet x 255 on the byte scale: the same values
    raw = Preprocess(96, 160, scale="byte", mean=(0, 0, 0), std=(1, 1, 1))(rgb)
    assert np.array_equal(raw, base.resized(rgb).transpose(2, 0, 1).astype(np.float32))  # the 8-bit levels as is
    # A 300 x 211 frame into a 96 x 160 input: crop keeps the centre rows, pad adds black bars left and right.
    crop_h = (211 * 96 + 80) // 160
    top = (300 - crop_h) // 2
    cropped = np.asarray(
        Image.fromarray(np.ascontiguousarray(rgb[top : top + crop_h])).resize((160, 96), Image.BILINEAR)
    )
    assert np.array_equal(Preprocess(96, 160, resize="center_crop").resized(rgb), cropped)
    padded = Preprocess(96, 160, resize="pad").resized(rgb)
    assert not padded[:, :20].any() and not padded[:, -20:].any() and padded[:, 60:100].any()


def test_default_preprocessing_is_unchanged() -> None:
    prep = Preprocessing(128, 128)
    assert prep.is_default and prep == Preprocess(128, 128)
    # The default's shard-key text carries no preprocess options, so shards described with the defaults keep
    # their keys (and stay reusable) whatever options other sorties declare.
    assert prep.spec() == "v1|rgb|bilinear|128x128|mean=(0.485, 0.456, 0.406)|std=(0.229, 0.224, 0.225)"
    rgb = _frame(256, 256)
    resized = np.asarray(Image.fromarray(rgb).resize((128, 128), Image.Resampling.BILINEAR)).astype(np.float32)
    old = (
        (resized * np.float32(1 / 255) - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    ).transpose(2, 0, 1)
    assert np.array_equal(prep(rgb), old)
    assert np.array_equal(nr.preprocess(rgb, 128, 128), old)  # the onboard function of the same name


def test_signed_preprocessing_holds_integers_only_and_keeps_every_digit() -> None:
    prep = Preprocess(224, 224, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    signed = prep.to_signed()
    assert signed["mean_e6"] == [481455, 457828, 408211] and signed["std_e6"] == [268630, 261303, 275777]
    assert all(not isinstance(v, float) for v in json.loads(json.dumps(signed), parse_float=lambda t: t).values())
    assert prep.mean == (0.481455, 0.457828, 0.408211)  # quantised up front: the ground uses what the drone reads
    assert Preprocess.from_signed(signed) == prep
    for bad, problem in (
        ({**signed, "layout": "CHW"}, "layout 'CHW' is not one of: NCHW, NHWC"),
        ({**signed, "std_e6": [1, 0, 1]}, "std must be positive"),
        ({**signed, "mean_e6": [1, 2]}, "mean_e6 must be 3 integers"),
        ({k: v for k, v in signed.items() if k != "width"}, "missing field(s) width"),
    ):
        with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            Preprocess.from_signed(bad)


def test_a_malformed_signed_preprocess_block_is_refused(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    statement = copy.deepcopy(cache.statement)
    statement["predicate"]["preprocess"] = {"vpr": {**Preprocess(8, 8).to_signed(), "scale": "percent"}}
    cache.resign(statement)
    report = cache.verify()
    assert not report.ok and report.codes == {FailureCode.PREPROCESS_INVALID}
    assert "scale 'percent' is not one of: unit, byte" in str(report.failures[0])
    statement["predicate"]["preprocess"] = {"vpr": Preprocess(8, 8, layout="NHWC").to_signed()}
    cache.resign(statement)
    report = cache.verify()
    assert report.ok and Preprocess.from_signed(report.preprocess["vpr"]) == Preprocess(8, 8, layout="NHWC")


def test_build_statement_records_the_preprocessing_as_integers(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    statement = build_statement(
        cache.root,
        sorted(cache.artifacts),
        sortie_id="byo",
        takeoff=TAKEOFF,
        area_geojson=AREA,
        host=HOST,
        coverage=cache.statement["predicate"]["coverage"],
        version=2,
        issued_at=ISSUED,
        expires=EXPIRES,
        tool_version="test",
        preprocess={"vit": Preprocess(224, 224, scale="byte", channels="BGR")},
    )
    assert statement["predicate"]["preprocess"] == {
        "vit": {
            "resize": "squash",
            "mean_e6": [123675000, 116280000, 103530000],
            "std_e6": [58395000, 57120000, 57375000],
            "scale": "byte",
            "channels": "BGR",
            "layout": "NCHW",
            "height": 224,
            "width": 224,
        }
    }


# --- preflight: refused in about a second -------------------------------------------------------------------


def _sortie(
    tmp_path: Path,
    assets: Assets,
    model: Path,
    *,
    shape: list[int] | None = None,
    profile: dict[str, list[int]] | None = None,
    preprocess: dict[str, Any] | None = None,
    precision: str = "fp32",
    output: str | None = None,
    runtime: str = "onnx_trt_ep",
    tiles: list[Any] | None = None,
    zoom: int = 18,
) -> Path:
    area = tiles_polygon(tiles or block_tiles()[0])
    first = area["coordinates"][0][0][0]
    backbone: dict[str, Any] = {"name": "vit_s14", "onnx": str(model), "role": "vpr", "precision": precision}
    if shape is not None:
        backbone["shape"] = shape
    if output is not None:
        backbone["output"] = output
    if profile is not None:
        backbone["profile"] = profile
    if preprocess is not None:
        backbone["preprocess"] = preprocess
    doc = {
        "sortie_id": f"byo-{tmp_path.name[:40]}",
        "runtime": runtime,
        "cache_dir": str(tmp_path / "cache"),
        "signing_key": str(assets.signing_key),
        "trusted_keys": str(assets.trusted_keys),
        "expires_hours": 24,
        "takeoff": {"lat": first[1] + 2e-4, "lon": first[0] + 2e-4},
        "area": {"geojson": json.dumps(area)},
        "tiles": {"zoom": zoom, "shard_block": 8},
        "orthophoto": {"geotiff": str(assets.ortho)},
        "descriptors": {"batch_size": 8},
        "backbones": [backbone],
    }
    return write_document(tmp_path / "sortie.toml", doc)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byo")
    return {
        "vit": vit_like(root / "vit.onnx"),
        "nhwc": vit_like(root / "nhwc.onnx", layout="NHWC"),
        "two": vit_like(root / "two.onnx", outputs="features_first"),
        "features": vit_like(root / "features.onnx", outputs="features"),
        "fixed8": vit_like(root / "fixed8.onnx", batch=8),
        "huge": vit_like(root / "huge.onnx", gain=1e6),
        "small_nhwc_huge": vit_like(root / "small.onnx", size=112, layout="NHWC", gain=1e6),
    }


def _refused(sortie: Path) -> SortieError:
    started = time.perf_counter()
    with pytest.raises(SortieError) as info:
        preflight(sortie)
    assert time.perf_counter() - started < 5.0  # about a second on 2 busy cores; nothing written
    assert not (sortie.parent / "cache").exists()
    return info.value


def test_an_nhwc_shape_for_an_nchw_model_is_refused(tmp_path: Path, assets: Assets, models: dict[str, Path]) -> None:
    error = _refused(_sortie(tmp_path, assets, models["vit"], shape=[8, 224, 224, 3]))
    assert error.where == "sortie.toml [[backbones]][0].shape"
    assert error.message == (
        "backbone 'vit_s14': shape [8, 224, 224, 3] has 224 channels on axis 1, but layout NCHW (the default) "
        "puts the 3 image channels there; the shape is NHWC"
    )
    assert error.hint == (
        'for an NCHW model give shape = [8, 3, 224, 224]; for an NHWC model declare layout = "NHWC" in '
        "[backbones.preprocess]"
    )
    # Declaring NHWC for a model that is NCHW is caught against the model's own dims.
    error = _refused(_sortie(tmp_path, assets, models["vit"], shape=[8, 224, 224, 3], preprocess={"layout": "NHWC"}))
    assert error.where == "sortie.toml [[backbones]][0].preprocess.layout"
    assert error.message == (
        "backbone 'vit_s14': the model's input 'image' is [N, 3, 224, 224], channels on axis 1 (NCHW), but the "
        "sortie declares layout NHWC with shape [8, 224, 224, 3]"
    )
    assert error.hint == 'remove layout = "NHWC" (the model is NCHW) and give shape = [8, 3, 224, 224]'
    # And an NHWC model without the declaration.
    error = _refused(_sortie(tmp_path, assets, models["nhwc"], shape=[8, 3, 224, 224]))
    assert error.message == (
        "backbone 'vit_s14': the model's input 'image' is [N, 224, 224, 3], channels on axis 3 (NHWC), but the "
        "sortie declares layout NCHW with shape [8, 3, 224, 224]"
    )
    assert error.hint == 'declare layout = "NHWC" in [backbones.preprocess] and give shape = [8, 224, 224, 3]'


def test_a_feature_map_output_is_refused_naming_the_outputs(
    tmp_path: Path, assets: Assets, models: dict[str, Path]
) -> None:
    error = _refused(_sortie(tmp_path, assets, models["two"], shape=[8, 3, 224, 224]))
    assert error.where == "sortie.toml [[backbones]][0].output"
    assert error.message == (
        "backbone 'vit_s14': the first output (no output set) 'features' is [N, 64, 16, 16], but a descriptor "
        "must be [N, D]; the model's outputs: 'features' [N, 64, 16, 16], 'descriptor' [N, 384]"
    )
    assert error.hint == 'set output = "descriptor" in sortie.toml [[backbones]][0]'
    assert validate_models(
        load_sortie(_sortie(tmp_path, assets, models["two"], shape=[8, 3, 224, 224], output="descriptor"))
    )
    error = _refused(_sortie(tmp_path, assets, models["two"], shape=[8, 3, 224, 224], output="features"))
    assert error.message.startswith("backbone 'vit_s14': the descriptor output 'features' is [N, 64, 16, 16]")
    error = _refused(_sortie(tmp_path, assets, models["features"], shape=[8, 3, 224, 224]))
    assert (
        error.hint == "export the model with an [N, D] descriptor output (pool or flatten the feature map in the graph)"
    )


def test_fp16_without_a_gpu_provider_is_refused(tmp_path: Path, assets: Assets, models: dict[str, Path]) -> None:
    import onnxruntime as ort

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this host has a GPU provider")
    error = _refused(_sortie(tmp_path, assets, models["vit"], shape=[8, 3, 224, 224], precision="fp16"))
    assert error.where == "sortie.toml [[backbones]][0].precision"
    assert error.message == (
        "backbone 'vit_s14': precision 'fp16' needs the TensorRT or CUDA execution provider, but this host's ONNX "
        f"Runtime offers {', '.join(ort.get_available_providers())} (the CPU provider builds fp32 engines only)"
    )
    assert error.hint == 'use precision = "fp32" on this host, or provision on the airframe with onnxruntime-gpu'


def test_a_fixed_batch_shape_gets_a_profile_from_batch_one(
    tmp_path: Path, assets: Assets, models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    sortie = validate_models(load_sortie(_sortie(tmp_path, assets, models["vit"], shape=[8, 3, 224, 224])))
    profile = sortie.vpr.profile
    assert (profile.min, profile.opt, profile.max) == ((1, 3, 224, 224), (8, 3, 224, 224), (8, 3, 224, 224))
    with caplog.at_level(logging.WARNING, logger="navcache.model_checks"):
        sortie = validate_models(load_sortie(_sortie(tmp_path, assets, models["fixed8"], shape=[8, 3, 224, 224])))
    profile = sortie.vpr.profile
    assert profile.min == profile.opt == profile.max == (8, 3, 224, 224)
    assert "batch axis is fixed at 8" in caplog.text and "one onboard frame costs a batch of 8" in caplog.text


def test_bad_preprocess_fields_name_the_field(tmp_path: Path, assets: Assets, models: dict[str, Path]) -> None:
    for fields, where, message in (
        ({"resize": "stretch"}, "resize", "resize 'stretch' is not one of: squash, center_crop, pad"),
        ({"mean": [0.5, 0.5]}, "mean", "mean must be 3 numbers, one per channel in the model's channel order"),
        ({"std": [0.2, 0.0, 0.2]}, "std", "std must be positive"),
        ({"colour": "RGB"}, "colour", "unknown field 'colour' in [[backbones]][0].preprocess"),
    ):
        with pytest.raises(SortieError) as info:
            load_sortie(_sortie(tmp_path, assets, models["vit"], shape=[8, 3, 224, 224], preprocess=fields))
        assert info.value.where == f"sortie.toml [[backbones]][0].preprocess.{where}"
        assert info.value.message.startswith(message), info.value.message


# --- at run time ------------------------------------------------------------------------------------------------


def _engine(model: Path, engine_dir: Path, shape: tuple[int, ...], output: str | None = None) -> DescriptorEngine:
    runtime = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": engine_dir})
    profile = nr.InputProfile("image", (1, *shape[1:]), shape, shape)
    entry = runtime.compile_engine(model, nr.BuildConfig(input_shapes=(profile,), model_name=model.stem))
    handle = runtime.deserialize_engine(entry)
    return DescriptorEngine(runtime, handle, "image", output, entry.sha256, batch_size=shape[0])


def test_a_feature_map_at_run_time_is_an_error_not_a_flattened_descriptor(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    engine = _engine(models["features"], tmp_path, (2, 3, 224, 224))
    with pytest.raises(
        ProvisionError, match=r"output 'features' has shape \[2, 64, 16, 16\]; a descriptor must be \[N, D\]"
    ):
        engine.describe(np.zeros((2, 3, 224, 224), np.float32))


def test_huge_outputs_give_unit_float16_descriptors(tmp_path: Path, models: dict[str, Path]) -> None:
    prep = Preprocess(224, 224)
    batch = np.stack([prep(_frame(256, 256, seed=s)) for s in range(4)])
    huge = _engine(models["huge"], tmp_path, (4, 3, 224, 224))
    raw = huge.runtime.infer(huge.handle, {"image": batch})["descriptor"]
    with np.errstate(over="ignore"):  # the raw output cast straight to float16 overflows to inf
        assert np.abs(raw).max() > 1e5 and not np.isfinite(raw.astype(np.float16)).all()
    stored = huge.describe(batch).astype(np.float16)
    assert np.isfinite(stored).all()
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # The same model at gain 1: identical descriptors within float16 tolerance.
    plain = _engine(models["vit"], tmp_path, (4, 3, 224, 224)).describe(batch).astype(np.float16)
    np.testing.assert_allclose(stored.astype(np.float32), plain.astype(np.float32), atol=2e-3)
    assert np.array_equal(l2_normalise(np.zeros((1, 3))), np.zeros((1, 3), np.float32))


# --- end to end: a channels-last, unnormalised model through the flow and onto the drone -----------------------


@pytest.mark.usefixtures("prefect_harness")
def test_a_declared_nhwc_model_is_provisioned_signed_and_applied_onboard(
    tmp_path: Path, assets: Assets, models: dict[str, Path]
) -> None:
    from navcache_flows.provision_sortie import provision_sortie

    first, _ = block_tiles()
    declared = {"layout": "NHWC", "channels": "BGR", "resize": "center_crop", "scale": "byte"}
    path = _sortie(
        tmp_path,
        assets,
        models["small_nhwc_huge"],
        profile={"min": [1, 112, 112, 3], "opt": [4, 112, 112, 3], "max": [8, 112, 112, 3]},
        preprocess=declared,
        tiles=first,
    )
    summary = provision_sortie(str(path))
    assert summary["verified"] and summary["index"]["vectors"] == len(first)
    expected = Preprocess(112, 112, **declared)
    manifest = json.loads((tmp_path / "cache" / "manifest.dsse.json").read_text())
    import base64

    predicate = json.loads(base64.b64decode(manifest["payload"]))["predicate"]
    assert predicate["preprocess"] == {"vit_s14": expected.to_signed()}
    descriptors = np.concatenate([np.load(p) for p in sorted((tmp_path / "cache" / "descriptors").glob("*.desc.npy"))])
    assert descriptors.dtype == np.float16 and np.isfinite(descriptors).all()
    np.testing.assert_allclose(np.linalg.norm(descriptors.astype(np.float32), axis=1), 1.0, atol=2e-3)

    with open_tile_source("geotiff", assets.ortho) as source:
        pixels = {tile: source.read_tile(tile) for tile in first}
    with nr.open_cache(tmp_path / "cache", assets.trusted_keys) as cache:
        assert cache.preprocessing == expected and cache.input_shape == (112, 112, 3)
        for tile, read in pixels.items():
            assert read is not None
            frame = cache.preprocess(read.rgb)
            assert np.array_equal(frame, expected(read.rgb))  # the ground's arithmetic, from the signed manifest
            descriptor = cache.describe(frame)[0]
            assert abs(float(np.linalg.norm(descriptor)) - 1.0) < 1e-5
            hits = cache.query(descriptor, k=1)
            assert hits[0].tile == (tile.z, tile.x, tile.y) and hits[0].score > 0.99


def test_the_cli_refuses_a_byo_mistake_with_exit_2_and_writes_nothing(
    tmp_path: Path, assets: Assets, models: dict[str, Path]
) -> None:
    sortie = _sortie(tmp_path, assets, models["two"], shape=[8, 3, 224, 224])
    done = navcache("provision", str(sortie), home=tmp_path / "prefect", columns=300, timeout=120)
    assert done.returncode == 2, done.stderr
    assert 'set output = "descriptor" in sortie.toml [[backbones]][0]' in done.stderr
    assert "'features' [N, 64, 16, 16], 'descriptor' [N, 384]" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "cache").exists()
