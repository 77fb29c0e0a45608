"""Ground side of the signed trust root: create, edit, sign and ship ``root-N.json`` (``navcache trust …``).

The format and the rules a drone applies are in :mod:`navcache_runtime.trustroot`. A *trust directory* holds
every version, ``root-1.json``, ``root-2.json``, …; the newest is the one being edited or signed.

Workflow (TUF's root signing ceremony, in files):

1. ``init_root`` writes ``root-1.json`` (root keys, operator keys, thresholds, expiry, validity cap), signed
   at once by the root keys given with ``sign_with`` (or later with ``sign_root``).
2. ``edit_root`` (add a key, revoke a key, change a threshold, extend the expiry) writes version N+1, unsigned;
   while N+1 does not yet carry enough signatures it is edited in place (its signatures are dropped, since
   they were over the old bytes).
3. ``sign_root`` adds one key's signature to the newest version; N+1 is complete when a threshold of
   version N's root keys **and** a threshold of its own root keys have signed (``root_status`` says which).
4. ``ship_roots`` copies every complete version into ``CACHE/trust/``, where drones pick them up; a drone
   holding version K walks K+1, K+2, … and refuses a gap, a missing signature or an old version.

The payload is RFC 8785 canonical JSON (the drone verifies the bytes as received; it never re-serialises).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from navcache_runtime.integrity import atomic_write_bytes
from navcache_runtime.trust import TrustedKeysError, keyid_for, raw_public_hex
from navcache_runtime.trustroot import (
    ROLES,
    ROOT_PAYLOAD_TYPE,
    ROOT_TYPE,
    TRUST_DIR,
    TrustRoot,
    check_bootstrap,
    parse_root,
    verify_root_update,
)
from navcache_runtime.verify import format_rfc3339, pae

from .errors import ManifestError
from .keys import Signer

logger = logging.getLogger(__name__)

_ROOT_FILE = re.compile(r"root-([1-9][0-9]*)\.json")
DEFAULT_ROOT_EXPIRY = timedelta(days=365)
DEFAULT_MAX_MANIFEST_VALIDITY = timedelta(days=30)


def key_entry(public_key: Ed25519PublicKey, name: str) -> dict[str, Any]:
    """A ``keys`` entry: TUF's key format (so the keyid is securesystemslib's default keyid) plus a name."""
    return {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": raw_public_hex(public_key)}, "name": name}


def root_path(directory: Path | str, version: int) -> Path:
    return Path(directory) / f"root-{version}.json"


def versions(directory: Path | str) -> list[int]:
    """The versions present in a trust directory, ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [int(m.group(1)) for m in map(_ROOT_FILE.fullmatch, (p.name for p in directory.iterdir())) if m]
    return sorted(found)


def latest_version(directory: Path | str) -> int:
    found = versions(directory)
    if not found:
        raise ManifestError(
            "no trust root in this directory", where=str(directory), hint="create one with `navcache trust init`"
        )
    return found[-1]


def read_payload(raw: bytes, where: str) -> dict[str, Any]:
    """The root payload of an envelope, read without checking signatures (ground side, for editing)."""
    try:
        envelope = json.loads(raw)
        doc = json.loads(base64.b64decode(envelope["payload"], validate=True))
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"not a trust-root envelope ({exc})", where=where) from None
    if not isinstance(doc, dict) or doc.get("_type") != ROOT_TYPE:
        raise ManifestError("not a navcache trust root", where=where)
    return doc


def _envelope(payload: bytes, signatures: list[dict[str, str]]) -> bytes:
    envelope = {
        "payloadType": ROOT_PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": signatures,
    }
    return (json.dumps(envelope, indent=2) + "\n").encode("utf-8")


def _write(path: Path, doc: Mapping[str, Any], signatures: list[dict[str, str]] | None = None) -> Path:
    payload = rfc8785.dumps(dict(doc))
    atomic_write_bytes(path, _envelope(payload, signatures or []))
    return path


def _check_doc(doc: Mapping[str, Any], where: str) -> None:
    """The runtime's own schema check, on an unsigned copy (a threshold of signatures is not needed here)."""
    try:
        probe = _envelope(rfc8785.dumps(dict(doc)), [{"keyid": "", "sig": base64.b64encode(bytes(64)).decode()}])
        parse_root(probe, source=where)
    except (ValueError, TrustedKeysError) as exc:
        raise ManifestError(f"invalid trust root: {exc}", where=where) from None


def init_root(
    directory: Path | str,
    *,
    root_keys: Sequence[tuple[Ed25519PublicKey, str]],
    operator_keys: Sequence[tuple[Ed25519PublicKey, str]],
    root_threshold: int = 1,
    operator_threshold: int = 1,
    expires: datetime | None = None,
    max_manifest_validity: timedelta = DEFAULT_MAX_MANIFEST_VALIDITY,
    min_manifest_version: int = 0,
    sign_with: Iterable[Signer] = (),
) -> Path:
    """Write ``directory/root-1.json`` (refused when the directory already holds a root)."""
    directory = Path(directory)
    if versions(directory):
        raise ManifestError(
            "this directory already holds a trust root",
            where=str(directory),
            hint="edit it with `navcache trust add-key` / `revoke-key`, or choose another directory",
        )
    keys: dict[str, Any] = {}
    for key, name in [*root_keys, *operator_keys]:
        keys[keyid_for(key)] = key_entry(key, name)
    doc = {
        "_type": ROOT_TYPE,
        "version": 1,
        "expires": format_rfc3339(expires or datetime.now(UTC) + DEFAULT_ROOT_EXPIRY),
        "keys": keys,
        "roles": {
            "root": {"keyids": sorted({keyid_for(k) for k, _ in root_keys}), "threshold": root_threshold},
            "operator": {"keyids": sorted({keyid_for(k) for k, _ in operator_keys}), "threshold": operator_threshold},
        },
        "max_manifest_validity_s": int(max_manifest_validity.total_seconds()),
        "min_manifest_version": min_manifest_version,
    }
    path = root_path(directory, 1)
    _check_doc(doc, str(path))
    directory.mkdir(parents=True, exist_ok=True)
    _write(path, doc)
    for signer in sign_with:
        sign_root(directory, signer)
    return path


@dataclass(frozen=True)
class RootStatus:
    """Where the newest version stands: who signed it and whether a drone would accept it."""

    version: int
    path: Path
    root: TrustRoot
    complete: bool
    problem: str  # why it is not complete ("" when it is)


def root_status(directory: Path | str, version: int | None = None) -> RootStatus:
    """Check ``version`` (default: the newest) exactly as a drone would: version 1 against its own root keys,
    version N+1 against version N (a threshold of the old root keys and of the new ones)."""
    directory = Path(directory)
    version = version or latest_version(directory)
    path = root_path(directory, version)
    raw = _read(path)
    envelope = json.loads(raw)
    unsigned = isinstance(envelope, dict) and not envelope.get("signatures")
    if unsigned:  # freshly written: read its content through a placeholder signature (which verifies nothing)
        placeholder = [{"keyid": "", "sig": base64.b64encode(bytes(64)).decode()}]
        raw = _envelope(base64.b64decode(envelope.get("payload", "")), placeholder)
    try:
        root = parse_root(raw, source=path.name)
    except TrustedKeysError as exc:
        raise ManifestError(exc.message, where=str(path)) from None
    if unsigned:
        return RootStatus(version, path, root, False, f"version {version} has no signatures yet")
    problem = ""
    try:
        if version == 1:
            check_bootstrap(root, source=path.name)
        else:
            previous = parse_root(_read(root_path(directory, version - 1)), source=f"root-{version - 1}.json")
            verify_root_update(previous, raw, source=path.name)
    except TrustedKeysError as exc:
        problem = exc.message
    return RootStatus(version, path, root, not problem, problem)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read trust root: {exc.strerror or exc}", where=str(path)) from None


def edit_root(
    directory: Path | str,
    *,
    add_keys: Sequence[tuple[str, Ed25519PublicKey, str]] = (),
    revoke_keyids: Sequence[tuple[str, str]] = (),
    thresholds: Mapping[str, int] | None = None,
    expires: datetime | None = None,
    max_manifest_validity: timedelta | None = None,
    min_manifest_version: int | None = None,
) -> Path:
    """Write the next version with the changes (or edit the pending one in place, dropping its signatures).

    ``add_keys``: (role, public key, name); ``revoke_keyids``: (role, keyid or unique keyid prefix). Revoking
    the last key of a role, or below its threshold, is refused. A revoked operator key moves to ``revoked``."""
    directory = Path(directory)
    status = root_status(directory)
    base = status.version if not status.complete else status.version + 1  # a pending version is edited in place
    source = root_path(directory, status.version)
    doc = read_payload(_read(source), str(source))
    doc["version"] = base
    keys: dict[str, Any] = dict(doc["keys"])
    revoked: dict[str, Any] = dict(doc.get("revoked", {}))
    roles = {
        name: {"keyids": list(doc["roles"][name]["keyids"]), "threshold": doc["roles"][name]["threshold"]}
        for name in ROLES
    }
    for role, key, name in add_keys:
        _check_role(role)
        keyid = keyid_for(key)
        if keyid in revoked:
            raise ManifestError(
                f"key {keyid[:12]}… was revoked in an earlier version; a revoked key is never trusted again",
                hint="generate a new key pair",
            )
        keys.setdefault(keyid, key_entry(key, name))
        if keyid not in roles[role]["keyids"]:
            roles[role]["keyids"].append(keyid)
    for role, wanted in revoke_keyids:
        _check_role(role)
        matches = [k for k in roles[role]["keyids"] if k.startswith(wanted)] if wanted else []
        if len(matches) != 1:
            raise ManifestError(
                f"{'no' if not matches else 'more than one'} {role} key matches keyid {wanted!r}",
                hint="give the full keyid (see `navcache trust show`)",
            )
        keyid = matches[0]
        roles[role]["keyids"].remove(keyid)
        if not any(keyid in roles[other]["keyids"] for other in ROLES):
            entry = keys.pop(keyid)
            revoked[keyid] = {**entry, "revoked_in": base}
    for role, value in (thresholds or {}).items():
        _check_role(role)
        roles[role]["threshold"] = value
    for role in ROLES:
        roles[role]["keyids"] = sorted(roles[role]["keyids"])
        if not roles[role]["keyids"]:
            raise ManifestError(f"the {role} role would have no key left", hint="add its replacement first or together")
    doc["keys"], doc["roles"] = keys, roles
    if revoked:
        doc["revoked"] = revoked
    if expires is not None:
        doc["expires"] = format_rfc3339(expires)
    elif parse_datetime(doc["expires"]) < datetime.now(UTC) + timedelta(days=30):
        doc["expires"] = format_rfc3339(datetime.now(UTC) + DEFAULT_ROOT_EXPIRY)
    if max_manifest_validity is not None:
        doc["max_manifest_validity_s"] = int(max_manifest_validity.total_seconds())
    if min_manifest_version is not None:
        doc["min_manifest_version"] = min_manifest_version
    path = root_path(directory, base)
    _check_doc(doc, str(path))
    _write(path, doc)
    logger.info("trust root v%d written (unsigned): %s", base, path)
    return path


def parse_datetime(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ManifestError(f"unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}")


def sign_root(directory: Path | str, signer: Signer, version: int | None = None) -> Path:
    """Add ``signer``'s signature to the newest version (or ``version``). A key that already signed is a no-op.

    Refused for a key that is neither a root key of this version nor of the previous one: only those count."""
    directory = Path(directory)
    version = version or latest_version(directory)
    path = root_path(directory, version)
    raw = _read(path)
    doc = read_payload(raw, str(path))
    envelope = json.loads(raw)
    payload = base64.b64decode(envelope["payload"], validate=True)
    keyid = keyid_for(signer.public_key())
    allowed = set(doc["roles"]["root"]["keyids"])
    if version > 1:
        previous = read_payload(_read(root_path(directory, version - 1)), f"root-{version - 1}.json")
        allowed |= set(previous["roles"]["root"]["keyids"])
    if keyid not in allowed:
        raise ManifestError(
            f"key {keyid[:12]}… is not a root key of version {version} or {version - 1}; its signature would not count",
            where=str(path),
            hint="sign with a root key (operator keys sign caches, not the trust root)",
        )
    signatures: list[dict[str, str]] = list(envelope.get("signatures", []))
    if any(entry.get("keyid") == keyid for entry in signatures):
        return path
    signature = signer.sign(pae(ROOT_PAYLOAD_TYPE, payload))
    signatures.append({"keyid": keyid, "sig": base64.b64encode(signature).decode("ascii")})
    atomic_write_bytes(path, _envelope(payload, signatures))
    logger.info("trust root v%d signed by %s", version, keyid[:12])
    return path


def ship_roots(directory: Path | str, cache_root: Path | str) -> list[Path]:
    """Copy every complete version into ``cache_root/trust/`` (drones take the versions they lack). An
    incomplete newest version is not shipped (a drone would refuse the cache for it)."""
    directory, cache_root = Path(directory), Path(cache_root)
    shipped: list[Path] = []
    for version in versions(directory):
        status = root_status(directory, version)
        if not status.complete:
            logger.warning("trust root v%d is not fully signed yet; not shipped (%s)", version, status.problem)
            break
        target = cache_root / TRUST_DIR / f"root-{version}.json"
        atomic_write_bytes(target, _read(status.path))  # a torn copy would make drones refuse the cache
        shipped.append(target)
    return shipped
