"""Small ONNX backbones whose retrieval quality is known in advance, for the self-test.

``thumbnail`` is a healthy, hand-built descriptor: the image averaged down to 8 x 8 per channel, minus its
mean (brightness), so views of the same place agree and different places differ. ``constant`` gives the same
vector for every image (a model with its output wired wrong). ``permuted`` is ``thumbnail`` with its output
dimensions shuffled: other weights with the same shapes, as an engine swapped onboard would be.
``first_channel`` reads its texture from the first input channel only, so a wrong channel order shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.support.onnx_files import save_onnx

GRID = 8


def _save(nodes: list, init: list, path: Path, size: int, dim: int) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["N", dim])],
        init,
    )
    return save_onnx(path, graph)


def thumbnail(path: Path, *, size: int = 128, permute_seed: int | None = None) -> Path:
    """[N, 3, size, size] → [N, 3 * 8 * 8]: average-pooled thumbnail minus its mean; with ``permute_seed`` the
    output dimensions are shuffled by a fixed permutation."""
    k = size // GRID
    dim = 3 * GRID * GRID
    init = [numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")]
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["flat", "mean"], ["centred" if permute_seed is not None else "descriptor"]),
    ]
    if permute_seed is not None:
        order = np.random.default_rng(permute_seed).permutation(dim).astype(np.int64)
        init.append(numpy_helper.from_array(order, "order"))
        nodes.append(helper.make_node("Gather", ["centred", "order"], ["descriptor"], axis=1))
    return _save(nodes, init, path, size, dim)


def first_channel(path: Path, *, size: int = 128) -> Path:
    """[N, 3, size, size] → [N, 8 * 8]: the thumbnail of the first input channel only, minus its mean: a model
    "trained" on RGB whose texture it reads from red. Fed BGR, it reads blue instead."""
    k = size // GRID
    init = [
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([1], np.int64), "end"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Slice", ["image", "start", "end", "axis"], ["red"]),
        helper.make_node("AveragePool", ["red"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["flat", "mean"], ["descriptor"]),
    ]
    return _save(nodes, init, path, size, GRID * GRID)


def constant(path: Path, *, size: int = 128, dim: int = 64) -> Path:
    """[N, 3, size, size] → the same [N, dim] row for every image (it still depends on the input's shape)."""
    init = [
        numpy_helper.from_array(np.linspace(0.1, 1.0, dim, dtype=np.float32)[None, :], "row"),
        numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m2"]),
        helper.make_node("Mul", ["m2", "zero"], ["z"]),
        helper.make_node("Add", ["z", "row"], ["descriptor"]),
    ]
    init.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    return _save(nodes, init, path, size, dim)
