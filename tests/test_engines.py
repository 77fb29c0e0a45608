"""The original engine-compiler acceptance list, against the real ONNX Runtime strategy."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import navcache_runtime as nr
from navcache.engines import (
    BackboneBuild,
    BackboneBuildError,
    NumericalMismatchError,
    Outcome,
    compile_in_order,
    compile_or_reuse,
)
from navcache_runtime.integrity import TEMP_PREFIX, sidecar_path
from tests.conftest import TinyModel
from tests.support.models import export_models, make_model


class CountingRuntime:
    """The real ORT strategy, counting compile calls (and optionally corrupting outputs)."""

    def __init__(self, engine_dir: Path, host: nr.HostFields | None = None, skew: float = 0.0) -> None:
        self.inner = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(engine_dir)}, host=host)
        self.compiled: list[str] = []
        self.skew = skew

    def compile_engine(self, onnx_path: Path, build_config: nr.BuildConfig) -> nr.EngineCacheEntry:
        self.compiled.append(Path(onnx_path).name)
        return self.inner.compile_engine(onnx_path, build_config)

    def infer(self, handle: Any, inputs: Any) -> dict[str, np.ndarray]:
        return {k: v + self.skew for k, v in self.inner.infer(handle, inputs).items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> list[BackboneBuild]:
    directory = tmp_path_factory.mktemp("corpus")
    second, _ = export_models(make_model(seed=1, descriptor_dim=32), directory, "second_vpr")
    config = tiny_model.build_config()
    return [
        BackboneBuild("tiny_vpr", tiny_model.onnx, dataclasses.replace(config, model_name="tiny_vpr")),
        BackboneBuild("second_vpr", second, dataclasses.replace(config, model_name="second_vpr")),
    ]


def test_cold_cache_builds_all_and_checks_numerics(corpus: list[BackboneBuild], tmp_path: Path) -> None:
    runtime = CountingRuntime(tmp_path)
    results = compile_in_order(corpus, partial(compile_or_reuse, runtime))
    assert [r.outcome for r in results] == [Outcome.BUILT, Outcome.BUILT]
    assert runtime.compiled == ["tiny_vpr.onnx", "second_vpr.onnx"]
    for result in results:
        assert result.entry.compile_duration_s is not None
        assert result.max_abs_error is not None and result.max_abs_error <= result.tolerance
        assert result.reason.startswith("cold cache")


def test_warm_cache_reuses_all_with_zero_compile_calls(
    corpus: list[BackboneBuild], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    compile_in_order(corpus, partial(compile_or_reuse, CountingRuntime(tmp_path)))
    warm = CountingRuntime(tmp_path)
    caplog.clear()  # the cold run's lines (the Prefect layer, once imported, sets navcache's loggers to INFO)
    with caplog.at_level(logging.INFO, logger="navcache.engines"):
        results = compile_in_order(corpus, partial(compile_or_reuse, warm))
    assert warm.compiled == []
    assert [r.outcome for r in results] == [Outcome.REUSED, Outcome.REUSED]
    assert all(r.entry.compile_duration_s is None for r in results)
    summaries = [rec.message for rec in caplog.records if "engines:" in rec.message]
    assert summaries == ["engines: 0 built, 2 reused (2 backbones)"]


def test_mixed_hit_and_miss(corpus: list[BackboneBuild], tmp_path: Path) -> None:
    compile_in_order(corpus[:1], partial(compile_or_reuse, CountingRuntime(tmp_path)))
    runtime = CountingRuntime(tmp_path)
    results = compile_in_order(corpus, partial(compile_or_reuse, runtime))
    assert [r.outcome for r in results] == [Outcome.REUSED, Outcome.BUILT]
    assert runtime.compiled == ["second_vpr.onnx"]


def test_hardware_change_rebuilds_at_a_new_name_and_leaves_old_files(
    corpus: list[BackboneBuild], tmp_path: Path, this_host: nr.HostFields
) -> None:
    old = compile_in_order(corpus[:1], partial(compile_or_reuse, CountingRuntime(tmp_path)))[0].entry.path
    before = (old.read_bytes(), old.stat().st_mtime_ns, sidecar_path(old).read_text())
    other = dataclasses.replace(this_host, cpu_isa="avx512" if this_host.cpu_isa != "avx512" else "avx2")
    runtime = CountingRuntime(tmp_path, host=other)
    result = compile_in_order(corpus[:1], partial(compile_or_reuse, runtime))[0]
    assert result.outcome is Outcome.BUILT and runtime.compiled == ["tiny_vpr.onnx"]
    assert result.entry.path != old and f"cpu-{other.cpu_isa}" in result.entry.path.name
    assert (old.read_bytes(), old.stat().st_mtime_ns, sidecar_path(old).read_text()) == before


@pytest.mark.parametrize("damage", ["tamper", "drop_sidecar"])
def test_damaged_engine_is_rebuilt_with_a_warning_naming_it(
    corpus: list[BackboneBuild], tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first = compile_in_order(corpus, partial(compile_or_reuse, CountingRuntime(tmp_path)))
    victim = first[1].entry.path
    if damage == "tamper":
        victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    else:
        sidecar_path(victim).unlink()
    runtime = CountingRuntime(tmp_path)
    with caplog.at_level(logging.WARNING, logger="navcache.engines"):
        results = compile_in_order(corpus, partial(compile_or_reuse, runtime))
    assert [r.outcome for r in results] == [Outcome.REUSED, Outcome.BUILT]
    assert runtime.compiled == ["second_vpr.onnx"]
    assert victim.name in caplog.text and "rebuilding" in caplog.text
    assert victim.name in results[1].reason
    nr.verify_artifact(results[1].entry.path)


def test_build_error_mid_corpus_stops_and_keeps_earlier_engines(corpus: list[BackboneBuild], tmp_path: Path) -> None:
    corrupt = tmp_path / "src" / "broken.onnx"
    corrupt.parent.mkdir()
    corrupt.write_bytes(corpus[0].onnx.read_bytes()[:3000])
    broken = BackboneBuild("broken", corrupt, dataclasses.replace(corpus[0].build_config, model_name="broken"))
    engines = tmp_path / "engines"
    runtime = CountingRuntime(engines)
    with pytest.raises(BackboneBuildError, match="backbone 'broken'") as caught:
        compile_in_order([corpus[0], broken, corpus[1]], partial(compile_or_reuse, runtime))
    assert caught.value.backbone == "broken" and not caught.value.transient
    assert runtime.compiled == ["tiny_vpr.onnx", "broken.onnx"]  # second_vpr never attempted
    files = sorted(p.name for p in engines.iterdir())
    assert len(files) == 2 and not [f for f in files if f.startswith(TEMP_PREFIX)]
    nr.verify_artifact(engines / files[0])


def test_empty_corpus_has_no_side_effects(tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    assert compile_in_order([], partial(compile_or_reuse, CountingRuntime(engines))) == []
    assert not engines.exists()


def test_an_engine_that_disagrees_with_the_reference_is_refused_and_removed(
    corpus: list[BackboneBuild], tmp_path: Path
) -> None:
    runtime = CountingRuntime(tmp_path, skew=0.1)
    with pytest.raises(NumericalMismatchError, match=r"differs from the ONNX reference by 0\.1"):
        compile_or_reuse(runtime, corpus[0])
    assert list(tmp_path.iterdir()) == []
