"""The signed-manifest format: what both sides agree on, byte for byte.

The provisioning side (``navcache.manifest``) writes it, the onboard verifier
(:mod:`navcache_runtime.verify`) and the trust root reader (:mod:`navcache_runtime.trustroot`) read it.
Nothing here decides whether a cache is trusted: these are the names, limits, encoders and decoders.

**Envelope.** ``manifest.dsse.json`` is a DSSE envelope: a JSON object with exactly ``payload`` (canonical
standard base64), ``payloadType`` and ``signatures`` (a non-empty list of objects with ``sig``, canonical
standard base64 of a 64-byte Ed25519 signature, and an optional ``keyid``). Signatures are over
``PAE(payloadType, payload)`` (:func:`pae`). Unlike DSSE's "consumers MUST ignore unrecognized fields",
the *unsigned* envelope may carry no other field and no URL-safe base64: it has no business carrying
anything else.

**Payload.** An in-toto Statement v1 (``_type`` :data:`STATEMENT_TYPE`) whose predicate has type
:data:`PREDICATE_TYPE`; ``subject`` lists ``{"name": <relative path>, "digest": {"sha256": <hex>}}``, and
the predicate holds ``artifacts`` (name → ``{"length": int}``), ``sortie_id``, ``takeoff``, ``area``,
``host``, ``version``, ``issued_at``, ``expires``, ``tool_version``, ``coverage`` and, optionally,
``preprocess`` and ``self_test``. Unknown fields inside the signed Statement and predicate are ignored, as
in-toto's parsing rules require. The JSON is strict (:func:`loads_strict`): UTF-8, no duplicate keys, no
floats, NaN or Infinity.

**Conventions of signed data.** Integers only; coordinates are scaled integers, degrees * 10^7
(``lat_e7``, ``lon_e7``); ``area`` is a GeoJSON ``Polygon`` or ``MultiPolygon`` whose positions are
``[lon_e7, lat_e7]`` (RFC 7946 order), rings closed, planar in lon/lat (an area must not cross the
antimeridian); times are RFC 3339 UTC with seconds precision (``2026-11-23T12:00:00Z``); artifact names
are relative, normalised POSIX paths (:func:`relpath_problem`).

**Coverage table.** The signed artifact ``predicate.coverage.path`` is ``{"tiles": [[z, x, y, code],
...], "codes": {"<code>": "<status>"}}`` (:func:`coverage_table_statuses`); its digest is
:func:`navcache_runtime.coverage.coverage_digest` over the (tile, status) rows.

**Limits** (``MAX_*``) are the defaults of :class:`navcache_runtime.verify.VerifierConfig`; the
provisioning side refuses to write what the verifier would refuse to read.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import itertools
import json
import os
import re
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from .errors import Failure, FailureCode
from .integrity import fdopen_regular
from .layout import MANIFEST_NAME

__all__ = [
    "E7",
    "HEX64",
    "MANIFEST_NAME",
    "MAX_AREA_VERTICES",
    "MAX_ARTIFACTS",
    "MAX_LAT_E7",
    "MAX_LON_E7",
    "MAX_MANIFEST_BYTES",
    "MAX_SIGNATURES",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Envelope",
    "coverage_table_statuses",
    "format_rfc3339",
    "hash_artifact",
    "hash_open_file",
    "hash_workers",
    "is_int",
    "loads_strict",
    "pae",
    "parse_area",
    "parse_envelope",
    "parse_rfc3339",
    "percent_x100_bounds",
    "point_in_area",
    "read_bounded",
    "read_manifest_version",
    "relpath_problem",
]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://navcache.dev/manifest/v1"
E7 = 10_000_000
MAX_LAT_E7 = 90 * E7
MAX_LON_E7 = 180 * E7

# The verifier's default limits (VerifierConfig); the writer keeps within them.
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURES = 16
MAX_ARTIFACTS = 200_000
MAX_AREA_VERTICES = 100_000

#: A sha256 digest as signed: 64 lowercase hex characters.
HEX64 = re.compile(r"[0-9a-f]{64}")
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_DRIVE = re.compile(r"[A-Za-z]:")
_ENVELOPE_FIELDS = frozenset({"payload", "payloadType", "signatures"})
_SIGNATURE_FIELDS = frozenset({"keyid", "sig"})
_ED25519_SIG_BYTES = 64


# --------------------------------------------------------------------------------------------------------
# Encoding and strict decoding


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` where
    LEN is the ASCII decimal *byte* length."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def relpath_problem(name: object) -> tuple[FailureCode, str] | None:
    """Why ``name`` is not an acceptable artifact path (relative POSIX, normalised), or None."""
    if not isinstance(name, str) or not name:
        return FailureCode.PATH_INVALID, "path must be a non-empty string"
    if len(name.encode("utf-8", "surrogatepass")) > 4096:
        return FailureCode.PATH_INVALID, "path is longer than 4096 bytes"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        return FailureCode.PATH_INVALID, "path contains control characters"
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        # A lone surrogate (JSON "\\ud800") names no UTF-8 file; the OS path functions cannot even encode it.
        return FailureCode.PATH_INVALID, "path contains a lone surrogate (not valid Unicode)"
    if "\\" in name:
        return FailureCode.PATH_INVALID, "path contains a backslash (POSIX separators only)"
    if name.startswith("/") or _DRIVE.match(name):
        return FailureCode.PATH_ABSOLUTE, "absolute path (artifacts are relative to the cache root)"
    parts = name.split("/")
    if ".." in parts:
        return FailureCode.PATH_TRAVERSAL, "path contains a '..' component"
    if any(part in ("", ".") for part in parts):
        return FailureCode.PATH_INVALID, "path has an empty or '.' component (not normalised)"
    if name == MANIFEST_NAME:
        return FailureCode.PATH_INVALID, "the manifest cannot list itself"
    return None


def percent_x100_bounds(covered: int, total: int) -> tuple[int, int]:
    """The acceptable ``percent_x100`` for ``covered`` of ``total``: 10000 * covered / total rounded down or
    up (so both floor and round-to-nearest conventions are accepted); 0 for an empty area."""
    if total <= 0:
        return 0, 0
    low, remainder = divmod(covered * 10_000, total)
    return low, low + (1 if remainder else 0)


def format_rfc3339(moment: datetime) -> str:
    """UTC, seconds precision: ``2026-11-23T12:00:00Z`` (sub-second part truncated)."""
    if moment.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: object) -> datetime | None:
    """Parse the one accepted form (``YYYY-MM-DDTHH:MM:SSZ``); None when it is anything else."""
    if not isinstance(text, str) or not _RFC3339_UTC.fullmatch(text):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def is_int(value: object) -> TypeGuard[int]:
    """A JSON integer (bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


class _DuplicateKeyError(Exception):
    pass


class _FloatError(Exception):
    pass


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _refuse_float(text: str) -> Any:
    raise _FloatError(text)


def loads_strict(data: bytes, *, allow_floats: bool = False) -> Any:
    """UTF-8 JSON with duplicate keys refused, and non-integer numbers (floats, NaN, Infinity) too unless
    ``allow_floats`` (for unsigned-but-hashed artifacts such as the coverage table; NaN/Infinity never).

    Raises ``ValueError`` with a message naming the problem; ``.code`` on the exception is the
    :class:`FailureCode` to report."""
    try:
        text = data.decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_pairs_without_duplicates,
            parse_float=float if allow_floats else _refuse_float,
            parse_constant=_refuse_float,
        )
    except _DuplicateKeyError as exc:
        raise _coded(FailureCode.PAYLOAD_DUPLICATE_KEY, f"duplicate JSON key {exc.args[0]!r}") from None
    except _FloatError as exc:
        raise _coded(FailureCode.PAYLOAD_FLOAT, f"non-integer number {exc.args[0]!r} (floats are refused)") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _coded(FailureCode.PAYLOAD_MALFORMED, f"not valid JSON: {exc}") from None


def _coded(code: FailureCode, message: str) -> ValueError:
    error = ValueError(message)
    error.code = code  # type: ignore[attr-defined]
    return error


def _b64decode_canonical(text: object) -> bytes | None:
    """Standard base64 with padding, in its one canonical spelling; None otherwise."""
    if not isinstance(text, str):
        return None
    try:
        raw = text.encode("ascii")
        data = base64.b64decode(raw, validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    return data if base64.b64encode(data) == raw else None


def read_bounded(path: Path, limit: int) -> bytes:
    """Read at most ``limit`` bytes; a larger file raises ``OSError(EFBIG)`` after reading ≤ limit + 1
    bytes (its size is checked with fstat first, so a huge file is not read at all)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with fdopen_regular(fd) as handle:
        info = os.fstat(handle.fileno())
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes exceeds the limit of {limit}")
        chunks: list[bytes] = []
        remaining = limit + 1
        while remaining > 0:
            chunk = handle.read(min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    data = b"".join(chunks)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"more than the limit of {limit} bytes (the file grew while read)")
    return data


def hash_open_file(handle: Any, limit: int, chunk_size: int = 1 << 20) -> tuple[int, str]:
    """Stream sha256 over at most ``limit`` bytes of an open binary file; returns (bytes read, hex)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    total = 0
    while total < limit:
        want = min(chunk_size, limit - total)
        n = handle.readinto(view[:want])
        if not n:
            break
        digest.update(view[:n])
        total += n
    return total, digest.hexdigest()


def hash_artifact(path: Path | str, chunk_size: int = 1 << 20) -> tuple[int, str]:
    """(length, sha256 hex) of a regular file, measured on one open descriptor."""
    with open(path, "rb", buffering=0) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        # Read one byte past the stat size, so a file that grows meanwhile is noticed (length ≠ size).
        length, hexdigest = hash_open_file(handle, info.st_size + 1, chunk_size)
    if length != info.st_size:
        raise OSError(errno.EAGAIN, f"{path} changed size while it was hashed")
    return length, hexdigest


def hash_workers(configured: int | None = None) -> int:
    return max(1, configured or os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------
# Geometry on scaled integers


_INSIDE, _OUTSIDE, _BOUNDARY = 1, 0, -1


def _ring_position(ring: Sequence[tuple[int, int]], px: int, py: int) -> int:
    """Ray casting toward +x with exact integer arithmetic; points on an edge are ``_BOUNDARY``."""
    inside = False
    for (ax, ay), (bx, by) in itertools.pairwise(ring):
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        if cross == 0 and min(ax, bx) <= px <= max(ax, bx) and min(ay, by) <= py <= max(ay, by):
            return _BOUNDARY
        if (ay > py) != (by > py):
            # The edge crosses the horizontal line y = py at x = ax + (py - ay)(bx - ax)/(by - ay);
            # the ray from px counts it when px < x. Multiply out by (by - ay), minding its sign.
            lhs = (px - ax) * (by - ay)
            rhs = (py - ay) * (bx - ax)
            if (lhs < rhs) if by > ay else (lhs > rhs):
                inside = not inside
    return _INSIDE if inside else _OUTSIDE


def point_in_area(polygons: Sequence[Sequence[Sequence[tuple[int, int]]]], lon_e7: int, lat_e7: int) -> bool:
    """True when the point lies in (or on the boundary of) any polygon; holes exclude their interior."""
    for rings in polygons:
        outer = _ring_position(rings[0], lon_e7, lat_e7)
        if outer == _OUTSIDE:
            continue
        if outer == _BOUNDARY:
            return True
        holes = [_ring_position(hole, lon_e7, lat_e7) for hole in rings[1:]]
        if _BOUNDARY in holes or _INSIDE not in holes:
            return True
    return False


def parse_area(area: object, max_vertices: int) -> tuple[list[list[list[tuple[int, int]]]] | None, str]:
    """Validate a GeoJSON Polygon/MultiPolygon of ``[lon_e7, lat_e7]`` integer positions."""
    if not isinstance(area, dict):
        return None, "area must be a GeoJSON geometry object"
    kind, coords = area.get("type"), area.get("coordinates")
    if kind == "Polygon":
        raw_polygons = [coords]
    elif kind == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            return None, "MultiPolygon coordinates must be a non-empty list of polygons"
        raw_polygons = coords
    else:
        return None, f"area type must be 'Polygon' or 'MultiPolygon', got {kind!r}"
    polygons: list[list[list[tuple[int, int]]]] = []
    vertices = 0
    for p, raw_rings in enumerate(raw_polygons):
        if not isinstance(raw_rings, list) or not raw_rings:
            return None, f"polygon {p} must be a non-empty list of rings"
        rings: list[list[tuple[int, int]]] = []
        for r, raw_ring in enumerate(raw_rings):
            where = f"polygon {p} ring {r}"
            if not isinstance(raw_ring, list) or len(raw_ring) < 4:
                return None, f"{where} must list at least 4 positions"
            vertices += len(raw_ring)
            if vertices > max_vertices:
                return None, f"area has more than {max_vertices} vertices"
            ring: list[tuple[int, int]] = []
            for position in raw_ring:
                if not (isinstance(position, list) and len(position) == 2 and all(map(is_int, position))):
                    return None, f"{where}: positions must be [lon_e7, lat_e7] integer pairs, got {position!r}"
                lon, lat = position
                if not (-MAX_LON_E7 <= lon <= MAX_LON_E7 and -MAX_LAT_E7 <= lat <= MAX_LAT_E7):
                    return None, f"{where}: position {position} is outside [-180e7, 180e7] x [-90e7, 90e7]"
                ring.append((lon, lat))
            if ring[0] != ring[-1]:
                return None, f"{where} is not closed (first position != last)"
            rings.append(ring)
        polygons.append(rings)
    return polygons, ""


# --------------------------------------------------------------------------------------------------------
# The envelope and the coverage table


@dataclass
class Envelope:
    """A DSSE envelope whose shape is valid; its signatures are not checked yet."""

    payload_type: str
    payload: bytes
    signatures: list[tuple[str, bytes | None, str]]  # (keyid hint, decoded sig or None, problem)


def parse_envelope(
    raw: bytes,
    *,
    allowed_payload_types: Collection[str] = frozenset({PAYLOAD_TYPE}),
    max_signatures: int = MAX_SIGNATURES,
    subject: str = MANIFEST_NAME,
) -> tuple[Envelope | None, list[Failure]]:
    """Shape of the unsigned envelope. Returns the envelope unless its structure is unusable (an unsupported
    ``payloadType`` is a failure, but the envelope is still returned so that its signatures can be checked
    and reported too). ``subject`` names the manifest file in failures, so the crew know which file to
    look at."""
    try:
        doc = loads_strict(raw)
    except ValueError as exc:
        return None, [Failure(FailureCode.ENVELOPE_MALFORMED, subject, str(exc))]
    if not isinstance(doc, dict):
        return None, [Failure(FailureCode.ENVELOPE_MALFORMED, subject, "must be a JSON object")]
    problems = []
    missing, unknown = sorted(_ENVELOPE_FIELDS - set(doc)), sorted(set(doc) - _ENVELOPE_FIELDS)
    if missing:
        problems.append(f"missing field(s) {missing}")
    if unknown:
        problems.append(f"unknown field(s) {unknown} (the unsigned envelope may carry only the DSSE fields)")
    payload_type = doc.get("payloadType")
    if "payloadType" in doc and not isinstance(payload_type, str):
        problems.append("payloadType must be a string")
    payload = _b64decode_canonical(doc.get("payload"))
    if "payload" in doc and payload is None:
        problems.append("payload is not canonical standard base64")
    raw_sigs = doc.get("signatures")
    if "signatures" in doc and (not isinstance(raw_sigs, list) or not raw_sigs):
        problems.append("signatures must be a non-empty list")
    elif isinstance(raw_sigs, list) and len(raw_sigs) > max_signatures:
        problems.append(f"more than {max_signatures} signatures")
    if problems:
        return None, [Failure(FailureCode.ENVELOPE_MALFORMED, subject, p) for p in problems]
    assert isinstance(payload_type, str) and payload is not None and isinstance(raw_sigs, list)
    failures: list[Failure] = []
    if payload_type not in allowed_payload_types:
        failures.append(
            Failure(
                FailureCode.PAYLOAD_TYPE_UNSUPPORTED,
                "envelope.payloadType",
                f"{payload_type!r} is not one of {sorted(allowed_payload_types)}",
            )
        )
    signatures: list[tuple[str, bytes | None, str]] = []
    for index, entry in enumerate(raw_sigs):
        where = f"signatures[{index}]"
        if not isinstance(entry, dict) or "sig" not in entry or set(entry) - _SIGNATURE_FIELDS:
            return None, [Failure(FailureCode.ENVELOPE_MALFORMED, where, "must be an object {'keyid'?, 'sig'}")]
        keyid = entry.get("keyid", "")
        if not isinstance(keyid, str):
            return None, [Failure(FailureCode.ENVELOPE_MALFORMED, where, "keyid must be a string")]
        sig = _b64decode_canonical(entry["sig"])
        if sig is None:
            signatures.append((keyid, None, "sig is not canonical standard base64"))
        elif len(sig) != _ED25519_SIG_BYTES:
            signatures.append((keyid, None, f"sig is {len(sig)} bytes, an Ed25519 signature is 64"))
        else:
            signatures.append((keyid, sig, ""))
    return Envelope(payload_type, payload, signatures), failures


def read_manifest_version(manifest_path: Path | str, *, max_bytes: int = MAX_MANIFEST_BYTES) -> int:
    """The ``predicate.version`` of an existing manifest, read WITHOUT checking its signature.

    For the provisioning side only (so that a new manifest never goes backwards, even when the old one no
    longer verifies). Uses the same bounded read and strict parsing as the verifier. Raises
    ``FileNotFoundError`` when there is no manifest and ``ValueError`` when no version can be read."""
    path = Path(manifest_path)
    try:
        raw = read_bounded(path, max_bytes)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    envelope, failures = parse_envelope(raw)
    if envelope is None:
        raise ValueError(f"{path}: {failures[0].message}")
    statement = loads_strict(envelope.payload)
    predicate = statement.get("predicate") if isinstance(statement, dict) else None
    version = predicate.get("version") if isinstance(predicate, dict) else None
    if not is_int(version) or version < 1:
        raise ValueError(f"{path}: payload has no integer predicate.version")
    return int(version)


def coverage_table_statuses(table: object) -> list[tuple[tuple[int, int, int], str]]:
    """``{"tiles": [[z, x, y, code], ...], "codes": {"<code>": "covered" | ...}}`` → (tile, status) rows.

    The code map may also be named ``status_codes`` (what ``navcache.coverage.CoverageReport.to_json``
    writes); other fields of the table are ignored, the digest covers the tiles and their statuses only."""
    if not isinstance(table, dict) or not isinstance(table.get("tiles"), list):
        raise ValueError("coverage table must be an object with a 'tiles' list")
    maps = [table[key] for key in ("codes", "status_codes") if key in table]
    if not maps or not all(isinstance(m, dict) for m in maps) or any(m != maps[0] for m in maps):
        raise ValueError("coverage table needs one 'codes' (or 'status_codes') object mapping codes to statuses")
    codes: Mapping[str, object] = maps[0]
    rows = []
    for index, tile in enumerate(table["tiles"]):
        if not (isinstance(tile, list) and len(tile) == 4 and all(map(is_int, tile))):
            raise ValueError(f"tiles[{index}] must be [z, x, y, status_code] integers")
        status = codes.get(str(tile[3]))
        if not isinstance(status, str):
            raise ValueError(f"tiles[{index}] has status code {tile[3]} that 'codes' does not define")
        rows.append(((tile[0], tile[1], tile[2]), status))
    return rows
