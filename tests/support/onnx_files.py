"""Writing the ONNX graphs that tests build by hand with ``onnx.helper``: one place that makes them a
model (opset 17, IR version 8), checks it and saves it. Imports onnx only, so torch stays unloaded."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper


def save_onnx(path: Path, graph: onnx.GraphProto) -> Path:
    """Write ``graph`` as a checked opset-17 model to ``path`` (parent folders made) and return the path."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
