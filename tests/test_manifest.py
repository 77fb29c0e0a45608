"""Building and signing the manifest (ground side), and the third-party openssl recipe."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from navcache.errors import ManifestError
from navcache.keys import KeyPaths, generate_keypair, load_private_key
from navcache.manifest import (
    MANIFEST_NAME,
    build_statement,
    canonical_payload,
    make_envelope,
    next_version,
    sign_manifest,
)
from navcache_runtime.coverage import coverage_digest
from navcache_runtime.errors import FailureCode
from navcache_runtime.integrity import TEMP_PREFIX
from navcache_runtime.verify import verify_cache

REPO = Path(__file__).resolve().parents[1]
ISSUED = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
EXPIRES = ISSUED + timedelta(days=2)
NOW = ISSUED + timedelta(hours=1)
TAKEOFF = (47.3977419, 8.5455938)  # (lat, lon)
# [lon, lat] positions (GeoJSON order): a square around the takeoff point with a hole to its north-east.
AREA = {
    "type": "Polygon",
    "coordinates": [
        [[8.50, 47.37], [8.60, 47.37], [8.60, 47.42], [8.50, 47.42], [8.50, 47.37]],
        [[8.56, 47.40], [8.58, 47.40], [8.58, 47.41], [8.56, 47.41], [8.56, 47.40]],
    ],
}
HOST = {"arch": "aarch64", "gpu": "Orin", "sm": "87", "jetpack": "6.2", "trt": "10.3"}
CODES = {"0": "covered", "1": "missing", "2": "blank"}


@dataclass
class Cache:
    """A small signed cache: artifacts, keys, allowlist and the statement that was signed."""

    root: Path
    keys: KeyPaths
    statement: dict[str, Any]
    artifacts: dict[str, bytes]

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def trusted(self) -> Path:
        return self.keys.trusted_keys

    def private_key(self) -> Ed25519PrivateKey:
        return load_private_key(self.keys.private_key)

    def verify(self, **kwargs: Any) -> Any:
        kwargs.setdefault("now", NOW)
        return verify_cache(self.root, self.trusted, **kwargs)

    def resign(self, statement_or_payload: dict[str, Any] | bytes, keys: list[Ed25519PrivateKey] | None = None) -> None:
        """Install a new envelope directly (no checks): the attacker-who-stole-nothing or a buggy signer."""
        payload = (
            statement_or_payload if isinstance(statement_or_payload, bytes) else rfc8785.dumps(statement_or_payload)
        )
        self.manifest.write_bytes(make_envelope(payload, keys or [self.private_key()]))

    def envelope(self) -> dict[str, Any]:
        return json.loads(self.manifest.read_bytes())

    def write_envelope(self, envelope: dict[str, Any]) -> None:
        self.manifest.write_text(json.dumps(envelope))


def coverage_table(tiles: list[list[int]]) -> tuple[bytes, dict[str, Any]]:
    statuses = [((z, x, y), CODES[str(code)]) for z, x, y, code in tiles]
    table = json.dumps({"tiles": tiles, "codes": CODES}).encode()
    covered = sum(1 for _, status in statuses if status == "covered")
    return table, {"digest": coverage_digest(statuses), "total": len(tiles), "covered": covered}


def make_cache(
    tmp: Path,
    *,
    version: int = 1,
    sign: bool = True,
    keys: KeyPaths | None = None,
    extra_artifacts: dict[str, bytes] | None = None,
) -> Cache:
    root = tmp / "cache"
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(version)
    tiles = [[17, 68000 + i, 45000 + j, 0 if (i + j) % 5 else 1] for i in range(4) for j in range(4)]
    table, coverage = coverage_table(tiles)
    artifacts = {
        "engines/vpr__sm87_jp6.2_trt10.3_fp16.engine": rng.randbytes(5000),
        "index/tiles.faiss": rng.randbytes(3000),
        "tiles/17/68000/45000.webp": rng.randbytes(700),
        "tiles/17/68001/45000.webp": rng.randbytes(700),  # same length as the one above (swap attack)
        "coverage.json": table,
        **(extra_artifacts or {}),
    }
    for name, data in artifacts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    # An engine sidecar: not listed, and not reported as an extra file either.
    engine = root / "engines/vpr__sm87_jp6.2_trt10.3_fp16.engine"
    engine.with_name(engine.name + ".sha256").write_text(hashlib.sha256(engine.read_bytes()).hexdigest())
    keys = keys or generate_keypair(tmp / "keys")
    statement = build_statement(
        root,
        sorted(artifacts),
        sortie_id="SORTIE-0042",
        takeoff=TAKEOFF,
        area_geojson=AREA,
        host=HOST,
        coverage={**coverage, "path": "coverage.json"},
        version=version,
        issued_at=ISSUED,
        expires=EXPIRES,
        tool_version="navcache 0.1.0",
    )
    cache = Cache(root, keys, statement, artifacts)
    if sign:
        sign_manifest(root, statement, signing_key=keys.private_key, trusted_keys=keys.trusted_keys)
    return cache


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return make_cache(tmp_path)


# --------------------------------------------------------------------------------------------------------
# build_statement


def test_statement_is_an_in_toto_statement_with_integer_predicate(cache: Cache) -> None:
    st = cache.statement
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://navcache.dev/manifest/v1"
    names = [s["name"] for s in st["subject"]]
    assert names == sorted(cache.artifacts)
    for subject in st["subject"]:
        data = cache.artifacts[subject["name"]]
        assert subject["digest"] == {"sha256": hashlib.sha256(data).hexdigest()}
        assert st["predicate"]["artifacts"][subject["name"]] == {"length": len(data)}
    p = st["predicate"]
    assert p["takeoff"] == {"lat_e7": 473977419, "lon_e7": 85455938}
    assert p["area"]["type"] == "Polygon"
    assert p["area"]["coordinates"][0][0] == [85000000, 473700000]  # [lon_e7, lat_e7]
    assert p["issued_at"] == "2026-11-23T12:00:00Z" and p["expires"] == "2026-11-25T12:00:00Z"
    assert p["coverage"]["path"] == "coverage.json"
    assert p["coverage"]["percent_x100"] == p["coverage"]["covered"] * 10_000 // p["coverage"]["total"]
    assert p["version"] == 1 and p["host"] == HOST and p["sortie_id"] == "SORTIE-0042"

    def walk(value: Any) -> None:
        assert not isinstance(value, float)
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(st)


def test_payload_is_rfc8785_canonical_and_envelope_carries_the_keyid(cache: Cache) -> None:
    envelope = cache.envelope()
    assert set(envelope) == {"payload", "payloadType", "signatures"}
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    payload = base64.b64decode(envelope["payload"])
    assert payload == rfc8785.dumps(json.loads(payload)) == canonical_payload(cache.statement)
    assert envelope["signatures"][0]["keyid"] == cache.keys.keyid


def test_microseconds_are_truncated_and_naive_datetimes_refused(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, sign=False)
    kwargs = _statement_kwargs(cache)
    st = build_statement(
        cache.root, sorted(cache.artifacts), **{**kwargs, "issued_at": ISSUED.replace(microsecond=999)}
    )
    assert st["predicate"]["issued_at"] == "2026-11-23T12:00:00Z"
    with pytest.raises(ManifestError, match="timezone-aware"):
        build_statement(cache.root, sorted(cache.artifacts), **{**kwargs, "expires": datetime(2027, 1, 1)})
    with pytest.raises(ManifestError, match="later than issued_at"):
        build_statement(cache.root, sorted(cache.artifacts), **{**kwargs, "expires": ISSUED})


def _statement_kwargs(cache: Cache) -> dict[str, Any]:
    p = cache.statement["predicate"]
    return {
        "sortie_id": p["sortie_id"],
        "takeoff": TAKEOFF,
        "area_geojson": AREA,
        "host": HOST,
        "coverage": {k: v for k, v in p["coverage"].items() if k != "percent_x100"},
        "version": 1,
        "issued_at": ISSUED,
        "expires": EXPIRES,
        "tool_version": "navcache 0.1.0",
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("host", {"arch": "aarch64", "free_gb": 12.5}, r"float 12\.5 .*host\.free_gb|host must map strings"),
        ("coverage", "PERCENT", r"float 97\.5 in signed data"),
        ("version", 1.0, "version must be an integer"),
        ("takeoff", (float("nan"), 8.5), "not finite"),
        ("takeoff", (8.5455938, 47.3977419), "outside the area"),  # (lon, lat) swapped by mistake
        ("area_geojson", {"type": "Feature", "geometry": AREA}, "Polygon or MultiPolygon"),
        ("area_geojson", {"type": "Polygon", "coordinates": [[[8.5, 47.3, 400.0]]]}, "no altitude"),
    ],
)
def test_build_refuses_floats_and_bad_fields_with_a_clear_error(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    cache = make_cache(tmp_path, sign=False)
    kwargs = _statement_kwargs(cache)
    if value == "PERCENT":
        value = {**kwargs["coverage"], "percent_x100": 97.5}
    kwargs[field] = value
    with pytest.raises(ManifestError, match=message):
        build_statement(cache.root, sorted(cache.artifacts), **kwargs)


def test_percent_x100_may_be_rounded_either_way(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, sign=False)
    kwargs = _statement_kwargs(cache)
    cov = {**kwargs["coverage"], "total": 3, "covered": 2}  # 6666.67
    for percent in (6666, 6667):
        st = build_statement(
            cache.root, sorted(cache.artifacts), **{**kwargs, "coverage": {**cov, "percent_x100": percent}}
        )
        assert st["predicate"]["coverage"]["percent_x100"] == percent
    with pytest.raises(ManifestError, match="between 6666 and 6667"):
        build_statement(cache.root, sorted(cache.artifacts), **{**kwargs, "coverage": {**cov, "percent_x100": 6668}})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "absolute"),
        ("../outside.bin", r"'\.\.'"),
        ("tiles\\17\\x.webp", "backslash"),
        ("tiles//17", "empty or '.'"),
        ("index/tiles.faiss", "listed twice"),
        ("link.bin", "symlink"),
        ("linkdir/45000.webp", "symlink"),
        ("tiles", "not a regular file"),
        ("nothing-here.bin", "missing"),
    ],
)
def test_build_refuses_unsafe_artifact_paths(tmp_path: Path, path: str, message: str) -> None:
    cache = make_cache(tmp_path, sign=False)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    (cache.root / "link.bin").symlink_to(outside)
    (cache.root / "linkdir").symlink_to(cache.root / "tiles/17/68000")
    with pytest.raises(ManifestError, match=message):
        build_statement(cache.root, [*sorted(cache.artifacts), path], **_statement_kwargs(cache))


# --------------------------------------------------------------------------------------------------------
# sign_manifest and next_version


def test_signed_manifest_verifies_in_both_modes(cache: Cache) -> None:
    for mode in ("airborne", "operator"):
        report = cache.verify(mode=mode)
        assert report.ok, report.summary()
        assert report.version == 1 and report.verified_keyids == [cache.keys.keyid]
    assert not [p for p in cache.root.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_signing_with_a_key_not_on_the_allowlist_is_refused_and_keeps_the_previous_manifest(
    cache: Cache, tmp_path: Path
) -> None:
    before = cache.manifest.read_bytes()
    rogue = generate_keypair(tmp_path / "rogue", name="rogue")  # has its own allowlist, not the operator's
    statement = {**cache.statement, "predicate": {**cache.statement["predicate"], "version": 2}}
    with pytest.raises(ManifestError, match="not on the operator allowlist"):
        sign_manifest(cache.root, statement, signing_key=rogue.private_key, trusted_keys=cache.trusted)
    assert cache.manifest.read_bytes() == before
    assert not [p for p in cache.root.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_candidate_that_does_not_verify_is_discarded_and_the_previous_manifest_kept(cache: Cache) -> None:
    before = cache.manifest.read_bytes()
    statement = {**cache.statement, "predicate": {**cache.statement["predicate"], "version": 2}}
    (cache.root / "index/tiles.faiss").write_bytes(b"changed after the statement was built")
    with pytest.raises(ManifestError, match="artifact_length_mismatch.*previous one is kept|previous one is kept"):
        sign_manifest(cache.root, statement, signing_key=cache.keys.private_key, trusted_keys=cache.trusted)
    assert cache.manifest.read_bytes() == before
    assert not [p for p in cache.root.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_sign_refuses_a_version_that_does_not_go_forward(cache: Cache) -> None:
    with pytest.raises(ManifestError, match="not above the existing manifest's version 1"):
        sign_manifest(cache.root, cache.statement, signing_key=cache.keys.private_key, trusted_keys=cache.trusted)


def test_a_threshold_above_one_needs_more_signatures(cache: Cache, tmp_path: Path) -> None:
    second = generate_keypair(cache.keys.private_key.parent, name="second")
    doc = json.loads(cache.trusted.read_text())
    doc["threshold"] = 2
    cache.trusted.write_text(json.dumps(doc))
    statement = {**cache.statement, "predicate": {**cache.statement["predicate"], "version": 2}}
    with pytest.raises(ManifestError, match="threshold_not_met") as info:
        sign_manifest(cache.root, statement, signing_key=cache.keys.private_key, trusted_keys=cache.trusted)
    assert "2 signatures" in str(info.value)
    cache.resign(statement, [cache.private_key(), load_private_key(second.private_key)])
    assert cache.verify().ok


def test_next_version_counts_up_and_never_goes_backwards(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, sign=False)
    assert next_version(cache.root) == 1
    sign_manifest(cache.root, cache.statement, signing_key=cache.keys.private_key, trusted_keys=cache.trusted)
    assert next_version(cache.root) == 2
    # An existing manifest that no longer verifies (here: signed by a key nobody trusts) still counts.
    statement = {**cache.statement, "predicate": {**cache.statement["predicate"], "version": 7}}
    cache.resign(statement, [Ed25519PrivateKey.generate()])
    assert not cache.verify().ok
    assert next_version(cache.root) == 8
    cache.manifest.write_text("{ not json")
    with pytest.raises(ManifestError, match="cannot read the version"):
        next_version(cache.root)


def test_encrypted_signing_key(tmp_path: Path) -> None:
    keys = generate_keypair(tmp_path / "keys", passphrase=b"correct horse")
    cache = make_cache(tmp_path, sign=False, keys=keys)
    with pytest.raises(ManifestError, match="encrypted"):
        sign_manifest(cache.root, cache.statement, signing_key=keys.private_key, trusted_keys=keys.trusted_keys)
    sign_manifest(
        cache.root,
        cache.statement,
        signing_key=keys.private_key,
        trusted_keys=keys.trusted_keys,
        passphrase=b"correct horse",
    )
    assert cache.verify().ok


# --------------------------------------------------------------------------------------------------------
# The third-party recipe in docs/verify-with-openssl.md, run exactly as written


def _recipe() -> str:
    text = (REPO / "docs/verify-with-openssl.md").read_text()
    match = re.search(r"<!-- recipe:.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert match, "the recipe block is missing from docs/verify-with-openssl.md"
    return match.group(1)


def _run_recipe(cache: Cache) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CACHE": str(cache.root), "PUB": str(cache.keys.public_key)}
    return subprocess.run(["bash", "-c", _recipe()], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_openssl_recipe_verifies_a_signed_manifest(cache: Cache) -> None:
    proc = _run_recipe(cache)
    assert proc.returncode == 0, proc.stderr
    assert "Signature Verified Successfully" in proc.stdout
    for name in cache.artifacts:
        assert f"{name}: OK" in proc.stdout


def test_openssl_recipe_refuses_a_tampered_payload(cache: Cache) -> None:
    envelope = cache.envelope()
    payload = base64.b64decode(envelope["payload"]).replace(b"SORTIE-0042", b"SORTIE-0043")
    envelope["payload"] = base64.b64encode(payload).decode()
    cache.write_envelope(envelope)
    proc = _run_recipe(cache)
    assert proc.returncode != 0
    assert "Signature Verified Successfully" not in proc.stdout
    assert "Signature Verification Failure" in proc.stdout + proc.stderr


def test_openssl_recipe_catches_a_tampered_artifact(cache: Cache) -> None:
    path = cache.root / "index/tiles.faiss"
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    proc = _run_recipe(cache)
    assert proc.returncode != 0
    assert "Signature Verified Successfully" in proc.stdout
    assert "index/tiles.faiss: FAILED" in proc.stdout


def test_our_verifier_agrees_with_the_recipe_on_the_tampered_payload(cache: Cache) -> None:
    envelope = cache.envelope()
    payload = base64.b64decode(envelope["payload"]).replace(b"SORTIE-0042", b"SORTIE-0043")
    envelope["payload"] = base64.b64encode(payload).decode()
    cache.write_envelope(envelope)
    assert cache.verify().codes == {FailureCode.SIGNATURE_INVALID, FailureCode.THRESHOLD_NOT_MET}
