"""The signed trust root: rotation, revocation, thresholds, expiry, recovery; manifest policy (validity cap,
default-on rollback protection); keyid interop with securesystemslib; securesystemslib signers."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from navcache.errors import ManifestError
from navcache.keys import KeyPaths, generate_keypair, load_private_key, load_signer
from navcache.manifest import make_envelope, sign_manifest
from navcache.trustroot import edit_root, init_root, root_path, root_status, ship_roots, sign_root
from navcache_cli import app
from navcache_runtime.cli import main as onboard_main
from navcache_runtime.trust import TrustedKeys, keyid_for, legacy_keyid_for, root_store_path
from navcache_runtime.trustroot import (
    ROOT_PAYLOAD_TYPE,
    TrustRootError,
    check_bootstrap,
    parse_root,
    verify_root_update,
)
from navcache_runtime.verify import FailureCode as F
from navcache_runtime.verify import VerifierConfig, pae, verify_cache
from tests.test_manifest import ISSUED, NOW, Cache, make_cache

REPO = Path(__file__).resolve().parents[1]
YEAR = timedelta(days=365)


@dataclass
class Fleet:
    """Three root keys (threshold 2), operators A and B, a trust directory and a drone's state."""

    tmp: Path
    roots: list[Ed25519PrivateKey]
    a: KeyPaths
    b: KeyPaths
    trust: Path
    state: Path

    def cache(self, name: str, operator: KeyPaths, *, version: int = 1, root_version: int = 1, **kw: Any) -> Cache:
        cache = make_cache(self.tmp / name, version=version, sign=False, keys=operator, **kw)
        sign_manifest(
            cache.root,
            cache.statement,
            signing_key=operator.private_key,
            trusted_keys=root_path(self.trust, root_version),
        )
        return cache

    def verify(self, cache: Cache, root_version: int = 1, **kw: Any) -> Any:
        kw.setdefault("now", NOW)
        kw.setdefault("state_path", self.state)
        return verify_cache(cache.root, root_path(self.trust, root_version), **kw)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    roots = [Ed25519PrivateKey.generate() for _ in range(3)]
    a = generate_keypair(tmp_path / "keys", name="ops-a")
    b = generate_keypair(tmp_path / "keys", name="ops-b")
    trust = tmp_path / "trust"
    init_root(
        trust,
        root_keys=[(key.public_key(), f"root{i}") for i, key in enumerate(roots)],
        operator_keys=[(load_private_key(a.private_key).public_key(), "ops-a")],
        root_threshold=2,
        expires=ISSUED + YEAR,
        sign_with=roots[:2],
    )
    return Fleet(tmp_path, roots, a, b, trust, tmp_path / "drone/state.json")


def _pub(keys: KeyPaths) -> Any:
    return load_private_key(keys.private_key).public_key()


def _rotate_a_to_b(fleet: Fleet) -> Path:
    """Version 2: operator A revoked, B added; signed by two of the (unchanged) root keys."""
    path = edit_root(
        fleet.trust, add_keys=[("operator", _pub(fleet.b), "ops-b")], revoke_keyids=[("operator", fleet.a.keyid)]
    )
    assert not root_status(fleet.trust).complete  # unsigned
    sign_root(fleet.trust, fleet.roots[0])
    assert "signed by 1 of version 1's root keys" in root_status(fleet.trust).problem
    sign_root(fleet.trust, fleet.roots[2])
    assert root_status(fleet.trust).complete
    return path


# --------------------------------------------------------------------------------------------------------
# The rotation story


def test_rotation_story_revoked_operator_refused_new_one_accepted_old_root_rejected(fleet: Fleet) -> None:
    # root created → operator A signs → a drone bootstrapped with root-1 accepts A's cache
    cache_a = fleet.cache("a", fleet.a)
    report = fleet.verify(cache_a)
    assert report.ok, report.summary()
    assert report.trust_root_version == 1 and report.verified_keyids == [fleet.a.keyid]
    assert parse_root(root_store_path(fleet.state).read_bytes()).version == 1  # the device holds root v1

    # A revoked, B added: root v2, shipped with B's cache (B signs against v2)
    _rotate_a_to_b(fleet)
    cache_b = fleet.cache("b", fleet.b, root_version=2)
    assert [p.name for p in ship_roots(fleet.trust, cache_b.root)] == ["root-1.json", "root-2.json"]
    report = fleet.verify(cache_b)  # still configured with root-1: it takes v2 up from the cache
    assert report.ok, report.summary()
    assert report.trust_root_version == 2
    assert F.TRUST_ROOT_UPDATED in {w.code for w in report.warnings}
    assert parse_root(root_store_path(fleet.state).read_bytes()).version == 2

    # A's cache (no trust/ in it) on the drone that has seen v2: refused, with the reason
    report = fleet.verify(cache_a)
    assert not report.ok and F.KEY_REVOKED in report.codes, report.summary()
    revoked = next(f for f in report.failures if f.code == F.KEY_REVOKED)
    assert "ops-a" in revoked.message and "revoked" in revoked.message and "v2" in revoked.message

    # the old root version is rejected as an update, and given to the drone it is ignored (v2 held)
    v1, v2 = (parse_root(root_path(fleet.trust, n).read_bytes()) for n in (1, 2))
    with pytest.raises(TrustRootError, match="old version"):
        verify_root_update(v2, root_path(fleet.trust, 1).read_bytes())
    assert v1.version == 1
    assert fleet.verify(cache_a, root_version=1).codes >= {F.KEY_REVOKED}

    # a fresh drone that never saw v2 accepts A's cache... until the cache ships v2 with it
    fresh = fleet.tmp / "fresh/state.json"
    assert fleet.verify(cache_a, state_path=fresh).ok
    assert [p.name for p in (cache_a.root / "trust").iterdir()] == ["root-1.json"]  # shipped when A signed
    shutil.copytree(cache_b.root / "trust", cache_a.root / "trust", dirs_exist_ok=True)
    assert F.KEY_REVOKED in fleet.verify(cache_a, state_path=fresh).codes


def test_new_version_needs_a_threshold_of_the_old_and_of_the_new_root_keys(fleet: Fleet) -> None:
    r3, r4 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    # the new root role: r3, r4 (threshold 2); root0..root2 leave it
    edit_root(
        fleet.trust,
        add_keys=[("root", r3.public_key(), "r3"), ("root", r4.public_key(), "r4")],
        revoke_keyids=[("root", keyid_for(k.public_key())) for k in fleet.roots],
    )
    raw = lambda: root_path(fleet.trust, 2).read_bytes()  # noqa: E731
    v1 = parse_root(root_path(fleet.trust, 1).read_bytes())
    sign_root(fleet.trust, r3)
    sign_root(fleet.trust, r4)
    with pytest.raises(TrustRootError, match="0 of version 1's root keys"):  # only the new keys signed
        verify_root_update(v1, raw())
    sign_root(fleet.trust, fleet.roots[0])
    with pytest.raises(TrustRootError, match="1 of version 1's root keys; the threshold is 2"):
        verify_root_update(v1, raw())
    sign_root(fleet.trust, fleet.roots[1])
    assert verify_root_update(v1, raw()).version == 2
    # a non-root key's signature does not count, and the ground tool refuses to add it
    with pytest.raises(ManifestError, match="not a root key"):
        sign_root(fleet.trust, load_private_key(fleet.a.private_key))


def test_old_keys_alone_cannot_install_new_root_keys(fleet: Fleet) -> None:
    r3 = Ed25519PrivateKey.generate()
    edit_root(fleet.trust, add_keys=[("root", r3.public_key(), "r3")], thresholds={"root": 4})
    for key in fleet.roots:
        sign_root(fleet.trust, key)
    v1 = parse_root(root_path(fleet.trust, 1).read_bytes())
    with pytest.raises(TrustRootError, match="3 of its own root keys; the threshold is 4"):
        verify_root_update(v1, root_path(fleet.trust, 2).read_bytes())


def test_bootstrap_root_needs_its_own_threshold_and_a_forged_update_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    # root-1 with one signature of the two needed is refused as the pinned root
    doc = json.loads(root_path(fleet.trust, 1).read_bytes())
    doc["signatures"] = doc["signatures"][:1]
    one = tmp_path / "root-1-one-sig.json"
    one.write_text(json.dumps(doc))
    with pytest.raises(TrustRootError, match="signed by 1 of its root keys, its threshold is 2"):
        check_bootstrap(parse_root(one.read_bytes()))
    cache_a = fleet.cache("a", fleet.a)
    report = verify_cache(cache_a.root, one, now=NOW, state_path=fleet.state)
    assert report.codes == {F.TRUSTED_KEYS_INVALID}

    # an attacker with operator A's key forges root-2 adding himself as a root key: refused on the drone
    payload = json.loads(base64.b64decode(json.loads(root_path(fleet.trust, 1).read_bytes())["payload"]))
    attacker = load_private_key(fleet.a.private_key)
    payload["version"] = 2
    payload["roles"]["root"] = {"keyids": [fleet.a.keyid], "threshold": 1}
    body = rfc8785.dumps(payload)
    sig = attacker.sign(pae(ROOT_PAYLOAD_TYPE, body))
    (cache_a.root / "trust").mkdir(exist_ok=True)
    (cache_a.root / "trust/root-2.json").write_text(
        json.dumps(
            {
                "payloadType": ROOT_PAYLOAD_TYPE,
                "payload": base64.b64encode(body).decode(),
                "signatures": [{"keyid": fleet.a.keyid, "sig": base64.b64encode(sig).decode()}],
            }
        )
    )
    report = fleet.verify(cache_a)
    assert report.codes == {F.TRUST_ROOT_UPDATE_REFUSED}, report.summary()
    assert "0 of version 1's root keys" in report.failures[0].message


def test_a_gap_in_the_shipped_versions_is_refused(fleet: Fleet) -> None:
    _rotate_a_to_b(fleet)
    edit_root(fleet.trust, thresholds={"operator": 1}, min_manifest_version=0, expires=ISSUED + YEAR)
    sign_root(fleet.trust, fleet.roots[0])
    sign_root(fleet.trust, fleet.roots[1])
    cache_b = fleet.cache("b", fleet.b, root_version=2)
    ship_roots(fleet.trust, cache_b.root)
    (cache_b.root / "trust/root-2.json").unlink()
    report = fleet.verify(cache_b)
    assert report.codes == {F.TRUST_ROOT_UPDATE_REFUSED}
    assert "does not chain" in report.failures[0].message


def test_an_expired_trust_root_is_refused_but_an_old_bootstrap_chains_to_a_fresh_one(fleet: Fleet) -> None:
    cache_a = fleet.cache("a", fleet.a)
    report = fleet.verify(cache_a, now=ISSUED + YEAR + timedelta(days=1))
    assert F.TRUST_ROOT_EXPIRED in report.codes
    # v2 (same keys, expiry a year later) shipped with the cache: the expired bootstrap still chains to it
    edit_root(fleet.trust, expires=ISSUED + 2 * YEAR)
    sign_root(fleet.trust, fleet.roots[1])
    sign_root(fleet.trust, fleet.roots[2])
    ship_roots(fleet.trust, cache_a.root)
    report = fleet.verify(cache_a, now=ISSUED + timedelta(days=1), state_path=fleet.tmp / "other/state.json")
    assert report.ok and report.trust_root_version == 2, report.summary()


# --------------------------------------------------------------------------------------------------------
# Policy: validity cap, version floor, rollback on by default, recovery


def test_validity_cap_from_the_config_and_from_the_trust_root(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, sign=False)
    long = dict(cache.statement)
    long["predicate"] = {**cache.statement["predicate"], "expires": "9999-12-31T23:59:59Z", "version": 2}
    cache.resign(long)
    report = cache.verify()
    assert report.codes == {F.VALIDITY_TOO_LONG} and "at most 30 days" in report.failures[0].message
    assert cache.verify(config=VerifierConfig(max_manifest_validity=timedelta(days=10**7))).ok
    # a trust root's cap replaces the config's
    key = cache.private_key()
    trusted = TrustedKeys({keyid_for(key.public_key()): key.public_key()}, max_manifest_validity_s=10**12)
    assert verify_cache(cache.root, trusted, now=NOW).ok
    # and the signer refuses to sign what drones would refuse
    with pytest.raises(ManifestError, match="validity_too_long"):
        again = {**long, "predicate": {**long["predicate"], "version": 3}}
        sign_manifest(cache.root, again, signing_key=cache.keys.private_key, trusted_keys=cache.trusted)


def test_rollback_protection_is_on_by_default_onboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = Path(os.environ["NAVCACHE_STATE"])  # conftest: a per-test device state
    cache = make_cache(tmp_path, version=2)
    args = ["verify", str(cache.root), "--trust-root", str(cache.trusted), "--now", "2026-11-23T13:00:00Z"]
    assert onboard_main(args) == 0
    assert json.loads(state.read_text())["version"] == 2
    old = make_cache(tmp_path / "old", version=1, keys=cache.keys)
    assert onboard_main([*args[:1], str(old.root), *args[2:]]) == 1
    assert "rollback" in capsys.readouterr().out
    # the explicit opt-out
    assert onboard_main([*args[:1], str(old.root), *args[2:], "--no-state"]) == 0
    assert "rollback protection switched off" in capsys.readouterr().out


def test_fast_forward_and_deleted_state_are_recovered_through_the_trust_root(fleet: Fleet) -> None:
    # a stolen operator key A signs version 10^15: the drone accepts it, then refuses every real cache
    forged = fleet.cache("forged", fleet.a, version=10**15)
    assert fleet.verify(forged).ok
    _rotate_a_to_b(fleet)
    cache_b = fleet.cache("b", fleet.b, version=7, root_version=2)
    # (a drone that already holds v2 by another path would refuse it as a rollback: that is what the reset
    # on revocation undoes) — here v2 arrives with the cache: A revoked → the record is reset
    ship_roots(fleet.trust, cache_b.root)
    report = fleet.verify(cache_b)
    assert report.ok, report.summary()
    assert json.loads(fleet.state.read_text())["version"] == 7

    old_b = fleet.cache("old-b", fleet.b, version=4, root_version=2)
    # the state file is deleted: refused (not silently restarted) while the device holds root v2 ...
    fleet.state.unlink()
    report = fleet.verify(cache_b)
    assert report.codes == {F.STATE_MISSING}, report.summary()
    # ... until the root keys publish v3 (here raising the version floor): the record restarts from it
    edit_root(fleet.trust, min_manifest_version=5, expires=ISSUED + YEAR)
    sign_root(fleet.trust, fleet.roots[0])
    sign_root(fleet.trust, fleet.roots[1])
    ship_roots(fleet.trust, cache_b.root)
    report = fleet.verify(cache_b)
    assert report.ok, report.summary()
    shutil.copytree(cache_b.root / "trust", old_b.root / "trust", dirs_exist_ok=True)
    report = fleet.verify(old_b, state_path=fleet.tmp / "fresh/state.json")
    assert F.ROLLBACK in report.codes and "min_manifest_version=5" in report.summary()
    # the ground refuses to sign below the floor too (it ships v3 and verifies as a drone would)
    with pytest.raises(ManifestError, match="below trust root v3's floor"):
        fleet.cache("older-b", fleet.b, version=3, root_version=2)


def test_a_plain_trusted_keys_file_keeps_working_as_a_pinned_root(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    report = cache.verify(state_path=tmp_path / "state.json")
    assert report.ok and report.trust_root_version is None
    assert not root_store_path(tmp_path / "state.json").exists()


# --------------------------------------------------------------------------------------------------------
# Keyid interop and securesystemslib signers


def test_securesystemslib_verifies_the_manifest_with_its_own_default_keyid(tmp_path: Path) -> None:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    cache = make_cache(tmp_path)
    envelope = Envelope.from_dict(json.loads(cache.manifest.read_bytes()))
    key = SSlibKey.from_crypto(cache.private_key().public_key())
    assert key.keyid == cache.keys.keyid
    assert list(envelope.verify([key], 1)) == [key.keyid]


def test_securesystemslib_recipe_in_the_docs_runs_as_written(tmp_path: Path) -> None:
    text = (REPO / "docs/verify-with-openssl.md").read_text()
    match = re.search(r"<!-- recipe: tests/test_trust_root.py.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the securesystemslib recipe is missing from docs/verify-with-openssl.md"
    cache = make_cache(tmp_path)
    env = {**os.environ, "CACHE": str(cache.root), "PUB": str(cache.keys.public_key)}
    proc = subprocess.run([sys.executable, "-c", match.group(1)], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "verified SORTIE-0042 version 1" in proc.stdout
    forged = {**cache.statement, "predicate": {**cache.statement["predicate"], "sortie_id": "SORTIE-0043"}}
    cache.resign(forged, [Ed25519PrivateKey.generate()])
    proc = subprocess.run([sys.executable, "-c", match.group(1)], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode != 0


def test_a_manifest_signed_with_the_legacy_keyid_still_verifies_without_a_warning(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    envelope = cache.envelope()
    envelope["signatures"][0]["keyid"] = legacy_keyid_for(cache.private_key().public_key())
    cache.write_envelope(envelope)
    report = cache.verify()
    assert report.ok and F.KEYID_HINT_MISMATCH not in {w.code for w in report.warnings}, report.summary()


def test_securesystemslib_signer_signs_manifests_and_trust_roots(fleet: Fleet) -> None:
    uri = f"sslib:{fleet.a.keyid[:10]}:file2:{fleet.a.private_key}"
    cache = make_cache(fleet.tmp / "a", sign=False, keys=fleet.a)
    sign_manifest(cache.root, cache.statement, signing_key=uri, trusted_keys=root_path(fleet.trust, 1))
    assert fleet.verify(cache).ok
    # a root key held by a securesystemslib signer signs the trust root
    root_pem = fleet.tmp / "root2.pem"
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    root_pem.write_bytes(fleet.roots[2].private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    edit_root(fleet.trust, expires=ISSUED + YEAR)
    sign_root(fleet.trust, fleet.roots[0])
    root_keys = [(keyid_for(k.public_key()), k.public_key()) for k in fleet.roots]
    sign_root(fleet.trust, load_signer(f"sslib:{root_keys[2][0]}:file2:{root_pem}", public_keys=root_keys))
    assert root_status(fleet.trust).complete
    # a signer configured with the wrong key fails on the ground, clearly
    with pytest.raises(ManifestError, match="does not match"):
        wrong = load_signer(f"sslib:{root_keys[1][0]}:file2:{root_pem}", public_keys=root_keys)
        make_envelope(b"{}", [wrong])
    with pytest.raises(ManifestError, match="no allowed key matches"):
        load_signer("sslib:ffff:file2:/nonexistent", public_keys=root_keys)


# --------------------------------------------------------------------------------------------------------
# CLI: keygen passphrases, navcache trust …


def test_keygen_encrypts_by_default_and_needs_a_passphrase_source(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["keygen", "--dir", str(tmp_path / "k1")])
    assert result.exit_code == 2 and "--no-passphrase" in result.output
    result = runner.invoke(
        app, ["keygen", "--dir", str(tmp_path / "k2"), "--passphrase-env", "PW"], env={"PW": "correct horse"}
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k2/operator.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    load_private_key(tmp_path / "k2/operator.key", b"correct horse")
    result = runner.invoke(app, ["keygen", "--dir", str(tmp_path / "k3"), "--no-passphrase"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k3/operator.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_trust_cli_round_trip(tmp_path: Path) -> None:
    runner = CliRunner()
    keys = tmp_path / "keys"
    for name in ("root", "ops-a", "ops-b"):
        assert runner.invoke(app, ["keygen", "--dir", str(keys), "--name", name, "--no-passphrase"]).exit_code == 0
    trust = ["--dir", str(tmp_path / "trust")]
    result = runner.invoke(
        app,
        [
            *("trust", "init", *trust, "--root-key", str(keys / "root.pub")),
            *("--operator-key", str(keys / "ops-a.pub"), "--sign-with", str(keys / "root.key")),
        ],
    )
    assert result.exit_code == 0 and "version 1 complete" in result.output, result.output
    assert runner.invoke(app, ["trust", "add-key", *trust, "--key", str(keys / "ops-b.pub")]).exit_code == 0
    a_keyid = keyid_for(load_private_key(keys / "ops-a.key").public_key())
    result = runner.invoke(app, ["trust", "revoke-key", *trust, "--keyid", a_keyid[:12]])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["trust", "show", *trust])
    assert "NOT COMPLETE" in result.output and "REVOKED" in result.output and "ops-b" in result.output
    result = runner.invoke(app, ["trust", "sign", *trust, "--key", str(keys / "root.key")])
    assert result.exit_code == 0 and "complete" in result.output, result.output
    assert "COMPLETE (drones accept it)" in runner.invoke(app, ["trust", "show", *trust]).output
    # mistakes: one clean line, exit 2
    result = runner.invoke(app, ["trust", "revoke-key", *trust, "--keyid", "nope"])
    assert result.exit_code == 2 and "no operator key matches" in result.output
    result = runner.invoke(app, ["trust", "sign", *trust, "--key", str(keys / "ops-a.key")])
    assert result.exit_code == 2 and "not a root key" in result.output
    assert runner.invoke(app, ["trust", "show", "--dir", str(tmp_path / "nowhere")]).exit_code == 2


# --------------------------------------------------------------------------------------------------------
# The verifier keeps what it verified


def test_the_report_keeps_the_verified_statement(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    report = cache.verify()
    assert report.ok
    assert report.statement == json.loads(base64.b64decode(cache.envelope()["payload"]))
    assert report.predicate["sortie_id"] == "SORTIE-0042" and report.predicate["version"] == 1
    assert report.signed_subjects() == {s["name"]: s["digest"]["sha256"] for s in cache.statement["subject"]}
    assert "statement" not in json.loads(report.to_json())  # the JSON report stays a report
    # a manifest replaced after verification does not change what the caller holds
    cache.resign({**cache.statement, "predicate": {**cache.statement["predicate"], "sortie_id": "X"}})
    assert report.predicate["sortie_id"] == "SORTIE-0042"
    # nothing is kept when the signatures do not hold
    cache.resign(cache.statement, [Ed25519PrivateKey.generate()])
    refused = cache.verify()
    assert refused.statement is None and refused.predicate == {} and refused.signed_subjects() == {}


def test_inspect_shows_the_verified_statement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = make_cache(tmp_path)
    assert onboard_main(["inspect", str(cache.root), "--trusted-keys", str(cache.trusted)]) == 1  # expired now
    out = capsys.readouterr().out
    assert "REFUSED" in out and "sortie     SORTIE-0042" in out and "version 1" in out
    assert onboard_main(["inspect", str(cache.root)]) == 0
    assert "UNVERIFIED" in capsys.readouterr().out


def test_securesystemslib_verifies_a_trust_root_from_its_own_key_list(fleet: Fleet) -> None:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    envelope = Envelope.from_dict(json.loads(root_path(fleet.trust, 1).read_bytes()))
    payload = json.loads(envelope.payload)
    keys = [SSlibKey.from_dict(keyid, dict(payload["keys"][keyid])) for keyid in payload["roles"]["root"]["keyids"]]
    accepted = envelope.verify(keys, payload["roles"]["root"]["threshold"])
    assert set(accepted) == {keyid_for(k.public_key()) for k in fleet.roots[:2]}


def test_a_broken_trust_directory_is_a_report_not_a_traceback(fleet: Fleet) -> None:
    cache_a = fleet.cache("a", fleet.a)
    trust = cache_a.root / "trust"
    shutil.rmtree(trust)
    trust.mkdir()
    (trust / "root-2.json").mkdir()  # a directory where a root version should be
    report = fleet.verify(cache_a)
    assert report.codes == {F.TRUST_ROOT_UPDATE_REFUSED} and "not a regular file" in report.summary()
    shutil.rmtree(trust)
    trust.write_text("not a directory")  # ignored: no versions shipped
    assert fleet.verify(cache_a).ok
    trust.unlink()
    trust.mkdir()
    (trust / "root-2.json").write_bytes(b"\\xff" * 10)
    assert fleet.verify(cache_a).codes == {F.TRUST_ROOT_UPDATE_REFUSED}
