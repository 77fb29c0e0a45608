"""The operator allowlist: which Ed25519 keys may sign a cache manifest, and how many must.

Shared by the ground side (which refuses to sign with a key that is not listed) and the onboard verifier
(which accepts a manifest only when ``threshold`` distinct listed keys signed it). Standard library and
``cryptography`` only: no provisioning imports.

File format (``trusted_keys.json``)::

    {
      "version": 1,
      "threshold": 1,
      "keys": [
        {"keyid": "<64 hex>", "public_key_pem": "-----BEGIN PUBLIC KEY-----\\n...", "name": "operator"}
      ]
    }

**keyid** = the keyid that securesystemslib, python-tuf and in-toto compute from the key alone
(``SSlibKey.from_crypto(public_key).keyid``): lowercase hex sha256 of the canonical JSON
``{"keytype":"ed25519","keyval":{"public":"<64 hex of the raw 32-byte key>"},"scheme":"ed25519"}`` (sorted
keys, no whitespace). So third-party DSSE tooling finds navcache's signatures with its own default keyid:
``Envelope.verify([SSlibKey.from_crypto(pub)], 1)`` works as is.

A key may also be named by its *legacy* keyid, the sha256 of the raw 32-byte key
(:func:`legacy_keyid_for`), which caches and allowlists signed with navcache's own convention carry. Both
are accepted: a trusted-keys file may list a key under either keyid (it
is re-indexed under the current one), and an envelope's keyid is only a hint anyway (the verifier tries
every trusted key; a legacy hint for the key that verified is not reported as a mismatch). A listed keyid
that matches neither form is an error, never silently corrected.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from .errors import InferenceRuntimeError

TRUSTED_KEYS_FORMAT_VERSION = 1
#: Default bound on the size of a trusted-keys file (a few hundred keys fit comfortably).
MAX_TRUSTED_KEYS_BYTES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOP_LEVEL_FIELDS = frozenset({"version", "threshold", "keys"})
_KEY_FIELDS = frozenset({"keyid", "public_key_pem", "name"})


class TrustedKeysError(InferenceRuntimeError, ValueError):
    """The trusted-keys file is missing, too large, malformed, or lists a keyid that is not its key's."""


def root_store_path(state_path: Path | str) -> Path:
    """Where a device keeps the newest trust root it accepted, next to its rollback state:
    ``state.json`` → ``state.root.json`` (see :mod:`navcache_runtime.trustroot`)."""
    state_path = Path(state_path)
    return state_path.with_name(state_path.stem + ".root.json")


def raw_public_hex(public_key: Ed25519PublicKey) -> str:
    """Lowercase hex of the raw 32-byte public key (RFC 8032 encoding), as TUF's ``keyval.public``."""
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def keyid_for(public_key: Ed25519PublicKey) -> str:
    """The keyid securesystemslib computes from the key alone (see the module docstring).

    The canonical JSON is written out literally: every value in it is lowercase hex or a fixed ASCII word,
    so sorted-keys/no-whitespace JSON is this exact byte string (no escaping can arise)."""
    public = raw_public_hex(public_key)
    canonical = '{"keytype":"ed25519","keyval":{"public":"' + public + '"},"scheme":"ed25519"}'
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def legacy_keyid_for(public_key: Ed25519PublicKey) -> str:
    """The keyid navcache used before interop with securesystemslib: sha256 hex of the raw 32-byte key."""
    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM text of ``public_key``."""
    return public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def trusted_key_entry(public_key: Ed25519PublicKey, name: str) -> dict[str, str]:
    """One ``keys`` entry of the trusted-keys file."""
    return {"keyid": keyid_for(public_key), "public_key_pem": public_key_pem(public_key), "name": name}


@dataclass(frozen=True)
class TrustedKeys:
    """The verified allowlist: keyid → public key, the signature threshold, and display names.

    ``max_manifest_validity_s`` and ``min_manifest_version`` are the policy a signed trust root sets for the
    manifests its operator keys sign (None/0 for a plain, pinned ``trusted_keys.json``: the verifier's
    config decides); ``root_version`` is the trust root's version (None when pinned); ``revoked`` are keys
    the root revoked (never trusted, kept so that a refusal can say why)."""

    keys: Mapping[str, Ed25519PublicKey]
    threshold: int = 1
    names: Mapping[str, str] = field(default_factory=dict)
    max_manifest_validity_s: int | None = None
    min_manifest_version: int = 0
    root_version: int | None = None
    revoked: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)  # never trusted; named in refusals

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 1:
            raise TrustedKeysError(f"threshold must be an integer >= 1, got {self.threshold!r}")
        if self.threshold > len(self.keys):
            raise TrustedKeysError(
                f"threshold {self.threshold} exceeds the number of trusted keys ({len(self.keys)})",
                hint="add keys or lower the threshold",
            )
        for keyid, key in self.keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise TrustedKeysError(f"trusted key {keyid[:12]}… is not an Ed25519 public key")
            if keyid_for(key) != keyid:
                raise TrustedKeysError(f"keyid {keyid[:12]}… does not match its public key")
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))
        object.__setattr__(self, "names", MappingProxyType(dict(self.names)))
        object.__setattr__(self, "revoked", MappingProxyType(dict(self.revoked)))

    @classmethod
    def from_public_keys(cls, *public_keys: Ed25519PublicKey, threshold: int = 1) -> TrustedKeys:
        return cls({keyid_for(key): key for key in public_keys}, threshold)

    def name_of(self, keyid: str) -> str:
        return self.names.get(keyid) or keyid[:12]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_float(text: str) -> Any:
    raise ValueError(f"non-integer number {text!r}")


def parse_trusted_keys(data: bytes, *, source: str = "trusted keys") -> TrustedKeys:
    """Parse and validate the bytes of a trusted-keys file. Raises :class:`TrustedKeysError`."""

    def fail(message: str, hint: str | None = None) -> TrustedKeysError:
        return TrustedKeysError(f"{source}: {message}", hint=hint)

    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_float=_no_float,
            parse_constant=_no_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise fail("must be a JSON object")
    unknown = sorted(set(doc) - _TOP_LEVEL_FIELDS)
    if unknown:
        raise fail(f"unknown field(s) {unknown}; expected {sorted(_TOP_LEVEL_FIELDS)}")
    if doc.get("version") != TRUSTED_KEYS_FORMAT_VERSION or isinstance(doc.get("version"), bool):
        raise fail(f"unsupported version {doc.get('version')!r} (expected {TRUSTED_KEYS_FORMAT_VERSION})")
    threshold = doc.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise fail(f"threshold must be an integer >= 1, got {threshold!r}")
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise fail("'keys' must be a non-empty list")
    keys: dict[str, Ed25519PublicKey] = {}
    names: dict[str, str] = {}
    for index, entry in enumerate(entries):
        where = f"keys[{index}]"
        if not isinstance(entry, dict):
            raise fail(f"{where} must be an object")
        unknown = sorted(set(entry) - _KEY_FIELDS)
        if unknown:
            raise fail(f"{where} has unknown field(s) {unknown}")
        keyid, pem, name = entry.get("keyid"), entry.get("public_key_pem"), entry.get("name", "")
        if not isinstance(keyid, str) or not _HEX64.fullmatch(keyid):
            raise fail(f"{where}.keyid must be 64 lowercase hex characters")
        if not isinstance(pem, str) or not isinstance(name, str):
            raise fail(f"{where}.public_key_pem and .name must be strings")
        try:
            key = load_pem_public_key(pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError, TypeError) as exc:
            raise fail(f"{where}.public_key_pem is not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise fail(f"{where} is a {type(key).__name__}, not an Ed25519 public key")
        actual = keyid_for(key)
        if keyid not in (actual, legacy_keyid_for(key)):
            raise fail(
                f"{where}.keyid {keyid[:12]}… does not match its public key (its keyid is {actual[:12]}…)",
                hint="re-add the key with `generate_keypair` or correct the keyid; never edit it by hand",
            )
        keyid = actual  # a legacy keyid (sha256 of the raw key) is re-indexed under the current one
        if keyid in keys:
            raise fail(f"{where} lists keyid {keyid[:12]}… twice")
        keys[keyid] = key
        names[keyid] = name
    if threshold > len(keys):
        raise fail(f"threshold {threshold} exceeds the number of keys ({len(keys)})")
    return TrustedKeys(keys, threshold, names)


def load_trusted_keys(path: Path | str, *, max_bytes: int = MAX_TRUSTED_KEYS_BYTES) -> TrustedKeys:
    """Read (bounded) and validate a trusted-keys file. Raises :class:`TrustedKeysError`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise TrustedKeysError(f"cannot read trusted keys file {path}: {exc.strerror or exc}", path=path) from None
    if len(data) > max_bytes:
        raise TrustedKeysError(f"trusted keys file {path} is larger than {max_bytes} bytes", path=path)
    return parse_trusted_keys(data, source=str(path))
