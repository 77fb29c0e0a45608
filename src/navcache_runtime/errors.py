"""One error family for everything the onboard runtime can refuse or fail at.

Strategies rewrap third-party exceptions (onnxruntime, torch, tensorrt) into these types so that callers
catch :class:`InferenceRuntimeError` and nothing else; exceptions unrelated to the runtime are never
swallowed.

A cache that does not verify is not one exception but a list of reasons: :class:`FailureCode` names each
(the verifier, the manifest format's decoders and the trust root reader all report in these codes) and a
:class:`Failure` is one reason about one subject (:mod:`navcache_runtime.verify` collects them into its
report and raises :class:`~navcache_runtime.verify.CacheVerificationError` with all of them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
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


#: The nine error types the InferenceRuntime Protocol's methods raise (docs/runtime-contract.md), in its order.
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


class FailureCode(enum.StrEnum):
    """Typed reasons. Values are stable strings (they appear in JSON reports and logs)."""

    TRUSTED_KEYS_INVALID = "trusted_keys_invalid"
    TRUST_ROOT_INVALID = "trust_root_invalid"
    TRUST_ROOT_EXPIRED = "trust_root_expired"
    TRUST_ROOT_UPDATE_REFUSED = "trust_root_update_refused"
    TRUST_ROOT_UPDATED = "trust_root_updated"
    STATE_MISSING = "state_missing"
    KEY_REVOKED = "key_revoked"
    VALIDITY_TOO_LONG = "validity_too_long"
    MANIFEST_MISSING = "manifest_missing"
    ENVELOPE_UNREADABLE = "envelope_unreadable"
    ENVELOPE_TOO_LARGE = "envelope_too_large"
    ENVELOPE_MALFORMED = "envelope_malformed"
    PAYLOAD_TYPE_UNSUPPORTED = "payload_type_unsupported"
    SIGNATURE_MALFORMED = "signature_malformed"
    SIGNATURE_INVALID = "signature_invalid"
    SIGNATURE_UNTRUSTED = "signature_untrusted"
    SIGNATURE_DUPLICATE_KEY = "signature_duplicate_key"
    KEYID_HINT_MISMATCH = "keyid_hint_mismatch"
    THRESHOLD_NOT_MET = "threshold_not_met"
    PAYLOAD_MALFORMED = "payload_malformed"
    PAYLOAD_DUPLICATE_KEY = "payload_duplicate_key"
    PAYLOAD_FLOAT = "payload_float"
    STATEMENT_TYPE_UNSUPPORTED = "statement_type_unsupported"
    SCHEMA_INVALID = "schema_invalid"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ROLLBACK = "rollback"
    VERSION_REUSED = "version_reused"
    ROLLBACK_UNCHECKED = "rollback_unchecked"
    STATE_INVALID = "state_invalid"
    STATE_WRITE_FAILED = "state_write_failed"
    PATH_ABSOLUTE = "path_absolute"
    PATH_TRAVERSAL = "path_traversal"
    PATH_INVALID = "path_invalid"
    SUBJECT_DUPLICATE = "subject_duplicate"
    ARTIFACT_LIST_MISMATCH = "artifact_list_mismatch"
    AREA_INVALID = "area_invalid"
    TAKEOFF_OUTSIDE_AREA = "takeoff_outside_area"
    ARTIFACT_MISSING = "artifact_missing"
    ARTIFACT_SYMLINK_ESCAPE = "artifact_symlink_escape"
    ARTIFACT_NOT_REGULAR = "artifact_not_regular"
    ARTIFACT_UNREADABLE = "artifact_unreadable"
    ARTIFACT_LENGTH_MISMATCH = "artifact_length_mismatch"
    ARTIFACT_DIGEST_MISMATCH = "artifact_digest_mismatch"
    EXTRA_FILE = "extra_file"
    COVERAGE_INCONSISTENT = "coverage_inconsistent"
    COVERAGE_TABLE_INVALID = "coverage_table_invalid"
    COVERAGE_MISMATCH = "coverage_mismatch"
    PREPROCESS_INVALID = "preprocess_invalid"


def printable(text: object) -> str:
    """``text`` safe to print on a terminal, one line: every character that is not printable (control
    characters such as ESC, CR and newline, Unicode format characters such as bidi overrides, lone
    surrogates) and the backslash itself are written as Python escapes (``\\x1b``, ``\\n``, ``\\u202e``,
    ``\\\\``); an undecodable file-name byte (surrogate-escaped by ``os.fsdecode``) is shown as ``\\xNN``.

    File names and signed strings reach the text output through this function only, so a crafted name can
    neither forge a ``VERIFIED`` line nor move the cursor to hide the ``REFUSED`` one. JSON output keeps the
    raw values (``json.dumps`` escapes them itself)."""
    value = str(text)
    if value.isprintable() and "\\" not in value:
        return value  # the common case: nothing to escape
    out = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")  # os.fsdecode's stand-in for an undecodable byte
        elif ch.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(ch)
        elif code <= 0xFF:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{code:02x}"))
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


@dataclass(frozen=True)
class Failure:
    """One reason to refuse (or, in ``warnings``, to look closer). ``subject`` names what it is about.

    ``subject`` and ``message`` hold the raw values (file names as found on disk); ``str()`` escapes them
    for a terminal (see :func:`printable`)."""

    code: FailureCode
    subject: str
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {printable(self.subject)}: {printable(self.message)}"
