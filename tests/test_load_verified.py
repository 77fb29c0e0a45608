"""Load exactly what was verified: an engine swapped on disk right after the gate hashed it is not the one
loaded (ONNX Runtime and TensorRT deserialise the bytes the gate read), one swapped before the gate read it
is refused, and anything but a regular file in place of an engine or its sidecar is a typed error.

The swap is a time-of-check/time-of-use attack: ``os.replace`` of a valid engine of the same kind
(another model's weights, with a matching sidecar) between the check and the load. The hook runs inside the
gate, right after its read-and-hash returns (``navcache_runtime.gate.read_hashed`` wrapped)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import navcache_runtime as nr
from navcache_runtime import gate as gate_module
from navcache_runtime.integrity import copy_hashed, private_directory, read_hashed, sidecar_path
from tests.conftest import TinyModel
from tests.fakes import HostMemory
from tests.support.models import export_models, make_model
from tests.support.tensorrt_strategy import strategy_over_fake_tensorrt

ORIN = nr.HostFields(sm="87", jetpack="6.2", trt="10.3.0", device="nvidia-jetson-agx-orin")


def replace_with(target: Path, data: bytes) -> None:
    """What the attacker does: a complete new file (and a sidecar that matches it) renamed over the old."""
    staged = target.with_name(".attack-" + target.name)
    staged.write_bytes(data)
    os.replace(staged, target)
    sidecar_path(target).write_text(hashlib.sha256(data).hexdigest())


def swap_after_gate_hash(monkeypatch: pytest.MonkeyPatch, target: Path, attacker: bytes) -> list[Path]:
    """Make the gate's read-and-hash (or copy-and-hash) of ``target`` swap the file right after it returns."""
    swapped: list[Path] = []

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def hashed_then_swapped(path: Path | str, *args: Any, **kwargs: Any) -> Any:
            result = real(path, *args, **kwargs)
            if Path(path) == target:
                replace_with(target, attacker)
                swapped.append(target)
            return result

        return hashed_then_swapped

    monkeypatch.setattr(gate_module, "read_hashed", wrap(gate_module.read_hashed))
    monkeypatch.setattr(gate_module, "copy_hashed", wrap(gate_module.copy_hashed))
    return swapped


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The attacker's model: same architecture and I/O as the tiny model, other weights."""
    onnx_path, _ = export_models(make_model(seed=1), tmp_path_factory.mktemp("attacker"), "tiny_vpr")
    return onnx_path


# --------------------------------------------------------------------------------------------------------
# ONNX Runtime (real)


def _ort(engine_dir: Path) -> nr.InferenceRuntime:
    return nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(engine_dir)})


def test_onnxruntime_loads_the_bytes_the_gate_hashed_not_a_file_swapped_in_after(
    tiny_model: TinyModel, other_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = _ort(tmp_path / "engines")
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    attacker = _ort(tmp_path / "attacker").compile_engine(other_model, tiny_model.build_config())
    inputs = tiny_model.inputs(batch=2, seed=3)
    reference = tiny_model.reference(inputs)
    attacker_out = runtime.infer(runtime.deserialize_engine(attacker), inputs)["descriptor"]
    assert not np.allclose(attacker_out, reference, atol=1e-3)  # the swap would be visible

    swapped = swap_after_gate_hash(monkeypatch, entry.path, attacker.path.read_bytes())
    handle = runtime.deserialize_engine(entry)
    assert swapped == [entry.path] and entry.path.read_bytes() == attacker.path.read_bytes()
    np.testing.assert_allclose(runtime.infer(handle, inputs)["descriptor"], reference, atol=1e-5, rtol=0)


def test_onnxruntime_refuses_an_engine_swapped_before_the_gate_read_it(
    tiny_model: TinyModel, other_model: Path, tmp_path: Path
) -> None:
    runtime = _ort(tmp_path / "engines")
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    attacker = _ort(tmp_path / "attacker").compile_engine(other_model, tiny_model.build_config())
    replace_with(entry.path, attacker.path.read_bytes())  # sidecar matches the attacker's bytes
    with pytest.raises(nr.EngineHashMismatchError, match="not the digest recorded"):
        runtime.deserialize_engine(entry)


@pytest.mark.parametrize("victim", ["engine", "sidecar"])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_an_engine_or_sidecar_that_is_not_a_file_is_a_typed_error(
    tiny_model: TinyModel, tmp_path: Path, victim: str, kind: str
) -> None:
    runtime = _ort(tmp_path / "engines")
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    path = entry.path if victim == "engine" else sidecar_path(entry.path)
    path.unlink()
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)  # must not hang either
    expected = nr.EngineDeserializeError if victim == "engine" else nr.EngineHashMismatchError
    with pytest.raises(expected, match="not a regular file"):
        runtime.deserialize_engine(entry)
    with pytest.raises(expected):
        runtime.gate.admit(entry)  # the check-only path (provisioning's reuse) too


# --------------------------------------------------------------------------------------------------------
# TensorRT (the fake tensorrt module: it runs the embedded ONNX with ONNX Runtime)


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from strategy_over_fake_tensorrt(monkeypatch)


def test_tensorrt_deserialises_the_bytes_the_gate_hashed_not_a_file_swapped_in_after(
    trt: ModuleType, tiny_model: TinyModel, other_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def runtime(directory: Path) -> Any:
        config = nr.RuntimeConfig(runtime="tensorrt", engine_dir=directory, thermal_poll_hz=0)
        return trt.TensorRTRuntime(config, host=ORIN, memory=HostMemory())

    trt_runtime = runtime(tmp_path / "engines")
    entry = trt_runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    attacker = runtime(tmp_path / "attacker").compile_engine(other_model, tiny_model.build_config())
    inputs = tiny_model.inputs(batch=2, seed=3)
    reference = tiny_model.reference(inputs)

    swapped = swap_after_gate_hash(monkeypatch, entry.path, attacker.path.read_bytes())
    handle = trt_runtime.deserialize_engine(entry)
    assert swapped == [entry.path]
    np.testing.assert_allclose(trt_runtime.infer(handle, inputs)["descriptor"], reference, atol=1e-5, rtol=0)

    replace_with(entry.path, attacker.path.read_bytes())  # before the gate: refused
    with pytest.raises(nr.EngineHashMismatchError):
        trt_runtime.deserialize_engine(entry)


# --------------------------------------------------------------------------------------------------------
# The integrity helpers the gate uses


def test_read_hashed_and_copy_hashed_return_what_they_hashed(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # several read chunks
    source = tmp_path / "engine.bin"
    source.write_bytes(data)
    assert read_hashed(source) == (data, hashlib.sha256(data).hexdigest())
    private = private_directory()
    try:
        copy, digest = copy_hashed(source, private)
        assert digest == hashlib.sha256(data).hexdigest() and copy.read_bytes() == data
        assert copy.parent == private and private.stat().st_mode & 0o077 == 0 and copy.stat().st_mode & 0o077 == 0
    finally:
        gate_module.shutil.rmtree(private)
    for make in (Path.mkdir, lambda p: os.mkfifo(p)):
        odd = tmp_path / f"odd-{make.__name__}"
        make(odd)
        with pytest.raises(OSError, match="not a regular file"):
            read_hashed(odd)
