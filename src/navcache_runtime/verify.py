"""Fail-closed verification of a signed navigation cache (onboard side).

The cache root holds the artifacts and ``manifest.dsse.json``: a DSSE envelope around an in-toto
Statement v1 whose predicate (type ``https://navcache.dev/manifest/v1``) describes the sortie. Nothing in
the payload is looked at before enough trusted keys have signed the exact bytes received, and the payload
is never re-serialised. :class:`CacheVerifier` runs these steps in order and *collects* every failure into
a :class:`VerificationReport` (a step whose input is untrusted is skipped and named in ``skipped``):

1. **envelope** — bounded read (``max_manifest_bytes``; an oversized file is refused from its size,
   unread); JSON object with exactly ``payload``, ``payloadType``, ``signatures`` (each signature exactly
   ``sig`` and optional ``keyid``); no duplicate keys; canonical standard base64; ``payloadType`` on the
   allowlist.
2. **signatures** — Ed25519 over DSSE ``PAE(payloadType, payload)``; each signature is tried against every
   trusted key (the ``keyid`` is only a hint); the number of *distinct* keys that verified must reach the
   threshold. A second signature by the same key does not count.
3. **payload** — strict JSON (UTF-8, duplicate keys and any float/NaN refused) and the schema of the
   Statement and predicate.
4. **freshness** — ``expires`` after ``now`` (one fixed instant), ``issued_at`` not in the future beyond
   the allowed clock skew, ``version`` not below the last version accepted on this device (state file) and
   not reused for different content.
5. **subjects** — relative POSIX paths only (no ``..``, absolute paths, backslashes, empty or ``.``
   components), no duplicates, subjects == ``predicate.artifacts``; takeoff inside ``area``.
6. **artifacts** — under the cache root (symlinks may not lead outside it), regular files; length from
   ``fstat`` first (a wrong length is reported without hashing), then a streamed, length-bounded sha256.
   Artifacts are hashed in parallel threads (hashlib releases the GIL on large updates). Whatever stands in
   an artifact's place (a directory, FIFO, socket, link loop, a file that vanishes) is a typed failure of
   that artifact; the other artifacts are still checked and reported.
7. **extra files** — files under the cache root that the manifest does not list are reported (warnings;
   failures with ``strict_extra=True``). Not reported: the manifest itself, temp files
   ``.navcache-tmp-*``, ground-side scan-memo entries ``.navcache-scan-*``, lock files ``*.lock``, the
   device state file, and the ``.sha256`` sidecar of a listed artifact (the manifest already pins the
   artifact's bytes; a bad sidecar only makes the engine gate refuse, which is fail-closed).
8. **coverage** — ``operator`` mode re-derives the coverage digest (and counts) from the signed coverage
   table; ``airborne`` mode trusts the signed aggregate (whose internal consistency is still checked).

After a fully successful verification the device state file (when given) records the accepted version,
written atomically.

The manifest's format (envelope, Statement, predicate fields, signed-data conventions, limits) is
specified in :mod:`navcache_runtime.manifest_format`, the cache's file layout in
:mod:`navcache_runtime.layout`; the reasons for a refusal are :class:`~navcache_runtime.errors.FailureCode`.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature

from .coverage import coverage_digest
from .errors import Failure, FailureCode, InferenceRuntimeError, printable
from .integrity import atomic_write_bytes, fdopen_regular
from .layout import MANIFEST_NAME, SHIPPED_TRUST_ROOT, SIDECAR_SUFFIX, UNLISTED_FILE_PATTERNS
from .manifest_format import (
    E7,
    HEX64,
    MAX_AREA_VERTICES,
    MAX_ARTIFACTS,
    MAX_LAT_E7,
    MAX_LON_E7,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURES,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    Envelope,
    coverage_table_statuses,
    format_rfc3339,
    hash_open_file,
    hash_workers,
    is_int,
    loads_strict,
    pae,
    parse_area,
    parse_envelope,
    parse_rfc3339,
    percent_x100_bounds,
    point_in_area,
    read_bounded,
    relpath_problem,
)
from .preprocessing import Preprocess
from .selftest import onboard_block
from .trust import TrustedKeys, TrustedKeysError, legacy_keyid_for, root_store_path

if TYPE_CHECKING:
    from .trustroot import TrustRoot

logger = logging.getLogger(__name__)

#: The format of the device state file (the last accepted manifest version).
STATE_FORMAT_VERSION = 1

Mode = Literal["airborne", "operator"]
MODES: tuple[Mode, ...] = ("airborne", "operator")


@dataclass(frozen=True)
class ArtifactResult:
    path: str
    ok: bool
    reason: FailureCode | None = None
    message: str = ""


@dataclass(frozen=True)
class VerifierConfig:
    """Explicit limits and policy. Defaults suit an onboard cache of a few GB and ~10^5 artifacts."""

    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    max_signatures: int = MAX_SIGNATURES
    max_artifacts: int = MAX_ARTIFACTS
    max_area_vertices: int = MAX_AREA_VERTICES
    max_coverage_table_bytes: int = 512 << 20
    max_state_bytes: int = 64 << 10
    allowed_payload_types: frozenset[str] = frozenset({PAYLOAD_TYPE})
    allowed_predicate_types: frozenset[str] = frozenset({PREDICATE_TYPE})
    clock_skew: timedelta = timedelta(minutes=5)
    #: Cap on ``expires - issued_at`` (a manifest signed to expire in 9999 is refused). A signed trust root's
    #: ``max_manifest_validity_s`` replaces it: the root keys set the fleet's policy.
    max_manifest_validity: timedelta = timedelta(days=30)
    hash_workers: int | None = None  # None → os.cpu_count()
    hash_chunk_bytes: int = 1 << 20
    ignored_extra_patterns: tuple[str, ...] = UNLISTED_FILE_PATTERNS
    max_extra_reported: int = 1000
    strict_extra: bool = False


@dataclass
class VerificationReport:
    """Everything the verifier found. ``ok`` is True only when ``failures`` is empty."""

    ok: bool
    mode: str
    cache_root: str
    manifest: str
    checked_at: str
    failures: list[Failure] = field(default_factory=list)
    warnings: list[Failure] = field(default_factory=list)
    artifacts: list[ArtifactResult] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    version: int | None = None
    issued_at: str | None = None
    expires: str | None = None
    sortie_id: str | None = None
    coverage_percent_x100: int | None = None
    verified_keyids: list[str] = field(default_factory=list)
    trust_root_version: int | None = None
    #: The Statement parsed from the payload bytes whose signatures held (None when they did not): what was
    #: verified, kept so that callers never decode the envelope again (not in ``to_dict``; do not modify).
    statement: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    payload_sha256: str | None = None
    # model name → its signed preprocessing block (navcache_runtime.preprocessing.Preprocess.to_signed), parsed
    preprocess: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the provision's signed self-test block (navcache.selftest), when the manifest has one
    self_test: dict[str, Any] | None = None
    bytes_hashed: int = 0
    elapsed_s: float = 0.0

    @property
    def codes(self) -> set[FailureCode]:
        return {failure.code for failure in self.failures}

    @property
    def predicate(self) -> dict[str, Any]:
        """The verified predicate ({} when the signatures did not hold)."""
        predicate = (self.statement or {}).get("predicate")
        return predicate if isinstance(predicate, dict) else {}

    def signed_subjects(self) -> dict[str, str]:
        """name → signed sha256 of every well-formed subject of the verified Statement."""
        subjects = (self.statement or {}).get("subject")
        result: dict[str, str] = {}
        for entry in subjects if isinstance(subjects, list) else []:
            digest = entry.get("digest") if isinstance(entry, dict) else None
            sha = digest.get("sha256") if isinstance(digest, dict) else None
            if isinstance(entry.get("name"), str) and isinstance(sha, str):
                result[entry["name"]] = sha
        return result

    def to_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, statement=None))  # the signed Statement is not part of the report's JSON
        del data["statement"]
        data["failures"] = [{**asdict(f), "code": str(f.code)} for f in self.failures]
        data["warnings"] = [{**asdict(f), "code": str(f.code)} for f in self.warnings]
        data["artifacts"] = [{**asdict(a), "reason": a.reason and str(a.reason)} for a in self.artifacts]
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def summary(self) -> str:
        head = "VERIFIED" if self.ok else "REFUSED"
        lines = [
            f"{head}: {printable(self.cache_root)} ({self.mode}) sortie={printable(self.sortie_id)} "
            f"version={self.version} expires={printable(self.expires)} artifacts={len(self.artifacts)} "
            f"failures={len(self.failures)} "
            f"warnings={len(self.warnings)}"
        ]
        lines += [f"  FAIL {failure}" for failure in self.failures]
        lines += [f"  warn {warning}" for warning in self.warnings]
        return "\n".join(lines)

    def raise_if_failed(self) -> VerificationReport:
        if not self.ok:
            raise CacheVerificationError(self)
        return self


class CacheVerificationError(InferenceRuntimeError):
    """A cache did not verify. ``report`` holds every failure."""

    def __init__(self, report: VerificationReport) -> None:
        first = "; ".join(str(f) for f in report.failures[:3])
        more = f" (+{len(report.failures) - 3} more)" if len(report.failures) > 3 else ""
        super().__init__(
            f"cache {report.cache_root} refused: {first}{more}",
            hint="re-provision the cache on the ground and re-sign it",
            path=report.manifest,
        )
        self.report = report


# --------------------------------------------------------------------------------------------------------
# The verifier


@dataclass
class _SignedFields:
    """The fields of the predicate that passed their schema check (None where they did not)."""

    subjects: list[tuple[str, str | None]] = field(default_factory=list)  # (name, sha256 or None)
    lengths: dict[str, int | None] = field(default_factory=dict)
    version: int | None = None
    issued_at: datetime | None = None
    expires: datetime | None = None
    sortie_id: str | None = None
    takeoff: tuple[int, int] | None = None
    area: list[list[list[tuple[int, int]]]] | None = None
    coverage: dict[str, Any] | None = None


def _check_arguments(mode: str, now: datetime | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if now is not None and (now.tzinfo is None or now.utcoffset() is None):
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")


class CacheVerifier:
    """Ordered, fail-closed checks of one cache against one set of trusted keys (see module docstring).

    Construct, then call :meth:`run` once. Failures are collected, never raised; only programming errors
    (bad mode, naive ``now``) raise."""

    STEPS = ("envelope", "signatures", "payload", "freshness", "subjects", "artifacts", "extras", "coverage")

    def __init__(
        self,
        cache_root: Path | str,
        trusted: TrustedKeys,
        *,
        mode: Mode = "airborne",
        now: datetime | None = None,
        state_path: Path | str | None = None,
        manifest_path: Path | str | None = None,
        config: VerifierConfig | None = None,
    ) -> None:
        _check_arguments(mode, now)
        self.cache_root = Path(cache_root)
        self.trusted = trusted
        self.mode = mode
        self.now = (now or datetime.now(UTC)).astimezone(UTC)  # one instant for every time check
        self.state_path = Path(state_path) if state_path is not None else None
        self.manifest_path = Path(manifest_path) if manifest_path is not None else self.cache_root / MANIFEST_NAME
        self.config = config or VerifierConfig()
        self.report = VerificationReport(
            ok=False,
            mode=mode,
            cache_root=str(self.cache_root),
            manifest=str(self.manifest_path),
            checked_at=format_rfc3339(self.now),
        )
        self._envelope: Envelope | None = None
        self._signed = _SignedFields()
        self._state: dict[str, Any] | None = None

    # -- bookkeeping -------------------------------------------------------------------------------------

    def _fail(self, code: FailureCode, subject: str, message: str) -> None:
        self.report.failures.append(Failure(code, subject, message))

    def _warn(self, code: FailureCode, subject: str, message: str) -> None:
        self.report.warnings.append(Failure(code, subject, message))

    # -- driver ------------------------------------------------------------------------------------------

    def run(self) -> VerificationReport:
        started = time.perf_counter()
        gated_steps = (
            ("envelope", self._step_envelope),
            ("signatures", self._step_signatures),
            ("payload", self._step_payload),
        )
        trusted_payload = True
        for name, step in gated_steps:
            # An unsupported payloadType is recorded by the envelope step and the signatures are still
            # checked, so both are reported; nothing in the payload is read unless both passed. Field-level
            # schema failures in the payload step do not stop the (independent) later steps.
            passed = step()
            if not passed or (name == "signatures" and self.report.failures):
                trusted_payload = False
                self.report.skipped = list(self.STEPS[self.STEPS.index(name) + 1 :])
                break
        if trusted_payload:
            # The payload is authentic and well-formed: the remaining checks are independent, so every one
            # runs and every failure is listed.
            self._step_freshness()
            self._step_subjects()
            self._step_artifacts()
            self._step_extras()
            self._step_coverage()
        self.report.ok = not self.report.failures
        if self.report.ok:
            self._record_state()
            self.report.ok = not self.report.failures
        self.report.elapsed_s = round(time.perf_counter() - started, 6)
        log = logger.info if self.report.ok else logger.warning
        log(
            "verify %s mode=%s ok=%s version=%s artifacts=%d failures=%s warnings=%d hashed=%dB in %.2fs",
            self.cache_root,
            self.mode,
            self.report.ok,
            self.report.version,
            len(self.report.artifacts),
            sorted({str(f.code) for f in self.report.failures}),
            len(self.report.warnings),
            self.report.bytes_hashed,
            self.report.elapsed_s,
        )
        return self.report

    # -- 1. envelope -------------------------------------------------------------------------------------

    def _step_envelope(self) -> bool:
        path = self.manifest_path
        try:
            raw = read_bounded(path, self.config.max_manifest_bytes)
        except FileNotFoundError:
            self._fail(FailureCode.MANIFEST_MISSING, path.name, f"no manifest at {path}")
            return False
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                self._fail(FailureCode.ENVELOPE_TOO_LARGE, path.name, f"manifest is too large: {exc.strerror}")
            else:
                self._fail(FailureCode.ENVELOPE_UNREADABLE, path.name, f"cannot read manifest: {exc.strerror or exc}")
            return False
        envelope, failures = parse_envelope(
            raw,
            allowed_payload_types=self.config.allowed_payload_types,
            max_signatures=self.config.max_signatures,
            subject=path.name,
        )
        self.report.failures.extend(failures)
        self._envelope = envelope
        # An unsupported payloadType is recorded but the signatures are still checked (both are reported).
        return envelope is not None

    # -- 2. signatures -----------------------------------------------------------------------------------

    def _step_signatures(self) -> bool:
        envelope = self._envelope
        assert envelope is not None
        message = pae(envelope.payload_type, envelope.payload)
        verified: dict[str, int] = {}
        problems: list[Failure] = []
        for index, (hint, sig, problem) in enumerate(envelope.signatures):
            where = f"signatures[{index}]"
            if sig is None:
                problems.append(Failure(FailureCode.SIGNATURE_MALFORMED, where, problem))
                continue
            matched = None
            # Every trusted key is tried; the hinted one first only because it is the likely match.
            for keyid in sorted(self.trusted.keys, key=lambda k: k != hint):
                try:
                    self.trusted.keys[keyid].verify(sig, message)
                except InvalidSignature:
                    continue
                matched = keyid
                break
            revoked = None if matched is not None else self._revoked_signer(sig, message)
            if revoked is not None:
                problems.append(
                    Failure(
                        FailureCode.KEY_REVOKED,
                        where,
                        f"signed by operator key {self.trusted.name_of(revoked)!r} ({revoked[:12]}…), which trust "
                        f"root v{self.trusted.root_version} revoked: re-sign the cache with a current operator key",
                    )
                )
            elif matched is None:
                if hint in self.trusted.keys:
                    problems.append(
                        Failure(
                            FailureCode.SIGNATURE_INVALID,
                            where,
                            f"signature does not verify with trusted key {self.trusted.name_of(hint)!r} "
                            "(tampered payload or signature)",
                        )
                    )
                else:
                    problems.append(
                        Failure(
                            FailureCode.SIGNATURE_UNTRUSTED,
                            where,
                            f"signature (keyid hint {hint[:12] or 'none'}…) verifies with no trusted key",
                        )
                    )
            elif matched in verified:
                problems.append(
                    Failure(
                        FailureCode.SIGNATURE_DUPLICATE_KEY,
                        where,
                        f"second signature by key {self.trusted.name_of(matched)!r} "
                        f"(already counted at signatures[{verified[matched]}]); it does not count again",
                    )
                )
            else:
                verified[matched] = index
                # The legacy keyid (sha256 of the raw key, navcache's own convention) names the same key.
                if hint and hint not in (matched, legacy_keyid_for(self.trusted.keys[matched])):
                    self._warn(FailureCode.KEYID_HINT_MISMATCH, where, "keyid hint does not name the key that verified")
        self.report.verified_keyids = sorted(verified)
        if len(verified) >= self.trusted.threshold:
            self.report.warnings.extend(problems)  # extra signatures that do not verify are ignored
            return True
        self.report.failures.extend(problems)
        self._fail(
            FailureCode.THRESHOLD_NOT_MET,
            "signatures",
            f"{len(verified)} distinct trusted key(s) signed; the threshold is {self.trusted.threshold}",
        )
        return False

    def _revoked_signer(self, sig: bytes, message: bytes) -> str | None:
        """The revoked key that made ``sig``, if any (only to name the reason; it never counts)."""
        for keyid, key in self.trusted.revoked.items():
            try:
                key.verify(sig, message)
            except InvalidSignature:
                continue
            return keyid
        return None

    # -- 3. payload --------------------------------------------------------------------------------------

    def _step_payload(self) -> bool:
        envelope = self._envelope
        assert envelope is not None
        self.report.payload_sha256 = hashlib.sha256(envelope.payload).hexdigest()
        try:
            statement = loads_strict(envelope.payload)
        except ValueError as exc:
            self._fail(getattr(exc, "code", FailureCode.PAYLOAD_MALFORMED), "payload", str(exc))
            return False
        if not isinstance(statement, dict):
            self._fail(FailureCode.PAYLOAD_MALFORMED, "payload", "the Statement must be a JSON object")
            return False
        if statement.get("_type") != STATEMENT_TYPE:
            self._fail(
                FailureCode.STATEMENT_TYPE_UNSUPPORTED,
                "payload._type",
                f"expected {STATEMENT_TYPE!r}, got {statement.get('_type')!r}",
            )
        if statement.get("predicateType") not in self.config.allowed_predicate_types:
            self._fail(
                FailureCode.STATEMENT_TYPE_UNSUPPORTED,
                "payload.predicateType",
                f"expected one of {sorted(self.config.allowed_predicate_types)}, got "
                f"{statement.get('predicateType')!r}",
            )
        if self.report.failures:
            return False
        self.report.statement = statement  # authentic: the signatures over these exact bytes held
        self._check_schema(statement)
        # Field-level schema failures do not stop the later steps: each works on what did validate.
        return True

    def _check_schema(self, statement: dict[str, Any]) -> None:
        signed = self._signed

        def bad(where: str, message: str) -> None:
            self._fail(FailureCode.SCHEMA_INVALID, where, message)

        subjects = statement.get("subject")
        if not isinstance(subjects, list) or not subjects:
            bad("payload.subject", "must be a non-empty list")
            subjects = []
        elif len(subjects) > self.config.max_artifacts:
            bad("payload.subject", f"more than {self.config.max_artifacts} subjects")
            subjects = []
        for index, entry in enumerate(subjects):
            where = f"payload.subject[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                bad(where, "must be an object with a string 'name'")
                continue
            digest = entry.get("digest")
            sha = digest.get("sha256") if isinstance(digest, dict) else None
            if not isinstance(sha, str) or not HEX64.fullmatch(sha):
                bad(entry["name"], "digest.sha256 must be 64 lowercase hex characters")
                sha = None
            signed.subjects.append((entry["name"], sha))

        predicate = statement.get("predicate")
        if not isinstance(predicate, dict):
            bad("payload.predicate", "must be an object")
            return

        def pfield(name: str) -> Any:
            if name not in predicate:
                bad(f"predicate.{name}", "required field is missing")
            return predicate.get(name)

        artifacts = pfield("artifacts")
        if isinstance(artifacts, dict) and len(artifacts) <= self.config.max_artifacts:
            for name, entry in artifacts.items():
                length = entry.get("length") if isinstance(entry, dict) else None
                if not is_int(length) or length < 0:
                    bad(f"predicate.artifacts[{name!r}]", "must be {'length': non-negative integer}")
                    signed.lengths[name] = None
                else:
                    signed.lengths[name] = length
        elif "artifacts" in predicate:
            bad("predicate.artifacts", f"must be an object of at most {self.config.max_artifacts} entries")

        sortie = pfield("sortie_id")
        if isinstance(sortie, str) and sortie:
            signed.sortie_id = self.report.sortie_id = sortie
        elif "sortie_id" in predicate:
            bad("predicate.sortie_id", "must be a non-empty string")

        takeoff = pfield("takeoff")
        if isinstance(takeoff, dict) and is_int(takeoff.get("lat_e7")) and is_int(takeoff.get("lon_e7")):
            lat, lon = takeoff["lat_e7"], takeoff["lon_e7"]
            if -MAX_LAT_E7 <= lat <= MAX_LAT_E7 and -MAX_LON_E7 <= lon <= MAX_LON_E7:
                signed.takeoff = (lon, lat)
            else:
                bad("predicate.takeoff", "lat_e7/lon_e7 out of range")
        elif "takeoff" in predicate:
            bad("predicate.takeoff", "must be {'lat_e7': int, 'lon_e7': int}")

        if "area" in predicate:
            area, problem = parse_area(predicate["area"], self.config.max_area_vertices)
            if area is None:
                self._fail(FailureCode.AREA_INVALID, "predicate.area", problem)
            signed.area = area
        else:
            pfield("area")

        host = pfield("host")
        if "host" in predicate and not (
            isinstance(host, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in host.items())
        ):
            bad("predicate.host", "must be an object of string values")

        version = pfield("version")
        if is_int(version) and version >= 1:
            signed.version = self.report.version = version
        elif "version" in predicate:
            bad("predicate.version", "must be an integer >= 1")

        for name in ("issued_at", "expires"):
            value = pfield(name)
            moment = parse_rfc3339(value)
            if moment is None and name in predicate:
                bad(f"predicate.{name}", f"must be an RFC 3339 UTC time like 2026-11-23T12:00:00Z, got {value!r}")
            setattr(signed, name, moment)
            setattr(self.report, name, value if moment else None)
        if signed.issued_at and signed.expires and signed.expires <= signed.issued_at:
            bad("predicate.expires", "expires must be later than issued_at")

        tool = pfield("tool_version")
        if "tool_version" in predicate and not isinstance(tool, str):
            bad("predicate.tool_version", "must be a string")

        coverage = pfield("coverage")
        if "coverage" in predicate:
            self._check_coverage_aggregate(coverage)

        if "preprocess" in predicate:  # optional: open_cache falls back to the defaults without it
            self._check_preprocess(predicate["preprocess"])
        if "self_test" in predicate:  # optional, as preprocess
            self._check_self_test(predicate["self_test"], {name for name, _ in signed.subjects})

    def _check_self_test(self, block: object, subjects: set[str]) -> None:
        """``predicate.self_test``: the provision's self-test figures and, optionally, the onboard query set
        (a signed subject) with its floor (``navcache_runtime.selftest``)."""
        where = "predicate.self_test"
        if not isinstance(block, dict):
            self._fail(FailureCode.SCHEMA_INVALID, where, "must be an object")
            return
        if "onboard" in block:
            onboard = onboard_block(block)
            if onboard is None:
                self._fail(FailureCode.SCHEMA_INVALID, f"{where}.onboard", "must be {path, queries, min_hits_at_5}")
                return
            path, queries, floor = onboard
            if path not in subjects:
                self._fail(FailureCode.SCHEMA_INVALID, f"{where}.onboard", f"{path!r} is not a signed subject")
                return
            if not 0 <= floor <= queries:
                self._fail(FailureCode.SCHEMA_INVALID, f"{where}.onboard", "min_hits_at_5 must be within 0..queries")
                return
        self.report.self_test = dict(block)

    def _check_preprocess(self, blocks: object) -> None:
        """``predicate.preprocess``: model name → the preprocessing its descriptors were made with."""
        if not isinstance(blocks, dict):
            self._fail(FailureCode.PREPROCESS_INVALID, "predicate.preprocess", "must be an object of model names")
            return
        for model, block in blocks.items():
            try:
                Preprocess.from_signed(block)
            except ValueError as exc:
                self._fail(FailureCode.PREPROCESS_INVALID, f"predicate.preprocess[{model!r}]", str(exc))
                continue
            self.report.preprocess[model] = dict(block)

    def _check_coverage_aggregate(self, coverage: object) -> None:
        where = "predicate.coverage"
        if not isinstance(coverage, dict):
            self._fail(FailureCode.SCHEMA_INVALID, where, "must be an object")
            return
        digest, path = coverage.get("digest"), coverage.get("path")
        total, covered, percent = coverage.get("total"), coverage.get("covered"), coverage.get("percent_x100")
        problems = []
        if not isinstance(digest, str) or not HEX64.fullmatch(digest):
            problems.append("digest must be 64 lowercase hex characters")
        if not all(is_int(v) and v >= 0 for v in (total, covered, percent)):
            problems.append("total, covered and percent_x100 must be non-negative integers")
        problem = relpath_problem(path)
        if problem:
            problems.append(f"path: {problem[1]}")
        for message in problems:
            self._fail(FailureCode.SCHEMA_INVALID, where, message)
        if problems:
            return
        assert isinstance(total, int) and isinstance(covered, int) and isinstance(percent, int)
        low, high = percent_x100_bounds(covered, total)
        expected = str(low) if low == high else f"{low} or {high}"
        if covered > total or not low <= percent <= high:
            self._fail(
                FailureCode.COVERAGE_INCONSISTENT,
                where,
                f"covered={covered} total={total} percent_x100={percent} (expected {expected})",
            )
            return
        self._signed.coverage = coverage
        self.report.coverage_percent_x100 = percent

    # -- 4. freshness ------------------------------------------------------------------------------------

    def _step_freshness(self) -> None:
        signed = self._signed
        if signed.expires is not None and signed.expires <= self.now:
            self._fail(
                FailureCode.EXPIRED,
                "predicate.expires",
                f"manifest expired at {format_rfc3339(signed.expires)} (now {format_rfc3339(self.now)})",
            )
        if signed.issued_at is not None and signed.issued_at > self.now + self.config.clock_skew:
            self._fail(
                FailureCode.NOT_YET_VALID,
                "predicate.issued_at",
                f"issued at {format_rfc3339(signed.issued_at)}, after now ({format_rfc3339(self.now)}) plus the "
                f"allowed clock skew of {self.config.clock_skew}: check the clock",
            )
        cap_s = self.trusted.max_manifest_validity_s
        cap = timedelta(seconds=cap_s) if cap_s is not None else self.config.max_manifest_validity
        if signed.issued_at is not None and signed.expires is not None and signed.expires - signed.issued_at > cap:
            source = f"trust root v{self.trusted.root_version}" if cap_s is not None else "the verifier's config"
            self._fail(
                FailureCode.VALIDITY_TOO_LONG,
                "predicate.expires",
                f"valid for {signed.expires - signed.issued_at} (issued {format_rfc3339(signed.issued_at)}, expires "
                f"{format_rfc3339(signed.expires)}); {source} allows at most {cap}",
            )
        if signed.version is not None and signed.version < self.trusted.min_manifest_version:
            self._fail(
                FailureCode.ROLLBACK,
                "predicate.version",
                f"version {signed.version} is below trust root v{self.trusted.root_version}'s floor "
                f"min_manifest_version={self.trusted.min_manifest_version}",
            )
        if self.state_path is None:
            self._warn(FailureCode.ROLLBACK_UNCHECKED, "state", "rollback protection switched off (no state file)")
            return
        try:
            self._state = self._read_state()
        except ValueError as exc:
            self._fail(FailureCode.STATE_INVALID, str(self.state_path), str(exc))
            return
        if self._state is None or signed.version is None:
            return
        last, last_digest = self._state["version"], self._state["payload_sha256"]
        if signed.version < last:
            self._fail(
                FailureCode.ROLLBACK,
                "predicate.version",
                f"version {signed.version} is older than version {last} already accepted on this device",
            )
        elif signed.version == last and last_digest and self.report.payload_sha256 != last_digest:
            self._fail(
                FailureCode.VERSION_REUSED,
                "predicate.version",
                f"version {signed.version} was already accepted on this device with different content",
            )

    def _read_state(self) -> dict[str, Any] | None:
        assert self.state_path is not None
        try:
            raw = read_bounded(self.state_path, self.config.max_state_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(f"device state file unreadable: {exc.strerror or exc}") from None
        try:
            state = loads_strict(raw)
        except ValueError as exc:
            raise ValueError(f"device state file is corrupt ({exc}); refusing rather than forgetting it") from None
        if (
            not isinstance(state, dict)
            or state.get("format") != STATE_FORMAT_VERSION
            or not is_int(state.get("version"))
            or not isinstance(state.get("payload_sha256"), str)
        ):
            raise ValueError("device state file has an unexpected structure; refusing rather than forgetting it")
        return state

    def _record_state(self) -> None:
        signed = self._signed
        if self.state_path is None or signed.version is None:
            return
        if self._state is not None and self._state["version"] >= signed.version:
            return  # the same version re-verified: nothing to advance
        state = {
            "format": STATE_FORMAT_VERSION,
            "version": signed.version,
            "payload_sha256": self.report.payload_sha256,
            "sortie_id": signed.sortie_id,
            "accepted_at": format_rfc3339(self.now),
            "root_version": self.trusted.root_version,
        }
        try:
            atomic_write_bytes(self.state_path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
        except OSError as exc:
            self._fail(
                FailureCode.STATE_WRITE_FAILED,
                str(self.state_path),
                f"verified, but the accepted version could not be recorded ({exc.strerror or exc}); "
                "without it rollback protection cannot advance",
            )

    # -- 5. subjects -------------------------------------------------------------------------------------

    def _step_subjects(self) -> None:
        signed = self._signed
        seen: set[str] = set()
        for name, _ in signed.subjects:
            problem = relpath_problem(name)
            if problem:
                self._fail(problem[0], name, problem[1])
            if name in seen:
                self._fail(FailureCode.SUBJECT_DUPLICATE, name, "listed more than once in the subjects")
            seen.add(name)
        for name in sorted(seen - set(signed.lengths)):
            self._fail(FailureCode.ARTIFACT_LIST_MISMATCH, name, "subject is missing from predicate.artifacts")
        for name in sorted(set(signed.lengths) - seen):
            self._fail(FailureCode.ARTIFACT_LIST_MISMATCH, name, "predicate.artifacts entry has no subject")
        if signed.coverage is not None and signed.coverage["path"] not in seen:
            self._fail(
                FailureCode.SCHEMA_INVALID, "predicate.coverage.path", "the coverage table is not a listed artifact"
            )
        if signed.takeoff is not None and signed.area is not None and not point_in_area(signed.area, *signed.takeoff):
            lon, lat = signed.takeoff
            self._fail(
                FailureCode.TAKEOFF_OUTSIDE_AREA,
                "predicate.takeoff",
                f"takeoff lat={lat / E7:.7f} lon={lon / E7:.7f} is outside the signed area",
            )

    # -- 6. artifacts ------------------------------------------------------------------------------------

    def _step_artifacts(self) -> None:
        signed = self._signed
        root_real = os.path.realpath(self.cache_root)
        counts: dict[str, int] = {}
        for name, _ in signed.subjects:
            counts[name] = counts.get(name, 0) + 1
        jobs: list[tuple[str, int, str]] = []
        results: dict[str, ArtifactResult] = {}
        for name, sha in signed.subjects:
            if name in results:
                continue
            problem = relpath_problem(name)
            length = signed.lengths.get(name)
            if problem:
                results[name] = ArtifactResult(name, False, problem[0], problem[1])
            elif counts[name] > 1:
                results[name] = ArtifactResult(name, False, FailureCode.SUBJECT_DUPLICATE, "listed more than once")
            elif name not in signed.lengths:
                results[name] = ArtifactResult(
                    name, False, FailureCode.ARTIFACT_LIST_MISMATCH, "not in predicate.artifacts"
                )
            elif sha is None or length is None:
                results[name] = ArtifactResult(name, False, FailureCode.SCHEMA_INVALID, "no valid digest/length signed")
            else:
                jobs.append((name, length, sha))
        workers = min(hash_workers(self.config.hash_workers), max(1, len(jobs)))
        jobs.sort(key=lambda job: -job[1])  # biggest first balances the threads
        chunk = self.config.hash_chunk_bytes
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="navcache-hash") as pool:
            outcomes = pool.map(lambda job: _check_artifact(root_real, job[0], job[1], job[2], chunk), jobs)
            for (name, _, _), (code, message, hashed) in zip(jobs, outcomes, strict=True):
                self.report.bytes_hashed += hashed
                results[name] = ArtifactResult(name, code is None, code, message)
                if code is not None:
                    self._fail(code, name, message)
        for name in sorted(set(signed.lengths) - set(results)):
            results[name] = ArtifactResult(name, False, FailureCode.ARTIFACT_LIST_MISMATCH, "no subject for it")
        self.report.artifacts = sorted(results.values(), key=lambda r: r.path)

    # -- 7. extra files ----------------------------------------------------------------------------------

    def _step_extras(self) -> None:
        listed = {name for name, _ in self._signed.subjects} | set(self._signed.lengths)
        listed_dirs = {name.rsplit("/", i)[0] for name in listed for i in range(1, name.count("/") + 1)}
        root = self.cache_root
        skip = {os.path.abspath(self.manifest_path)}
        if self.state_path is not None:
            skip.add(os.path.abspath(self.state_path))
            skip.add(os.path.abspath(root_store_path(self.state_path)))
        extras: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            rel_dir = Path(os.path.relpath(dirpath, root)).as_posix()
            prefix = "" if rel_dir == "." else rel_dir + "/"
            # Symlinked directories are not descended into: each is an entry of its own, unless a listed
            # path goes through it (its target is then checked artifact by artifact).
            linked = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d)) and prefix + d not in listed_dirs]
            for entry in sorted(filenames + linked):
                rel = prefix + entry
                if rel in listed or self._ignored_extra(rel, listed):
                    continue
                if os.path.abspath(os.path.join(dirpath, entry)) in skip:
                    continue
                extras.append(rel)
        self.report.extra_files = extras[: self.config.max_extra_reported]
        record = self._fail if self.config.strict_extra else self._warn
        for rel in self.report.extra_files:
            record(FailureCode.EXTRA_FILE, rel, "file in the cache is not listed in the manifest")
        if len(extras) > self.config.max_extra_reported:
            record(FailureCode.EXTRA_FILE, "…", f"{len(extras) - self.config.max_extra_reported} more unlisted files")

    def _ignored_extra(self, rel: str, listed: set[str]) -> bool:
        base = rel.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatchcase(base, pattern) for pattern in self.config.ignored_extra_patterns):
            return True
        if SHIPPED_TRUST_ROOT.fullmatch(rel):
            return True  # trust-root versions shipped with the cache: signed by the root keys, checked apart
        return rel.endswith(SIDECAR_SUFFIX) and rel[: -len(SIDECAR_SUFFIX)] in listed

    # -- 8. coverage -------------------------------------------------------------------------------------

    def _step_coverage(self) -> None:
        coverage = self._signed.coverage
        if self.mode != "operator" or coverage is None:
            return  # airborne: the signed aggregate (checked for consistency in the schema step) is trusted
        where = coverage["path"]
        result = next((r for r in self.report.artifacts if r.path == where), None)
        if result is None or not result.ok:
            self._fail(
                FailureCode.COVERAGE_TABLE_INVALID, where, "coverage table did not verify; cannot re-derive its digest"
            )
            return
        expected_sha = dict(self._signed.subjects)[where]
        try:
            data = read_bounded(self.cache_root / where, self.config.max_coverage_table_bytes)
        except OSError as exc:
            self._fail(FailureCode.COVERAGE_TABLE_INVALID, where, f"cannot read the coverage table: {exc}")
            return
        if hashlib.sha256(data).hexdigest() != expected_sha:  # bytes verified as read, not as hashed earlier
            self._fail(FailureCode.ARTIFACT_DIGEST_MISMATCH, where, "coverage table changed after it was hashed")
            return
        try:
            statuses = coverage_table_statuses(loads_strict(data, allow_floats=True))
            digest = coverage_digest(statuses)
        except ValueError as exc:
            self._fail(FailureCode.COVERAGE_TABLE_INVALID, where, str(exc))
            return
        total, covered = len(statuses), sum(1 for _, status in statuses if status == "covered")
        if digest != coverage["digest"]:
            self._fail(
                FailureCode.COVERAGE_MISMATCH,
                "predicate.coverage.digest",
                f"re-derived digest {digest[:12]}… != signed {coverage['digest'][:12]}…",
            )
        if (total, covered) != (coverage["total"], coverage["covered"]):
            self._fail(
                FailureCode.COVERAGE_MISMATCH,
                "predicate.coverage",
                f"table has total={total} covered={covered}, signed total={coverage['total']} "
                f"covered={coverage['covered']}",
            )


def _check_artifact(
    root_real: str, name: str, length: int, sha: str, chunk: int
) -> tuple[FailureCode | None, str, int]:
    """One artifact: containment, type, length (fstat) before any hashing, then a bounded streamed sha256.
    Returns (failure code or None, message, bytes hashed). Runs in a worker thread; never raises for what
    it finds on disk (an unexpected OSError or encoding error is an unreadable artifact, not a traceback
    that would hide every other artifact's result)."""
    try:
        return _check_artifact_unguarded(root_real, name, length, sha, chunk)
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return FailureCode.ARTIFACT_UNREADABLE, f"cannot check: {type(exc).__name__}: {detail}", 0


def _check_artifact_unguarded(
    root_real: str, name: str, length: int, sha: str, chunk: int
) -> tuple[FailureCode | None, str, int]:
    full = os.path.join(root_real, *name.split("/"))
    real = os.path.realpath(full)
    if real != root_real and not real.startswith(root_real + os.sep):
        return FailureCode.ARTIFACT_SYMLINK_ESCAPE, f"resolves outside the cache root (to {real})", 0
    if not os.path.lexists(full):
        return FailureCode.ARTIFACT_MISSING, "listed in the manifest but not present", 0
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return FailureCode.ARTIFACT_MISSING, "dangling link or removed while checked", 0
    except OSError as exc:
        return FailureCode.ARTIFACT_UNREADABLE, f"cannot open: {exc.strerror or exc}", 0
    try:
        handle = fdopen_regular(fd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return FailureCode.ARTIFACT_NOT_REGULAR, str(exc.strerror), 0
        return FailureCode.ARTIFACT_UNREADABLE, f"cannot open: {exc.strerror or exc}", 0
    with handle:
        info = os.fstat(handle.fileno())
        if info.st_size != length:
            return FailureCode.ARTIFACT_LENGTH_MISMATCH, f"{info.st_size} bytes, manifest says {length} (not hashed)", 0
        try:
            hashed, actual = hash_open_file(handle, length + 1, chunk)
        except OSError as exc:
            return FailureCode.ARTIFACT_UNREADABLE, f"read error: {exc.strerror or exc}", 0
    if hashed != length:
        return FailureCode.ARTIFACT_LENGTH_MISMATCH, f"changed size while hashed ({hashed} != {length})", hashed
    if actual != sha:
        return FailureCode.ARTIFACT_DIGEST_MISMATCH, f"sha256 {actual[:12]}… != signed {sha[:12]}…", hashed
    return None, "", hashed


def verify_cache(
    cache_root: Path | str,
    trusted_keys: TrustedKeys | TrustRoot | Path | str,
    *,
    mode: Mode = "airborne",
    now: datetime | None = None,
    state_path: Path | str | None = None,
    max_manifest_bytes: int | None = None,
    strict_extra: bool | None = None,
    manifest_path: Path | str | None = None,
    config: VerifierConfig | None = None,
) -> VerificationReport:
    """Verify ``cache_root`` against ``trusted_keys``: a :class:`TrustedKeys`, a verified
    :class:`~navcache_runtime.trustroot.TrustRoot`, or the path of a trusted-keys file or a signed trust root
    (``root-N.json``). Never raises for anything found on disk: every problem is a :class:`Failure` in the
    report.

    With a signed trust root, the newest root reachable from it is used (the one this device holds next to
    ``state_path``, then newer versions shipped in ``cache_root/trust/``; see
    :mod:`navcache_runtime.trustroot`); a newer root is stored on the device as soon as it is accepted.

    ``now`` defaults to ``datetime.now(UTC)`` taken once; ``state_path`` is the device's record of the last
    accepted version (rollback protection; updated only after a fully successful verification; None switches
    it off: the onboard entry points default to :func:`navcache_runtime.trustroot.default_state_path`);
    ``manifest_path`` defaults to ``cache_root / "manifest.dsse.json"``; ``max_manifest_bytes`` and
    ``strict_extra`` override the same fields of ``config``."""
    from .trustroot import TrustRoot, load_trust_anchor, resolve_trust  # trustroot builds on this module

    _check_arguments(mode, now)
    config = config or VerifierConfig()
    overrides: dict[str, Any] = {}
    if max_manifest_bytes is not None:
        overrides["max_manifest_bytes"] = max_manifest_bytes
    if strict_extra is not None:
        overrides["strict_extra"] = strict_extra
    if overrides:
        config = replace(config, **overrides)
    moment = (now or datetime.now(UTC)).astimezone(UTC)

    def refused(code: FailureCode, subject: str, message: str) -> VerificationReport:
        report = VerificationReport(
            ok=False,
            mode=mode,
            cache_root=str(cache_root),
            manifest=str(manifest_path or Path(cache_root) / MANIFEST_NAME),
            checked_at=format_rfc3339(moment),
            failures=[Failure(code, subject, message)],
            skipped=list(CacheVerifier.STEPS),
        )
        logger.warning("verify %s refused: %s", cache_root, message)
        return report

    anchor: TrustedKeys | TrustRoot
    if isinstance(trusted_keys, TrustedKeys | TrustRoot):
        anchor = trusted_keys
    else:
        try:
            anchor = load_trust_anchor(trusted_keys)
        except TrustedKeysError as exc:
            return refused(FailureCode.TRUSTED_KEYS_INVALID, str(trusted_keys), str(exc))
    state = Path(state_path) if state_path is not None else None
    resolution = resolve_trust(
        anchor,
        cache_root=cache_root,
        state_path=state,
        now=moment,
        state_present=state is not None and os.path.lexists(state),
    )
    if resolution.problems or resolution.trusted is None:
        code, subject, message = resolution.problems[0]
        return refused(FailureCode(code), subject, message)
    notes = [Failure(FailureCode(code), subject, message) for code, subject, message in resolution.notes]
    root = resolution.root
    if state is not None and root is not None and (resolution.store or resolution.reset_state):
        try:
            if resolution.store:  # the root's bytes as received; it is re-checked on every later load
                atomic_write_bytes(root_store_path(state), root.raw)
            if resolution.reset_state:
                record = {
                    "format": STATE_FORMAT_VERSION,
                    "version": root.min_manifest_version,
                    "payload_sha256": "",
                    "root_version": root.version,
                    "reset_by_root_at": format_rfc3339(moment),
                }
                atomic_write_bytes(state, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        except OSError as exc:
            return refused(
                FailureCode.STATE_WRITE_FAILED,
                str(state),
                f"cannot record trust root v{root.version} on this device ({exc.strerror or exc})",
            )
    report = CacheVerifier(
        cache_root,
        resolution.trusted,
        mode=mode,
        now=now,
        state_path=state_path,
        manifest_path=manifest_path,
        config=config,
    ).run()
    report.trust_root_version = resolution.trusted.root_version
    report.warnings[:0] = notes
    return report
