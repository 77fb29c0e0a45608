"""navcache onboard runtime: the InferenceRuntime boundary, its strategies and the engine gate.

Importing this package imports numpy (and cryptography where verification is used) only; the strategy
libraries (onnxruntime, torch, tensorrt) are imported when :func:`build_inference_runtime` selects one.
"""

from typing import TYPE_CHECKING

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

# The public surface, spelled out (not computed) so that it changes only by an edit a reviewer sees. It is
# frozen by docs/runtime-contract.md, whose version __version__ is; tests/test_runtime_contract.py holds the
# two together. The names from TrustedKeys on load lazily (see _LAZY below).
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
    "TrustedKeys",
    "TrustedKeysError",
    "keyid_for",
    "load_trusted_keys",
    "TrustRootError",
    "MANIFEST_NAME",
    "ArtifactResult",
    "CacheVerificationError",
    "CacheVerifier",
    "Failure",
    "FailureCode",
    "VerificationReport",
    "VerifierConfig",
    "verify_cache",
    "Candidate",
    "CacheOpenError",
    "OnboardCache",
    "open_cache",
    "preprocess",
    "CacheIndexError",
    "OnboardSelfTest",
    "SelfTestFailedError",
]

#: The version of the runtime contract (docs/runtime-contract.md) this package implements: semver, bumped
#: with every change of the public surface (MAJOR: removed or changed, MINOR: added, PATCH: wording only).
__version__ = "1.2.0"

# The verifier and trust store load lazily: most users of the runtime never verify in-process, and this
# keeps `import navcache_runtime` (and so the factory's first call) light.
_LAZY = {
    "TrustedKeys": "trust",
    "TrustedKeysError": "trust",
    "keyid_for": "trust",
    "load_trusted_keys": "trust",
    "TrustRootError": "trustroot",
    "MANIFEST_NAME": "layout",
    "ArtifactResult": "verify",
    "CacheVerificationError": "verify",
    "CacheVerifier": "verify",
    "Failure": "errors",
    "FailureCode": "errors",
    "VerificationReport": "verify",
    "VerifierConfig": "verify",
    "verify_cache": "verify",
    "Candidate": "cache",
    "CacheOpenError": "cache",
    "OnboardCache": "cache",
    "open_cache": "cache",
    "preprocess": "cache",
    "CacheIndexError": "index",
    "OnboardSelfTest": "selftest",
    "SelfTestFailedError": "selftest",
}

if TYPE_CHECKING:  # type checkers of consumer code see the real types of the lazy names (same list as _LAZY)
    from .cache import CacheOpenError, Candidate, OnboardCache, open_cache, preprocess
    from .errors import Failure, FailureCode
    from .index import CacheIndexError
    from .layout import MANIFEST_NAME
    from .selftest import OnboardSelfTest, SelfTestFailedError
    from .trust import TrustedKeys, TrustedKeysError, keyid_for, load_trusted_keys
    from .trustroot import TrustRootError
    from .verify import (
        ArtifactResult,
        CacheVerificationError,
        CacheVerifier,
        VerificationReport,
        VerifierConfig,
        verify_cache,
    )


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'navcache_runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
