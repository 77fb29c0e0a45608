"""Sortie files for the schema and model-check tests, written from Python dicts: a tiny TOML emitter, a valid
base document over dummy keys and imagery, and tiny ONNX models (the per-channel mean of the image)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from navcache.errors import SortieError
from navcache.sortie import Sortie, load_sortie

# ~3.7 km x 3.3 km around the takeoff in Munich
POLYGON = {
    "type": "Polygon",
    "coordinates": [[[11.55, 48.12], [11.60, 48.12], [11.60, 48.15], [11.55, 48.15], [11.55, 48.12]]],
}
TAKEOFF = {"lat": 48.137, "lon": 11.575}


def toml_value(value: Any) -> str:
    """A tiny TOML emitter (inline tables only) so tests can build documents as dicts."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def dump_toml(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


def make_onnx(
    path: Path,
    *,
    input_name: str = "image",
    dims: tuple[int | str, ...] = ("N", 3, 64, 64),
    outputs: tuple[tuple[str, int], ...] = (("descriptor", TensorProto.FLOAT),),
) -> Path:
    """A tiny valid model: the per-channel mean of the image, one output per entry (cast as asked)."""
    nodes = [helper.make_node("ReduceMean", [input_name], ["pooled"], axes=[2, 3], keepdims=0)]
    graph_outputs = []
    for name, elem in outputs:
        nodes.append(helper.make_node("Cast", ["pooled"], [name], to=elem))
        graph_outputs.append(helper.make_tensor_value_info(name, elem, [dims[0], dims[1]]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(dims))], graph_outputs
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@dataclass
class Flight:
    root: Path
    doc: dict[str, Any]

    def write(self, name: str = "sortie.toml") -> Path:
        path = self.root / name
        path.write_text(dump_toml(self.doc), encoding="utf-8")
        return path

    def load(self, **kwargs: Any) -> Sortie:
        return load_sortie(self.write(), **kwargs)

    def error(self, **kwargs: Any) -> SortieError:
        with pytest.raises(SortieError) as info:
            self.load(**kwargs)
        return info.value


BASE_DOC: dict[str, Any] = {
    "sortie_id": "demo-001",
    "runtime": "onnx_trt_ep",
    "cache_dir": "cache",
    "signing_key": "keys/operator.key",
    "trusted_keys": "keys/trusted_keys.json",
    "coverage_threshold": 99.0,
    "expires_hours": 72,
    "takeoff": dict(TAKEOFF),
    "area": {"geojson": json.dumps(POLYGON)},
    "tiles": {"zoom": 16, "size": 256, "chunk_span": 1, "overlap": 0.0, "budget": 250000},
    "orthophoto": {"geotiff": "ortho.tif"},
    "descriptors": {"batch_size": 16},
    "backbones": [
        {
            "name": "tiny_vpr",
            "onnx": "models/tiny_vpr.onnx",
            "role": "vpr",
            "precision": "fp32",
            "input": "image",
            "shape": [8, 3, 64, 64],
        }
    ],
}


def make_files(root: Path) -> None:
    (root / "keys").mkdir(parents=True, exist_ok=True)
    (root / "keys" / "operator.key").write_bytes(b"dummy key")
    (root / "keys" / "trusted_keys.json").write_text("{}")
    (root / "ortho.tif").write_bytes(b"II*\x00")
    make_onnx(root / "models" / "tiny_vpr.onnx")


def backbone_entry(name: str, role: str = "vpr", **extra: Any) -> dict[str, Any]:
    """One [[backbones]] entry over the base document's model (``onnx`` and the rest overridable)."""
    return {
        "name": name,
        "onnx": "models/tiny_vpr.onnx",
        "role": role,
        "precision": "fp32",  # fp16 needs a GPU provider (validate_models checks the host)
        "shape": [8, 3, 64, 64],
        **extra,
    }
