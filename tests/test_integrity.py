from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from navcache_runtime import EngineHashMismatchError, EngineSidecarMissingError, sha256_file, verify_artifact
from navcache_runtime.integrity import TEMP_PREFIX, read_sidecar, sidecar_path, staged_artifact, write_artifact


def test_write_artifact_writes_bytes_and_a_64_hex_sidecar(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.engine"
    digest = write_artifact(target, b"engine bytes")
    assert target.read_bytes() == b"engine bytes"
    assert sidecar_path(target).read_text() == digest
    assert len(digest) == 64 and digest == sha256_file(target)
    assert verify_artifact(target) == digest
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(TEMP_PREFIX)] == []


def test_a_failed_build_leaves_the_previous_artifact_and_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "a.onnx"
    good = write_artifact(target, b"good")
    with pytest.raises(RuntimeError, match="builder crashed"), staged_artifact(target) as tmp:
        tmp.write_bytes(b"half-writ")
        raise RuntimeError("builder crashed")
    assert target.read_bytes() == b"good"
    assert verify_artifact(target) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.sha256"]


def test_staged_artifact_commits_what_the_builder_wrote(tmp_path: Path) -> None:
    target = tmp_path / "m.pt2"
    with staged_artifact(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("m.pt2")  # same dir, same suffix
        tmp.write_bytes(b"package")
    assert verify_artifact(target) == sha256_file(target)


def test_tampering_one_byte_is_detected(tmp_path: Path) -> None:
    target = tmp_path / "a.engine"
    write_artifact(target, bytes(range(256)) * 64)
    data = bytearray(target.read_bytes())
    data[1000] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(EngineHashMismatchError, match="does not match its sidecar"):
        verify_artifact(target)


def test_missing_and_malformed_sidecars_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "a.engine"
    write_artifact(target, b"x")
    sidecar_path(target).write_text("not-a-digest")
    with pytest.raises(EngineHashMismatchError, match="malformed"):
        read_sidecar(target)
    sidecar_path(target).unlink()
    with pytest.raises(EngineSidecarMissingError, match="no .sha256 sidecar"):
        verify_artifact(target)


def test_hashing_streams_instead_of_reading_the_whole_file(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as handle:
        for _ in range(48):
            handle.write(b"\xab" * (1 << 20))
    tracemalloc.start()
    try:
        sha256_file(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"hashing a 48 MiB file peaked at {peak / 2**20:.1f} MiB"
