from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from navcache_runtime import BuildConfig, EngineCacheEntry, HostFields, InputProfile, ThermalState, ZoneReading


def _entry() -> EngineCacheEntry:
    return EngineCacheEntry(
        path=Path("a.onnx"),
        sha256="0" * 64,
        model_name="a",
        precision="fp32",
        runtime_label="onnx_trt_ep",
        host=HostFields(ort="1.32.0"),
    )


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (BuildConfig(), "precision"),
        (_entry(), "sha256"),
        (ThermalState(zones=(ZoneReading("cpu", 40.0),), throttled=False), "throttled"),
        (HostFields(sm="87"), "sm"),
        (InputProfile.fixed("image", (1, 3, 8, 8)), "opt"),
        (ZoneReading("cpu", 40.0), "temp_c"),
    ],
)
def test_frozen_dtos_reject_mutation(value: object, field: str) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, None)


def test_build_config_defaults_match_the_contract() -> None:
    config = BuildConfig()
    assert config.precision == "fp32"
    assert config.workspace_mib == 4096
    assert config.input_shapes == ()


def test_build_config_normalises_mapping_profiles_and_keeps_their_order() -> None:
    config = BuildConfig(input_shapes={"b": (1, 4), "a": ((1, 3), (2, 3), (8, 3))}, builder_options={"z": 1, "a": "x"})
    assert [p.name for p in config.input_shapes] == ["b", "a"]
    assert config.profile["a"] == InputProfile("a", (1, 3), (2, 3), (8, 3))
    assert config.profile["b"].dynamic_axes == ()
    assert config.profile["a"].dynamic_axes == (0,)
    assert config.builder_options == (("a", "x"), ("z", 1))
    hash(config)  # usable as a cache key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp8"}, "precision 'fp8'"),
        ({"workspace_mib": 0}, "workspace_mib"),
        ({"input_shapes": {"x": ((4,), (2,), (8,))}}, "min <= opt <= max"),
        ({"input_shapes": {"x": ((1, 2), (2,), (8,))}}, "same rank"),
        ({"input_shapes": {"x": (0, 3)}}, "positive integers"),
        ({"builder_options": {"k": [1]}}, "builder option 'k'"),
    ],
)
def test_build_config_rejects_invalid_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BuildConfig(**kwargs)


def test_build_config_digest_tracks_everything_that_changes_the_artifact() -> None:
    base = BuildConfig(input_shapes={"x": ((1, 3), (2, 3), (8, 3))})
    assert base.digest() == BuildConfig(input_shapes={"x": ((1, 3), (2, 3), (8, 3))}).digest()
    assert base.digest() == dataclasses.replace(base, model_name="renamed").digest()
    for changed in (
        dataclasses.replace(base, precision="fp16"),
        dataclasses.replace(base, workspace_mib=1024),
        dataclasses.replace(base, builder_options=(("tf32", False),)),
        BuildConfig(input_shapes={"x": ((1, 3), (2, 3), (16, 3))}),
    ):
        assert changed.digest() != base.digest()


def test_thermal_state_reports_hottest_zone() -> None:
    state = ThermalState(zones=(ZoneReading("cpu", 41.5), ZoneReading("gpu", 63.0, 95.0)), throttled=False)
    assert state.max_temp_c == 63.0
    assert ThermalState(zones=(), throttled=False).max_temp_c is None


def test_a_regenerated_calibration_table_changes_the_digest(tmp_path) -> None:
    table = tmp_path / "calib.cache"
    table.write_bytes(b"TRT-1001-EntropyCalibration2\nimage: 3c010a14\n")
    config = BuildConfig(precision="int8", calibration_cache=table)
    before = config.digest()
    table.write_bytes(b"TRT-1001-EntropyCalibration2\nimage: 3c020b15\n")
    assert config.digest() != before
