"""navcache onboard runtime: the InferenceRuntime boundary, its strategies and the engine gate.

Importing this package imports numpy (and cryptography where verification is used) only; the strategy
libraries (onnxruntime, torch, tensorrt) are imported when :func:`build_inference_runtime` selects one.
"""

from .config import RuntimeConfig, load_runtime_config
from .errors import (
    CONTRACT_ERRORS,
    CalibrationCacheError,
    EngineBuildError,
    EngineDeserializeError,
    EngineHashMismatchError,
    EngineSchemaMismatchError,
    EngineSidecarMissingError,
    InferenceError,
    InferenceRuntimeError,
    OutOfMemoryError,
    RuntimeConfigError,
    RuntimeNotAvailableError,
    TelemetryUnavailableError,
)
from .factory import build_inference_runtime, runtime_available
from .gate import EngineGate, entry_from_artifact
from .host import detect_host_fields
from .integrity import sha256_file, sidecar_path, verify_artifact, write_artifact
from .naming import EngineName, parse_engine_name
from .protocol import InferenceRuntime
from .types import (
    PRECISIONS,
    RUNTIME_LABELS,
    BuildConfig,
    EngineCacheEntry,
    EngineHandle,
    HostFields,
    InputProfile,
    Precision,
    RuntimeLabel,
    ThermalState,
    ZoneReading,
)

__all__ = [
    "CONTRACT_ERRORS",
    "PRECISIONS",
    "RUNTIME_LABELS",
    "BuildConfig",
    "CalibrationCacheError",
    "EngineBuildError",
    "EngineCacheEntry",
    "EngineDeserializeError",
    "EngineGate",
    "EngineHandle",
    "EngineHashMismatchError",
    "EngineName",
    "EngineSchemaMismatchError",
    "EngineSidecarMissingError",
    "HostFields",
    "InferenceError",
    "InferenceRuntime",
    "InferenceRuntimeError",
    "InputProfile",
    "OutOfMemoryError",
    "Precision",
    "RuntimeConfig",
    "RuntimeConfigError",
    "RuntimeLabel",
    "RuntimeNotAvailableError",
    "TelemetryUnavailableError",
    "ThermalState",
    "ZoneReading",
    "build_inference_runtime",
    "detect_host_fields",
    "entry_from_artifact",
    "load_runtime_config",
    "parse_engine_name",
    "runtime_available",
    "sha256_file",
    "sidecar_path",
    "verify_artifact",
    "write_artifact",
]
__version__ = "0.1.0"
