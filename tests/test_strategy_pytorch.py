"""The pytorch_fp16 strategy: AOTInductor compile, gate-checked load, inference, eager fallback, breaker.

One AOTInductor compile (~20-60 s on 2 cores) is shared by the module; tests that need another compile
are marked ``slow``. Eager-fallback and circuit-breaker tests make AOTInductor fail on purpose, so they
cost only an export and a save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from navcache_runtime import (
    BuildConfig,
    EngineBuildError,
    EngineCacheEntry,
    EngineHandle,
    EngineHashMismatchError,
    EngineSchemaMismatchError,
    EngineSidecarMissingError,
    HostFields,
    InferenceError,
    InferenceRuntime,
    InputProfile,
    OutOfMemoryError,
    RuntimeConfig,
    build_inference_runtime,
    entry_from_artifact,
    parse_engine_name,
    sha256_file,
    sidecar_path,
)
from tests.conftest import TinyModel

pytest.importorskip("torch")
import torch
import torch._inductor  # the tests patch its compile entry point

from navcache_runtime.strategies.pytorch import (
    INDUCTOR_CACHE_ENV,
    PyTorchRuntime,
    TorchEngineHandle,
)

# torch's own pickling of pytree specs warns from copyreg, which the torch.* filter in pyproject misses.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
# AOTInductor vs ONNX Runtime CPU on an L2-normalised descriptor: measured ~6e-8 on CPU. On CUDA, fp32
# convolutions run in TF32 by default (torch.backends.cudnn.allow_tf32), hence the looser bound there.
FP32_ATOL = 5e-3 if torch.cuda.is_available() else 1e-4
FP16_ATOL = 2e-2  # fp16 weights and activations vs the fp32 reference: measured ~1e-3
OUTPUT_NAMES = {"output_names": "descriptor"}  # the ONNX export's output name


def make_runtime(engine_dir: Path, **config: Any) -> PyTorchRuntime:
    runtime = build_inference_runtime({"runtime": "pytorch_fp16", "engine_dir": engine_dir, **config})
    assert isinstance(runtime, PyTorchRuntime)
    return runtime


def artifacts(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


@dataclasses.dataclass(frozen=True)
class Compiled:
    runtime: PyTorchRuntime
    entry: EngineCacheEntry
    build_config: BuildConfig
    engine_dir: Path


@pytest.fixture(autouse=True)
def fresh_circuit_breaker() -> Iterator[None]:
    """The breaker is per process; tests that fail compiles on purpose must not trip it for others."""
    PyTorchRuntime.reset_circuit_breaker()
    yield
    PyTorchRuntime.reset_circuit_breaker()


@pytest.fixture(scope="module")
def compiled(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """The module's one real AOTInductor compile (fp32, CPU or the GPU when there is one)."""
    engine_dir = tmp_path_factory.mktemp("engines")
    runtime = make_runtime(engine_dir)
    build_config = tiny_model.build_config("fp32", builder_options=OUTPUT_NAMES)
    entry = runtime.compile_engine(tiny_model.onnx, build_config)
    return Compiled(runtime, entry, build_config, engine_dir)


@pytest.fixture(scope="module")
def handle(compiled: Compiled) -> Iterator[TorchEngineHandle]:
    loaded = compiled.runtime.deserialize_engine(compiled.entry)
    assert isinstance(loaded, TorchEngineHandle)
    yield loaded
    compiled.runtime.release_engine(loaded)


def failing_compile(calls: list[object]) -> Any:
    def fail(*args: object, **kwargs: object) -> str:
        calls.append(args)
        raise RuntimeError("simulated C++ compiler failure")

    return fail


# -- compile -------------------------------------------------------------------------------------------
def test_satisfies_the_protocol(compiled: Compiled) -> None:
    assert isinstance(compiled.runtime, InferenceRuntime)
    assert compiled.runtime.current_runtime_label() == "pytorch_fp16"


def test_compile_writes_artifact_and_sidecar(compiled: Compiled, tiny_model: TinyModel, this_host: HostFields) -> None:
    entry = compiled.entry
    assert entry.path.parent == compiled.engine_dir and entry.path.suffix == ".pt2"
    assert entry.path.is_file() and sidecar_path(entry.path).is_file()
    assert sidecar_path(entry.path).read_text() == entry.sha256 == sha256_file(entry.path)
    assert not entry.eager_fallback
    assert entry.compile_duration_s is not None and entry.compile_duration_s > 0
    assert entry.prewarm_duration_s is not None and entry.prewarm_duration_s > 0
    assert entry.runtime_label == "pytorch_fp16" and entry.precision == "fp32" and entry.model_name == "tiny_vpr"
    # Nothing but the artifact and its sidecar: no temp files left behind.
    assert artifacts(compiled.engine_dir) == sorted([entry.path.name, sidecar_path(entry.path).name])

    name = parse_engine_name(entry.path.name)
    assert name.runtime_label == "pytorch_fp16" and not name.eager
    assert name.host.torch == this_host.torch
    if torch.cuda.is_available():
        assert name.host.sm is not None and name.host.cpu_isa is None
    else:
        assert name.host.cpu_isa == this_host.cpu_isa and name.host.sm is None
    assert name.source == sha256_file(tiny_model.pt2)[:16] == entry.source_digest
    assert name.config == compiled.build_config.digest()[:8] == entry.config_digest
    assert name.host == entry.host


def test_entry_from_artifact_describes_the_same_engine(compiled: Compiled) -> None:
    described = entry_from_artifact(compiled.entry.path)
    for attr in (
        "path",
        "sha256",
        "model_name",
        "precision",
        "runtime_label",
        "host",
        "source_digest",
        "config_digest",
        "eager_fallback",
    ):
        assert getattr(described, attr) == getattr(compiled.entry, attr), attr
    assert described.compile_duration_s is None


def test_handle_carries_the_signature(handle: TorchEngineHandle) -> None:
    assert handle.input_names == ("image",)
    assert handle.output_names == ("descriptor",)
    assert handle.dtype == torch.float32 and not handle.eager
    assert handle.min_shapes == ((1, 3, 64, 64),) and handle.max_shapes == ((16, 3, 64, 64),)


def test_output_names_default_to_positional(compiled: Compiled, tiny_model: TinyModel) -> None:
    program = torch.export.load(tiny_model.pt2)
    names = PyTorchRuntime._output_names(program, tiny_model.pt2, tiny_model.build_config())
    assert names == ("output_0",)  # the graph's own output name ("div") would mean nothing to a caller


# -- deserialize in a fresh process ------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import torch, torch._inductor

    def forbidden(*args, **kwargs):
        raise AssertionError("deserialize_engine/infer must not export or compile")

    torch._inductor.aoti_compile_and_package = forbidden
    torch.export.export = forbidden

    import navcache_runtime as nr

    engine_dir, artifact, inputs_path, output_path = sys.argv[1:5]
    runtime = nr.build_inference_runtime({"runtime": "pytorch_fp16", "engine_dir": engine_dir})
    started = time.perf_counter()
    handle = runtime.deserialize_engine(nr.entry_from_artifact(artifact))
    load_s = time.perf_counter() - started
    outputs = runtime.infer(handle, {"image": np.load(inputs_path)})
    np.save(output_path, outputs["descriptor"])
    runtime.release_engine(handle)
    print(json.dumps({"load_s": load_s, "outputs": sorted(outputs), "device": str(handle.device)}))
    """
)


def run_child(
    engine_dir: Path, artifact: Path, inputs: np.ndarray, tmp_path: Path
) -> tuple[dict[str, Any], np.ndarray]:
    np.save(tmp_path / "inputs.npy", inputs)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT / "src"), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(engine_dir),
            str(artifact),
            str(tmp_path / "inputs.npy"),
            str(tmp_path / "outputs.npy"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"child failed:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report, np.load(tmp_path / "outputs.npy")


def test_deserialize_in_a_new_process_matches_reference_without_compiling(
    compiled: Compiled, tiny_model: TinyModel, tmp_path: Path
) -> None:
    before = artifacts(compiled.engine_dir)
    inputs = tiny_model.inputs(batch=4, seed=7)
    report, output = run_child(compiled.engine_dir, compiled.entry.path, inputs["image"], tmp_path)
    assert report["outputs"] == ["descriptor"]
    assert report["load_s"] < 5.0  # loading a package is milliseconds; a compile would take tens of seconds
    assert artifacts(compiled.engine_dir) == before  # nothing was written next to the engine
    assert output.dtype == np.float32
    np.testing.assert_allclose(output, tiny_model.reference(inputs), atol=FP32_ATOL, rtol=0)


# -- inference -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_dynamic_batch_matches_reference(
    compiled: Compiled, handle: TorchEngineHandle, tiny_model: TinyModel, batch: int
) -> None:
    inputs = tiny_model.inputs(batch=batch, seed=batch)
    outputs = compiled.runtime.infer(handle, inputs)
    assert set(outputs) == {"descriptor"}
    assert outputs["descriptor"].shape == (batch, tiny_model.descriptor_dim)
    assert outputs["descriptor"].dtype == np.float32
    np.testing.assert_allclose(outputs["descriptor"], tiny_model.reference(inputs), atol=FP32_ATOL, rtol=0)


def test_inputs_are_cast_to_the_engine_dtype(
    compiled: Compiled, handle: TorchEngineHandle, tiny_model: TinyModel
) -> None:
    inputs = tiny_model.inputs(batch=2)
    as_f64 = {"image": inputs["image"].astype(np.float64)[:, :, ::-1][:, :, ::-1]}  # non-contiguous float64
    np.testing.assert_allclose(
        compiled.runtime.infer(handle, as_f64)["descriptor"], tiny_model.reference(inputs), atol=FP32_ATOL, rtol=0
    )


@pytest.mark.parametrize(
    ("make_inputs", "message"),
    [
        (lambda x: {}, "missing ['image']"),
        (lambda x: {"image": x, "mask": x}, "unknown ['mask']"),
        (lambda x: {"img": x}, "expects inputs ['image']"),
        (lambda x: {"image": np.full(x.shape, "a")}, "non-numeric"),
        (lambda x: {"image": x[:, :, :32, :32]}, "outside the profile"),
        (lambda x: {"image": np.concatenate([x] * 5)}, "outside the profile"),  # batch 20 > max 16
        (lambda x: {"image": x[0]}, "outside the profile"),  # wrong rank
    ],
    ids=["missing", "unknown", "renamed", "non-numeric", "spatial", "batch", "rank"],
)
def test_bad_inputs_raise_inference_error(
    compiled: Compiled, handle: TorchEngineHandle, tiny_model: TinyModel, make_inputs: Any, message: str
) -> None:
    with pytest.raises(InferenceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compiled.runtime.infer(handle, make_inputs(tiny_model.inputs(batch=4)["image"]))


def test_released_handle_is_refused_and_release_is_idempotent(compiled: Compiled, tiny_model: TinyModel) -> None:
    fresh = compiled.runtime.deserialize_engine(compiled.entry)
    compiled.runtime.release_engine(fresh)
    compiled.runtime.release_engine(fresh)
    assert fresh.released
    with pytest.raises(InferenceError, match="released"):
        compiled.runtime.infer(fresh, tiny_model.inputs(batch=1))


def test_foreign_handle_is_refused(compiled: Compiled, tiny_model: TinyModel) -> None:
    foreign = EngineHandle(entry=compiled.entry, input_names=("image",))
    with pytest.raises(InferenceError, match="TorchEngineHandle"):
        compiled.runtime.infer(foreign, tiny_model.inputs(batch=1))
    with pytest.raises(InferenceError):
        compiled.runtime.release_engine(foreign)


def test_model_failures_are_rewrapped(compiled: Compiled, handle: TorchEngineHandle, tiny_model: TinyModel) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("kernel exploded")

    def oom(*args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    for module, error, message in ((crash, InferenceError, "kernel exploded"), (oom, OutOfMemoryError, "memory")):
        broken = dataclasses.replace(handle, module=module)
        with pytest.raises(error, match=message):
            compiled.runtime.infer(broken, tiny_model.inputs(batch=1))


# -- the engine gate ---------------------------------------------------------------------------------
def test_tampered_artifact_is_refused(compiled: Compiled, tmp_path: Path) -> None:
    copy = Path(shutil.copy(compiled.entry.path, tmp_path))
    shutil.copy(sidecar_path(compiled.entry.path), tmp_path)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(data)
    with pytest.raises(EngineHashMismatchError, match=copy.name):
        compiled.runtime.deserialize_engine(dataclasses.replace(compiled.entry, path=copy))
    with pytest.raises(EngineHashMismatchError):
        compiled.runtime.deserialize_engine(entry_from_artifact(copy))


def test_missing_sidecar_is_refused(compiled: Compiled, tmp_path: Path) -> None:
    copy = Path(shutil.copy(compiled.entry.path, tmp_path))
    with pytest.raises(EngineSidecarMissingError, match=copy.name):
        compiled.runtime.deserialize_engine(dataclasses.replace(compiled.entry, path=copy))


def test_artifact_for_another_host_is_refused(compiled: Compiled, this_host: HostFields) -> None:
    config = RuntimeConfig(runtime="pytorch_fp16", engine_dir=compiled.engine_dir)
    other_torch = PyTorchRuntime(config, host=dataclasses.replace(this_host, torch="9.9"))
    with pytest.raises(EngineSchemaMismatchError, match="PyTorch 2.13"):
        other_torch.deserialize_engine(compiled.entry)
    if compiled.entry.host.cpu_isa is not None:
        other_cpu = PyTorchRuntime(config, host=dataclasses.replace(this_host, cpu_isa="neon"))
        with pytest.raises(EngineSchemaMismatchError, match="CPU ISA"):
            other_cpu.deserialize_engine(compiled.entry)


# -- build errors (no compile happens) ---------------------------------------------------------------
def test_int8_is_refused_with_a_hint(tiny_model: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(EngineBuildError, match="int8") as info:
        make_runtime(tmp_path).compile_engine(tiny_model.onnx, tiny_model.build_config("int8"))
    assert info.value.hint is not None and "tensorrt" in info.value.hint
    assert not any(tmp_path.iterdir())


def test_onnx_without_pt2_sibling_is_refused_with_a_hint(model_copy: TinyModel, tmp_path: Path) -> None:
    model_copy.pt2.unlink()
    with pytest.raises(EngineBuildError, match=model_copy.pt2.name) as info:
        make_runtime(tmp_path / "engines").compile_engine(model_copy.onnx, model_copy.build_config())
    assert info.value.hint is not None and "<stem>.pt2" in info.value.hint and "torch.export" in info.value.hint
    assert info.value.path == model_copy.pt2


def test_unloadable_program_is_refused(model_copy: TinyModel, tmp_path: Path) -> None:
    model_copy.pt2.write_bytes(b"not a zip archive")
    with pytest.raises(EngineBuildError, match="not a loadable torch.export program") as info:
        make_runtime(tmp_path / "engines").compile_engine(model_copy.pt2, model_copy.build_config())
    assert info.value.path == model_copy.pt2


@pytest.mark.parametrize(
    ("build_config", "message"),
    [
        (BuildConfig(), "no input_shapes"),
        (BuildConfig(input_shapes=(InputProfile.fixed("image", (1, 3, 64)),)), "rank"),
        (
            BuildConfig(
                input_shapes=(InputProfile.fixed("a", (1, 3, 64, 64)), InputProfile.fixed("b", (1, 3, 64, 64)))
            ),
            "takes 1 input",
        ),
        (
            BuildConfig(
                input_shapes=(InputProfile.fixed("image", (1, 3, 64, 64)),), builder_options={"output_names": "a,b"}
            ),
            "output_names",
        ),
    ],
    ids=["no-profile", "rank", "input-count", "output-count"],
)
def test_profile_mismatches_are_refused(
    tiny_model: TinyModel, tmp_path: Path, build_config: BuildConfig, message: str
) -> None:
    with pytest.raises(EngineBuildError, match=message):
        make_runtime(tmp_path).compile_engine(tiny_model.pt2, build_config)
    assert not any(tmp_path.iterdir())


def test_compile_oom_is_typed_and_leaves_nothing(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args: object, **kwargs: object) -> str:
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", oom)
    with pytest.raises(OutOfMemoryError):
        make_runtime(tmp_path).compile_engine(tiny_model.onnx, tiny_model.build_config())
    assert artifacts(tmp_path) == []  # no eager fallback for OOM, no half-written file
    assert PyTorchRuntime.aot_failure_count(sha256_file(tiny_model.pt2)) == 0


# -- eager fallback and circuit breaker ----------------------------------------------------------------
def test_eager_fallback_when_aot_compile_fails(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", failing_compile(calls))
    runtime = make_runtime(tmp_path)
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config(builder_options=OUTPUT_NAMES))
    assert len(calls) == 1
    assert entry.eager_fallback and parse_engine_name(entry.path.name).eager
    assert entry.path.name.endswith("__eager.pt2")
    assert any("simulated C++ compiler failure" in note for note in entry.notes)
    assert entry.compile_duration_s is not None and entry.prewarm_duration_s is not None
    assert artifacts(tmp_path) == sorted([entry.path.name, sidecar_path(entry.path).name])

    loaded = runtime.deserialize_engine(entry_from_artifact(entry.path))
    assert isinstance(loaded, TorchEngineHandle) and loaded.eager
    inputs = tiny_model.inputs(batch=3)
    np.testing.assert_allclose(
        runtime.infer(loaded, inputs)["descriptor"], tiny_model.reference(inputs), atol=FP32_ATOL, rtol=0
    )
    with pytest.raises(InferenceError, match="outside the profile"):
        runtime.infer(loaded, tiny_model.inputs(batch=17))
    runtime.release_engine(loaded)


def test_eager_fallback_keeps_the_original_program_when_export_fails(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated export failure")

    monkeypatch.setattr(torch.export, "export", no_export)
    runtime = make_runtime(tmp_path)
    entry = runtime.compile_engine(tiny_model.pt2, tiny_model.build_config(builder_options=OUTPUT_NAMES))
    assert entry.eager_fallback and any("simulated export failure" in note for note in entry.notes)
    loaded = runtime.deserialize_engine(entry)
    inputs = tiny_model.inputs(batch=2)
    np.testing.assert_allclose(
        runtime.infer(loaded, inputs)["descriptor"], tiny_model.reference(inputs), atol=FP32_ATOL, rtol=0
    )


def test_circuit_breaker_stops_retrying_aot(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", failing_compile(calls))
    runtime = make_runtime(tmp_path, compile_failure_threshold=2)
    build_config = tiny_model.build_config(builder_options=OUTPUT_NAMES)
    entries = [runtime.compile_engine(tiny_model.onnx, build_config) for _ in range(2)]
    assert len(calls) == 2
    with caplog.at_level("WARNING", logger="navcache_runtime.strategies.pytorch"):
        third = runtime.compile_engine(tiny_model.onnx, build_config)
    assert len(calls) == 2  # the third compile never reached AOTInductor
    assert all(e.eager_fallback for e in [*entries, third])
    assert any("circuit breaker" in note for note in third.notes)
    assert "circuit breaker" in caplog.text
    # The breaker is per process, not per runtime instance; a reset re-enables AOT attempts.
    make_runtime(tmp_path, compile_failure_threshold=2).compile_engine(tiny_model.onnx, build_config)
    assert len(calls) == 2
    PyTorchRuntime.reset_circuit_breaker()
    runtime.compile_engine(tiny_model.onnx, build_config)
    assert len(calls) == 3


# -- Inductor cache directory --------------------------------------------------------------------------
@pytest.fixture
def restore_inductor_cache_env() -> Iterator[None]:
    before = os.environ.get(INDUCTOR_CACHE_ENV)
    yield
    if before is None:
        os.environ.pop(INDUCTOR_CACHE_ENV, None)
    else:
        os.environ[INDUCTOR_CACHE_ENV] = before
    from torch._inductor.utils import clear_caches

    clear_caches()  # Inductor memoizes paths under the cache dir


@pytest.mark.usefixtures("restore_inductor_cache_env")
def test_inductor_cache_dir_precedence(tmp_path: Path) -> None:
    os.environ[INDUCTOR_CACHE_ENV] = str(tmp_path / "from-env")
    assert make_runtime(tmp_path / "e")._use_inductor_cache() == tmp_path / "from-env"
    configured = make_runtime(tmp_path / "e", inductor_cache_dir=tmp_path / "configured")
    assert configured._use_inductor_cache() == tmp_path / "configured"
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "configured")
    del os.environ[INDUCTOR_CACHE_ENV]
    assert make_runtime(tmp_path / "e")._use_inductor_cache() == tmp_path / "e" / "inductor-cache"
    assert (tmp_path / "e" / "inductor-cache").is_dir()


@pytest.mark.slow
@pytest.mark.usefixtures("restore_inductor_cache_env")
def test_compile_populates_the_configured_inductor_cache(tiny_model: TinyModel, tmp_path: Path) -> None:
    cache = tmp_path / "inductor"
    runtime = make_runtime(tmp_path / "engines", inductor_cache_dir=cache)
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config(builder_options=OUTPUT_NAMES))
    assert not entry.eager_fallback
    assert os.environ[INDUCTOR_CACHE_ENV] == str(cache)
    assert sum(1 for p in cache.rglob("*") if p.is_file()) > 0


# -- fp16 ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fp16_on_cpu_matches_reference(tiny_model: TinyModel, tmp_path: Path) -> None:
    runtime = make_runtime(tmp_path)
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp16", builder_options=OUTPUT_NAMES))
    assert not entry.eager_fallback and entry.precision == "fp16"
    loaded = runtime.deserialize_engine(entry)
    inputs = tiny_model.inputs(batch=8)
    output = runtime.infer(loaded, inputs)["descriptor"]
    assert output.dtype == np.float16  # fp16 engines return fp16
    np.testing.assert_allclose(output.astype(np.float32), tiny_model.reference(inputs), atol=FP16_ATOL, rtol=0)


@pytest.mark.gpu
def test_fp16_on_cuda_matches_reference(tiny_model: TinyModel, tmp_path: Path, this_host: HostFields) -> None:
    runtime = make_runtime(tmp_path)
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config("fp16", builder_options=OUTPUT_NAMES))
    assert not entry.eager_fallback
    name = parse_engine_name(entry.path.name)
    assert name.host.sm is not None and name.host.device is not None and name.host.cpu_isa is None
    loaded = runtime.deserialize_engine(entry)
    assert isinstance(loaded, TorchEngineHandle)
    assert loaded.device.type == "cuda" and loaded.dtype == torch.float16
    for batch in (1, 4, 16):
        inputs = tiny_model.inputs(batch=batch, seed=batch)
        output = runtime.infer(loaded, inputs)["descriptor"]
        np.testing.assert_allclose(output.astype(np.float32), tiny_model.reference(inputs), atol=FP16_ATOL, rtol=0)
    runtime.release_engine(loaded)
    assert loaded.released and loaded.module is None


@pytest.mark.gpu
def test_cuda_engine_loads_in_a_new_process(compiled: Compiled, tiny_model: TinyModel, tmp_path: Path) -> None:
    inputs = tiny_model.inputs(batch=16, seed=3)
    report, output = run_child(compiled.engine_dir, compiled.entry.path, inputs["image"], tmp_path)
    assert report["device"].startswith("cuda")
    np.testing.assert_allclose(output, tiny_model.reference(inputs), atol=FP32_ATOL, rtol=0)


# -- load what was verified: a package swapped between the gate's check and the load ---------------------
def test_a_package_swapped_right_after_the_gate_copied_it_is_not_the_one_loaded(
    compiled: Compiled, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from navcache_runtime import gate as gate_module
    from tests.test_load_verified import swap_after_gate_hash

    path = tmp_path / compiled.entry.path.name  # a private copy of the module's artifact, to attack
    shutil.copy(compiled.entry.path, path)
    shutil.copy(sidecar_path(compiled.entry.path), sidecar_path(path))
    copies: list[Path] = []
    real_private = gate_module.private_directory

    def recorded(prefix: str = "navcache-") -> Path:
        copies.append(real_private(prefix))
        return copies[-1]

    monkeypatch.setattr(gate_module, "private_directory", recorded)
    swapped = swap_after_gate_hash(monkeypatch, path, b"PK\x03\x04 not the package that was verified" * 64)
    handle = compiled.runtime.deserialize_engine(dataclasses.replace(compiled.entry, path=path))
    assert swapped == [path] and path.read_bytes().startswith(b"PK\x03\x04 not")
    inputs = tiny_model.inputs(batch=2, seed=5)
    np.testing.assert_allclose(
        compiled.runtime.infer(handle, inputs)["descriptor"], tiny_model.reference(inputs), atol=FP32_ATOL, rtol=0
    )
    compiled.runtime.release_engine(handle)
    assert len(copies) == 1 and not copies[0].exists()  # the private copy is gone once loaded


def test_an_eager_program_swapped_right_after_the_gate_read_it_is_not_the_one_loaded(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_load_verified import swap_after_gate_hash

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", failing_compile([]))
    runtime = make_runtime(tmp_path)
    entry = runtime.compile_engine(tiny_model.onnx, tiny_model.build_config(builder_options=OUTPUT_NAMES))
    assert entry.eager_fallback
    swapped = swap_after_gate_hash(monkeypatch, entry.path, b"not the program that was verified")
    loaded = runtime.deserialize_engine(entry)
    assert swapped == [entry.path]
    inputs = tiny_model.inputs(batch=2)
    np.testing.assert_allclose(
        runtime.infer(loaded, inputs)["descriptor"], tiny_model.reference(inputs), atol=FP32_ATOL, rtol=0
    )
