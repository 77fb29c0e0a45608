"""One error family for everything the onboard runtime can refuse or fail at.

Strategies rewrap third-party exceptions (onnxruntime, torch, tensorrt) into these types so that callers
catch :class:`InferenceRuntimeError` and nothing else; exceptions unrelated to the runtime are never
swallowed.
"""

from __future__ import annotations

from pathlib import Path


class InferenceRuntimeError(Exception):
    """Base of the family. ``hint`` tells the user how to fix it; ``path`` names the file involved."""

    def __init__(self, message: str, *, hint: str | None = None, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text += f" (fix: {self.hint})"
        return text


class EngineBuildError(InferenceRuntimeError):
    """Compiling a model into an engine/artifact failed (parser error, unsupported op, bad precision...)."""


class EngineDeserializeError(InferenceRuntimeError):
    """A compiled artifact could not be loaded by its runtime."""


class EngineHashMismatchError(InferenceRuntimeError):
    """The artifact's bytes do not match its ``.sha256`` sidecar (tampered, truncated or corrupt)."""


class EngineSchemaMismatchError(InferenceRuntimeError):
    """The artifact's filename does not parse, or its host fields do not match the running host."""


class EngineSidecarMissingError(InferenceRuntimeError):
    """The artifact has no ``.sha256`` sidecar, so it cannot be trusted."""


class CalibrationCacheError(InferenceRuntimeError):
    """INT8 was requested but the calibration cache is missing, unreadable or does not fit the model."""


class InferenceError(InferenceRuntimeError):
    """Running an engine failed: wrong inputs, released handle, or a runtime failure during execution."""


class OutOfMemoryError(InferenceRuntimeError):
    """The runtime ran out of (GPU or host) memory while building, loading or running an engine."""


class TelemetryUnavailableError(InferenceRuntimeError):
    """No thermal telemetry source (sysfs thermal zones, NVML) is available on this host."""


class RuntimeNotAvailableError(InferenceRuntimeError):
    """The configured runtime strategy's library is not installed on this host."""


class RuntimeConfigError(InferenceRuntimeError, ValueError):
    """The runtime configuration is invalid (unknown runtime label, unknown key, bad value)."""


#: The nine error types of the original C7 contract, in its order.
CONTRACT_ERRORS: tuple[type[InferenceRuntimeError], ...] = (
    EngineBuildError,
    EngineDeserializeError,
    EngineHashMismatchError,
    EngineSchemaMismatchError,
    EngineSidecarMissingError,
    CalibrationCacheError,
    InferenceError,
    OutOfMemoryError,
    TelemetryUnavailableError,
)
