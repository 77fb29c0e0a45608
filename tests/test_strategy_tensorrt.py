"""The native TensorRT strategy, run against the fake ``tensorrt`` module (tests/fakes/tensorrt.py).

No real TensorRT builder installs on the development machines, so these tests check everything above the
``tensorrt`` API: naming and pinning, the gate, option/profile/precision plumbing, the timing cache, buffer
handling through the memory seam, and the error family. The fake runs the embedded ONNX with ONNX Runtime,
so numeric results are checked against the ONNX reference.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from navcache_runtime import (
    BuildConfig,
    CalibrationCacheError,
    EngineBuildError,
    EngineDeserializeError,
    EngineHandle,
    EngineHashMismatchError,
    EngineSchemaMismatchError,
    EngineSidecarMissingError,
    HostFields,
    InferenceError,
    InferenceRuntime,
    OutOfMemoryError,
    RuntimeConfig,
    RuntimeNotAvailableError,
    build_inference_runtime,
    parse_engine_name,
    sidecar_path,
    verify_artifact,
)
from navcache_runtime.integrity import TEMP_PREFIX
from tests.fakes import HostMemory
from tests.fakes import tensorrt as fake_trt
from tests.support.tensorrt_strategy import strategy_over_fake_tensorrt

FAKES_DIR = Path(__file__).parent / "fakes"
ORIN = HostFields(sm="87", jetpack="6.2", trt="10.3.0", device="nvidia-jetson-agx-orin")
CALIBRATION = b"TRT-100300-EntropyCalibration2\nimage: 3c010a14\ndescriptor: 3c00a0b1\n"


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from strategy_over_fake_tensorrt(monkeypatch)


def make_runtime(trt: ModuleType, engine_dir: Path, host: HostFields = ORIN, memory: Any = None, **cfg: Any) -> Any:
    config = RuntimeConfig(runtime="tensorrt", engine_dir=engine_dir, thermal_poll_hz=0, **cfg)
    return trt.TensorRTRuntime(config, host=host, memory=memory if memory is not None else HostMemory())


@pytest.fixture
def runtime(trt: ModuleType, tmp_path: Path) -> Any:
    return make_runtime(trt, tmp_path / "engines")


def no_partial_files(directory: Path) -> bool:
    return not directory.exists() or not [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


# -- compile -----------------------------------------------------------------------------------------------


def test_compile_writes_engine_with_sidecar_named_for_the_host(runtime: Any, tiny_model: Any) -> None:
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp16"))

    assert entry.path.parent == runtime.config.engine_dir
    assert entry.path.is_file() and sidecar_path(entry.path).is_file()
    assert verify_artifact(entry.path) == entry.sha256
    assert entry.path.name.startswith("tiny_vpr__sm87_jp6.2_trt10.3.0_fp16__dev-nvidia-jetson-agx-orin__src-")
    name = parse_engine_name(entry.path.name)
    assert (name.host.sm, name.host.jetpack, name.host.trt, name.host.device) == (
        "87",
        "6.2",
        "10.3.0",
        "nvidia-jetson-agx-orin",
    )
    assert name.host.ort is None and name.host.torch is None and name.host.cpu_isa is None
    assert (name.precision, name.ext, name.runtime_label) == ("fp16", "engine", "tensorrt")
    assert parse_engine_name(name.filename).filename == entry.path.name  # round trip
    assert entry.runtime_label == "tensorrt" and entry.model_name == "tiny_vpr" and entry.precision == "fp16"
    assert entry.host == name.host and entry.source_digest == name.source and entry.config_digest == name.config
    assert entry.compile_duration_s is not None and entry.compile_duration_s > 0
    assert entry.path.read_bytes().startswith(fake_trt.PLAN_MAGIC)
    assert no_partial_files(entry.path.parent)


def test_workspace_profile_and_precision_flags_reach_the_builder(runtime: Any, tiny_model: Any) -> None:
    runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp32"))
    runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp16", workspace_mib=512))
    fp32, fp16 = fake_trt.builds

    assert fp32.workspace == 4096 << 20 and fp16.workspace == 512 << 20
    assert "FP16" not in fp32.flags and "INT8" not in fp32.flags
    assert "FP16" in fp16.flags
    size = tiny_model.size
    assert fp32.profiles == [{"image": ((1, 3, size, size), (4, 3, size, size), (16, 3, size, size))}]
    assert fp32.network_flags == 0  # TensorRT 10: explicit batch is implied
    assert fp32.optimization_level == 3 and fp32.device_type == "GPU"


def test_tensorrt_8_gets_the_explicit_batch_flag(
    runtime: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_trt, "__version__", "8.6.1")
    runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    assert fake_trt.builds[-1].network_flags == 1 << int(fake_trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def test_timing_cache_is_persisted_next_to_the_engines_and_reused(runtime: Any, tiny_model: Any) -> None:
    cache = runtime.config.engine_dir / "timing__sm87_trt10.3.0.cache"

    runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp32"))
    assert cache.is_file() and runtime.timing_cache_path() == cache
    assert fake_trt.timing_cache_loads == [b""]  # nothing to load on a cold cache
    first = cache.read_bytes()

    runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp16"))
    assert fake_trt.timing_cache_loads[-1] == first  # the second build loaded what the first wrote
    assert fake_trt.builds[-1].timing_cache_attached
    assert len(cache.read_bytes()) > len(first)  # and it grew with the new configuration's timings

    runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp32"))
    assert fake_trt.builds[-1].timing_cache_hits > 0  # a repeated configuration is served from the cache
    assert no_partial_files(cache.parent)


def test_corrupt_timing_cache_is_replaced_not_fatal(
    runtime: Any, tiny_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = runtime.config.engine_dir / "timing__sm87_trt10.3.0.cache"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a timing cache")

    with caplog.at_level(logging.WARNING):
        entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    assert entry.path.is_file()
    assert any("corrupt" in r.getMessage() and cache.name in r.getMessage() for r in caplog.records)
    assert cache.read_bytes().startswith(fake_trt.TIMING_MAGIC)


def test_builder_options_are_applied(runtime: Any, tiny_model: Any) -> None:
    options = {"builder_optimization_level": 5, "tf32": False, "max_aux_streams": 0}
    runtime.compile_engine(tiny_model.onnx, tiny_model.build_config(builder_options=options))
    record = fake_trt.builds[-1]
    assert record.optimization_level == 5 and "TF32" not in record.flags and record.max_aux_streams == 0


def test_dla_core_targets_the_dla_with_gpu_fallback(runtime: Any, tiny_model: Any) -> None:
    fake_trt.controls.dla_cores = 2
    runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp16", builder_options={"dla_core": 1}))
    record = fake_trt.builds[-1]
    assert (record.device_type, record.dla_core) == ("DLA", 1) and "GPU_FALLBACK" in record.flags


@pytest.mark.parametrize(
    ("options", "precision", "match"),
    [
        ({"unknown_knob": 1}, "fp32", r"unknown TensorRT builder option.*'unknown_knob'.*builder_optimization_level"),
        ({"builder_optimization_level": 7}, "fp32", "0-5"),
        ({"builder_optimization_level": True}, "fp32", "must be int"),
        ({"tf32": "yes"}, "fp32", "must be bool"),
        ({"dla_core": 0}, "fp32", "DLA has no fp32"),
        ({"dla_core": 0}, "fp16", "0 DLA core"),
    ],
)
def test_bad_builder_options_are_refused(
    runtime: Any, tiny_model: Any, options: dict[str, Any], precision: str, match: str
) -> None:
    with pytest.raises(EngineBuildError, match=match):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config(precision, builder_options=options))
    assert not list(runtime.config.engine_dir.glob("*.engine"))  # refused before anything was written


def test_corrupt_onnx_names_the_model_and_the_parser_error(runtime: Any, model_copy: Any) -> None:
    model_copy.onnx.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    with pytest.raises(EngineBuildError) as caught:
        runtime.compile_engine(model_copy.onnx, model_copy.build_config())
    text = str(caught.value)
    assert "could not parse tiny_vpr" in text and "Failed to parse ONNX model" in text
    assert caught.value.path == model_copy.onnx
    assert not list(runtime.config.engine_dir.glob("*.engine"))


def test_unsupported_operator_is_reported_with_its_node(runtime: Any, tiny_model: Any) -> None:
    fake_trt.controls.parse_fail_ops = {"Conv"}
    with pytest.raises(EngineBuildError, match=r"No importer registered for op: Conv \(node .*Conv\)"):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())


def test_missing_source_model_is_a_build_error(runtime: Any, tmp_path: Path, tiny_model: Any) -> None:
    with pytest.raises(EngineBuildError, match="does not exist"):
        runtime.compile_engine(tmp_path / "absent.onnx", tiny_model.build_config())


def test_dynamic_input_without_a_profile_is_named(runtime: Any, tiny_model: Any) -> None:
    with pytest.raises(EngineBuildError, match=r"image \[\?x3x64x64\] have dynamic dimensions"):
        runtime.compile_engine(tiny_model.onnx, BuildConfig())


def test_profile_for_an_unknown_input_is_refused(runtime: Any, tiny_model: Any) -> None:
    config = BuildConfig(input_shapes={"pixels": ((1, 3, 64, 64), (1, 3, 64, 64), (2, 3, 64, 64))})
    with pytest.raises(EngineBuildError, match=r"'pixels'.*its inputs are image"):
        runtime.compile_engine(tiny_model.onnx, config)


def test_profile_that_contradicts_a_fixed_axis_is_refused(runtime: Any, tiny_model: Any) -> None:
    config = BuildConfig(input_shapes={"image": ((1, 3, 32, 32), (4, 3, 64, 64), (16, 3, 64, 64))})
    with pytest.raises(EngineBuildError, match="fixed axes"):
        runtime.compile_engine(tiny_model.onnx, config)


def test_int8_without_calibration_cache_is_a_calibration_error(runtime: Any, tiny_model: Any, tmp_path: Path) -> None:
    with pytest.raises(CalibrationCacheError, match="int8 needs a calibration cache") as caught:
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("int8"))
    assert caught.value.hint and "calibration_cache" in caught.value.hint
    with pytest.raises(CalibrationCacheError, match="does not exist"):
        runtime.compile_engine(
            tiny_model.onnx, tiny_model.build_config("int8", calibration_cache=tmp_path / "no.cache")
        )
    assert fake_trt.builds == []  # refused before any builder was created


def test_int8_replays_the_calibration_cache(runtime: Any, tiny_model: Any, tmp_path: Path) -> None:
    table = tmp_path / "tiny_vpr.calib"
    table.write_bytes(CALIBRATION)
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("int8", calibration_cache=table))
    record = fake_trt.builds[-1]
    assert "INT8" in record.flags and record.calibration_cache == CALIBRATION and record.calibration_profile_set
    assert parse_engine_name(entry.path.name).precision == "int8"


def test_int8_cache_the_builder_rejects_is_a_calibration_error(runtime: Any, tiny_model: Any, tmp_path: Path) -> None:
    table = tmp_path / "wrong.calib"
    table.write_bytes(b"this is not a TensorRT calibration table")
    with pytest.raises(CalibrationCacheError, match="rejected calibration cache"):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("int8", calibration_cache=table))


def test_host_without_gpu_or_tensorrt_cannot_compile(trt: ModuleType, tmp_path: Path, tiny_model: Any) -> None:
    runtime = make_runtime(trt, tmp_path, host=HostFields(cpu_isa="avx2"))
    with pytest.raises(RuntimeNotAvailableError, match="needs a CUDA GPU and TensorRT"):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())


# -- deserialize and infer ---------------------------------------------------------------------------------


def test_infer_matches_the_onnx_reference_across_the_profile(runtime: Any, tiny_model: Any) -> None:
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    handle = runtime.deserialize_engine(entry)
    assert handle.input_names == ("image",) and handle.output_names == ("descriptor",)
    assert handle.profile["image"][0] == (1, 3, 64, 64) and handle.profile["image"][2] == (16, 3, 64, 64)
    for batch in (1, 4, 16):
        inputs = tiny_model.inputs(batch, seed=batch)
        out = runtime.infer(handle, inputs)
        assert set(out) == {"descriptor"}
        assert out["descriptor"].shape == (batch, tiny_model.descriptor_dim)
        assert out["descriptor"].dtype == np.float32
        np.testing.assert_allclose(out["descriptor"], tiny_model.reference(inputs), atol=1e-5, rtol=0)
    assert [e["inputs"]["image"][0] for e in fake_trt.executions] == [1, 4, 16]
    assert all(e["stream"] == HostMemory().stream() for e in fake_trt.executions)
    runtime.release_engine(handle)


def test_batch_outside_the_profile_is_refused(runtime: Any, tiny_model: Any) -> None:
    handle = runtime.deserialize_engine(runtime.compile_engine(tiny_model.onnx, tiny_model.build_config()))
    with pytest.raises(InferenceError, match=r"outside the optimization profile \(min \[1, 3, 64, 64\], max \[16"):
        runtime.infer(handle, tiny_model.inputs(32))
    assert fake_trt.executions == []


def test_input_names_and_dtypes_are_checked(runtime: Any, tiny_model: Any) -> None:
    handle = runtime.deserialize_engine(runtime.compile_engine(tiny_model.onnx, tiny_model.build_config()))
    image = tiny_model.inputs(2)["image"]
    with pytest.raises(InferenceError, match=r"missing \['image'\].*takes exactly \['image'\]"):
        runtime.infer(handle, {"pixels": image})
    with pytest.raises(InferenceError, match=r"unknown \['extra'\]"):
        runtime.infer(handle, {"image": image, "extra": image})
    with pytest.raises(InferenceError, match="is uint8, the engine takes float32"):
        runtime.infer(handle, {"image": (image * 50).astype(np.uint8)})
    with pytest.raises(InferenceError, match="rank 4"):
        runtime.infer(handle, {"image": image[0]})
    # float64 is cast to the engine's float32 rather than refused
    out = runtime.infer(handle, {"image": image.astype(np.float64)})
    np.testing.assert_allclose(out["descriptor"], tiny_model.reference({"image": image}), atol=1e-5, rtol=0)


def test_tampered_engine_is_refused(runtime: Any, tiny_model: Any) -> None:
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    data = bytearray(entry.path.read_bytes())
    data[-10] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    with pytest.raises(EngineHashMismatchError):
        runtime.deserialize_engine(entry)


def test_engine_without_sidecar_is_refused(runtime: Any, tiny_model: Any) -> None:
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    sidecar_path(entry.path).unlink()
    with pytest.raises(EngineSidecarMissingError):
        runtime.deserialize_engine(entry)


def test_engine_for_another_gpu_is_refused_by_the_gate(trt: ModuleType, tmp_path: Path, tiny_model: Any) -> None:
    entry = make_runtime(trt, tmp_path).compile_engine(tiny_model.onnx, tiny_model.build_config())
    h100 = HostFields(sm="90", trt="10.3.0", device="nvidia-h100-80gb-hbm3")
    with pytest.raises(EngineSchemaMismatchError, match="GPU SM 87 in the name but 90 on this host"):
        make_runtime(trt, tmp_path, host=h100).deserialize_engine(entry)


def test_engine_tensorrt_cannot_load_is_a_deserialize_error(runtime: Any, tiny_model: Any) -> None:
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    fake_trt.controls.deserialize_returns_none = True
    with pytest.raises(EngineDeserializeError, match="could not deserialize.*forced to fail") as caught:
        runtime.deserialize_engine(entry)
    assert caught.value.hint and "rebuild" in caught.value.hint


def test_released_handle_cannot_infer_and_release_is_idempotent(runtime: Any, tiny_model: Any) -> None:
    handle = runtime.deserialize_engine(runtime.compile_engine(tiny_model.onnx, tiny_model.build_config()))
    runtime.release_engine(handle)
    runtime.release_engine(handle)
    assert handle.released and handle.context is None and handle.engine is None
    with pytest.raises(InferenceError, match="released"):
        runtime.infer(handle, tiny_model.inputs(1))


def test_foreign_handle_is_refused(runtime: Any, tiny_model: Any) -> None:
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    with pytest.raises(InferenceError, match="not created by this runtime"):
        runtime.infer(EngineHandle(entry=entry), tiny_model.inputs(1))


# -- the error family --------------------------------------------------------------------------------------


def test_tensorrt_exceptions_are_rewrapped(runtime: Any, tiny_model: Any) -> None:
    fake_trt.controls.build_error = RuntimeError("[builder.cpp::buildSerializedNetwork] internal error")
    with pytest.raises(EngineBuildError, match="tiny_vpr.*internal error") as caught:
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    assert isinstance(caught.value.__cause__, RuntimeError)

    fake_trt.controls.build_error = RuntimeError("CUDA error: out of memory")
    with pytest.raises(OutOfMemoryError):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())

    fake_trt.controls.build_error = None
    fake_trt.controls.build_fail_message = (
        "Error Code 2: OutOfMemory (Requested size was 8589934592 bytes: out of memory)"
    )
    with pytest.raises(OutOfMemoryError, match="Requested size"):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())

    fake_trt.controls.build_fail_message = "Error Code 10: Internal Error (Could not find any implementation)"
    with pytest.raises(EngineBuildError, match="could not build an engine for tiny_vpr.*Could not find any"):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    assert no_partial_files(runtime.config.engine_dir)
    assert not list(runtime.config.engine_dir.glob("*.engine"))


def test_builder_that_cannot_start_is_a_build_error(runtime: Any, tiny_model: Any) -> None:
    fake_trt.controls.builder_init_error = TypeError("pybind11::init(): factory function returned nullptr")
    with pytest.raises(EngineBuildError, match="cannot create a TensorRT builder") as caught:
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    assert caught.value.hint and "GPU" in caught.value.hint


def test_unrelated_exceptions_propagate(runtime: Any, tiny_model: Any) -> None:
    fake_trt.controls.build_error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())


def test_execution_failures_are_inference_errors(runtime: Any, tiny_model: Any) -> None:
    handle = runtime.deserialize_engine(runtime.compile_engine(tiny_model.onnx, tiny_model.build_config()))
    fake_trt.controls.execute_error = RuntimeError("enqueueV3 failed")
    with pytest.raises(InferenceError, match="enqueueV3 failed"):
        runtime.infer(handle, tiny_model.inputs(2))
    fake_trt.controls.execute_error = None
    fake_trt.controls.execute_fail = True
    with pytest.raises(InferenceError, match="execution failed.*illegal memory access"):
        runtime.infer(handle, tiny_model.inputs(2))
    fake_trt.controls.execute_fail = False
    assert runtime.infer(handle, tiny_model.inputs(2))["descriptor"].shape == (2, tiny_model.descriptor_dim)


# -- composition -------------------------------------------------------------------------------------------


def test_runtime_satisfies_the_protocol_and_is_cheap_to_build(trt: ModuleType, tmp_path: Path) -> None:
    config = RuntimeConfig(runtime="tensorrt", engine_dir=tmp_path, thermal_poll_hz=0)
    timings = []
    for _ in range(3):  # best of three: a busy CI box must not make this flaky
        started = time.perf_counter()
        runtime = trt.TensorRTRuntime(config, host=ORIN)
        timings.append(time.perf_counter() - started)
    assert min(timings) < 0.02
    assert isinstance(runtime, InferenceRuntime)
    assert runtime.current_runtime_label() == "tensorrt"
    assert isinstance(HostMemory(), trt.DeviceMemory)


def test_default_memory_needs_torch_with_cuda(trt: ModuleType, tmp_path: Path, tiny_model: Any) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA; the default memory would work")
    config = RuntimeConfig(runtime="tensorrt", engine_dir=tmp_path, thermal_poll_hz=0)
    runtime = trt.TensorRTRuntime(config, host=ORIN)  # no memory: torch CUDA, created at first infer
    handle = runtime.deserialize_engine(runtime.compile_engine(tiny_model.onnx, tiny_model.build_config()))
    with pytest.raises(RuntimeNotAvailableError, match="needs torch with CUDA for device buffers"):
        runtime.infer(handle, tiny_model.inputs(1))


def test_factory_builds_the_strategy_when_tensorrt_is_importable(
    trt: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(FAKES_DIR))  # find_spec("tensorrt") finds the fake on disk as well
    runtime = build_inference_runtime({"runtime": "tensorrt", "engine_dir": str(tmp_path)}, host=ORIN)
    assert type(runtime).__name__ == "TensorRTRuntime" and runtime.current_runtime_label() == "tensorrt"


def test_factory_reports_tensorrt_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importlib's marker for "not importable"
    with pytest.raises(RuntimeNotAvailableError, match="'tensorrt'"):
        build_inference_runtime({"runtime": "tensorrt", "engine_dir": str(tmp_path)}, host=ORIN)
