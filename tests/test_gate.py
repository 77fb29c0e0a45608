from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from navcache_runtime import (
    EngineDeserializeError,
    EngineGate,
    EngineHashMismatchError,
    EngineSchemaMismatchError,
    EngineSidecarMissingError,
    HostFields,
    entry_from_artifact,
    write_artifact,
)
from navcache_runtime.integrity import sidecar_path

ORIN = HostFields(sm="87", jetpack="6.2", trt="10.3.0.30", ort="1.22.0", cpu_isa="neon", device="jetson-agx-orin")


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    path = tmp_path / "dinov2_vpr__sm87_jp6.2_trt10.3_fp16.engine"
    write_artifact(path, b"serialized engine " * 100)
    return path


def test_a_matching_engine_is_admitted_with_its_fields(engine: Path) -> None:
    entry = EngineGate(ORIN, "tensorrt").admit(engine)
    assert entry.model_name == "dinov2_vpr"
    assert entry.precision == "fp16"
    assert entry.host == HostFields(sm="87", jetpack="6.2", trt="10.3")
    assert entry.compile_duration_s is None  # described, not built


def test_admitting_an_entry_checks_its_recorded_digest(engine: Path) -> None:
    entry = entry_from_artifact(engine)
    assert EngineGate(ORIN).admit(entry) is entry
    with pytest.raises(EngineHashMismatchError, match="recorded in its cache entry"):
        EngineGate(ORIN).admit(dataclasses.replace(entry, sha256="f" * 64))


@pytest.mark.parametrize(
    ("host", "complaint"),
    [
        (dataclasses.replace(ORIN, sm="72"), "GPU SM 87 in the name but 72 on this host"),
        (dataclasses.replace(ORIN, jetpack="5.1.2"), "JetPack 6.2 in the name but 5.1.2"),
        (dataclasses.replace(ORIN, trt="10.4.0"), "TensorRT 10.3 in the name but 10.4.0"),
        (dataclasses.replace(ORIN, trt=None), "TensorRT 10.3 in the name but none"),
        (HostFields(cpu_isa="avx2"), "GPU SM 87"),
    ],
)
def test_an_engine_for_other_hardware_is_refused_naming_the_field(
    engine: Path, host: HostFields, complaint: str
) -> None:
    with pytest.raises(EngineSchemaMismatchError, match=complaint):
        EngineGate(host, "tensorrt").admit(engine)


def test_a_short_version_in_the_name_pins_the_release_line(engine: Path) -> None:
    EngineGate(dataclasses.replace(ORIN, trt="10.3.1"), "tensorrt").admit(engine)
    with pytest.raises(EngineSchemaMismatchError):
        EngineGate(dataclasses.replace(ORIN, trt="10.30"), "tensorrt").admit(engine)


def test_the_wrong_runtime_is_refused(engine: Path) -> None:
    with pytest.raises(EngineSchemaMismatchError, match="is a tensorrt artifact, this runtime is onnx_trt_ep"):
        EngineGate(ORIN, "onnx_trt_ep").admit(engine)


def test_tampered_missing_sidecar_and_missing_file(engine: Path) -> None:
    data = bytearray(engine.read_bytes())
    data[-1] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineHashMismatchError):
        EngineGate(ORIN).admit(engine)
    sidecar_path(engine).unlink()
    with pytest.raises(EngineSidecarMissingError):
        EngineGate(ORIN).admit(engine)
    engine.unlink()
    with pytest.raises(EngineDeserializeError, match="does not exist"):
        EngineGate(ORIN).admit(engine)


def test_a_renamed_artifact_is_refused_by_the_schema(engine: Path) -> None:
    renamed = engine.with_name("dinov2_vpr.engine")
    engine.rename(renamed)
    with pytest.raises(EngineSchemaMismatchError, match="does not follow the engine filename schema"):
        EngineGate(ORIN).admit(renamed)
