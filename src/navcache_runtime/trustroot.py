"""The signed trust root: which operator keys may sign caches, rotated and revoked like TUF's root metadata.

Onboard side (standard library + ``cryptography``). The ground side that writes it is
:mod:`navcache.trustroot` (``navcache trust …``).

File (``root-N.json``): a DSSE envelope, payloadType ``application/vnd.navcache.root+json``, signed with
Ed25519 over ``PAE(payloadType, payload)`` exactly like the cache manifest, so the same envelope parser and
the same third-party recipes apply. The payload bytes are verified as received and stored as received
(never re-serialised, so no canonicalisation is needed onboard; the ground side writes RFC 8785 JSON)::

    {"_type": "https://navcache.dev/root/v1",
     "version": 2,                                   # 1, 2, 3, … (each new version is the previous + 1)
     "expires": "2027-12-01T00:00:00Z",              # the root itself expires (RFC 3339 UTC)
     "keys": {"<keyid>": {"keytype": "ed25519", "scheme": "ed25519",
                          "keyval": {"public": "<64 hex>"}, "name": "ops-a"}},
     "roles": {"root": {"keyids": ["<keyid>", …], "threshold": 2},       # sign the next root version
               "operator": {"keyids": ["<keyid>", …], "threshold": 1}},  # sign cache manifests
     "revoked": {"<keyid>": {"keytype": …, "keyval": …, "name": "ops-a", "revoked_in": 2}},  # optional
     "max_manifest_validity_s": 2592000,             # cap on a manifest's expires - issued_at
     "min_manifest_version": 0}                      # manifests below it are refused (optional, default 0)

Keyids are securesystemslib's default keyid of each key (:func:`navcache_runtime.trust.keyid_for`); a keyid
that is not its key's is refused. Integers only; unknown fields are refused (the format is versioned by
``_type``). ``revoked`` keys are never trusted: they are kept so that a cache signed by one is refused with
that reason rather than "untrusted signature".

Rules (TUF's client workflow, section 5.3):

- **bootstrap**: the root given to the verifier (``--trust-root``) must be signed by a threshold of its own
  root keys; its expiry is checked only at the end (an old bootstrap root still chains to the current one).
- **update**: version N+1 is accepted only when signed by ``threshold`` distinct keys of version N's root
  role **and** ``threshold`` distinct keys of its own root role; any other version number is refused (an old
  version is a rollback; a gap is refused too, every step must be shown). Candidates come from the cache
  (``CACHE/trust/root-<N>.json``) and from the root file given to the verifier.
- **final**: the newest accepted root must not have expired; its operator role is the allowlist for the
  manifest, with its threshold, its validity cap and its version floor.
- **device store**: with a state file (``state.json``, rollback protection), the newest accepted root is kept
  next to it as ``state.root.json`` (the envelope bytes as received); a drone that has seen version N never
  goes back to an older one, whatever root file it is given.
- **recovery**: accepting a root version that removes an operator key (revocation), or that arrives while the
  state file is missing or corrupt, resets the manifest-version record to the new root's
  ``min_manifest_version``: the root keys, not whoever can delete a file, decide when rollback protection
  restarts (fast-forward recovery: a version of 10^18 signed by a stolen key is undone by revoking that key).
  A missing state file on a device that holds a trust root is refused until then.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .layout import TRUST_DIR, TRUST_ROOT_FILE
from .manifest_format import (
    HEX64,
    format_rfc3339,
    is_int,
    loads_strict,
    pae,
    parse_envelope,
    parse_rfc3339,
    read_bounded,
)
from .trust import TrustedKeys, TrustedKeysError, keyid_for, parse_trusted_keys, root_store_path

ROOT_PAYLOAD_TYPE = "application/vnd.navcache.root+json"
ROOT_TYPE = "https://navcache.dev/root/v1"
ROLES = ("root", "operator")
#: Bound on one trust-root file (a few hundred keys fit comfortably).
MAX_ROOT_BYTES = 1 << 20
#: Bound on the number of root versions walked in one verification (TUF's max_root_rotations).
MAX_ROOT_ROTATIONS = 256
#: Where the onboard verifier keeps its rollback state unless told otherwise (``$NAVCACHE_STATE`` wins).
DEFAULT_STATE_PATH = Path("/var/lib/navcache/state.json")
STATE_ENV = "NAVCACHE_STATE"
_MAX_INT = (1 << 53) - 1  # RFC 8785 (I-JSON) integers
_TOP_FIELDS = frozenset(
    {"_type", "version", "expires", "keys", "roles", "revoked", "max_manifest_validity_s", "min_manifest_version"}
)
_KEY_FIELDS = frozenset({"keytype", "scheme", "keyval", "name"})
_REVOKED_FIELDS = _KEY_FIELDS | {"revoked_in"}


class TrustRootError(TrustedKeysError):
    """A trust root is malformed, not signed by enough root keys, older than the one held, or expired."""


class DefaultState(enum.Enum):
    """The type of :data:`DEFAULT_STATE` (a sentinel, so that ``None`` can mean "off")."""

    DEFAULT = "default"


#: ``open_cache(state_path=DEFAULT_STATE)``: the default device state (:func:`default_state_path`); pass
#: ``state_path=None`` to switch rollback protection off explicitly.
DEFAULT_STATE: Final = DefaultState.DEFAULT


def default_state_path() -> Path:
    """``$NAVCACHE_STATE`` or ``/var/lib/navcache/state.json``: rollback protection is on by default onboard."""
    value = os.environ.get(STATE_ENV)
    return Path(value) if value else DEFAULT_STATE_PATH


@dataclass(frozen=True)
class Role:
    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class TrustRoot:
    """One verified trust-root version. ``raw`` is the envelope exactly as received (stored as received)."""

    version: int
    expires: datetime
    keys: Mapping[str, Ed25519PublicKey]
    names: Mapping[str, str]
    root: Role
    operator: Role
    max_manifest_validity_s: int
    min_manifest_version: int
    revoked: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    raw: bytes = b""
    signers: frozenset[str] = frozenset()  # keyids whose signature over this envelope verified

    def operator_keys(self) -> TrustedKeys:
        """The allowlist for cache manifests that this root version defines."""
        return TrustedKeys(
            {keyid: self.keys[keyid] for keyid in self.operator.keyids},
            self.operator.threshold,
            dict(self.names),
            max_manifest_validity_s=self.max_manifest_validity_s,
            min_manifest_version=self.min_manifest_version,
            root_version=self.version,
            revoked=dict(self.revoked),
        )

    def signed_by(self, role: Role) -> set[str]:
        return set(role.keyids) & self.signers

    def name_of(self, keyid: str) -> str:
        return self.names.get(keyid) or keyid[:12]


def _key_from(entry: object, where: str, fields: frozenset[str]) -> tuple[Ed25519PublicKey, str]:
    if not isinstance(entry, dict) or set(entry) - fields:
        raise ValueError(f"{where} must be an object with fields {sorted(fields)}")
    if entry.get("keytype") != "ed25519" or entry.get("scheme") != "ed25519":
        raise ValueError(f"{where}: only keytype and scheme 'ed25519' are supported")
    keyval = entry.get("keyval")
    public = keyval.get("public") if isinstance(keyval, dict) and set(keyval) == {"public"} else None
    if not isinstance(public, str) or not HEX64.fullmatch(public):
        raise ValueError(f"{where}.keyval must be {{'public': 64 lowercase hex}}")
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise ValueError(f"{where}.name must be a string")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)), name


def _parse_payload(payload: bytes) -> dict[str, Any]:
    """Schema of the signed root payload; raises ValueError naming the field."""
    doc = loads_strict(payload)
    if not isinstance(doc, dict):
        raise ValueError("the root payload must be a JSON object")
    unknown = sorted(set(doc) - _TOP_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    if doc.get("_type") != ROOT_TYPE:
        raise ValueError(f"_type must be {ROOT_TYPE!r}, got {doc.get('_type')!r}")
    version = doc.get("version")
    if not is_int(version) or not 1 <= version <= _MAX_INT:
        raise ValueError("version must be an integer >= 1")
    if parse_rfc3339(doc.get("expires")) is None:
        raise ValueError(f"expires must be an RFC 3339 UTC time like 2027-12-01T00:00:00Z, got {doc.get('expires')!r}")
    validity = doc.get("max_manifest_validity_s")
    if not is_int(validity) or not 1 <= validity <= _MAX_INT:
        raise ValueError("max_manifest_validity_s must be an integer >= 1")
    floor = doc.get("min_manifest_version", 0)
    if not is_int(floor) or not 0 <= floor <= _MAX_INT:
        raise ValueError("min_manifest_version must be an integer >= 0")
    return doc


def parse_root(raw: bytes, *, source: str = "trust root") -> TrustRoot:
    """Parse a trust-root envelope and record which of its listed keys signed it.

    Checks the envelope, the payload schema and the keyids; does NOT decide whether enough keys signed
    (that depends on which root it is checked against: see :func:`check_bootstrap` and
    :func:`verify_root_update`). Raises :class:`TrustRootError`."""
    envelope, failures = parse_envelope(raw, allowed_payload_types={ROOT_PAYLOAD_TYPE}, subject=source)
    if envelope is None or failures:
        raise TrustRootError(f"{source}: {failures[0].message if failures else 'unusable envelope'}")
    try:
        doc = _parse_payload(envelope.payload)
        keys: dict[str, Ed25519PublicKey] = {}
        names: dict[str, str] = {}
        raw_keys = doc.get("keys")
        if not isinstance(raw_keys, dict) or not raw_keys:
            raise ValueError("keys must be a non-empty object keyid -> key")
        for keyid, entry in raw_keys.items():
            key, name = _key_from(entry, f"keys[{keyid[:12]}]", _KEY_FIELDS)
            if keyid_for(key) != keyid:
                raise ValueError(f"keys[{keyid[:12]}…] is listed under a keyid that is not its key's")
            keys[keyid], names[keyid] = key, name
        revoked: dict[str, Ed25519PublicKey] = {}
        raw_revoked = doc.get("revoked", {})
        if not isinstance(raw_revoked, dict):
            raise ValueError("revoked must be an object keyid -> key")
        for keyid, entry in raw_revoked.items():
            key, name = _key_from(entry, f"revoked[{keyid[:12]}]", _REVOKED_FIELDS)
            if keyid_for(key) != keyid or keyid in keys:
                raise ValueError(f"revoked[{keyid[:12]}…] has a wrong keyid or is also a trusted key")
            revoked[keyid] = key
            names.setdefault(keyid, name)
        roles = doc.get("roles")
        if not isinstance(roles, dict) or set(roles) != set(ROLES):
            raise ValueError(f"roles must name exactly {list(ROLES)}")
        parsed: dict[str, Role] = {}
        for role_name in ROLES:
            role = roles[role_name]
            if not isinstance(role, dict) or set(role) != {"keyids", "threshold"}:
                raise ValueError(f"roles.{role_name} must be {{'keyids': [...], 'threshold': int}}")
            keyids, threshold = role["keyids"], role["threshold"]
            if not isinstance(keyids, list) or not keyids or len(set(map(str, keyids))) != len(keyids):
                raise ValueError(f"roles.{role_name}.keyids must be a non-empty list without duplicates")
            missing = [k for k in keyids if k not in keys]
            if missing:
                raise ValueError(f"roles.{role_name} names keyid(s) not in keys: {[str(k)[:12] for k in missing]}")
            if not is_int(threshold) or not 1 <= threshold <= len(keyids):
                raise ValueError(f"roles.{role_name}.threshold must be between 1 and {len(keyids)}")
            parsed[role_name] = Role(tuple(keyids), threshold)
    except ValueError as exc:
        raise TrustRootError(f"{source}: {exc}") from None
    message = pae(envelope.payload_type, envelope.payload)
    signers: set[str] = set()
    for _hint, sig, _problem in envelope.signatures:
        if sig is None:
            continue
        for keyid, key in keys.items():
            try:
                key.verify(sig, message)
            except InvalidSignature:
                continue
            signers.add(keyid)
            break
    expires = parse_rfc3339(doc["expires"])
    assert expires is not None
    return TrustRoot(
        version=doc["version"],
        expires=expires,
        keys=MappingProxyType(keys),
        names=MappingProxyType(names),
        root=parsed["root"],
        operator=parsed["operator"],
        max_manifest_validity_s=doc["max_manifest_validity_s"],
        min_manifest_version=doc.get("min_manifest_version", 0),
        revoked=MappingProxyType(revoked),
        raw=raw,
        signers=frozenset(signers),
    )


def _signers_of(new: TrustRoot, role: Role, keys: Mapping[str, Ed25519PublicKey]) -> set[str]:
    """Distinct keys of ``role`` (looked up in ``keys``) whose signature over ``new`` verifies."""
    envelope, _ = parse_envelope(new.raw, allowed_payload_types={ROOT_PAYLOAD_TYPE})
    assert envelope is not None  # parse_root already accepted it
    message = pae(envelope.payload_type, envelope.payload)
    found: set[str] = set()
    for _hint, sig, _problem in envelope.signatures:
        if sig is None:
            continue
        for keyid in role.keyids:
            if keyid in found:
                continue
            try:
                keys[keyid].verify(sig, message)
            except InvalidSignature:
                continue
            found.add(keyid)
            break
    return found


def check_bootstrap(root: TrustRoot, *, source: str = "trust root") -> TrustRoot:
    """A root trusted as given (the pinned first root) must still be signed by a threshold of its own root
    keys: a hand-edited file is refused. Raises :class:`TrustRootError`."""
    signed = len(root.signed_by(root.root))
    if signed < root.root.threshold:
        raise TrustRootError(
            f"{source}: version {root.version} is signed by {signed} of its root keys, its threshold is "
            f"{root.root.threshold}",
            hint="collect the root keys' signatures with `navcache trust sign`",
        )
    return root


def verify_root_update(current: TrustRoot, raw: bytes, *, source: str = "trust root") -> TrustRoot:
    """Accept ``raw`` as the next version after ``current``, or raise :class:`TrustRootError`."""
    new = parse_root(raw, source=source)
    if new.version != current.version + 1:
        what = "an old version (rollback)" if new.version <= current.version else "not the next version"
        raise TrustRootError(
            f"{source}: version {new.version} is {what}; this device holds version {current.version} and accepts "
            f"only version {current.version + 1} next"
        )
    by_old = _signers_of(new, current.root, current.keys)
    if len(by_old) < current.root.threshold:
        raise TrustRootError(
            f"{source}: version {new.version} is signed by {len(by_old)} of version {current.version}'s root keys; "
            f"the threshold is {current.root.threshold}",
            hint="the previous root keys must sign the new version (`navcache trust sign`)",
        )
    by_new = new.signed_by(new.root)
    if len(by_new) < new.root.threshold:
        raise TrustRootError(
            f"{source}: version {new.version} is signed by {len(by_new)} of its own root keys; the threshold is "
            f"{new.root.threshold}",
            hint="the new root keys must sign it too (`navcache trust sign`)",
        )
    return new


def read_root_file(path: Path | str, *, max_bytes: int = MAX_ROOT_BYTES) -> bytes:
    path = Path(path)
    try:
        return read_bounded(path, max_bytes)
    except OSError as exc:
        raise TrustRootError(f"cannot read trust root {path}: {exc.strerror or exc}", path=path) from None


def is_root_envelope(data: bytes) -> bool:
    """Whether a trust file is a signed root (a DSSE envelope) rather than a plain ``trusted_keys.json``."""
    try:
        doc = loads_strict(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and "payloadType" in doc


def load_trust_anchor(path: Path | str, *, max_bytes: int = MAX_ROOT_BYTES) -> TrustRoot | TrustedKeys:
    """A signed trust root (checked against its own root keys) or a plain ``trusted_keys.json`` (a pinned,
    unsigned root: no rotation, no recovery). Raises :class:`TrustedKeysError`."""
    data = read_root_file(path, max_bytes=max_bytes)
    if is_root_envelope(data):
        return check_bootstrap(parse_root(data, source=str(path)), source=str(path))
    return parse_trusted_keys(data, source=str(path))


@dataclass
class TrustResolution:
    """What the trust step decided: the allowlist for this manifest, and what to store on the device."""

    trusted: TrustedKeys | None
    root: TrustRoot | None = None
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (code, subject, message)
    notes: list[tuple[str, str, str]] = field(default_factory=list)
    store: bool = False  # a newer root than the device held was accepted: persist it
    reset_state: bool = False  # reset the manifest-version record to the root's floor (recovery)
    stored_version: int | None = None


def resolve_trust(
    anchor: TrustRoot | TrustedKeys,
    *,
    cache_root: Path | str,
    state_path: Path | str | None,
    now: datetime,
    state_present: bool,
) -> TrustResolution:
    """The newest trust root this device can reach (held root, given root, roots shipped in the cache), its
    operator allowlist, and whether the device store and rollback record must change. Never raises for
    anything found on disk: problems are returned as (code, subject, message)."""
    if isinstance(anchor, TrustedKeys):
        return TrustResolution(trusted=anchor)
    result = TrustResolution(trusted=None)
    current, stored = anchor, None
    if state_path is not None:
        store = root_store_path(state_path)
        if store.exists() or store.is_symlink():
            try:
                stored = check_bootstrap(parse_root(read_root_file(store), source=str(store)), source=str(store))
            except TrustRootError as exc:
                result.problems.append(
                    ("trust_root_invalid", str(store), f"{exc}; refusing rather than forgetting the device's root")
                )
                return result
            result.stored_version = stored.version
            if stored.version >= anchor.version:
                current = stored
    # Candidates are named first and read only when the walk reaches them (a cache can hold many files).
    candidates: dict[int, tuple[Path | bytes, str]] = {}
    trust_dir = Path(cache_root) / TRUST_DIR
    try:
        entries = sorted(os.listdir(trust_dir)) if trust_dir.is_dir() else []
    except OSError as exc:
        result.problems.append(("trust_root_update_refused", TRUST_DIR, f"cannot list: {exc.strerror or exc}"))
        return result
    for entry in entries:
        match = TRUST_ROOT_FILE.fullmatch(entry)
        if match and int(match.group(1)) > current.version:  # older versions are superseded: ignored
            candidates[int(match.group(1))] = (trust_dir / entry, f"{TRUST_DIR}/{entry}")
    if stored is not None and anchor.version > stored.version:
        candidates.setdefault(anchor.version, (anchor.raw, "the given trust root"))
    removed_operators: set[str] = set()
    start = current.version
    for _ in range(MAX_ROOT_ROTATIONS):
        step = candidates.get(current.version + 1)
        if step is None:
            break
        try:
            raw = step[0] if isinstance(step[0], bytes) else read_root_file(step[0])
            new = verify_root_update(current, raw, source=step[1])
        except TrustRootError as exc:
            result.problems.append(("trust_root_update_refused", step[1], str(exc)))
            return result
        removed_operators |= set(current.operator.keyids) - set(new.operator.keyids)
        current = new
    if stored is not None and current.version == stored.version and not state_present:
        result.problems.append(
            (
                "state_missing",
                str(state_path),
                f"the device state file is missing but this device holds trust root v{stored.version}: it was "
                "deleted or lost, and rollback protection does not restart from zero on its own. Recovery: a "
                f"trust root newer than v{stored.version}, signed by the root keys, shipped with the cache "
                "(CACHE/trust/root-N.json) or given with --trust-root",
            )
        )
        return result
    newer = sorted(v for v in candidates if v > current.version)
    if newer:
        result.problems.append(
            (
                "trust_root_update_refused",
                candidates[newer[0]][1],
                f"version {newer[0]} does not chain from version {current.version} (missing root-"
                f"{current.version + 1}.json): every version in between must be shown",
            )
        )
        return result
    if current.expires <= now:
        result.problems.append(
            (
                "trust_root_expired",
                f"trust root v{current.version}",
                f"expired at {format_rfc3339(current.expires)} (now {format_rfc3339(now)}); ship a newer version "
                "signed by the root keys with the cache (CACHE/trust/root-N.json)",
            )
        )
        return result
    result.root = current
    result.trusted = current.operator_keys()
    if stored is None or current.version > stored.version:
        result.store = state_path is not None
    if current.version > start:
        result.notes.append(("trust_root_updated", f"trust root v{current.version}", f"updated from v{start}"))
        result.reset_state = bool(removed_operators) or not state_present
    elif stored is None and not state_present:
        result.reset_state = state_path is not None  # first use of this device: start the record at the floor
    return result


def state_path_from(state_path: Path | str | Literal[DefaultState.DEFAULT] | None) -> Path | None:
    """``DEFAULT_STATE`` → :func:`default_state_path`; None stays None (rollback protection off)."""
    if state_path is DEFAULT_STATE:
        return default_state_path()
    return Path(state_path) if state_path is not None else None
