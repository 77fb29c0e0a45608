from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import navcache_runtime as nr
from navcache_runtime import factory
from tests.support.isolation import run_json


def test_unknown_label_is_rejected_at_load_listing_valid_values() -> None:
    with pytest.raises(
        nr.RuntimeConfigError, match="unknown runtime 'openvino'; valid values: tensorrt, onnx_trt_ep, pytorch_fp16"
    ):
        nr.load_runtime_config({"runtime": "openvino"})


def test_unknown_keys_and_bad_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(nr.RuntimeConfigError, match="unknown runtime config key\\(s\\) 'engin_dir'"):
        nr.load_runtime_config({"runtime": "onnx_trt_ep", "engin_dir": "x"})
    with pytest.raises(nr.RuntimeConfigError, match="thermal_poll_hz"):
        nr.load_runtime_config({"runtime": "onnx_trt_ep", "thermal_poll_hz": -1})
    with pytest.raises(nr.RuntimeConfigError, match="lacks 'runtime'"):
        nr.load_runtime_config({})


def test_config_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "runtime.toml"
    path.write_text('[runtime]\nlabel = "pytorch_fp16"\nengine_dir = "/data/engines"\nthermal_poll_hz = 2.5\n')
    config = nr.load_runtime_config(path)
    assert (config.runtime, config.engine_dir, config.thermal_poll_hz) == ("pytorch_fp16", Path("/data/engines"), 2.5)
    path.write_text('runtime = "tensorrt"\nthermal_zones = ["CPU-therm"]\n')
    assert nr.load_runtime_config(path).thermal_zones == ("CPU-therm",)
    path.write_text("runtime = \n")
    with pytest.raises(nr.RuntimeConfigError, match="not valid TOML"):
        nr.load_runtime_config(path)
    with pytest.raises(nr.RuntimeConfigError, match="does not exist"):
        nr.load_runtime_config(tmp_path / "missing.toml")


def test_factory_honours_the_configured_label(tmp_path: Path, this_host: nr.HostFields) -> None:
    runtime = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(tmp_path)})
    assert runtime.current_runtime_label() == "onnx_trt_ep"
    assert isinstance(runtime, nr.InferenceRuntime)
    assert type(runtime).__name__ == "OnnxRuntime"


def test_factory_raises_when_the_strategy_library_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        factory.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(nr.RuntimeNotAvailableError, match="runtime 'onnx_trt_ep' needs the 'onnxruntime'") as caught:
        nr.build_inference_runtime({"runtime": "onnx_trt_ep"})
    assert caught.value.hint is not None and "navcache[ort]" in caught.value.hint


def test_tensorrt_is_reported_unavailable_on_this_machine() -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(nr.RuntimeNotAvailableError, match="'tensorrt'"):
        nr.build_inference_runtime({"runtime": "tensorrt"})


def test_importing_the_package_imports_no_inference_library() -> None:
    result = run_json("""
        import json, sys
        import navcache_runtime
        heavy = [m for m in ("onnxruntime", "torch", "tensorrt", "onnx", "prefect", "faiss") if m in sys.modules]
        config = navcache_runtime.load_runtime_config({"runtime": "onnx_trt_ep"})
        print(json.dumps({"heavy": heavy}))
    """)
    assert result["heavy"] == []


def test_strategy_library_is_imported_only_when_selected() -> None:
    result = run_json("""
        import json, sys
        import navcache_runtime
        navcache_runtime.build_inference_runtime({"runtime": "onnx_trt_ep"})
        print(json.dumps({m: m in sys.modules for m in ("onnxruntime", "torch", "tensorrt")}))
    """)
    assert result == {"onnxruntime": True, "torch": False, "tensorrt": False}
