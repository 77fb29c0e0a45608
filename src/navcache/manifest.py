"""Build and sign the cache manifest (DAG step 5, ground side).

The manifest is an in-toto Statement v1 serialised with RFC 8785 (JSON Canonicalization Scheme) inside a
DSSE envelope signed with the operator's Ed25519 key over ``PAE(payloadType, payload)``, written to
``cache_root/manifest.dsse.json``. Field conventions are documented in :mod:`navcache_runtime.verify`
(integers only; coordinates in degrees * 10^7; GeoJSON positions ``[lon_e7, lat_e7]``; RFC 3339 UTC times
with seconds precision). Anyone can check it with openssl: ``docs/verify-with-openssl.md``.

Statement::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "<relative POSIX path>", "digest": {"sha256": "<hex>"}}, ...],   # sorted by name
     "predicateType": "https://navcache.dev/manifest/v1",
     "predicate": {"artifacts": {"<path>": {"length": <int>}}, "sortie_id": "...",
                   "takeoff": {"lat_e7": <int>, "lon_e7": <int>}, "area": <GeoJSON Polygon|MultiPolygon>,
                   "route": {"type": "LineString", "coordinates": [...], "corridor_cm": <int>},   # routes only
                   "host": {"<key>": "<str>"}, "coverage": {"digest", "total", "covered", "percent_x100", "path"},
                   "version": <int>, "issued_at": "...Z", "expires": "...Z", "tool_version": "...",
                   "preprocess": {"<vpr model>": {"resize", "mean_e6": [3 ints], "std_e6": [3 ints], "scale",
                                                  "channels", "layout", "height", "width"}}}}
                   # preprocess: how the tiles were fed to the VPR backbone (navcache_runtime.preprocessing);
                   # open_cache applies exactly this to camera frames. mean/std are integers x 10^6.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path, PurePath
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from navcache_runtime.integrity import fsync_dir, temp_path_for
from navcache_runtime.layout import MANIFEST_NAME
from navcache_runtime.manifest_format import (
    E7,
    HEX64,
    MAX_AREA_VERTICES,
    MAX_LAT_E7,
    MAX_LON_E7,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    format_rfc3339,
    hash_artifact,
    hash_workers,
    is_int,
    pae,
    parse_area,
    parse_rfc3339,
    percent_x100_bounds,
    point_in_area,
    read_manifest_version,
    relpath_problem,
)
from navcache_runtime.preprocessing import Preprocess
from navcache_runtime.trust import TrustedKeysError, keyid_for
from navcache_runtime.trustroot import TrustRoot, load_trust_anchor
from navcache_runtime.verify import verify_cache

from .errors import ManifestError
from .keys import Signer, load_signer

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "build_statement",
    "canonical_payload",
    "make_envelope",
    "next_version",
    "sign_manifest",
]


# --------------------------------------------------------------------------------------------------------
# Statement


def build_statement(
    cache_root: Path | str,
    artifact_paths: Iterable[str | PurePath],
    *,
    sortie_id: str,
    takeoff: tuple[float, float],
    area_geojson: Mapping[str, Any],
    host: Mapping[str, str],
    coverage: Mapping[str, Any],
    version: int,
    issued_at: datetime,
    expires: datetime,
    tool_version: str,
    predicate_type: str = PREDICATE_TYPE,
    preprocess: Mapping[str, Preprocess] | None = None,
    route: Mapping[str, Any] | None = None,
    corridor_m: float | None = None,
    self_test: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The in-toto Statement for the artifacts under ``cache_root`` (paths relative to it).

    Every artifact is stream-hashed (in parallel threads) for its sha256 and length. Refused with
    :class:`ManifestError`: absolute paths, ``..``, backslashes, duplicates, symlinks anywhere on an
    artifact's path, anything that is not a regular file inside ``cache_root``, and floats anywhere in the
    result (``takeoff`` (lat, lon) and the area's coordinates are converted to integers, degrees * 10^7,
    rounded half-even from their shortest decimal representation).

    For a route sortie ``area_geojson`` is the corridor actually provisioned (what the drone checks its
    takeoff against); ``route`` (a GeoJSON LineString in degrees) and ``corridor_m`` are recorded beside it
    as information, as ``{"type": "LineString", "coordinates": [[lon_e7, lat_e7], ...], "corridor_cm": int}``."""
    root = Path(cache_root)
    if not root.is_dir():
        raise ManifestError("cache root is not a directory", where=str(root))
    root_real = os.path.realpath(root)
    names = _artifact_names(root, root_real, artifact_paths)

    predicate_area = _scale_area(area_geojson)
    if not isinstance(takeoff, tuple | list) or len(takeoff) != 2:
        raise ManifestError(f"takeoff must be a (lat, lon) pair, got {takeoff!r}", where="takeoff")
    lat_e7 = _to_e7(takeoff[0], "takeoff latitude", MAX_LAT_E7)
    lon_e7 = _to_e7(takeoff[1], "takeoff longitude", MAX_LON_E7)
    polygons, problem = parse_area(predicate_area, MAX_AREA_VERTICES)
    if polygons is None:
        raise ManifestError(problem, where="area_geojson")
    if not point_in_area(polygons, lon_e7, lat_e7):
        raise ManifestError(
            f"takeoff ({lat_e7 / E7}, {lon_e7 / E7}) is outside the area",
            where="takeoff",
            hint="check the (lat, lon) order and the area polygon",
        )
    if not isinstance(sortie_id, str) or not sortie_id:
        raise ManifestError("sortie_id must be a non-empty string", where="sortie_id")
    if not isinstance(host, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in host.items()):
        raise ManifestError("host must map strings to strings", where="host", hint="stringify versions and counts")
    if not is_int(version) or version < 1:
        raise ManifestError(f"version must be an integer >= 1, got {version!r}", where="version")
    if not isinstance(tool_version, str) or not tool_version:
        raise ManifestError("tool_version must be a non-empty string", where="tool_version")
    issued, expiry = _utc_seconds(issued_at, "issued_at"), _utc_seconds(expires, "expires")
    if expiry <= issued:  # one fixed-width UTC format: string order is time order
        raise ManifestError(f"expires ({expiry}) must be later than issued_at ({issued})", where="expires")
    coverage_block = _coverage_block(coverage, names)
    preprocess_block = {model: prep.to_signed() for model, prep in sorted((preprocess or {}).items())}
    route_block = _route_block(route, corridor_m) if route is not None else None
    self_test_block = _self_test_block(self_test, names) if self_test is not None else None

    hashes = _hash_all(root_real, names)
    statement: dict[str, Any] = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": hashes[name][1]}} for name in sorted(names)],
        "predicateType": predicate_type,
        "predicate": {
            "artifacts": {name: {"length": hashes[name][0]} for name in sorted(names)},
            "sortie_id": sortie_id,
            "takeoff": {"lat_e7": lat_e7, "lon_e7": lon_e7},
            "area": predicate_area,
            "host": dict(host),
            "coverage": coverage_block,
            "version": version,
            "issued_at": issued,
            "expires": expiry,
            "tool_version": tool_version,
        },
    }
    if route_block is not None:
        statement["predicate"]["route"] = route_block
    if preprocess_block:
        statement["predicate"]["preprocess"] = preprocess_block
    if self_test_block is not None:
        statement["predicate"]["self_test"] = self_test_block
    reject_floats(statement)
    return statement


def _artifact_names(root: Path, root_real: str, artifact_paths: Iterable[str | PurePath]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for raw in artifact_paths:
        name = raw.as_posix() if isinstance(raw, PurePath) else raw
        problem = relpath_problem(name)
        if problem:
            raise ManifestError(f"{problem[1]}: {name!r}", where="artifact_paths")
        if name in seen:
            raise ManifestError(f"artifact listed twice: {name!r}", where="artifact_paths")
        seen.add(name)
        current = root
        for part in name.split("/"):
            current = current / part
            if current.is_symlink():
                raise ManifestError(
                    f"{name!r} goes through a symlink ({current.relative_to(root).as_posix()}); "
                    "the cache must hold the artifacts themselves",
                    where="artifact_paths",
                    hint="copy the file into the cache root instead of linking it",
                )
        real = os.path.realpath(current)
        if not real.startswith(root_real + os.sep):
            raise ManifestError(f"{name!r} is outside the cache root", where="artifact_paths")
        if not current.is_file():
            raise ManifestError(f"{name!r} is missing or not a regular file", where=str(current))
        names.append(name)
    if not names:
        raise ManifestError("no artifacts to sign", where="artifact_paths")
    return names


def _hash_all(root_real: str, names: Sequence[str]) -> dict[str, tuple[int, str]]:
    paths = {name: os.path.join(root_real, *name.split("/")) for name in names}
    order = sorted(names, key=lambda n: -os.path.getsize(paths[n]))
    with ThreadPoolExecutor(max_workers=min(hash_workers(), len(order)), thread_name_prefix="navcache-sign") as pool:
        results = dict(zip(order, pool.map(lambda n: hash_artifact(paths[n]), order), strict=True))
    return results


def _to_e7(value: object, what: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ManifestError(f"{what} must be a number of degrees, got {value!r}", where=what)
    if isinstance(value, float) and not math.isfinite(value):
        raise ManifestError(f"{what} is not finite: {value!r}", where=what)
    try:
        scaled = int((Decimal(str(value)) * E7).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    except InvalidOperation:
        raise ManifestError(f"{what} is not a valid number: {value!r}", where=what) from None
    if not -limit <= scaled <= limit:
        raise ManifestError(f"{what} {value!r} is out of range", where=what)
    return scaled


def _scale_area(area: Mapping[str, Any]) -> dict[str, Any]:
    """GeoJSON Polygon/MultiPolygon in degrees ([lon, lat] positions) → the same with integer e7 positions."""
    if not isinstance(area, Mapping):
        raise ManifestError("area_geojson must be a GeoJSON geometry object", where="area_geojson")
    kind = area.get("type")
    if kind not in ("Polygon", "MultiPolygon"):
        hint = "pass the Feature's 'geometry'" if kind in ("Feature", "FeatureCollection") else None
        raise ManifestError(
            f"area_geojson must be a Polygon or MultiPolygon, got {kind!r}", where="area_geojson", hint=hint
        )

    def position(pos: object) -> list[int]:
        if not isinstance(pos, list | tuple) or len(pos) != 2:
            raise ManifestError(f"positions must be [lon, lat] pairs (no altitude), got {pos!r}", where="area_geojson")
        return [_to_e7(pos[0], "area longitude", MAX_LON_E7), _to_e7(pos[1], "area latitude", MAX_LAT_E7)]

    def polygon(rings: object) -> list[list[list[int]]]:
        if not isinstance(rings, list | tuple):
            raise ManifestError("a polygon must be a list of rings", where="area_geojson")
        out = []
        for ring in rings:
            if not isinstance(ring, list | tuple):
                raise ManifestError("a ring must be a list of positions", where="area_geojson")
            out.append([position(pos) for pos in ring])
        return out

    coords = area.get("coordinates")
    if kind == "Polygon":
        scaled: Any = polygon(coords)
    else:
        if not isinstance(coords, list | tuple):
            raise ManifestError("MultiPolygon coordinates must be a list of polygons", where="area_geojson")
        scaled = [polygon(p) for p in coords]
    return {"type": kind, "coordinates": scaled}


def _self_test_block(block: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The self-test's figures (navcache.selftest.SelfTestResult.manifest_fields); its onboard query set must be
    one of the signed artifacts, or the drone could be pointed at unsigned views."""
    if not isinstance(block, Mapping):
        raise ManifestError("self_test must be an object", where="self_test")
    onboard = block.get("onboard")
    if onboard is not None and (not isinstance(onboard, Mapping) or onboard.get("path") not in names):
        raise ManifestError(
            f"the self-test's onboard query set {onboard!r} is not among the signed artifacts", where="self_test"
        )
    return dict(block)


def _route_block(route: Mapping[str, Any], corridor_m: float | None) -> dict[str, Any]:
    if not isinstance(route, Mapping) or route.get("type") != "LineString":
        raise ManifestError("route must be a GeoJSON LineString", where="route")
    coords = route.get("coordinates")
    if not isinstance(coords, list | tuple) or len(coords) < 2:
        raise ManifestError("a route needs at least two positions", where="route")
    if corridor_m is None or isinstance(corridor_m, bool) or not isinstance(corridor_m, int | float):
        raise ManifestError("a route needs its corridor_m (metres)", where="corridor_m")
    if not (math.isfinite(corridor_m) and corridor_m > 0):
        raise ManifestError(f"corridor_m must be a positive number of metres, got {corridor_m!r}", where="corridor_m")
    positions = []
    for pos in coords:
        if not isinstance(pos, list | tuple) or len(pos) < 2:
            raise ManifestError(f"route positions must be [lon, lat] pairs, got {pos!r}", where="route")
        positions.append([_to_e7(pos[0], "route longitude", MAX_LON_E7), _to_e7(pos[1], "route latitude", MAX_LAT_E7)])
    return {"type": "LineString", "coordinates": positions, "corridor_cm": round(corridor_m * 100)}


def _utc_seconds(moment: object, what: str) -> str:
    if not isinstance(moment, datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise ManifestError(
            f"{what} must be a timezone-aware datetime",
            where=what,
            hint="use datetime.now(UTC) or .replace(tzinfo=UTC)",
        )
    return format_rfc3339(moment)


def _coverage_block(coverage: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    if not isinstance(coverage, Mapping):
        raise ManifestError("coverage must be a mapping", where="coverage")
    block = dict(coverage)
    reject_floats(block, "coverage")
    digest, path = block.get("digest"), block.get("path")
    total, covered = block.get("total"), block.get("covered")
    if not isinstance(digest, str) or not HEX64.fullmatch(digest):
        raise ManifestError("coverage.digest must be 64 lowercase hex characters", where="coverage.digest")
    if not (is_int(total) and is_int(covered) and 0 <= covered <= total):
        raise ManifestError("coverage.total and .covered must be integers, 0 <= covered <= total", where="coverage")
    low, high = percent_x100_bounds(covered, total)
    if "percent_x100" not in block:
        block["percent_x100"] = low
    elif not (is_int(block["percent_x100"]) and low <= block["percent_x100"] <= high):
        raise ManifestError(
            f"coverage.percent_x100 is {block['percent_x100']!r}, but 10000 * covered / total is "
            f"{low if low == high else f'between {low} and {high}'}",
            where="coverage.percent_x100",
        )
    if path not in names:
        raise ManifestError(
            f"coverage.path {path!r} is not one of the artifacts",
            where="coverage.path",
            hint="list the coverage table among the artifacts so that it is signed",
        )
    return block


def reject_floats(value: object, where: str = "statement") -> None:
    """Raise :class:`ManifestError` naming the first float (or non-JSON value) inside ``value``."""
    if isinstance(value, float):
        raise ManifestError(
            f"float {value!r} in signed data; signed data holds integers only",
            where=where,
            hint="scale it to an integer (coordinates: degrees * 10^7; percentages: percent * 100)",
        )
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ManifestError(f"non-string key {key!r} in signed data", where=where)
            reject_floats(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            reject_floats(item, f"{where}[{index}]")
    elif value is not None and not isinstance(value, str | int | bool):
        raise ManifestError(f"{type(value).__name__} value {value!r} is not JSON", where=where)


# --------------------------------------------------------------------------------------------------------
# Envelope and signing


def canonical_payload(statement: Mapping[str, Any]) -> bytes:
    """RFC 8785 bytes of the statement (floats refused first, with the field named)."""
    reject_floats(statement)
    try:
        return rfc8785.dumps(statement)
    except Exception as exc:  # rfc8785 raises its own CanonicalizationError family
        raise ManifestError(f"cannot canonicalise the statement: {exc}", where="statement") from None


def make_envelope(
    payload: bytes, signing_keys: Sequence[Ed25519PrivateKey | Signer], payload_type: str = PAYLOAD_TYPE
) -> bytes:
    """A DSSE JSON envelope over ``payload`` with one signature per key or :class:`~navcache.keys.Signer`
    (over ``PAE(payload_type, payload)``); each signature carries its keyid (securesystemslib's default
    keyid of the key) as a hint."""
    message = pae(payload_type, payload)
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {"keyid": keyid_for(key.public_key()), "sig": base64.b64encode(key.sign(message)).decode("ascii")}
            for key in signing_keys
        ],
    }
    return (json.dumps(envelope, indent=2) + "\n").encode("utf-8")


def next_version(cache_root: Path | str) -> int:
    """The version for the next manifest: the existing manifest's version + 1, or 1 when there is none.

    The existing version is read without checking its signature (an expired or no longer trusted manifest
    still counts), so versions never go backwards. An existing manifest whose version cannot be read at all
    raises :class:`ManifestError` rather than restarting at 1."""
    path = Path(cache_root) / MANIFEST_NAME
    try:
        return read_manifest_version(path) + 1
    except FileNotFoundError:
        return 1
    except ValueError as exc:
        raise ManifestError(
            f"cannot read the version of the existing manifest ({exc})",
            where=str(path),
            hint="restore it, or move it aside and choose a version above any the airframes have accepted",
        ) from None


def sign_manifest(
    cache_root: Path | str,
    statement: Mapping[str, Any],
    *,
    signing_key: Path | str,
    trusted_keys: Path | str,
    passphrase: bytes | None = None,
) -> Path:
    """Sign ``statement`` and install it as ``cache_root/manifest.dsse.json``.

    ``trusted_keys`` is a plain ``trusted_keys.json`` or a signed trust root (``root-N.json``; the complete
    versions beside it are shipped into ``cache_root/trust/``); ``signing_key`` is a PKCS#8 key file or
    ``sslib:<keyid>:<private key URI>`` (:func:`navcache.keys.load_signer`).

    Refuses a key that is not on the ``trusted_keys`` allowlist and a version that is not above the existing
    manifest's. The envelope is written to a temp file beside the manifest, verified there with
    :func:`navcache_runtime.verify.verify_cache` (same trusted keys, airborne mode, ``now`` = issued_at),
    and only then moved over the previous manifest (``os.replace``, then the directory is fsynced). On any
    failure the previous manifest is untouched and the temp file is removed."""
    root = Path(cache_root)
    final = root / MANIFEST_NAME
    predicate = statement.get("predicate") if isinstance(statement, Mapping) else None
    if not isinstance(predicate, Mapping) or not is_int(predicate.get("version")):
        raise ManifestError("statement has no integer predicate.version", where="statement")
    version: int = predicate["version"]
    payload = canonical_payload(statement)

    try:
        anchor = load_trust_anchor(trusted_keys)  # a trusted_keys.json or a signed trust root (root-N.json)
    except TrustedKeysError as exc:
        raise ManifestError(str(exc), where=str(trusted_keys)) from None
    trusted = anchor.operator_keys() if isinstance(anchor, TrustRoot) else anchor
    key = load_signer(signing_key, passphrase, public_keys=trusted.keys.items())
    keyid = keyid_for(key.public_key())
    if keyid not in trusted.keys:
        raise ManifestError(
            f"signing key {Path(signing_key).name} (keyid {keyid[:12]}…) is not on the operator allowlist",
            where=str(trusted_keys),
            hint="sign with an allowlisted operator key, or add this key to the allowlist deliberately",
        )
    if final.exists():
        previous = next_version(root) - 1
        if version <= previous:
            raise ManifestError(
                f"version {version} is not above the existing manifest's version {previous}",
                where="predicate.version",
                hint=f"use next_version(cache_root) (= {previous + 1})",
            )
    issued_at = parse_rfc3339(predicate.get("issued_at")) or datetime.now(UTC)
    if isinstance(anchor, TrustRoot) and anchor.expires <= issued_at:
        raise ManifestError(
            f"trust root v{anchor.version} expired at {format_rfc3339(anchor.expires)}; drones would refuse the cache",
            where=str(trusted_keys),
            hint="publish a new trust-root version (`navcache trust add-key`/`sign`) and point the sortie at it",
        )
    if isinstance(anchor, TrustRoot):
        from .trustroot import ship_roots

        # Drones take up the root versions they lack from CACHE/trust/ (a revocation reaches the fleet with
        # the next cache); the check below then verifies against the newest, as a drone will.
        ship_roots(Path(trusted_keys).parent, root)
    envelope = make_envelope(payload, [key])

    tmp = temp_path_for(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(envelope)
            handle.flush()
            os.fsync(handle.fileno())
        report = verify_cache(root, anchor, mode="airborne", now=issued_at, manifest_path=tmp)
        if not report.ok:
            details = "; ".join(str(f) for f in report.failures[:5])
            more = f" (+{len(report.failures) - 5} more)" if len(report.failures) > 5 else ""
            hint = (
                f"the allowlist needs {trusted.threshold} signatures; collect them with make_envelope"
                if trusted.threshold > 1
                else "fix the cache and build the statement again"
            )
            raise ManifestError(
                f"the new manifest does not verify, the previous one is kept: {details}{more}",
                where=str(final),
                hint=hint,
            )
        os.replace(tmp, final)
        fsync_dir(root)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    logger.info(
        "signed manifest v%d for sortie %s: %d artifacts, key %s, %s",
        version,
        predicate.get("sortie_id"),
        len(statement.get("subject", ())),
        keyid[:12],
        final,
    )
    return final
