"""Operator signing keys (Ed25519) and the trusted-keys allowlist that goes with them.

``generate_keypair`` writes, in one directory:

- ``{name}.key`` — the private key, PKCS#8 PEM, created with mode 0600 (``os.open`` with ``O_EXCL``, so an
  existing key is never overwritten), encrypted with the passphrase when one is given;
- ``{name}.pub`` — the public key, SubjectPublicKeyInfo PEM (what ``openssl pkeyutl -pubin`` reads);
- ``trusted_keys.json`` — the allowlist (created, or the key appended), see
  :mod:`navcache_runtime.trust` for the format.

The **keyid** is securesystemslib's default keyid of the key (:func:`navcache_runtime.trust.keyid_for`;
the openssl recipe is in ``docs/verify-with-openssl.md``).

Signers (:class:`Signer`: ``public_key()`` and ``sign(message) -> 64-byte Ed25519 signature``) come from
:func:`load_signer`: a PKCS#8 PEM file (``operator.key``, encrypted with a passphrase by ``navcache keygen``
unless ``--no-passphrase``), or, with the ``signers`` extra, a signer of securesystemslib's Signer API named
by ``sslib:<keyid>:<private key URI>``, e.g. ``sslib:3f2a9c1e:hv:navcache-ops/1`` (HashiCorp Vault transit)
or ``sslib:3f2a9c1e:file2:/secure/operator.key``. The keyid (or a unique prefix of it) names the public key
in the allowlist or trust root that the signer must match; securesystemslib needs it to build the signer,
and navcache checks each signature against it.

Manifests and trust roots are Ed25519 only (that is what drones verify). securesystemslib 1.6's own signers
for ``hsm:`` (ECDSA P-256/P-384), ``gcpkms:``, ``awskms:``, ``azurekms:``, ``gnupg:`` and ``tkey:`` (ML-DSA-44)
cannot sign with an Ed25519 key, so :func:`load_signer` refuses those schemes before loading anything; a
signer a site registers in their place (``securesystemslib.signer.SIGNER_FOR_URI_SCHEME["hsm"] = ...``, e.g.
a PKCS#11 signer for Ed25519 keys) is loaded like any other.

A signer that needs a secret (a PKCS#11 token's PIN, a token's passphrase) asks securesystemslib's secrets
handler for it; :func:`load_signer` gives it :class:`EnvironmentSecrets`, which answers with the value of
``$NAVCACHE_SIGNER_SECRET`` (:data:`SIGNER_SECRET_ENV`): a Prefect worker has no terminal to type a PIN on.
An unset variable is refused when the signer asks, and when the signer is loaded if it declares, as
securesystemslib's HSM signer does (``SECRETS_HANDLER_MSG``), that it will ask at signing time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    KeySerializationEncryption,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from navcache_runtime.integrity import atomic_write_bytes
from navcache_runtime.trust import (
    TRUSTED_KEYS_FORMAT_VERSION,
    TrustedKeysError,
    keyid_for,
    load_trusted_keys,
    public_key_pem,
    trusted_key_entry,
)

from .errors import ManifestError

logger = logging.getLogger(__name__)

TRUSTED_KEYS_NAME = "trusted_keys.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_KEY_FILE_BYTES = 64 << 10

SSLIB_PREFIX = "sslib:"

#: The environment variable :class:`EnvironmentSecrets` reads a signer's secret (PIN, passphrase) from.
SIGNER_SECRET_ENV = "NAVCACHE_SIGNER_SECRET"

__all__ = [
    "SIGNER_SECRET_ENV",
    "SSLIB_PREFIX",
    "TRUSTED_KEYS_NAME",
    "EnvironmentSecrets",
    "KeyPaths",
    "Signer",
    "SslibSigner",
    "load_signer",
    "add_trusted_key",
    "generate_keypair",
    "keyid_for",
    "load_private_key",
    "load_public_key",
]


@dataclass(frozen=True)
class KeyPaths:
    private_key: Path
    public_key: Path
    trusted_keys: Path
    keyid: str


def generate_keypair(directory: Path | str, name: str = "operator", passphrase: bytes | None = None) -> KeyPaths:
    """Create an Ed25519 key pair in ``directory`` and add it to ``directory/trusted_keys.json``."""
    directory = Path(directory)
    if not _NAME.fullmatch(name):
        raise ManifestError(
            f"key name {name!r} is not a plain file name",
            hint="use letters, digits, '.', '_' or '-' (e.g. 'operator')",
        )
    if passphrase is not None and (not isinstance(passphrase, bytes) or not passphrase):
        raise ManifestError("passphrase must be non-empty bytes (or None for an unencrypted key)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ManifestError(
                "refusing to overwrite an existing key", where=str(path), hint="choose another name or directory"
            )
    key = Ed25519PrivateKey.generate()
    encryption: KeySerializationEncryption = BestAvailableEncryption(passphrase) if passphrase else NoEncryption()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
    created: list[Path] = []
    try:
        _write_new_file(private_path, private_pem, 0o600)
        created.append(private_path)
        _write_new_file(public_path, public_key_pem(key.public_key()).encode("ascii"), 0o644)
        created.append(public_path)
        trusted = add_trusted_key(directory / TRUSTED_KEYS_NAME, key.public_key(), name)
    except FileExistsError as exc:
        for path in created:
            path.unlink(missing_ok=True)
        raise ManifestError("refusing to overwrite an existing key", where=str(exc.filename)) from None
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    keyid = keyid_for(key.public_key())
    logger.info("generated Ed25519 key %s (keyid %s) in %s", name, keyid[:12], directory)
    return KeyPaths(private_path, public_path, trusted, keyid)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` from the start (no window where it is more open)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; make it exactly ``mode``
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def add_trusted_key(trusted_keys: Path | str, public_key: Ed25519PublicKey, name: str) -> Path:
    """Add ``public_key`` to the allowlist file (created with threshold 1 when missing); written atomically.
    A key already listed is left as it is."""
    path = Path(trusted_keys)
    if path.exists():
        try:
            load_trusted_keys(path)  # validate before touching it
            doc = json.loads(path.read_bytes())
        except TrustedKeysError as exc:
            raise ManifestError(str(exc), where=str(path), hint="fix or remove the trusted keys file") from None
    else:
        doc = {"version": TRUSTED_KEYS_FORMAT_VERSION, "threshold": 1, "keys": []}
    entry = trusted_key_entry(public_key, name)
    if any(existing["keyid"] == entry["keyid"] for existing in doc["keys"]):
        return path
    doc["keys"].append(entry)
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    return path


def load_private_key(path: Path | str, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PKCS#8 PEM). Refuses a key file that group or others can access."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ManifestError("signing key not found", where=str(path), hint="run generate_keypair first") from None
    if not stat.S_ISREG(info.st_mode):
        raise ManifestError("signing key is not a regular file", where=str(path))
    loose = stat.S_IMODE(info.st_mode) & 0o077
    if loose:
        raise ManifestError(
            f"private key is accessible to group/others (mode {stat.S_IMODE(info.st_mode):04o}); refusing to use it",
            where=str(path),
            hint=f"chmod 600 {path}",
        )
    with open(path, "rb") as handle:
        data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ManifestError("file is too large to be a private key", where=str(path))
    try:
        key = load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise ManifestError(
                "private key is encrypted but no passphrase was given", where=str(path), hint="pass the passphrase"
            ) from None
        raise ManifestError(
            f"a passphrase was given but the private key is not encrypted ({exc})",
            where=str(path),
            hint="call without a passphrase",
        ) from None
    except ValueError:
        if passphrase is not None:
            raise ManifestError("wrong passphrase (or corrupt key file)", where=str(path)) from None
        raise ManifestError("not a PEM private key (corrupt or wrong file)", where=str(path)) from None
    except UnsupportedAlgorithm as exc:
        raise ManifestError(f"cannot load private key: {exc}", where=str(path)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestError(
            f"signing key is a {type(key).__name__}, not an Ed25519 key",
            where=str(path),
            hint="generate one with navcache.keys.generate_keypair",
        )
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Load an Ed25519 public key (SubjectPublicKeyInfo PEM)."""
    path = Path(path)
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot load public key: {exc}", where=str(path)) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ManifestError(f"public key is a {type(key).__name__}, not Ed25519", where=str(path))
    return key


class Signer(Protocol):
    """What signs a manifest or a trust root: an ``Ed25519PrivateKey`` is one, :class:`SslibSigner` too."""

    def public_key(self) -> Ed25519PublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


class SslibSigner:
    """A securesystemslib ``Signer`` (HSM, KMS, Vault, file, …) behind navcache's :class:`Signer` interface.

    Each signature is checked against the expected public key before it is used, so a misconfigured signer
    fails here, on the ground, with a clear error rather than as an untrusted signature onboard."""

    def __init__(self, signer: Any, public_key: Ed25519PublicKey, uri: str) -> None:
        self._signer, self._public_key, self.uri = signer, public_key, uri

    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        from cryptography.exceptions import InvalidSignature

        try:
            signature = bytes.fromhex(self._signer.sign(data).signature)
        except ManifestError:
            raise  # a secret the signer asked for is missing; EnvironmentSecrets says which and how to give it
        except Exception as exc:  # the Signer API wraps many backends; each raises its own errors
            raise ManifestError(f"securesystemslib signer failed: {exc}", where=self.uri) from None
        try:
            self._public_key.verify(signature, data)
        except InvalidSignature:
            raise ManifestError(
                "the securesystemslib signer's signature does not verify with the key it was configured for",
                where=self.uri,
                hint="check the keyid in the sslib: URI and the private key URI",
            ) from None
        return signature


@dataclass(frozen=True)
class EnvironmentSecrets:
    """securesystemslib's secrets handler for a process with no terminal (a Prefect worker, CI): every secret
    a signer asks for (``"pin"``, ``"passphrase"``) is the value of the environment variable ``variable``.
    Unset or empty is refused with a :class:`~navcache.errors.ManifestError` naming the variable."""

    variable: str = SIGNER_SECRET_ENV

    def __call__(self, secret: str) -> str:
        value = os.environ.get(self.variable)
        if not value:
            raise ManifestError(
                f"the signer needs its {secret} from ${self.variable}, which is unset or empty",
                where=f"${self.variable}",
                hint=f"set {self.variable} to the {secret} in the environment of the process that signs "
                "(the shell that runs navcache, or the Prefect worker's environment)",
            )
        return value


def load_signer(
    spec: Path | str,
    passphrase: bytes | None = None,
    *,
    public_keys: Iterable[tuple[str, Ed25519PublicKey]] = (),
    secrets_handler: Callable[[str], str] | None = None,
) -> Signer:
    """A PKCS#8 key file (see :func:`load_private_key`) or ``sslib:<keyid>:<private key URI>``.

    ``public_keys`` are the (keyid, key) pairs the keyid is looked up in (the operator allowlist for a
    manifest, the root keys for a trust root). ``secrets_handler`` answers a signer that asks for a secret;
    ``None`` means :class:`EnvironmentSecrets` (``$NAVCACHE_SIGNER_SECRET``), which is also asked once here
    when the signer declares that it will ask at signing time, so a missing secret fails before the run."""
    text = str(spec)
    if not text.startswith(SSLIB_PREFIX):
        return load_private_key(spec, passphrase)
    wanted, _, uri = text[len(SSLIB_PREFIX) :].partition(":")
    if not wanted or not uri:
        raise ManifestError(
            f"{text!r} is not an sslib signer URI",
            hint="write sslib:<keyid>:<private key URI>, e.g. sslib:3f2a9c1e:hv:navcache-ops/1",
        )
    try:
        from securesystemslib.signer import SIGNER_FOR_URI_SCHEME, SSlibKey
        from securesystemslib.signer import Signer as SslibSignerApi
    except ImportError:
        raise ManifestError(
            "signing through securesystemslib needs the 'signers' extra", hint="pip install 'navcache[signers]'"
        ) from None
    scheme = uri.partition(":")[0]
    registered = SIGNER_FOR_URI_SCHEME.get(scheme)
    if scheme in _NOT_ED25519 and getattr(registered, "__module__", "").startswith("securesystemslib."):
        raise ManifestError(
            f"securesystemslib's {scheme}: signer cannot sign with an Ed25519 key (it signs with "
            f"{_NOT_ED25519[scheme]}); navcache manifests and trust roots are signed with Ed25519 keys only",
            where=uri,
            hint="keep the Ed25519 key in HashiCorp Vault transit (hv:<key name>/<version>) or a key file "
            "(file2:<path>, or the path itself), or register a signer for Ed25519 keys under this scheme",
        )
    handler = EnvironmentSecrets() if secrets_handler is None else secrets_handler
    matches = [(keyid, key) for keyid, key in public_keys if keyid.startswith(wanted)]
    if len(matches) != 1:
        raise ManifestError(
            f"{'no' if not matches else 'more than one'} allowed key matches keyid {wanted!r}",
            where=text,
            hint="give the keyid of an allowlisted key (see `navcache trust show`)",
        )
    keyid, public = matches[0]
    try:
        signer = SslibSignerApi.from_priv_key_uri(uri, SSlibKey.from_crypto(public, keyid=keyid), handler)
    except ManifestError:
        raise  # EnvironmentSecrets: the secret the signer asked for while loading is missing
    except Exception as exc:  # unknown scheme, missing backend library, unreachable KMS, …
        message, hint = _signer_load_failure(exc, uri, keyid)
        raise ManifestError(message, where=uri, hint=hint) from None
    asks_when_signing = getattr(signer, "SECRETS_HANDLER_MSG", None)  # securesystemslib's HSMSigner: "pin"
    if isinstance(handler, EnvironmentSecrets) and isinstance(asks_when_signing, str):
        handler(asks_when_signing)
    return SslibSigner(signer, public, uri)


#: What securesystemslib's own signer for each of these schemes signs with (securesystemslib 1.6): none of
#: them can hold the Ed25519 keys drones verify with. Re-check on a securesystemslib upgrade.
_NOT_ED25519 = {
    "awskms": "ECDSA P-256/P-384 and RSA keys",
    "azurekms": "ECDSA P-256/P-384/P-521 keys",
    "gcpkms": "ECDSA P-256/P-384 and RSA keys",
    "gnupg": "OpenPGP keys, whose signatures are not raw Ed25519",
    "hsm": "ECDSA P-256/P-384 keys",
    "tkey": "ML-DSA-44 keys",
}


#: securesystemslib's pip extra for each private-key URI scheme whose backend is an optional library.
_SSLIB_EXTRAS = {
    "awskms": "awskms",
    "azurekms": "azurekms",
    "file2": "crypto",
    "gcpkms": "gcpkms",
    "hsm": "hsm",
    "hv": "vault",
    "tkey": "tkey",
}


def _signer_load_failure(exc: Exception, uri: str, keyid: str) -> tuple[str, str | None]:
    """What went wrong loading the signer behind ``uri`` (one line) and how to fix it, for the failures an
    operator can act on; anything else (a KMS that is unreachable, refuses, …) is passed on as it is."""
    from securesystemslib.exceptions import KeyMismatchError, UnsupportedLibraryError
    from securesystemslib.signer import SIGNER_FOR_URI_SCHEME

    scheme = uri.partition(":")[0]
    if scheme not in SIGNER_FOR_URI_SCHEME:
        return (
            f"securesystemslib has no signer for private key URIs starting {scheme + ':'!r}",
            f"use one of {', '.join(s + ':' for s in sorted(SIGNER_FOR_URI_SCHEME))}",
        )
    if isinstance(exc, UnsupportedLibraryError):
        extra = _SSLIB_EXTRAS.get(scheme)
        return (
            f"the securesystemslib backend for {scheme}: keys is not installed ({' '.join(str(exc).split())})",
            f"pip install 'securesystemslib[{extra}]' on the provisioning host"
            if extra
            else "install the library named above on the provisioning host",
        )
    if isinstance(exc, KeyMismatchError):
        return (
            f"the private key does not match the allowlisted key {keyid[:12]}…",
            "give the keyid of the key this URI holds, or the URI of that key's private part",
        )
    if isinstance(exc, OSError):
        # securesystemslib re-raises a missing key file with a garbled message; the original says it plainly
        original = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        return (
            f"cannot read the private key: {original.strerror or original}",
            "check the file path in the private key URI",
        )
    return f"cannot load the securesystemslib signer: {' '.join(str(exc).split())}", None
