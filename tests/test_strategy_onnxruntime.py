from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import navcache_runtime as nr
from navcache_runtime.integrity import TEMP_PREFIX, sidecar_path
from navcache_runtime.strategies import onnxruntime as ort_strategy
from tests.conftest import TinyModel
from tests.support.isolation import run_json

FP32_ATOL = 1e-5


def _runtime(engine_dir: Path, **extra: object) -> nr.InferenceRuntime:
    return nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(engine_dir), **extra})


@pytest.fixture
def compiled(tiny_model: TinyModel, tmp_path: Path) -> tuple[nr.InferenceRuntime, nr.EngineCacheEntry]:
    runtime = _runtime(tmp_path / "engines")
    return runtime, runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())


def test_compile_writes_a_cpu_tied_optimized_model_with_sidecar(
    compiled, tiny_model: TinyModel, this_host: nr.HostFields
) -> None:
    _, entry = compiled
    name = nr.parse_engine_name(entry.path.name)
    assert name.host == nr.HostFields(ort=this_host.ort, cpu_isa=this_host.cpu_isa)
    assert name.source == nr.sha256_file(tiny_model.onnx)[:16]
    assert name.config == tiny_model.build_config().digest()[:8]
    assert entry.sha256 == sidecar_path(entry.path).read_text() == nr.sha256_file(entry.path)
    assert entry.compile_duration_s is not None and entry.compile_duration_s > 0
    assert entry.providers == ("CPUExecutionProvider",)
    assert entry.path.read_bytes() != tiny_model.onnx.read_bytes()  # ORT's optimized graph, not a copy
    assert not [p for p in entry.path.parent.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_deserialize_in_a_new_process_loads_without_recompiling(compiled, tiny_model: TinyModel) -> None:
    _, entry = compiled
    inputs = tiny_model.inputs(batch=5)
    np.save(entry.path.parent.parent / "x.npy", inputs["image"])
    before = sorted(p.name for p in entry.path.parent.iterdir())
    result = run_json(f"""
        import json, time
        from pathlib import Path
        import numpy as np
        import navcache_runtime as nr
        from navcache_runtime.strategies.onnxruntime import OnnxRuntime
        def no_compile(*a, **k):
            raise AssertionError("compile_engine called while loading")
        OnnxRuntime.compile_engine = no_compile
        rt = nr.build_inference_runtime({{"runtime": "onnx_trt_ep", "engine_dir": {str(entry.path.parent)!r}}})
        started = time.perf_counter()
        handle = rt.deserialize_engine(nr.entry_from_artifact(Path({str(entry.path)!r})))
        load_s = time.perf_counter() - started
        x = np.load(Path({str(entry.path.parent.parent / "x.npy")!r}))
        out = rt.infer(handle, {{"image": x}})["descriptor"]
        np.save(Path({str(entry.path.parent.parent / "y.npy")!r}), out)
        print(json.dumps({{"load_s": load_s, "providers": list(handle.providers)}}))
    """)
    assert sorted(p.name for p in entry.path.parent.iterdir()) == before
    assert result["providers"] == ["CPUExecutionProvider"]
    out = np.load(entry.path.parent.parent / "y.npy")
    np.testing.assert_allclose(out, tiny_model.reference(inputs), atol=FP32_ATOL)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_infer_matches_the_reference_across_the_profile(compiled, tiny_model: TinyModel, batch: int) -> None:
    runtime, entry = compiled
    handle = runtime.deserialize_engine(entry)
    inputs = tiny_model.inputs(batch)
    out = runtime.infer(handle, inputs)
    assert list(out) == ["descriptor"]
    assert out["descriptor"].shape == (batch, tiny_model.descriptor_dim)
    np.testing.assert_allclose(out["descriptor"], tiny_model.reference(inputs), atol=FP32_ATOL)


def test_float64_inputs_are_cast_and_bad_inputs_are_refused(compiled, tiny_model: TinyModel) -> None:
    runtime, entry = compiled
    handle = runtime.deserialize_engine(entry)
    x = tiny_model.inputs(2)["image"]
    np.testing.assert_allclose(
        runtime.infer(handle, {"image": x.astype(np.float64)})["descriptor"],
        runtime.infer(handle, {"image": x})["descriptor"],
        atol=1e-6,
    )
    with pytest.raises(nr.InferenceError, match=r"missing \['image'\], unknown \['img'\]"):
        runtime.infer(handle, {"img": x})
    with pytest.raises(nr.InferenceError, match="rank 3"):
        runtime.infer(handle, {"image": x[0]})
    with pytest.raises(nr.InferenceError, match="non-numeric"):
        runtime.infer(handle, {"image": np.array([["a"]])})
    with pytest.raises(nr.InferenceError, match="inference with"):
        runtime.infer(handle, {"image": x[:, :, :7, :7]})  # too small for the conv stack? ORT decides
    runtime.release_engine(handle)
    runtime.release_engine(handle)  # idempotent
    with pytest.raises(nr.InferenceError, match="was released"):
        runtime.infer(handle, {"image": x})


def test_tampering_one_byte_makes_the_gate_refuse(compiled) -> None:
    runtime, entry = compiled
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    entry.path.write_bytes(bytes(data))
    with pytest.raises(nr.EngineHashMismatchError, match="does not match its sidecar"):
        runtime.deserialize_engine(entry)
    with pytest.raises(nr.EngineHashMismatchError):
        runtime.deserialize_engine(nr.EngineCacheEntry(**{**entry.__dict__, "sha256": "0" * 64}))


def test_an_artifact_for_another_cpu_isa_is_refused(compiled, this_host: nr.HostFields) -> None:
    _, entry = compiled
    other_isa = "avx512" if this_host.cpu_isa != "avx512" else "avx2"
    runtime = nr.build_inference_runtime(
        {"runtime": "onnx_trt_ep", "engine_dir": str(entry.path.parent)},
        host=nr.HostFields(**{**this_host.__dict__, "cpu_isa": other_isa}),
    )
    with pytest.raises(nr.EngineSchemaMismatchError, match=f"CPU ISA {this_host.cpu_isa} in the name but {other_isa}"):
        runtime.deserialize_engine(entry)


def test_silent_provider_fallback_is_detected_reported_and_named_for_what_ran(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend this ORT build lists CUDA (as onnxruntime-gpu does on a host without a usable GPU); ORT then
    # really falls back to CPU at session creation, only warning through Python's warnings module.
    monkeypatch.setattr(
        ort_strategy.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    runtime = _runtime(tmp_path / "engines")
    # A handler on the strategy's own logger: what the root logger carries depends on what other tests (an
    # in-process CLI run configures logging) did before this one.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger(ort_strategy.__name__).addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    finally:
        logging.getLogger(ort_strategy.__name__).removeHandler(handler)
    assert any(
        "fell back from CUDAExecutionProvider to CPUExecutionProvider" in r.getMessage()
        and r.levelno == logging.WARNING
        for r in records
    ), [r.getMessage() for r in records]
    assert entry.notes and "fell back" in entry.notes[0]
    assert entry.host.sm is None and entry.host.cpu_isa  # named for the CPU it really was built for
    strict = _runtime(tmp_path / "strict", strict_providers=True)
    with warnings.catch_warnings(), pytest.raises(nr.EngineBuildError, match="fell back"):
        warnings.simplefilter("ignore", UserWarning)
        strict.compile_engine(tiny_model.onnx, tiny_model.build_config())
    assert not (tmp_path / "strict").exists() or not list((tmp_path / "strict").iterdir())


def test_precisions_this_host_cannot_build_are_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    with pytest.raises(nr.EngineBuildError, match="fp16 needs the CUDA or TensorRT"):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp16"))
    with pytest.raises(nr.EngineBuildError, match="int8 needs the TensorRT execution provider"):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("int8"))


def test_missing_and_corrupt_models_fail_cleanly(tiny_model: TinyModel, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path / "engines")
    with pytest.raises(nr.EngineBuildError, match="does not exist"):
        runtime.compile_engine(tmp_path / "nope.onnx", tiny_model.build_config())
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(tiny_model.onnx.read_bytes()[:2000])
    with pytest.raises(nr.EngineBuildError, match="could not compile corrupt.onnx"):
        runtime.compile_engine(corrupt, tiny_model.build_config())
    assert list((tmp_path / "engines").iterdir()) == []  # no half-written artifact, no temp file


def test_unknown_provider_names_are_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, providers=["openvino"])
    with pytest.raises(nr.EngineBuildError, match="unsupported ONNX Runtime provider"):
        runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())


def test_loading_skips_graph_optimisation(compiled, tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, entry = compiled
    levels = []
    real = ort.InferenceSession

    def spy(path, options=None, **kwargs):
        levels.append(options.graph_optimization_level)
        return real(path, options, **kwargs)

    monkeypatch.setattr(ort_strategy.ort, "InferenceSession", spy)
    runtime.deserialize_engine(entry)
    assert levels == [ort.GraphOptimizationLevel.ORT_DISABLE_ALL]
    assert json.dumps(str(levels[0]))  # the spy really ran


@pytest.mark.parametrize("spinning", [True, False])
def test_intra_op_spinning_reaches_the_session(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spinning: bool
) -> None:
    runtime = _runtime(tmp_path / "engines", intra_op_spinning=spinning)
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())
    expected = tiny_model.reference(tiny_model.inputs(batch=3))
    seen = []
    real = ort.InferenceSession

    def spy(path, options=None, **kwargs):
        try:
            seen.append(options.get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: ORT's default, which spins
            seen.append("unset")
        return real(path, options, **kwargs)

    monkeypatch.setattr(ort_strategy.ort, "InferenceSession", spy)
    handle = runtime.deserialize_engine(entry)
    assert seen == (["unset"] if spinning else ["0"])
    out = next(iter(runtime.infer(handle, tiny_model.inputs(batch=3)).values()))
    np.testing.assert_allclose(out, expected, atol=FP32_ATOL)


@pytest.mark.parametrize("key", ["intra_op_spinning", "strict_providers"])
def test_boolean_settings_are_refused_unless_boolean(tmp_path: Path, key: str) -> None:
    with pytest.raises(nr.RuntimeConfigError, match=f"{key} must be true or false, got 'no'"):
        _runtime(tmp_path, **{key: "no"})


@pytest.mark.gpu
def test_cuda_ep_compiles_and_runs_on_the_gpu(tiny_model: TinyModel, tmp_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime build has no CUDA provider")
    runtime = _runtime(tmp_path, providers=["cuda"], strict_providers=True)
    for precision, atol in (("fp32", 1e-4), ("fp16", 2e-2)):
        entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config(precision))
        assert entry.providers[0] == "CUDAExecutionProvider" and entry.host.sm
        handle = runtime.deserialize_engine(entry)
        inputs = tiny_model.inputs(8)
        out = runtime.infer(handle, inputs)["descriptor"]
        np.testing.assert_allclose(out.astype(np.float32), tiny_model.reference(inputs), atol=atol)
