"""Compile-or-reuse: one engine per backbone, content-addressed, checked before it is accepted.

The engine-compiler contract (DESIGN §3): cold cache → every backbone BUILT; warm → every backbone
REUSED with zero compile calls and ``compile_duration_s is None``; a hardware change gets a new filename
and leaves old engines untouched; a tampered artifact or missing sidecar is rebuilt with a warning naming
it; a build error stops the corpus with the backbone named, engines already done stay valid, later
backbones are not attempted; an empty corpus does nothing. A newly built engine is accepted only when its
outputs match ONNX Runtime's CPU reference on sample inputs within the precision's tolerance.

Reuse is decided here and only here (:func:`find_reusable`): the flow runs :func:`compile_or_reuse` in
a task without a Prefect cache, and ``navcache plan`` asks :func:`find_reusable` the same question. What
a runtime must offer for it, beyond the onboard :class:`~navcache_runtime.InferenceRuntime`, is
:class:`ProvisioningRuntime`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from navcache_runtime import (
    BuildConfig,
    EngineCacheEntry,
    EngineHashMismatchError,
    EngineSidecarMissingError,
    InferenceRuntime,
    InferenceRuntimeError,
    OutOfMemoryError,
    RuntimeConfig,
    build_inference_runtime,
    sidecar_path,
)
from navcache_runtime.gate import EngineGate

from .errors import ProvisionError

if TYPE_CHECKING:
    from .sortie import BackboneSpec

log = logging.getLogger(__name__)

#: Max absolute output difference against the ONNX Runtime fp32 CPU reference, per precision.
TOLERANCES: dict[str, float] = {"fp32": 5e-3, "fp16": 5e-2, "int8": 0.25}
CHECK_BATCH = 2


@runtime_checkable
class ProvisioningRuntime(InferenceRuntime, Protocol):
    """A runtime as provisioning uses it: the onboard Protocol plus where a build would land, the gate
    that admits an existing file there, and the build config a strategy really compiles with (every
    strategy in ``navcache_runtime.strategies`` offers these)."""

    gate: EngineGate

    def expected_artifacts(self, source: Path, build_config: BuildConfig) -> list[Path]:
        """Where a build of ``source`` with ``build_config`` on this host lands, best candidate first."""
        ...

    def build_config_for(self, source: Path, build_config: BuildConfig) -> BuildConfig:
        """The build config this strategy compiles ``source`` with and names the artifact after."""
        ...


def provisioning_runtime(config: RuntimeConfig) -> ProvisioningRuntime:
    """The configured runtime, checked to offer what compile-or-reuse needs."""
    runtime = build_inference_runtime(config)
    if not isinstance(runtime, ProvisioningRuntime):
        raise ProvisionError(
            f"runtime {config.runtime!r} cannot provision: {type(runtime).__name__} does not predict its artifacts",
            hint="use one of navcache_runtime's strategies",
        )
    return runtime


class Outcome(enum.StrEnum):
    BUILT = "BUILT"
    REUSED = "REUSED"


@dataclass(frozen=True)
class BackboneBuild:
    """What compile-or-reuse needs to know about one backbone."""

    name: str
    onnx: Path
    build_config: BuildConfig


@dataclass(frozen=True)
class EngineResult:
    backbone: str
    outcome: Outcome
    entry: EngineCacheEntry
    seconds: float
    reason: str  # why it was built ("cold cache", "tampered: ...") or "verified"
    max_abs_error: float | None = None  # numerical check, BUILT engines only
    tolerance: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "outcome": str(self.outcome),
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
            "artifact": self.entry.path.name,
            "max_abs_error": self.max_abs_error,
            "eager_fallback": self.entry.eager_fallback,
        }


class BackboneBuildError(ProvisionError):
    """Building one backbone failed. ``transient`` tells a retry policy whether trying again can help."""

    def __init__(self, backbone: str, cause: BaseException, *, transient: bool = False) -> None:
        hint = getattr(cause, "hint", None)
        super().__init__(f"backbone {backbone!r}: {cause}", where=backbone, hint=hint)
        self.backbone = backbone
        self.transient = transient


class NumericalMismatchError(ProvisionError):
    """A freshly built engine disagrees with the ONNX reference beyond the tolerance."""


def _remove_artifact(path: Path) -> None:
    for stale in (path, sidecar_path(path)):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def find_reusable(runtime: ProvisioningRuntime, backbone: BackboneBuild) -> tuple[EngineCacheEntry | None, str]:
    """An existing artifact the engine gate admits, or (None, why a build is needed). ``backbone`` as
    ``runtime`` builds it (:func:`for_runtime`)."""
    reason = "cold cache: no engine for this model, configuration and host"
    for candidate in runtime.expected_artifacts(backbone.onnx, backbone.build_config):
        if not candidate.exists():
            continue
        try:
            return runtime.gate.admit(candidate), "verified"
        except EngineSidecarMissingError:
            reason = f"sidecar missing for {candidate.name}"
        except EngineHashMismatchError as exc:
            reason = f"tampered or corrupt {candidate.name}: {exc.message}"
        log.warning("%s: %s; rebuilding it", backbone.name, reason)
    return None, reason


def backbone_build(spec: BackboneSpec) -> BackboneBuild:
    """What the flow compiles for a sortie backbone (and what ``navcache plan`` looks up)."""
    return BackboneBuild(spec.name, spec.onnx, spec.build_config())


def for_runtime(runtime: ProvisioningRuntime, backbone: BackboneBuild) -> BackboneBuild:
    """The backbone with the build config ``runtime`` really compiles it with (PyTorch adds the ONNX
    graph's output names), so checks and lookups agree."""
    return replace(backbone, build_config=runtime.build_config_for(backbone.onnx, backbone.build_config))


def sample_inputs(build_config: BuildConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs at the profile's opt shape (batch capped): image-like values in [0, 1)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for profile in build_config.input_shapes:
        shape = list(profile.opt)
        shape[0] = max(profile.min[0], min(shape[0], CHECK_BATCH))
        inputs[profile.name] = rng.random(shape, dtype=np.float32)
    return inputs


def reference_outputs(onnx_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def check_numerics(runtime: InferenceRuntime, entry: EngineCacheEntry, backbone: BackboneBuild) -> tuple[float, float]:
    """Run the new engine and the ONNX reference on the same inputs; return (max abs error, tolerance)."""
    inputs = sample_inputs(backbone.build_config)
    expected = reference_outputs(backbone.onnx, inputs)
    handle = runtime.deserialize_engine(entry)
    try:
        got = runtime.infer(handle, inputs)
    finally:
        runtime.release_engine(handle)
    # Engines may rename outputs (PyTorch: output_0...); match by name where possible, else by position.
    pairs = (
        [(expected[n], got[n]) for n in expected]
        if set(expected) <= set(got)
        else list(zip(expected.values(), got.values(), strict=False))
    )
    if len(pairs) != len(expected):
        raise NumericalMismatchError(
            f"{backbone.name}: the engine returns {len(got)} outputs, the ONNX model {len(expected)}",
            where=str(entry.path),
        )
    error = 0.0
    for want, have in pairs:
        if want.shape != have.shape:
            raise NumericalMismatchError(
                f"{backbone.name}: output shape {have.shape} differs from the reference {want.shape}",
                where=str(entry.path),
            )
        error = max(error, float(np.max(np.abs(want.astype(np.float64) - have.astype(np.float64)), initial=0.0)))
    return error, TOLERANCES[backbone.build_config.precision]


def compile_or_reuse(runtime: ProvisioningRuntime, backbone: BackboneBuild, *, check: bool = True) -> EngineResult:
    """Reuse the backbone's engine when the gate admits it; otherwise build, check and accept it."""
    started = time.perf_counter()
    try:
        backbone = for_runtime(runtime, backbone)
        entry, reason = find_reusable(runtime, backbone)
        if entry is not None:
            return EngineResult(backbone.name, Outcome.REUSED, entry, time.perf_counter() - started, reason)
        entry = runtime.compile_engine(backbone.onnx, backbone.build_config)
    except InferenceRuntimeError as exc:
        raise BackboneBuildError(backbone.name, exc, transient=isinstance(exc, OutOfMemoryError)) from exc
    error = tolerance = None
    if check:
        try:
            error, tolerance = check_numerics(runtime, entry, backbone)
        except InferenceRuntimeError as exc:
            _remove_artifact(entry.path)
            raise BackboneBuildError(backbone.name, exc) from exc
        except NumericalMismatchError:
            _remove_artifact(entry.path)
            raise
        if error > tolerance:
            _remove_artifact(entry.path)  # never leave an engine that failed its acceptance check
            raise NumericalMismatchError(
                f"{backbone.name}: engine output differs from the ONNX reference by {error:.3g} "
                f"(tolerance {tolerance:g} for {backbone.build_config.precision})",
                where=str(entry.path),
                hint="check the precision setting; fp16/int8 may need a more tolerant model or fp32",
            )
        log.info("%s: numerical check passed (max abs error %.2g <= %g)", backbone.name, error, tolerance)
    return EngineResult(backbone.name, Outcome.BUILT, entry, time.perf_counter() - started, reason, error, tolerance)


@dataclass(frozen=True)
class EngineRow:
    """One backbone's line of the engine table: its result, or why there is none (FAILED with the error,
    SKIPPED when an earlier backbone failed)."""

    backbone: str
    outcome: str
    reason: str
    result: EngineResult | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.result is not None:
            return self.result.summary()
        return {
            "backbone": self.backbone,
            "outcome": self.outcome,
            "seconds": None,
            "reason": self.reason,
            "artifact": None,
            "max_abs_error": None,
        }


def compile_in_order(
    backbones: Sequence[BackboneBuild],
    compile_one: Callable[[BackboneBuild], EngineResult],
    report: Callable[[list[EngineRow]], None] = lambda rows: None,
) -> list[EngineResult]:
    """The corpus in order, one build at a time (GPU memory stays predictable); the first failure
    propagates and later backbones are not attempted. ``report`` gets every backbone's row whatever
    happens: a failed one with its error, the ones after it SKIPPED."""
    results: list[EngineResult] = []
    rows: list[EngineRow] = []
    try:
        for backbone in backbones:
            results.append(compile_one(backbone))
            rows.append(EngineRow(backbone.name, str(results[-1].outcome), results[-1].reason, results[-1]))
    except Exception as exc:
        rows.append(EngineRow(backbones[len(results)].name, "FAILED", str(exc)))
        skipped = "not attempted: an earlier backbone failed"
        rows += [EngineRow(backbone.name, "SKIPPED", skipped) for backbone in backbones[len(rows) :]]
        raise
    finally:
        report(rows)
    if results:
        built = sum(r.outcome is Outcome.BUILT for r in results)
        log.info("engines: %d built, %d reused (%d backbones)", built, len(results) - built, len(results))
    return results
