from __future__ import annotations

from pathlib import Path

import pytest

import navcache_runtime as nr

METHODS = ("compile_engine", "deserialize_engine", "infer", "release_engine", "thermal_state", "current_runtime_label")


class _Complete:
    def compile_engine(self, onnx_path, build_config): ...
    def deserialize_engine(self, entry): ...
    def infer(self, handle, inputs): ...
    def release_engine(self, handle): ...
    def thermal_state(self): ...
    def current_runtime_label(self): ...


def test_a_complete_implementation_conforms() -> None:
    assert isinstance(_Complete(), nr.InferenceRuntime)


@pytest.mark.parametrize("missing", METHODS)
def test_a_fake_missing_one_method_does_not_conform(missing: str) -> None:
    namespace = {name: getattr(_Complete, name) for name in METHODS if name != missing}
    fake = type(f"Without_{missing}", (), namespace)()
    assert not isinstance(fake, nr.InferenceRuntime)


def test_the_onnxruntime_strategy_conforms(tmp_path: Path) -> None:
    runtime = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(tmp_path)})
    assert isinstance(runtime, nr.InferenceRuntime)
    assert runtime.current_runtime_label() == "onnx_trt_ep"


def test_thermal_state_without_any_source_raises_the_typed_error(tmp_path: Path) -> None:
    runtime = nr.build_inference_runtime(
        {
            "runtime": "onnx_trt_ep",
            "engine_dir": str(tmp_path),
            "thermal_sysfs_root": str(tmp_path / "no-sysfs"),
            "thermal_poll_hz": 0,
        }
    )
    pytest.importorskip("pynvml")
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("an NVML GPU is present")
    except pynvml.NVMLError:
        pass
    with pytest.raises(nr.TelemetryUnavailableError):
        runtime.thermal_state()
