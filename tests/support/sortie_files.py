"""Sortie files written from Python dicts: the one TOML writer the tests use (:func:`write_document`, also
behind the templates in tests/support/sorties.py and realistic.py), a valid base document over dummy keys
and imagery, and tiny ONNX models (the per-channel mean of the image).

The writer emits what a crew would write: top-level keys first, then a ``[table]`` per dict,
``[[table]]`` per dict in a list of dicts, bare keys wherever TOML allows them, one ``key = value`` a line.
Tests edit the written text line by line (``zoom = 18`` → ``zom = 18``), so that layout is part of the
contract."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from onnx import TensorProto, helper

from navcache.errors import SortieError
from navcache.sortie import Sortie, load_sortie
from tests.support.onnx_files import save_onnx

# ~3.7 km x 3.3 km around the takeoff in Munich
POLYGON = {
    "type": "Polygon",
    "coordinates": [[[11.55, 48.12], [11.60, 48.12], [11.60, 48.15], [11.55, 48.15], [11.55, 48.12]]],
}
TAKEOFF = {"lat": 48.137, "lon": 11.575}

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LITERAL_SAFE = re.compile(r"[ -&(-~]*")  # printable ASCII without the apostrophe: fits a '...' literal
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string: quotes, backslashes and control characters escaped, the rest as is."""
    escaped = "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text)
    return f'"{escaped}"'


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    """One value as inline TOML (strings with double quotes inside as '...' literals, so JSON stays legible)."""
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
        return f"'{value}'" if '"' in value and _LITERAL_SAFE.fullmatch(value) else toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _table_lines(table: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    """``table``'s own keys, then its sub-tables and arrays of tables (TOML wants them in that order)."""
    lines = [
        f"{toml_key(k)} = {toml_value(v)}"
        for k, v in table.items()
        if not isinstance(v, dict) and not _is_table_array(v)
    ]
    for key, value in table.items():
        header = ".".join(toml_key(part) for part in (*path, key))
        if isinstance(value, dict):
            lines += ["", f"[{header}]", *_table_lines(value, (*path, key))]
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{header}]]", *_table_lines(item, (*path, key))]
    return lines


def dump_toml(doc: dict[str, Any]) -> str:
    """``doc`` as a TOML document that ``tomllib.loads`` reads back equal (tuples come back as lists)."""
    return "\n".join(_table_lines(doc, ())).lstrip("\n") + "\n"


def write_document(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` to ``path`` as a sortie file (UTF-8) and return the path."""
    path.write_text(dump_toml(doc), encoding="utf-8")
    return path


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
    return save_onnx(path, graph)


@dataclass
class Flight:
    root: Path
    doc: dict[str, Any]

    def write(self, name: str = "sortie.toml") -> Path:
        return write_document(self.root / name, self.doc)

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
