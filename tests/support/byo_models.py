"""Bring-your-own ONNX backbones of the shapes real crews bring, built with onnx.helper (small weights).

``vit_like`` is a ViT-S/14-shaped stand-in: 14 px patches of a 224 px image (a 16 x 16 token grid), a
384-dim descriptor, dynamic batch. Options give the other real cases: channels-last input, an unnormalised
output (``gain``, e.g. 1e6), two outputs (a [B, 64, 16, 16] feature map first, the descriptor second), a
feature map alone, a fixed batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.support.onnx_files import save_onnx

PATCH = 14
EMBED = 16  # patch-embedding channels (small: the model only has to tell tiles apart)
FEATURES = 64  # channels of the feature-map output


def vit_like(
    path: Path,
    *,
    size: int = 224,
    dim: int = 384,
    batch: int | str = "N",
    layout: str = "NCHW",
    gain: float = 1.0,
    outputs: str = "descriptor",  # "descriptor" | "features_first" | "features"
    seed: int = 0,
) -> Path:
    """Write the model to ``path`` and return it. Input "image"; outputs "descriptor" [B, dim] and/or
    "features" [B, 64, size/14, size/14]."""
    rng = np.random.default_rng(seed)
    grid = size // PATCH
    pooled = max(1, grid // 4)
    image_dims: list[int | str] = [batch, 3, size, size] if layout == "NCHW" else [batch, size, size, 3]
    init = [
        numpy_helper.from_array(rng.standard_normal((EMBED, 3, PATCH, PATCH)).astype(np.float32) * 0.05, "patch_w"),
        numpy_helper.from_array(rng.standard_normal((FEATURES, EMBED, 1, 1)).astype(np.float32) * 0.2, "feat_w"),
        numpy_helper.from_array(rng.standard_normal((EMBED * pooled * pooled, dim)).astype(np.float32) * 0.1, "proj_w"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(gain, np.float32), "gain"),
    ]
    nodes = []
    source = "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    nodes.append(
        helper.make_node("Conv", [source, "patch_w"], ["tokens"], kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    )
    nodes.append(helper.make_node("Conv", ["tokens", "feat_w"], ["features"], kernel_shape=[1, 1]))
    nodes.append(helper.make_node("AveragePool", ["tokens"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]))
    nodes.append(helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]))
    nodes.append(helper.make_node("MatMul", ["flat", "proj_w"], ["projected"]))
    nodes.append(helper.make_node("Mul", ["projected", "gain"], ["descriptor"]))
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, FEATURES, grid, grid])
    descriptor = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, [batch, dim])
    graph_outputs = {
        "descriptor": [descriptor],
        "features_first": [features, descriptor],
        "features": [features],
    }[outputs]
    graph = helper.make_graph(
        nodes,
        "vit_like",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, image_dims)],
        graph_outputs,
        init,
    )
    return save_onnx(path, graph)


__all__ = ["vit_like"]
