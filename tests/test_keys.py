"""Operator keys and the trusted-keys allowlist."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import securesystemslib.signer as sslib_signer
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_public_key,
)
from securesystemslib.signer import SecretsHandler

from navcache.errors import ManifestError
from navcache.keys import (
    SIGNER_SECRET_ENV,
    TRUSTED_KEYS_NAME,
    EnvironmentSecrets,
    add_trusted_key,
    generate_keypair,
    load_private_key,
    load_public_key,
    load_signer,
)
from navcache_runtime.trust import (
    MAX_TRUSTED_KEYS_BYTES,
    TrustedKeys,
    TrustedKeysError,
    keyid_for,
    legacy_keyid_for,
    load_trusted_keys,
    trusted_key_entry,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_a_0600_pkcs8_key_a_spki_public_key_and_the_allowlist(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even with a permissive umask the key is never more open than 0600
    try:
        keys = generate_keypair(tmp_path / "keys")
    finally:
        os.umask(old_umask)
    assert keys.private_key == tmp_path / "keys/operator.key"
    assert _mode(keys.private_key) == 0o600
    assert _mode(keys.public_key) == 0o644
    assert keys.private_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert keys.public_key.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    doc = json.loads(keys.trusted_keys.read_text())
    assert keys.trusted_keys.name == TRUSTED_KEYS_NAME
    assert doc["version"] == 1 and doc["threshold"] == 1
    assert doc["keys"] == [{"keyid": keys.keyid, "public_key_pem": keys.public_key.read_text(), "name": "operator"}]
    trusted = load_trusted_keys(keys.trusted_keys)
    assert list(trusted.keys) == [keys.keyid] and trusted.threshold == 1


def test_keyid_is_securesystemslibs_default_keyid(tmp_path: Path) -> None:
    from securesystemslib.signer import SSlibKey

    keys = generate_keypair(tmp_path)
    public = load_public_key(keys.public_key)
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert len(raw) == 32
    assert keys.keyid == SSlibKey.from_crypto(public).keyid == keyid_for(public)
    # The documented openssl one-liner gives the same value.
    script = (
        f'printf \'{{"keytype":"ed25519","keyval":{{"public":"%s"}},"scheme":"ed25519"}}\' '
        f"\"$(openssl pkey -pubin -in {keys.public_key} -outform DER | tail -c 32 | od -An -tx1 | tr -d ' \\n')\" "
        "| sha256sum | cut -d' ' -f1"
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, text=True).stdout.strip()
    assert out == keys.keyid
    # The legacy keyid (sha256 of the raw key) is still recognised.
    assert legacy_keyid_for(public) == hashlib.sha256(raw).hexdigest() != keys.keyid


def test_allowlist_written_with_legacy_keyids_still_loads(tmp_path: Path) -> None:
    keys = generate_keypair(tmp_path)
    public = load_public_key(keys.public_key)
    doc = json.loads(keys.trusted_keys.read_text())
    doc["keys"][0]["keyid"] = legacy_keyid_for(public)
    keys.trusted_keys.write_text(json.dumps(doc))
    assert list(load_trusted_keys(keys.trusted_keys).keys) == [keyid_for(public)]


def test_second_key_is_appended_and_existing_keys_are_never_overwritten(tmp_path: Path) -> None:
    first = generate_keypair(tmp_path)
    second = generate_keypair(tmp_path, name="backup-operator")
    assert second.trusted_keys == first.trusted_keys
    trusted = load_trusted_keys(first.trusted_keys)
    assert set(trusted.keys) == {first.keyid, second.keyid}
    assert trusted.names[second.keyid] == "backup-operator"
    before = first.private_key.read_bytes()
    with pytest.raises(ManifestError, match="refusing to overwrite"):
        generate_keypair(tmp_path)
    assert first.private_key.read_bytes() == before
    # Adding a key that is already listed changes nothing.
    add_trusted_key(first.trusted_keys, load_public_key(first.public_key), "operator")
    assert len(load_trusted_keys(first.trusted_keys).keys) == 2


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 80])
def test_key_names_must_be_plain_file_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ManifestError, match="plain file name"):
        generate_keypair(tmp_path, name=name)


def test_passphrase_round_trip_and_clear_errors(tmp_path: Path) -> None:
    keys = generate_keypair(tmp_path, passphrase=b"correct horse battery staple")
    assert keys.private_key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = load_private_key(keys.private_key, b"correct horse battery staple")
    assert keyid_for(key.public_key()) == keys.keyid
    with pytest.raises(ManifestError, match="wrong passphrase"):
        load_private_key(keys.private_key, b"wrong")
    with pytest.raises(ManifestError, match="encrypted but no passphrase"):
        load_private_key(keys.private_key)
    plain = generate_keypair(tmp_path, name="plain")
    with pytest.raises(ManifestError, match="not encrypted"):
        load_private_key(plain.private_key, b"unneeded")
    with pytest.raises(ManifestError, match="non-empty bytes"):
        generate_keypair(tmp_path, name="empty", passphrase=b"")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_key_file_open_to_group_or_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    keys = generate_keypair(tmp_path)
    keys.private_key.chmod(mode)
    with pytest.raises(ManifestError, match="group/others") as info:
        load_private_key(keys.private_key)
    assert f"chmod 600 {keys.private_key}" in str(info.value)
    keys.private_key.chmod(0o400)
    load_private_key(keys.private_key)


def test_a_non_ed25519_or_missing_key_is_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(ec_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    path.chmod(0o600)
    with pytest.raises(ManifestError, match="not an Ed25519 key"):
        load_private_key(path)
    with pytest.raises(ManifestError, match="not found"):
        load_private_key(tmp_path / "absent.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(ManifestError, match="not a PEM private key"):
        load_private_key(garbage)


# --------------------------------------------------------------------------------------------------------
# Trusted keys file (navcache_runtime.trust)


def _doc(*keys: Ed25519PrivateKey, threshold: int = 1) -> dict:
    return {
        "version": 1,
        "threshold": threshold,
        "keys": [trusted_key_entry(k.public_key(), f"k{i}") for i, k in enumerate(keys)],
    }


def _write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "trusted_keys.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_a_keyid_that_does_not_match_its_key_is_an_error(tmp_path: Path) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    doc = _doc(a)
    doc["keys"][0]["keyid"] = keyid_for(b.public_key())  # claims to be b, carries a's key
    with pytest.raises(TrustedKeysError, match="does not match its public key"):
        load_trusted_keys(_write(tmp_path, doc))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(threshold=3), "exceeds the number of keys"),
        (lambda d: d.update(threshold=0), "threshold must be an integer >= 1"),
        (lambda d: d.update(threshold=True), "threshold must be an integer >= 1"),
        (lambda d: d.update(version=2), "unsupported version"),
        (lambda d: d.update(treshold=1), "unknown field"),
        (lambda d: d.update(keys=[]), "non-empty list"),
        (lambda d: d["keys"].append(dict(d["keys"][0])), "twice"),
        (lambda d: d["keys"][0].update(keyid="ABC"), "64 lowercase hex"),
        (lambda d: d["keys"][0].update(public_key_pem="garbage"), "not a PEM public key"),
    ],
)
def test_trusted_keys_file_validation(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    doc = _doc(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())
    mutate(doc)
    with pytest.raises(TrustedKeysError, match=message):
        load_trusted_keys(_write(tmp_path, doc))


def test_trusted_keys_refuses_other_key_types_duplicates_and_oversized_files(tmp_path: Path) -> None:
    doc = _doc(Ed25519PrivateKey.generate())
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    doc["keys"][0]["public_key_pem"] = ec_pub.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(TrustedKeysError, match="not an Ed25519 public key"):
        load_trusted_keys(_write(tmp_path, doc))
    with pytest.raises(TrustedKeysError, match="duplicate key 'threshold'"):
        load_trusted_keys(_write(tmp_path, '{"version": 1, "threshold": 1, "threshold": 0, "keys": []}'))
    big = _write(tmp_path, " " * (MAX_TRUSTED_KEYS_BYTES + 1))
    with pytest.raises(TrustedKeysError, match="larger than"):
        load_trusted_keys(big)
    with pytest.raises(TrustedKeysError, match="cannot read"):
        load_trusted_keys(tmp_path / "absent.json")


def test_trusted_keys_object_checks_itself() -> None:
    a = Ed25519PrivateKey.generate().public_key()
    trusted = TrustedKeys.from_public_keys(a)
    assert trusted.threshold == 1 and keyid_for(a) in trusted.keys
    with pytest.raises(TrustedKeysError, match="exceeds"):
        TrustedKeys.from_public_keys(a, threshold=2)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(TrustedKeysError, match="does not match"):
        TrustedKeys({keyid_for(other): a})
    pem = a.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert keyid_for(load_pem_public_key(pem)) == keyid_for(a)  # type: ignore[arg-type]


# --- securesystemslib signers that need a secret ------------------------------------------------------------

PIN_SCHEME = "testpin"


class PinToken(sslib_signer.Signer):
    """Stands in for a PKCS#11 token that holds an Ed25519 key (the hardware boundary): like securesystemslib's
    HSMSigner it declares ``SECRETS_HANDLER_MSG`` and asks the secrets handler for its PIN at each signature,
    and it signs only with the right PIN. ``testpin:<PKCS#8 file>`` names the key it holds."""

    SECRETS_HANDLER_MSG = "pin"
    PIN = "246810"

    def __init__(self, private: Ed25519PrivateKey, public_key: sslib_signer.SSlibKey, pin: SecretsHandler) -> None:
        self._private, self._public_key, self._pin = private, public_key, pin

    @classmethod
    def from_priv_key_uri(
        cls, priv_key_uri: str, public_key: sslib_signer.Key, secrets_handler: SecretsHandler | None = None
    ) -> PinToken:
        assert isinstance(public_key, sslib_signer.SSlibKey) and secrets_handler is not None
        return cls(load_private_key(priv_key_uri.partition(":")[2]), public_key, secrets_handler)

    @property
    def public_key(self) -> sslib_signer.SSlibKey:
        return self._public_key

    def sign(self, payload: bytes) -> sslib_signer.Signature:
        if self._pin(self.SECRETS_HANDLER_MSG) != self.PIN:
            raise ValueError("CKR_PIN_INCORRECT")
        return sslib_signer.Signature(self._public_key.keyid, self._private.sign(payload).hex())


def test_environment_secrets_answer_with_the_variable_and_refuse_it_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIGNER_SECRET_ENV, "246810")
    assert EnvironmentSecrets()("pin") == "246810"
    monkeypatch.setenv("OPS_TOKEN_PIN", "1357")
    assert EnvironmentSecrets("OPS_TOKEN_PIN")("passphrase") == "1357"
    for unset in (lambda: monkeypatch.delenv(SIGNER_SECRET_ENV), lambda: monkeypatch.setenv(SIGNER_SECRET_ENV, "")):
        unset()
        with pytest.raises(ManifestError) as refused:
            EnvironmentSecrets()("pin")
        assert refused.value.where == "$NAVCACHE_SIGNER_SECRET"
        assert "needs its pin from $NAVCACHE_SIGNER_SECRET, which is unset or empty" in refused.value.message
        assert "set NAVCACHE_SIGNER_SECRET to the pin" in (refused.value.hint or "")


def test_a_signer_gets_its_pin_from_the_environment_and_is_refused_at_load_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sslib_signer.SIGNER_FOR_URI_SCHEME, PIN_SCHEME, PinToken)
    keys = generate_keypair(tmp_path)
    allowed = [(keys.keyid, load_public_key(keys.public_key))]
    spec = f"sslib:{keys.keyid[:10]}:{PIN_SCHEME}:{keys.private_key}"
    monkeypatch.setenv(SIGNER_SECRET_ENV, PinToken.PIN)
    signer = load_signer(spec, public_keys=allowed)
    signer.public_key().verify(signer.sign(b"payload"), b"payload")

    monkeypatch.setenv(SIGNER_SECRET_ENV, "0000")  # a wrong PIN is the token's refusal, at signing time
    with pytest.raises(ManifestError, match="securesystemslib signer failed: CKR_PIN_INCORRECT"):
        signer.sign(b"payload")
    monkeypatch.delenv(SIGNER_SECRET_ENV)
    with pytest.raises(ManifestError, match=r"needs its pin from \$NAVCACHE_SIGNER_SECRET"):
        signer.sign(b"payload")  # the variable went away after loading: still named, not wrapped
    with pytest.raises(ManifestError, match=r"needs its pin from \$NAVCACHE_SIGNER_SECRET"):
        load_signer(spec, public_keys=allowed)  # declared SECRETS_HANDLER_MSG: refused before any signing
    asked: list[str] = []
    given = load_signer(spec, public_keys=allowed, secrets_handler=lambda what: asked.append(what) or PinToken.PIN)
    assert asked == []  # a caller's own handler is asked only when the signer needs the secret
    given.sign(b"payload")
    assert asked == ["pin"]


@pytest.mark.parametrize("scheme", ["hsm", "gcpkms", "awskms", "azurekms", "gnupg", "tkey"])
def test_securesystemslib_signers_that_cannot_hold_an_ed25519_key_are_refused_with_the_fix(
    scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # securesystemslib 1.6's HSMSigner, given a secrets handler, refuses the key itself ("unsupported scheme
    # ed25519") once python-pkcs11 is installed; navcache says so before any backend is needed.
    keys = generate_keypair(tmp_path)
    allowed = [(keys.keyid, load_public_key(keys.public_key))]
    monkeypatch.setenv(SIGNER_SECRET_ENV, PinToken.PIN)
    with pytest.raises(ManifestError) as refused:
        load_signer(f"sslib:{keys.keyid[:10]}:{scheme}:x", public_keys=allowed)
    assert f"securesystemslib's {scheme}: signer cannot sign with an Ed25519 key" in refused.value.message
    assert "hv:<key name>/<version>" in (refused.value.hint or "")
    monkeypatch.setitem(sslib_signer.SIGNER_FOR_URI_SCHEME, scheme, PinToken)  # a site's own Ed25519 signer
    signer = load_signer(f"sslib:{keys.keyid[:10]}:{scheme}:{keys.private_key}", public_keys=allowed)
    signer.public_key().verify(signer.sign(b"payload"), b"payload")
