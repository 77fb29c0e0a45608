"""Attack suite for the onboard verifier (modelled on tuf-conformance): each test asserts the exact failure
codes, and that simultaneous failures are all listed."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from navcache.keys import generate_keypair, load_private_key
from navcache.manifest import make_envelope
from navcache_runtime.errors import FailureCode
from navcache_runtime.manifest_format import loads_strict, pae, point_in_area
from navcache_runtime.trust import TrustedKeys, load_trusted_keys
from navcache_runtime.verify import CacheVerificationError, CacheVerifier, VerifierConfig, verify_cache
from tests.support.isolation import run_json
from tests.test_manifest import EXPIRES, ISSUED, NOW, Cache, coverage_table, make_cache

F = FailureCode


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return make_cache(tmp_path)


def _predicate(cache: Cache, **changes: Any) -> dict[str, Any]:
    statement = copy.deepcopy(cache.statement)
    statement["predicate"].update(changes)
    return statement


def _add_subject(statement: dict[str, Any], name: str, data: bytes) -> None:
    statement["subject"].append({"name": name, "digest": {"sha256": hashlib.sha256(data).hexdigest()}})
    statement["predicate"]["artifacts"][name] = {"length": len(data)}


def _flip(path: Path, index: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------------------
# Happy paths


@pytest.mark.parametrize("mode", ["airborne", "operator"])
def test_happy_path(cache: Cache, mode: str) -> None:
    report = cache.verify(mode=mode)
    assert report.ok, report.summary()
    assert report.failures == []
    assert [w.code for w in report.warnings] == [F.ROLLBACK_UNCHECKED]  # no state file given
    assert report.extra_files == []  # the engine's .sha256 sidecar is not an "extra"
    assert sorted(a.path for a in report.artifacts) == sorted(cache.artifacts)
    assert all(a.ok for a in report.artifacts)
    assert report.version == 1 and report.sortie_id == "SORTIE-0042"
    assert report.expires == "2026-11-25T12:00:00Z" and report.issued_at == "2026-11-23T12:00:00Z"
    assert report.bytes_hashed == sum(len(d) for d in cache.artifacts.values())
    assert report.skipped == []
    assert report.raise_if_failed() is report
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["mode"] == mode and data["failures"] == []


def test_report_json_lists_typed_failures(cache: Cache) -> None:
    _flip(cache.root / "index/tiles.faiss")
    report = cache.verify()
    data = json.loads(report.to_json())
    assert data["ok"] is False
    assert data["failures"] == [
        {"code": "artifact_digest_mismatch", "subject": "index/tiles.faiss", "message": data["failures"][0]["message"]}
    ]
    assert {"path": "index/tiles.faiss", "ok": False, "reason": "artifact_digest_mismatch"}.items() <= next(
        a for a in data["artifacts"] if a["path"] == "index/tiles.faiss"
    ).items()
    with pytest.raises(CacheVerificationError, match="artifact_digest_mismatch"):
        report.raise_if_failed()


# --------------------------------------------------------------------------------------------------------
# Artifacts


def test_tampered_artifact(cache: Cache) -> None:
    _flip(cache.root / "engines/vpr__sm87_jp6.2_trt10.3_fp16.engine", 4000)
    report = cache.verify()
    assert report.codes == {F.ARTIFACT_DIGEST_MISMATCH}
    assert [f.subject for f in report.failures] == ["engines/vpr__sm87_jp6.2_trt10.3_fp16.engine"]


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_wrong_length_is_reported_without_hashing(cache: Cache, change: str) -> None:
    path = cache.root / "engines/vpr__sm87_jp6.2_trt10.3_fp16.engine"
    data = path.read_bytes()
    path.write_bytes(data[:-1] if change == "truncate" else data + b"\0" * 10_000)
    report = cache.verify()
    assert report.codes == {F.ARTIFACT_LENGTH_MISMATCH}
    assert "not hashed" in report.failures[0].message
    assert report.bytes_hashed == sum(len(d) for d in cache.artifacts.values()) - len(data)


def test_swapped_artifacts_are_both_reported(cache: Cache) -> None:
    a, b = cache.root / "tiles/17/68000/45000.webp", cache.root / "tiles/17/68001/45000.webp"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    report = cache.verify()
    assert report.codes == {F.ARTIFACT_DIGEST_MISMATCH}
    assert sorted(f.subject for f in report.failures) == ["tiles/17/68000/45000.webp", "tiles/17/68001/45000.webp"]


def test_missing_artifact(cache: Cache) -> None:
    (cache.root / "index/tiles.faiss").unlink()
    report = cache.verify()
    assert report.codes == {F.ARTIFACT_MISSING}
    assert report.failures[0].subject == "index/tiles.faiss"


def test_symlink_out_of_the_cache_is_refused_even_with_the_right_bytes(cache: Cache, tmp_path: Path) -> None:
    path = cache.root / "index/tiles.faiss"
    outside = tmp_path / "elsewhere.faiss"
    outside.write_bytes(path.read_bytes())  # identical content: containment is checked, not just bytes
    path.unlink()
    path.symlink_to(outside)
    report = cache.verify()
    assert report.codes == {F.ARTIFACT_SYMLINK_ESCAPE}
    # A symlink inside the cache, to identical bytes, is acceptable.
    inside = cache.root / "index/real.faiss"
    inside.write_bytes(outside.read_bytes())
    path.unlink()
    path.symlink_to("real.faiss")
    report = cache.verify()
    assert report.ok and [f.subject for f in report.warnings if f.code == F.EXTRA_FILE] == ["index/real.faiss"]


def test_a_fifo_in_place_of_an_artifact_does_not_hang(cache: Cache) -> None:
    path = cache.root / "index/tiles.faiss"
    path.unlink()
    os.mkfifo(path)
    assert cache.verify().codes == {F.ARTIFACT_NOT_REGULAR}


def test_extra_unlisted_file_is_reported_and_fails_only_when_strict(cache: Cache) -> None:
    (cache.root / "tiles/17/68000/99999.webp").write_bytes(b"planted")
    (cache.root / ".navcache-tmp-123-abcd-x.bin").write_bytes(b"temp")  # ignored
    (cache.root / "cache.lock").write_text("pid 1")  # ignored
    (cache.root / "tiles" / ".navcache-scan-0123abcd").write_text("f" * 64)  # ground-side scan memo: ignored
    report = cache.verify()
    assert report.ok
    assert report.extra_files == ["tiles/17/68000/99999.webp"]
    assert F.EXTRA_FILE in {w.code for w in report.warnings}
    strict = cache.verify(strict_extra=True)
    assert strict.codes == {F.EXTRA_FILE}
    assert [f.subject for f in strict.failures] == ["tiles/17/68000/99999.webp"]


def test_state_file_and_linked_directories_inside_the_cache_are_not_extras(cache: Cache) -> None:
    state = cache.root / "device-state.json"
    assert cache.verify(state_path=state).ok and state.exists()
    report = cache.verify(state_path=state)
    assert report.ok and report.extra_files == []
    (cache.root / "shortcut").symlink_to("tiles/17")  # not listed: reported as one entry, not descended into
    assert cache.verify(state_path=state).extra_files == ["shortcut"]


def test_all_simultaneous_failures_are_listed(cache: Cache, tmp_path: Path) -> None:
    _flip(cache.root / "engines/vpr__sm87_jp6.2_trt10.3_fp16.engine")
    (cache.root / "index/tiles.faiss").write_bytes(b"short")
    (cache.root / "tiles/17/68000/45000.webp").unlink()
    escape = cache.root / "tiles/17/68001/45000.webp"
    outside = tmp_path / "out.webp"
    outside.write_bytes(escape.read_bytes())
    escape.unlink()
    escape.symlink_to(outside)
    (cache.root / "planted.bin").write_bytes(b"x")
    report = cache.verify(now=EXPIRES + timedelta(seconds=1), strict_extra=True)
    by_subject = {(f.code, f.subject) for f in report.failures}
    assert by_subject == {
        (F.ARTIFACT_DIGEST_MISMATCH, "engines/vpr__sm87_jp6.2_trt10.3_fp16.engine"),
        (F.ARTIFACT_LENGTH_MISMATCH, "index/tiles.faiss"),
        (F.ARTIFACT_MISSING, "tiles/17/68000/45000.webp"),
        (F.ARTIFACT_SYMLINK_ESCAPE, "tiles/17/68001/45000.webp"),
        (F.EXTRA_FILE, "planted.bin"),
        (F.EXPIRED, "predicate.expires"),
    }
    assert [a.path for a in report.artifacts if a.ok] == ["coverage.json"]


# --------------------------------------------------------------------------------------------------------
# Envelope and signatures


def _tamper_payload(cache: Cache) -> None:
    envelope = cache.envelope()
    payload = base64.b64decode(envelope["payload"]).replace(b"SORTIE-0042", b"SORTIE-0666")
    envelope["payload"] = base64.b64encode(payload).decode()
    cache.write_envelope(envelope)


def test_tampered_payload(cache: Cache) -> None:
    _tamper_payload(cache)
    report = cache.verify()
    assert report.codes == {F.SIGNATURE_INVALID, F.THRESHOLD_NOT_MET}
    assert report.skipped == ["payload", "freshness", "subjects", "artifacts", "extras", "coverage"]
    assert report.sortie_id is None and report.artifacts == []  # nothing from the payload was used


def test_tampered_signature(cache: Cache) -> None:
    envelope = cache.envelope()
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[10] ^= 0x80
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    cache.write_envelope(envelope)
    assert cache.verify().codes == {F.SIGNATURE_INVALID, F.THRESHOLD_NOT_MET}


def test_wrong_key(cache: Cache) -> None:
    cache.resign(cache.statement, [Ed25519PrivateKey.generate()])
    assert cache.verify().codes == {F.SIGNATURE_UNTRUSTED, F.THRESHOLD_NOT_MET}


def test_keyid_is_only_a_hint(cache: Cache) -> None:
    # A rogue signature that claims the operator's keyid is still tried against the key and fails.
    cache.resign(cache.statement, [Ed25519PrivateKey.generate()])
    envelope = cache.envelope()
    envelope["signatures"][0]["keyid"] = cache.keys.keyid
    cache.write_envelope(envelope)
    assert cache.verify().codes == {F.SIGNATURE_INVALID, F.THRESHOLD_NOT_MET}
    # A genuine signature with a wrong or missing keyid still verifies (with a warning).
    cache.resign(cache.statement)
    envelope = cache.envelope()
    envelope["signatures"][0]["keyid"] = "0" * 64
    cache.write_envelope(envelope)
    report = cache.verify()
    assert report.ok and F.KEYID_HINT_MISMATCH in {w.code for w in report.warnings}
    del envelope["signatures"][0]["keyid"]
    cache.write_envelope(envelope)
    assert cache.verify().ok


def test_key_not_in_allowlist_at_verify_time(cache: Cache, tmp_path: Path) -> None:
    other = generate_keypair(tmp_path / "other-ground-station")
    report = verify_cache(cache.root, other.trusted_keys, now=NOW)
    assert report.codes == {F.SIGNATURE_UNTRUSTED, F.THRESHOLD_NOT_MET}


def test_duplicate_signatures_by_one_key_do_not_meet_a_threshold_of_two(cache: Cache, tmp_path: Path) -> None:
    second = load_private_key(generate_keypair(tmp_path / "k2", name="second").private_key)
    operator = cache.private_key()
    trusted = TrustedKeys.from_public_keys(operator.public_key(), second.public_key(), threshold=2)
    cache.resign(cache.statement, [operator, operator])
    report = verify_cache(cache.root, trusted, now=NOW)
    assert report.codes == {F.SIGNATURE_DUPLICATE_KEY, F.THRESHOLD_NOT_MET}
    assert report.verified_keyids == [cache.keys.keyid]
    cache.resign(cache.statement, [operator, second])
    assert verify_cache(cache.root, trusted, now=NOW).ok


def test_unknown_payload_type(cache: Cache) -> None:
    # Signed by the operator, but for another type: refused on the type alone.
    payload = rfc8785.dumps(cache.statement)
    cache.manifest.write_bytes(make_envelope(payload, [cache.private_key()], payload_type="application/json"))
    assert cache.verify().codes == {F.PAYLOAD_TYPE_UNSUPPORTED}
    # The type swapped after signing: both the type and the signature (PAE binds the type) are reported.
    cache.resign(cache.statement)
    envelope = cache.envelope()
    envelope["payloadType"] = "application/json"
    cache.write_envelope(envelope)
    assert cache.verify().codes == {F.PAYLOAD_TYPE_UNSUPPORTED, F.SIGNATURE_INVALID, F.THRESHOLD_NOT_MET}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.update(extra="smuggled"),
        lambda e: e.pop("payloadType"),
        lambda e: e.update(signatures=[]),
        lambda e: e.update(payload=e["payload"][:-1]),  # not a whole base64 quantum
        lambda e: e.update(payload=e["payload"][:40] + "\n" + e["payload"][40:]),  # whitespace inside
        lambda e: e.update(payload=e["payload"].replace("+", "-").replace("/", "_") + "!"),
        lambda e: e["signatures"][0].update(role="admin"),
    ],
)
def test_malformed_envelopes(cache: Cache, mutate: Any) -> None:
    envelope = cache.envelope()
    mutate(envelope)
    cache.write_envelope(envelope)
    assert cache.verify().codes == {F.ENVELOPE_MALFORMED}


def test_envelope_with_duplicate_keys_is_malformed(cache: Cache) -> None:
    text = cache.manifest.read_text()
    cache.manifest.write_text(text.replace('"payloadType"', '"payloadType": "x", "payloadType"', 1))
    report = cache.verify()
    assert report.codes == {F.ENVELOPE_MALFORMED}
    assert "duplicate JSON key 'payloadType'" in report.failures[0].message


def test_non_canonical_base64_signature_is_malformed(cache: Cache) -> None:
    envelope = cache.envelope()
    sig = envelope["signatures"][0]["sig"]  # 64 bytes → 88 chars ending "=="; its last data char has 4 spare bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(sig[-3])
    sibling = alphabet[last ^ 0x01]  # same decoded bytes, different spelling
    envelope["signatures"][0]["sig"] = sig[:-3] + sibling + "=="
    assert base64.b64decode(envelope["signatures"][0]["sig"]) == base64.b64decode(sig)
    cache.write_envelope(envelope)
    assert cache.verify().codes == {F.SIGNATURE_MALFORMED, F.THRESHOLD_NOT_MET}


def test_missing_manifest(cache: Cache) -> None:
    cache.manifest.unlink()
    report = cache.verify()
    assert report.codes == {F.MANIFEST_MISSING}
    assert report.skipped[0] == "signatures"


def test_oversized_manifest_is_refused_without_reading_it(cache: Cache) -> None:
    with open(cache.manifest, "r+b") as handle:
        handle.truncate(1 << 30)  # 1 GiB, sparse
    io_before = _bytes_read()
    report = cache.verify()
    io_after = _bytes_read()
    assert report.codes == {F.ENVELOPE_TOO_LARGE}
    if io_before is not None and io_after is not None:
        assert io_after - io_before < 8 << 20  # the artifacts are not read either: nothing was trusted


def test_manifest_over_a_small_limit(cache: Cache) -> None:
    assert cache.verify(max_manifest_bytes=100).codes == {F.ENVELOPE_TOO_LARGE}


def test_bounded_reader_stops_at_the_limit_when_a_file_grows(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    # fstat says small, the file yields more: the reader stops at limit + 1 bytes.
    import navcache_runtime.manifest_format as format_module

    real_fstat = os.fstat
    monkeypatch.setattr(format_module.os, "fstat", lambda fd: _Shrunk(real_fstat(fd)))
    size = cache.manifest.stat().st_size
    reads: list[int] = []
    manifest_inode = cache.manifest.stat().st_ino

    class Spy:  # counts the bytes read from the manifest (the device state file is read the same way)
        def __init__(self, handle: Any) -> None:
            self.handle = handle
            self.counted = real_fstat(handle.fileno()).st_ino == manifest_inode

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def fileno(self) -> int:
            return int(self.handle.fileno())

        def read(self, n: int) -> bytes:
            chunk = bytes(self.handle.read(n))
            if self.counted:
                reads.append(len(chunk))
            return chunk

    real_fdopen = format_module.fdopen_regular  # where the bounded reader opens its descriptor
    monkeypatch.setattr(format_module, "fdopen_regular", lambda fd: Spy(real_fdopen(fd)))
    report = verify_cache(cache.root, cache.trusted, now=NOW, max_manifest_bytes=size // 2)
    assert report.codes == {F.ENVELOPE_TOO_LARGE}
    assert sum(reads) == size // 2 + 1


class _Shrunk:
    def __init__(self, real: os.stat_result) -> None:
        self.st_mode = real.st_mode
        self.st_size = 10


def _bytes_read() -> int | None:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))


# --------------------------------------------------------------------------------------------------------
# Signed but wrong: the payload is authentic, its content is refused


def test_expired_manifest(cache: Cache) -> None:
    assert cache.verify(now=EXPIRES).codes == {F.EXPIRED}
    assert cache.verify(now=EXPIRES - timedelta(seconds=1)).ok


def test_manifest_from_the_future(cache: Cache) -> None:
    assert cache.verify(now=ISSUED - timedelta(hours=1)).codes == {F.NOT_YET_VALID}
    assert cache.verify(now=ISSUED - timedelta(minutes=4)).ok  # within the allowed clock skew


def test_rollback_to_an_older_version(tmp_path: Path) -> None:
    state = tmp_path / "device/state.json"
    old = make_cache(tmp_path / "v1", version=1)
    old_manifest = old.manifest.read_bytes()
    new = make_cache(tmp_path / "v1", version=2, sign=False, keys=old.keys)
    new.resign(new.statement)
    report = new.verify(state_path=state)
    assert report.ok and json.loads(state.read_text())["version"] == 2
    assert new.verify(state_path=state).ok  # re-verifying the accepted version at every boot is fine
    # The attacker restores the (validly signed, unexpired) version 1 manifest and its artifacts.
    old_cache = make_cache(tmp_path / "v1", version=1, sign=False, keys=old.keys)
    old_cache.manifest.write_bytes(old_manifest)
    report = old_cache.verify(state_path=state)
    assert report.codes == {F.ROLLBACK}
    assert json.loads(state.read_text())["version"] == 2  # not updated by a failed verification


def test_same_version_with_different_content_is_refused(cache: Cache, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    assert cache.verify(state_path=state).ok
    cache.resign(_predicate(cache, sortie_id="SORTIE-0043"))
    assert cache.verify(state_path=state).codes == {F.VERSION_REUSED}


def test_corrupt_state_file_fails_closed(cache: Cache, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{ garbage")
    assert cache.verify(state_path=state).codes == {F.STATE_INVALID}


def test_absolute_path(cache: Cache) -> None:
    statement = copy.deepcopy(cache.statement)
    _add_subject(statement, "/etc/hostname", b"whatever")
    cache.resign(statement)
    report = cache.verify()
    assert report.codes == {F.PATH_ABSOLUTE}
    assert report.bytes_hashed == sum(len(d) for d in cache.artifacts.values())  # never opened


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../outside.bin", F.PATH_TRAVERSAL),
        ("tiles/../../outside.bin", F.PATH_TRAVERSAL),
        ("tiles\\17\\x.webp", F.PATH_INVALID),
        ("./coverage.json", F.PATH_INVALID),
        ("C:/windows.bin", F.PATH_ABSOLUTE),
        ("manifest.dsse.json", F.PATH_INVALID),
    ],
)
def test_unsafe_paths(cache: Cache, tmp_path: Path, name: str, code: FailureCode) -> None:
    (tmp_path / "outside.bin").write_bytes(b"outside")
    statement = copy.deepcopy(cache.statement)
    _add_subject(statement, name, b"outside")
    cache.resign(statement)
    assert cache.verify().codes == {code}


def test_duplicate_subjects_and_list_mismatch(cache: Cache) -> None:
    statement = copy.deepcopy(cache.statement)
    statement["subject"].append(copy.deepcopy(statement["subject"][0]))
    del statement["predicate"]["artifacts"]["index/tiles.faiss"]
    statement["predicate"]["artifacts"]["ghost.bin"] = {"length": 1}
    cache.resign(statement)
    report = cache.verify()
    assert {(f.code, f.subject) for f in report.failures} == {
        (F.SUBJECT_DUPLICATE, statement["subject"][0]["name"]),
        (F.ARTIFACT_LIST_MISMATCH, "index/tiles.faiss"),
        (F.ARTIFACT_LIST_MISMATCH, "ghost.bin"),
    }


def test_takeoff_outside_the_area(cache: Cache) -> None:
    cache.resign(_predicate(cache, takeoff={"lat_e7": 480000000, "lon_e7": 85455938}))
    assert cache.verify().codes == {F.TAKEOFF_OUTSIDE_AREA}
    # Inside the outer ring but in the hole is outside too.
    cache.resign(_predicate(cache, takeoff={"lat_e7": 474050000, "lon_e7": 85700000}))
    assert cache.verify().codes == {F.TAKEOFF_OUTSIDE_AREA}


def test_duplicate_json_keys_in_the_signed_payload(cache: Cache) -> None:
    payload = rfc8785.dumps(cache.statement)
    evil = payload.replace(b'"version":1', b'"version":1,"version":99', 1)
    assert evil != payload
    cache.resign(evil)
    report = cache.verify()
    assert report.codes == {F.PAYLOAD_DUPLICATE_KEY}
    assert report.verified_keyids == [cache.keys.keyid]  # the signature was fine: it was checked first


def test_floats_in_the_signed_payload(cache: Cache) -> None:
    payload = rfc8785.dumps(cache.statement).replace(b'"lat_e7":473977419', b'"lat_e7":47.3977419', 1)
    cache.resign(payload)
    assert cache.verify().codes == {F.PAYLOAD_FLOAT}
    cache.resign(rfc8785.dumps(cache.statement).replace(b'"version":1', b'"version":1e0', 1))
    assert cache.verify().codes == {F.PAYLOAD_FLOAT}


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"version": "2"}, F.SCHEMA_INVALID),
        ({"expires": "2026-11-25 12:00:00"}, F.SCHEMA_INVALID),
        ({"area": {"type": "Point", "coordinates": [1, 2]}}, F.AREA_INVALID),
        (
            {
                "coverage": {
                    "digest": "0" * 64,
                    "total": 10,
                    "covered": 9,
                    "percent_x100": 9999,
                    "path": "coverage.json",
                }
            },
            F.COVERAGE_INCONSISTENT,
        ),
    ],
)
def test_schema_violations(cache: Cache, change: dict[str, Any], code: FailureCode) -> None:
    cache.resign(_predicate(cache, **change))
    report = cache.verify()
    assert report.codes == {code}
    assert report.bytes_hashed > 0  # the independent checks still ran


def test_wrong_statement_type_stops_before_the_artifacts(cache: Cache) -> None:
    statement = copy.deepcopy(cache.statement)
    statement["predicateType"] = "https://slsa.dev/provenance/v1"
    cache.resign(statement)
    report = cache.verify()
    assert report.codes == {F.STATEMENT_TYPE_UNSUPPORTED}
    assert report.bytes_hashed == 0


def test_operator_mode_rederives_the_coverage_digest(cache: Cache) -> None:
    # The table was changed (one missing tile now claims "covered") and re-signed with its new hash, but
    # the signed aggregate still carries the old digest and counts.
    table = json.loads((cache.root / "coverage.json").read_bytes())
    table["tiles"][0][3] = 0 if table["tiles"][0][3] else 1
    new_bytes = json.dumps(table).encode()
    (cache.root / "coverage.json").write_bytes(new_bytes)
    statement = copy.deepcopy(cache.statement)
    statement["subject"] = [s for s in statement["subject"] if s["name"] != "coverage.json"]
    _add_subject(statement, "coverage.json", new_bytes)
    cache.resign(statement)
    assert cache.verify(mode="airborne").ok  # airborne trusts the signed aggregate
    report = cache.verify(mode="operator")
    assert report.codes == {F.COVERAGE_MISMATCH}
    assert {f.subject for f in report.failures} == {"predicate.coverage.digest", "predicate.coverage"}


def test_operator_mode_reads_the_coverage_module_format(cache: Cache) -> None:
    # navcache.coverage_walk writes "status_codes" and float percentages; the digest covers tiles only.
    tiles = [[17, 1, 1, 0], [17, 1, 2, 2], [17, 2, 1, 1]]
    _, coverage = coverage_table(tiles)
    table = {
        "format": "navcache.coverage_walk/1",
        "percent": 33.3,
        "status_codes": {"0": "covered", "1": "missing", "2": "blank"},
        "tiles": tiles,
    }
    data = json.dumps(table).encode()
    (cache.root / "coverage.json").write_bytes(data)
    statement = copy.deepcopy(cache.statement)
    statement["subject"] = [s for s in statement["subject"] if s["name"] != "coverage.json"]
    _add_subject(statement, "coverage.json", data)
    statement["predicate"]["coverage"] = {**coverage, "percent_x100": 3333, "path": "coverage.json"}
    cache.resign(statement)
    assert cache.verify(mode="operator").ok


def test_trusted_keys_file_problems_are_reported_not_raised(cache: Cache) -> None:
    doc = json.loads(cache.trusted.read_text())
    doc["keys"][0]["keyid"] = "f" * 64
    cache.trusted.write_text(json.dumps(doc))
    report = verify_cache(cache.root, cache.trusted, now=NOW)
    assert report.codes == {F.TRUSTED_KEYS_INVALID}
    assert report.skipped == list(CacheVerifier.STEPS)


def test_programming_errors_raise(cache: Cache) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_cache(cache.root, cache.trusted, now=datetime(2026, 11, 23))
    with pytest.raises(ValueError, match="mode"):
        verify_cache(cache.root, cache.trusted, mode="ground")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# Pieces


def test_pae_matches_the_dsse_spec_vector() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("é", b"") == b"DSSEv1 2 \xc3\xa9 0 "  # LEN counts bytes


def test_loads_strict() -> None:
    assert loads_strict(b'{"a": [1, 2]}') == {"a": [1, 2]}
    for bad, code in [
        (b'{"a": 1, "a": 2}', F.PAYLOAD_DUPLICATE_KEY),
        (b'{"a": 1.0}', F.PAYLOAD_FLOAT),
        (b'{"a": NaN}', F.PAYLOAD_FLOAT),
        (b"\xff", F.PAYLOAD_MALFORMED),
        (b"[" * 100_000, F.PAYLOAD_MALFORMED),
    ]:
        with pytest.raises(ValueError) as info:
            loads_strict(bad)
        assert info.value.code == code  # type: ignore[attr-defined]


SQUARE = [[(0, 0), (100, 0), (100, 100), (0, 100), (0, 0)]]
SQUARE_WITH_HOLE = [SQUARE[0], [(40, 40), (60, 40), (60, 60), (40, 60), (40, 40)]]
CONCAVE = [[(0, 0), (100, 0), (100, 100), (50, 50), (0, 100), (0, 0)]]  # notch from the top


@pytest.mark.parametrize(
    ("polygons", "point", "inside"),
    [
        ([SQUARE], (50, 50), True),
        ([SQUARE], (150, 50), False),
        ([SQUARE], (100, 50), True),  # on an edge: boundary counts as inside
        ([SQUARE], (0, 0), True),  # a vertex
        ([SQUARE], (-1, 0), False),  # on the extension of an edge
        ([SQUARE_WITH_HOLE], (50, 50), False),  # in the hole
        ([SQUARE_WITH_HOLE], (40, 50), True),  # on the hole's edge
        ([SQUARE_WITH_HOLE], (20, 50), True),
        ([CONCAVE], (50, 80), False),  # in the notch
        ([CONCAVE], (50, 40), True),
        ([CONCAVE], (20, 50), True),  # ray passes through the notch vertex height
        ([SQUARE, [[(200, 200), (300, 200), (300, 300), (200, 200)]]], (280, 250), True),  # MultiPolygon
    ],
)
def test_point_in_area(polygons: Any, point: tuple[int, int], inside: bool) -> None:
    assert point_in_area(polygons, *point) is inside


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-1000, 1000), st.integers(-1000, 1000)), min_size=3, max_size=12, unique=True),
    st.integers(-1100, 1100),
    st.integers(-1100, 1100),
)
def test_point_in_area_agrees_with_shapely(vertices: list[tuple[int, int]], x: int, y: int) -> None:
    shapely = pytest.importorskip("shapely")
    polygon = shapely.Polygon(vertices)
    if not polygon.is_valid or polygon.area == 0:
        return
    ring = list(polygon.exterior.coords)
    ring_int = [(int(px), int(py)) for px, py in ring]
    expected = bool(polygon.covers(shapely.Point(x, y)))  # covers: boundary included
    assert point_in_area([[ring_int]], x, y) is expected


# --------------------------------------------------------------------------------------------------------
# Property: random mutations of a valid envelope never verify (unless they leave the signed content,
# i.e. payloadType, payload bytes and signature bytes, unchanged; the keyid is an unsigned hint).


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cache, TrustedKeys, bytes]:
    cache = make_cache(tmp_path_factory.mktemp("prop"))
    return cache, load_trusted_keys(cache.trusted), cache.manifest.read_bytes()


def _signed_content(raw: bytes) -> tuple[Any, ...] | None:
    try:
        env = json.loads(raw)
        return (
            env["payloadType"],
            base64.b64decode(env["payload"]),
            tuple(base64.b64decode(s["sig"]) for s in env["signatures"]),
        )
    except Exception:
        return None


def _mutations() -> st.SearchStrategy[tuple[str, int, int, bytes]]:
    return st.tuples(
        st.sampled_from(["flip", "insert", "delete", "replace_field", "replace_b64_char"]),
        st.integers(0, 1 << 30),
        st.integers(0, 7),
        st.binary(min_size=1, max_size=8),
    )


def _mutate(raw: bytes, kind: str, position: int, bit: int, blob: bytes) -> bytes:
    data = bytearray(raw)
    index = position % len(data)
    if kind == "flip":
        data[index] ^= 1 << bit
    elif kind == "insert":
        data[index:index] = blob
    elif kind == "delete":
        del data[index : index + 1 + bit]
    elif kind == "replace_field":
        env = json.loads(raw)
        field_name = ["payloadType", "payload", "sig", "keyid"][bit % 4]
        replacement = [
            "application/vnd.in-toto+json ",
            base64.b64encode(base64.b64decode(env["payload"]) + blob).decode(),
            base64.b64encode(blob * 8)[:88].decode(),
            blob.hex(),
        ][bit % 4]
        if field_name in ("sig", "keyid"):
            env["signatures"][0][field_name] = replacement
        else:
            env[field_name] = replacement
        return json.dumps(env).encode()
    else:  # change one character inside the base64 payload
        env = json.loads(raw)
        payload = list(env["payload"])
        i = position % len(payload)
        payload[i] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(bit * 8 + blob[0]) % 64]
        env["payload"] = "".join(payload)
        return json.dumps(env).encode()
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_mutations())
def test_random_mutations_never_verify(signed: tuple[Cache, TrustedKeys, bytes], mutation: Any) -> None:
    cache, trusted, original = signed
    mutated = _mutate(original, *mutation)
    candidate = cache.root / f".navcache-tmp-prop-{os.getpid()}.json"
    candidate.write_bytes(mutated)
    try:
        report = verify_cache(cache.root, trusted, now=NOW, manifest_path=candidate)
    finally:
        candidate.unlink()
    if report.ok:
        assert _signed_content(mutated) == _signed_content(original), f"mutation {mutation} verified"
    else:
        assert report.failures


# --------------------------------------------------------------------------------------------------------
# Runs where the provisioning stack cannot be imported


def test_verifier_runs_without_the_provisioning_stack(cache: Cache, tmp_path: Path) -> None:
    blocked = ("prefect", "faiss", "onnx", "rfc8785", "shapely", "navcache")
    tampered = tmp_path / "tampered"
    shutil.copytree(cache.root, tampered, symlinks=True)
    _flip(tampered / "index/tiles.faiss")
    result = run_json(
        f"""
        import json, sys
        from datetime import datetime
        from pathlib import Path
        from navcache_runtime.verify import verify_cache
        now = datetime.fromisoformat({NOW.isoformat()!r})
        good = verify_cache(Path({str(cache.root)!r}), Path({str(cache.trusted)!r}), mode="operator", now=now)
        bad = verify_cache(Path({str(tampered)!r}), Path({str(cache.trusted)!r}), now=now)
        loaded = sorted(m for m in {list(blocked)!r} if m in sys.modules)
        print(json.dumps({{"good": good.ok, "bad": sorted(str(c) for c in bad.codes), "loaded": loaded}}))
        """,
        blocked=blocked,
    )
    assert result == {"good": True, "bad": ["artifact_digest_mismatch"], "loaded": []}


@pytest.mark.parametrize("module", ["verify.py", "manifest_format.py", "layout.py"])
def test_verifier_modules_import_only_stdlib_cryptography_and_runtime(module: str) -> None:
    source = (Path(__file__).resolve().parents[1] / "src/navcache_runtime" / module).read_text()
    imports = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from ")) and not line.startswith("from .")
    }
    allowed = {"__future__", "base64", "binascii", "enum", "errno", "fnmatch", "hashlib", "itertools", "json",
               "logging", "os", "re", "stat", "time", "collections", "concurrent", "dataclasses", "datetime",
               "pathlib", "types", "typing", "cryptography"}  # fmt: skip
    assert imports <= allowed, imports - allowed


def test_parallel_hashing_uses_the_configured_workers(cache: Cache) -> None:
    report = verify_cache(cache.root, cache.trusted, now=NOW, config=VerifierConfig(hash_workers=1))
    assert report.ok
