"""Concurrency, tamper and full-disk faults against real provisions (subprocesses, real Prefect server)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from navcache.lock import HOLDER_NAME
from navcache_runtime.integrity import sidecar_path
from navcache_runtime.layout import MANIFEST_NAME
from tests.reliability.conftest import copy_cache
from tests.reliability.harness import Navcache, cache_state, manifest_subjects, verifies
from tests.support.sorties import Assets

# --------------------------------------------------------------------------------------------------------
# Concurrency


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_same_cache_root_is_serialised(
    navcache: Navcache, sorties: dict[str, Path], assets: Assets, tmp_path: Path
) -> None:
    """A holds the lock (and is paused there, so the overlap is certain); B starts, names A as the holder and
    waits; A resumes and finishes; B then runs on A's finished cache: everything reused, manifest v2."""
    cache = tmp_path / "cache"
    args = ("provision", str(sorties["both"]), "--cache-dir", str(cache), "--json")
    first = navcache.start(*args)
    _wait(lambda: (cache / HOLDER_NAME).exists() or first.poll() is not None, 120, "A to take the lock")
    assert first.poll() is None, "A ended before it could be paused"
    os.killpg(first.pid, signal.SIGSTOP)
    second = navcache.start(*args, "--lock-timeout", "300")
    lines: list[str] = []
    assert second.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(second.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        _wait(lambda: any("locked by" in line for line in lines), 120, "B to report the lock holder")
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out_a, err_a = first.communicate(timeout=300)
    out_b = second.stdout.read() if second.stdout else ""
    second.wait(timeout=300)
    reader.join(timeout=10)
    err_b = "".join(lines)
    assert first.returncode == 0, err_a
    assert second.returncode == 0, err_b
    assert f"pid {first.pid}" in err_b, err_b  # the holder is named
    a, b = json.loads(out_a), json.loads(out_b)
    assert (a["manifest_version"], b["manifest_version"]) == (1, 2)
    assert all(e["outcome"] == "BUILT" for e in a["engines"])
    assert all(e["outcome"] == "REUSED" for e in b["engines"]) and b["shards"]["computed"] == 0
    assert verifies(cache, assets.trusted_keys)[0]
    assert not cache_state(cache).temps


@pytest.mark.slow
def test_different_cache_roots_are_independent(
    navcache: Navcache, sorties: dict[str, Path], assets: Assets, tmp_path: Path
) -> None:
    runs = [
        navcache.start("provision", str(sorties["both"]), "--cache-dir", str(tmp_path / name), "--json")
        for name in ("one", "two")
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
        assert "locked by" not in err
        summary = json.loads(out)
        assert summary["manifest_version"] == 1 and all(e["outcome"] == "BUILT" for e in summary["engines"])
    for name in ("one", "two"):
        assert verifies(tmp_path / name, assets.trusted_keys)[0]


# --------------------------------------------------------------------------------------------------------
# Tamper: verify names the damaged artifact; a re-provision rebuilds exactly it.


def _pick(cache: Path, kind: str) -> Path:
    subjects = sorted(manifest_subjects(cache))
    patterns = {
        "engine": lambda s: s.startswith("engines/tiny_vpr") and s.endswith(".onnx"),
        "sidecar": lambda s: s.startswith("engines/local_features") and s.endswith(".sha256"),
        "shard": lambda s: s.startswith("descriptors/") and s.endswith(".desc.npy"),
        "tile-table": lambda s: s.startswith("index/tiles-") and s.endswith(".npy"),
        "index": lambda s: s.startswith("index/") and s.endswith(".faiss"),
    }
    if kind in ("manifest", "signature"):
        return cache / MANIFEST_NAME
    return cache / next(s for s in subjects if patterns[kind](s))


def _damage(path: Path, how: str, kind: str) -> None:
    if kind == "signature":
        envelope = json.loads(path.read_text())
        sig = bytearray(envelope["signatures"][0]["sig"].encode())
        sig[10] = ord("A") if sig[10] != ord("A") else ord("B")
        envelope["signatures"][0]["sig"] = sig.decode()
        path.write_text(json.dumps(envelope, indent=2) + "\n")
        return
    data = path.read_bytes()
    if how == "modify":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x5A]) + data[middle + 1 :])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()


TAMPER = [
    ("engine", "modify"),
    ("engine", "truncate"),
    ("engine", "delete"),
    ("sidecar", "modify"),
    ("sidecar", "delete"),
    ("shard", "modify"),
    ("shard", "truncate"),
    ("shard", "delete"),
    ("tile-table", "modify"),
    ("index", "truncate"),
    ("index", "delete"),
    ("manifest", "modify"),
    ("manifest", "delete"),
    ("signature", "modify"),
]
FAST_TAMPER = {("shard", "truncate")}


@pytest.mark.parametrize(
    ("kind", "how"),
    [pytest.param(k, h, marks=() if (k, h) in FAST_TAMPER else (pytest.mark.slow,), id=f"{k}-{h}") for k, h in TAMPER],
)
def test_tamper_is_named_then_rebuilt(
    kind: str,
    how: str,
    navcache: Navcache,
    sorties: dict[str, Path],
    assets: Assets,
    warm_both: Path,
    tmp_path: Path,
    record: Callable[..., None],
) -> None:
    cache = copy_cache(warm_both, tmp_path / "cache")
    target = _pick(cache, kind)
    rel = target.relative_to(cache).as_posix()
    _damage(target, how, kind)

    refused = navcache.verify_cli(cache, assets.trusted_keys)
    assert refused.returncode != 0 and "VERIFIED" not in refused.stdout.split(":")[0], refused.stdout
    named = target.name
    assert named in refused.stdout + refused.stderr or (
        kind == "signature" and "signature" in refused.stdout.lower()
    ), refused.stdout + refused.stderr

    code, summary, stderr = navcache.provision(sorties["both"], cache)
    if kind == "manifest" and how == "modify":
        # A manifest whose version cannot be read is not silently restarted at v1 (rollback protection).
        assert code != 0 and "error:" in stderr and MANIFEST_NAME in stderr and "Traceback" not in stderr, stderr
        record(suite="tamper", kind=kind, how=how, outcome="refused (clear error)", failures=0)
        return
    assert code == 0 and summary is not None, stderr
    built = {e["backbone"] for e in summary["engines"] if e["outcome"] == "BUILT"}
    expected_built = {"tiny_vpr"} if kind == "engine" else {"local_features"} if kind == "sidecar" else set()
    assert built == expected_built, summary["engines"]
    assert summary["shards"]["computed"] == (1 if kind == "shard" else 0), summary["shards"]
    assert verifies(cache, assets.trusted_keys)[0]
    assert not cache_state(cache).incomplete
    if kind not in ("manifest", "signature"):
        assert rel in manifest_subjects(cache) or sidecar_path(cache / rel).exists()
    record(suite="tamper", kind=kind, how=how, outcome="rebuilt", built=sorted(built), failures=0)


# --------------------------------------------------------------------------------------------------------
# Full disk / I/O errors through the NAVCACHE_FAULT_INJECT seam.

FAULTS = [
    ("enospc", "*.desc.npy", "shard"),
    ("eio", "*.tiles.npy", "shard table"),
    ("enospc", "*.faiss", "index"),
    ("eio", "tiles-*.npy", "tile table"),
    ("enospc", MANIFEST_NAME, "manifest"),
    ("eio", MANIFEST_NAME, "manifest"),
]
FAST_FAULTS = {("enospc", MANIFEST_NAME)}


@pytest.mark.parametrize(
    ("code", "glob", "what"),
    [
        pytest.param(c, g, w, marks=() if (c, g) in FAST_FAULTS else (pytest.mark.slow,), id=f"{c}-{w}")
        for c, g, w in FAULTS
    ],
)
def test_io_error_keeps_the_previous_cache(
    code: str,
    glob: str,
    what: str,
    navcache: Navcache,
    sorties: dict[str, Path],
    assets: Assets,
    warm_small: Path,
    tmp_path: Path,
    record: Callable[..., None],
) -> None:
    """Extending a good cache hits a full/failing disk: the run fails, the previous manifest and everything it
    names are untouched and still verify."""
    cache = copy_cache(warm_small, tmp_path / "cache")
    manifest_before = (cache / MANIFEST_NAME).read_bytes()
    named = {s: (cache / s).read_bytes() for s in manifest_subjects(cache)}
    rc, _summary, stderr = navcache.provision(sorties["both"], cache, NAVCACHE_FAULT_INJECT=f"{code}:{glob}")
    assert rc != 0, stderr
    assert (cache / MANIFEST_NAME).read_bytes() == manifest_before
    assert all((cache / s).read_bytes() == data for s, data in named.items())
    assert verifies(cache, assets.trusted_keys)[0]
    assert not cache_state(cache).temps, "a failed write left its temp file"
    clear = "error:" in stderr and "Traceback" not in stderr
    record(suite="io-error", fault=code, target=what, clear_error=clear, failures=0)
    # After the disk recovers, the same provision completes.
    rc, summary, stderr = navcache.provision(sorties["both"], cache)
    assert rc == 0 and summary is not None and summary["manifest_version"] == 2, stderr


def test_io_error_is_one_clear_line(
    navcache: Navcache, sorties: dict[str, Path], warm_small: Path, tmp_path: Path
) -> None:
    cache = copy_cache(warm_small, tmp_path / "cache")
    rc, _summary, stderr = navcache.provision(sorties["both"], cache, NAVCACHE_FAULT_INJECT="enospc:*.desc.npy")
    assert rc != 0
    assert "error:" in stderr and "No space left" in stderr and "Traceback" not in stderr, stderr
