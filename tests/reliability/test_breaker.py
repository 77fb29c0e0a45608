"""Compile failures: a backbone that always fails trips the circuit breaker after N attempts, is
reported with its error, and the other backbones' engines stay valid; the PyTorch path falls back to eager
with the flag recorded.

AOTInductor is patched to fail, so no test here pays for a real AOT compile (export + save + pre-warm only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import navcache_runtime as nr
from navcache.engines import BackboneBuild, BackboneBuildError, Outcome, compile_in_order, compile_or_reuse
from navcache_runtime.integrity import TEMP_PREFIX
from tests.conftest import TinyModel
from tests.support.models import export_models, make_model

pytest.importorskip("torch")
import torch
import torch._inductor  # the tests patch its compile entry point

from navcache_runtime.strategies.pytorch import PyTorchRuntime

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

THRESHOLD = 2
OUTPUT_NAMES = {"output_names": "descriptor"}


@pytest.fixture(autouse=True)
def fresh_circuit_breaker() -> Iterator[None]:
    """The breaker is per process: start closed, and never leave it open for other tests."""
    PyTorchRuntime.reset_circuit_breaker()
    yield
    PyTorchRuntime.reset_circuit_breaker()


def test_always_failing_aot_trips_the_breaker_and_falls_back_to_eager(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Any] = []

    def always_fails(*args: object, **kwargs: object) -> str:
        calls.append(kwargs.get("package_path"))
        raise RuntimeError("simulated AOTInductor failure: cc1plus killed")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", always_fails)
    runtime = nr.build_inference_runtime(
        {"runtime": "pytorch_fp16", "engine_dir": tmp_path, "compile_failure_threshold": THRESHOLD}
    )
    assert isinstance(runtime, PyTorchRuntime)
    build_config = tiny_model.build_config("fp32", builder_options=OUTPUT_NAMES)
    digest = runtime.source_digest(tiny_model.pt2)

    entries = []
    for attempt in range(1, THRESHOLD + 1):
        entry = runtime.compile_engine(tiny_model.onnx, build_config)
        assert len(calls) == attempt  # each of the first N compiles tries AOTInductor once, no retries
        assert PyTorchRuntime.aot_failure_count(digest) == attempt
        assert entry.eager_fallback and nr.parse_engine_name(entry.path.name).eager
        assert any("eager fallback" in n and "simulated AOTInductor failure" in n for n in entry.notes), entry.notes
        entries.append(entry)

    with caplog.at_level("WARNING", logger="navcache_runtime.strategies.pytorch"):
        third = runtime.compile_engine(tiny_model.onnx, build_config)
    assert len(calls) == THRESHOLD  # breaker open: AOTInductor not called again
    assert PyTorchRuntime.aot_failure_count(digest) == THRESHOLD
    assert third.eager_fallback and any("circuit breaker open" in n for n in third.notes), third.notes
    assert "circuit breaker" in caplog.text

    # The eager artifact is a real engine: committed with its sidecar, admitted by the gate, runs.
    assert nr.verify_artifact(third.path) == third.sha256
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    handle = runtime.deserialize_engine(nr.entry_from_artifact(third.path))
    try:
        inputs = tiny_model.inputs(batch=2)
        got = runtime.infer(handle, inputs)["descriptor"]
        np.testing.assert_allclose(got, tiny_model.reference(inputs), atol=1e-3, rtol=0)
    finally:
        runtime.release_engine(handle)

    PyTorchRuntime.reset_circuit_breaker()
    assert PyTorchRuntime.aot_failure_count(digest) == 0


# -- compile_in_order: a failing backbone mid-corpus ------------------------------------------------------------
class FailingBackbone:
    """The real ORT strategy, except that compiling ``broken`` always fails; counts compile calls."""

    def __init__(self, engine_dir: Path, broken: str) -> None:
        self.inner = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(engine_dir)})
        self.broken = broken
        self.compiled: list[str] = []

    def compile_engine(self, onnx_path: Path, build_config: nr.BuildConfig) -> nr.EngineCacheEntry:
        self.compiled.append(build_config.model_name or Path(onnx_path).stem)
        if build_config.model_name == self.broken:
            raise nr.EngineBuildError(
                "simulated builder crash: unsupported op Foo", hint="re-export the model", path=onnx_path
            )
        return self.inner.compile_engine(onnx_path, build_config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_corpus_stops_at_the_failing_backbone_and_keeps_the_first(tiny_model: TinyModel, tmp_path: Path) -> None:
    second, _ = export_models(make_model(seed=1, descriptor_dim=32), tmp_path / "src", "third_vpr")
    config = tiny_model.build_config()
    corpus = [
        BackboneBuild("first_vpr", tiny_model.onnx, dataclasses.replace(config, model_name="first_vpr")),
        BackboneBuild("broken_vpr", tiny_model.onnx, dataclasses.replace(config, model_name="broken_vpr")),
        BackboneBuild("third_vpr", second, dataclasses.replace(config, model_name="third_vpr")),
    ]
    engines = tmp_path / "engines"
    runtime = FailingBackbone(engines, broken="broken_vpr")
    with pytest.raises(BackboneBuildError) as caught:
        compile_in_order(corpus, partial(compile_or_reuse, runtime))
    error = caught.value
    assert error.backbone == "broken_vpr" and not error.transient
    assert "backbone 'broken_vpr'" in str(error) and "simulated builder crash" in str(error)
    assert error.hint == "re-export the model"
    assert runtime.compiled == ["first_vpr", "broken_vpr"]  # one attempt, no retries; third never attempted

    files = sorted(p for p in engines.iterdir())
    assert not [p for p in files if p.name.startswith(TEMP_PREFIX)]
    artifacts = [p for p in files if not p.name.endswith(".sha256")]
    assert len(artifacts) == 1 and artifacts[0].name.startswith("first_vpr")
    nr.verify_artifact(artifacts[0])

    # The next run reuses the first engine and fails at the same backbone again, still without retries.
    again = FailingBackbone(engines, broken="broken_vpr")
    with pytest.raises(BackboneBuildError, match="broken_vpr"):
        compile_in_order(corpus, partial(compile_or_reuse, again))
    assert again.compiled == ["broken_vpr"]
    # Once the backbone is fixed, the rest of the corpus builds; the first engine is reused untouched.
    fixed = compile_in_order(corpus, partial(compile_or_reuse, FailingBackbone(engines, broken="none")))
    assert [r.outcome for r in fixed] == [Outcome.REUSED, Outcome.BUILT, Outcome.BUILT]
    for result in fixed:
        nr.verify_artifact(result.entry.path)
