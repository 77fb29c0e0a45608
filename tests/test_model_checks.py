"""The ONNX model checks (navcache.model_checks): a backbone's model against what the sortie declares for it,
each refusal with its field and fix."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from onnx import TensorProto

from navcache.errors import SortieError
from navcache.model_checks import validate_models
from tests.support.sortie_files import BASE_DOC, Flight, backbone_entry, make_files, make_onnx


@pytest.fixture
def flight(tmp_path: Path) -> Flight:
    make_files(tmp_path)
    return Flight(tmp_path, copy.deepcopy(BASE_DOC))


def test_validate_models_accepts_good_models(flight: Flight) -> None:
    make_onnx(flight.root / "models" / "local.onnx", outputs=(("keypoints", TensorProto.INT64),))
    flight.doc["backbones"].append(backbone_entry("local", "local", onnx="models/local.onnx"))
    validate_models(flight.load())


def test_validate_models_rejects_a_corrupt_model(flight: Flight) -> None:
    path = flight.root / "models" / "tiny_vpr.onnx"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    sortie = flight.load()
    with pytest.raises(SortieError) as info:
        validate_models(sortie)
    error = info.value
    assert error.where == "sortie.toml [[backbones]][0].onnx"
    assert "'tiny_vpr'" in error.message and str(path.resolve()) in error.message
    assert "not a valid ONNX model" in error.message and "truncated or corrupt" in (error.hint or "")
    path.write_bytes(b"")  # parses as an empty proto, the checker rejects it
    with pytest.raises(SortieError, match="not a valid ONNX model"):
        validate_models(sortie)


def test_validate_models_names_the_real_inputs(flight: Flight) -> None:
    flight.doc["backbones"][0]["input"] = "pixels"
    with pytest.raises(SortieError) as info:
        validate_models(flight.load())
    error = info.value
    assert error.where == "sortie.toml [[backbones]][0].input"
    assert "no input 'pixels'" in error.message and "its inputs are 'image'" in error.message
    assert "input = 'image'" in (error.hint or "")


def test_validate_models_checks_rank_and_fixed_axes(flight: Flight) -> None:
    flight.doc["backbones"][0]["shape"] = [8, 3, 64]
    with pytest.raises(SortieError) as info:
        validate_models(flight.load())
    assert info.value.where == "sortie.toml [[backbones]][0].shape"
    assert "rank 4 ([N, 3, 64, 64])" in info.value.message and "rank 3" in info.value.message
    flight.doc["backbones"][0]["shape"] = [8, 3, 128, 128]
    with pytest.raises(SortieError, match="axis 2 is fixed at 64"):
        validate_models(flight.load())


def test_validate_models_needs_a_float_vpr_output(flight: Flight) -> None:
    make_onnx(
        flight.root / "models" / "mixed.onnx",
        outputs=(("labels", TensorProto.INT64), ("desc", TensorProto.FLOAT16)),
    )
    flight.doc["backbones"] = [backbone_entry("mixed", onnx="models/mixed.onnx")]
    with pytest.raises(SortieError) as info:
        validate_models(flight.load())
    error = info.value
    assert error.where == "sortie.toml [[backbones]][0].output"
    assert "output 'labels'" in error.message and "INT64" in error.message
    assert "output = 'desc'" in (error.hint or "")
    flight.doc["backbones"][0]["output"] = "desc"
    validate_models(flight.load())
    flight.doc["backbones"][0]["output"] = "nope"
    with pytest.raises(SortieError, match="its outputs are 'labels', 'desc'"):
        validate_models(flight.load())


def test_validate_models_int_only_model(flight: Flight) -> None:
    make_onnx(flight.root / "models" / "ints.onnx", outputs=(("ids", TensorProto.INT32),))
    flight.doc["backbones"] = [backbone_entry("ints", onnx="models/ints.onnx")]
    with pytest.raises(SortieError) as info:
        validate_models(flight.load())
    assert "FLOAT or FLOAT16" in (info.value.hint or "")
