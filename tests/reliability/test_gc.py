"""`navcache gc`: unit tests on a hand-made cache (no Prefect), plus the CLI on a real one."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from navcache.descriptors import ScanMemo
from navcache.gc import GcError, collect_garbage, sweep_orphan_temps
from navcache.lock import cache_lock
from navcache_runtime.integrity import write_artifact
from navcache_runtime.layout import MANIFEST_NAME
from tests.support.isolation import REPO

DAY = 86400.0


def _manifest(root: Path, names: list[str]) -> None:
    statement = {"subject": [{"name": n, "digest": {"sha256": "0" * 64}} for n in names], "predicate": {}}
    payload = base64.b64encode(json.dumps(statement).encode()).decode()
    (root / MANIFEST_NAME).write_text(json.dumps({"payloadType": "x", "payload": payload, "signatures": []}))


def _artifact(root: Path, rel: str, size: int, age_days: float) -> Path:
    path = root / rel
    write_artifact(path, b"x" * size)
    stamp = time.time() - age_days * DAY
    for file in (path, path.with_name(path.name + ".sha256")):
        os.utime(file, (stamp, stamp))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    _artifact(root, "engines/a__cpu_fp32.onnx", 1000, 40)  # named, old
    _artifact(root, "engines/old__cpu_fp32.onnx", 1000, 40)  # unnamed, old
    _artifact(root, "engines/new__cpu_fp32.onnx", 1000, 1)  # unnamed, recent
    _artifact(root, "descriptors/k1.desc.npy", 500, 50)  # unnamed, oldest
    _artifact(root, "descriptors/k1.tiles.npy", 100, 50)
    _artifact(root, "index/index-1.faiss", 300, 2)  # named
    (root / "engines" / "inductor-cache").mkdir()
    (root / "engines" / "notes.txt").write_text("not ours")
    _manifest(root, ["engines/a__cpu_fp32.onnx", "engines/a__cpu_fp32.onnx.sha256", "index/index-1.faiss"])
    return root


def _paths(items: list) -> set[str]:  # type: ignore[type-arg]
    return {i.path for i in items}


def test_ttl_removes_only_old_unreferenced_with_sidecars(cache: Path) -> None:
    report = collect_garbage(cache, ttl_days=30)
    assert _paths(report.removed) == {
        "engines/old__cpu_fp32.onnx",
        "descriptors/k1.desc.npy",
        "descriptors/k1.tiles.npy",
    }
    assert not (cache / "engines/old__cpu_fp32.onnx").exists()
    assert not (cache / "engines/old__cpu_fp32.onnx.sha256").exists()
    for kept in ("engines/a__cpu_fp32.onnx", "engines/a__cpu_fp32.onnx.sha256", "engines/new__cpu_fp32.onnx"):
        assert (cache / kept).exists()
    assert (cache / "engines/notes.txt").exists() and (cache / "engines/inductor-cache").is_dir()
    reasons = {i.path: i.reason for i in report.kept}
    assert reasons["engines/a__cpu_fp32.onnx"] == "named by the current manifest"
    assert "within the TTL" in reasons["engines/new__cpu_fp32.onnx"]


def test_size_budget_removes_oldest_unreferenced_first_never_named(cache: Path) -> None:
    report = collect_garbage(cache, ttl_days=None, max_bytes=2600)
    # total ~ 3*1064 + 564 + 164 + 364 bytes; removing the oldest unreferenced (shard pair, then old engine)
    assert "descriptors/k1.desc.npy" in _paths(report.removed)
    assert report.bytes_after <= 2600 or not [i for i in report.kept if "manifest" not in i.reason]
    assert (cache / "engines/a__cpu_fp32.onnx").exists() and (cache / "index/index-1.faiss").exists()
    everything = collect_garbage(cache, ttl_days=None, max_bytes=0)
    assert (cache / "engines/a__cpu_fp32.onnx").exists() and (cache / "index/index-1.faiss").exists()
    assert all("manifest" in i.reason for i in everything.kept)


def test_dry_run_removes_nothing(cache: Path) -> None:
    def files() -> list[Path]:
        return sorted(p for p in cache.rglob("*") if ".navcache.lock" not in p.name)  # gc takes the lock

    before = files()
    report = collect_garbage(cache, ttl_days=0, dry_run=True)
    assert report.removed and files() == before


def test_unreadable_manifest_refuses(cache: Path) -> None:
    (cache / MANIFEST_NAME).write_text("{ torn")
    with pytest.raises(GcError, match="cannot be read"):
        collect_garbage(cache, ttl_days=0)
    assert (cache / "engines/old__cpu_fp32.onnx").exists()


def test_missing_cache_and_bad_arguments(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(GcError, match="no such cache"):
        collect_garbage(tmp_path / "nope")
    with pytest.raises(GcError, match="ttl"):
        collect_garbage(cache, ttl_days=-1)


def test_orphan_temps_of_dead_writers_only(cache: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = cache / "descriptors" / f".navcache-tmp-{dead.stdout.strip()}-abcd-k2.desc.npy"
    live = cache / "descriptors" / f".navcache-tmp-{os.getppid()}-abcd-k3.desc.npy"
    orphan.write_bytes(b"torn")
    live.write_bytes(b"being written")
    removed = sweep_orphan_temps(cache)
    assert _paths(removed) == {orphan.relative_to(cache).as_posix()}
    assert not orphan.exists() and live.exists()


HOLD = """
import sys, time
from pathlib import Path
from navcache.lock import cache_lock
with cache_lock(Path(sys.argv[1]), timeout_s=5):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_gc_waits_for_a_running_provision(cache: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cache), "1.5"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        collect_garbage(cache, ttl_days=30, lock_timeout_s=30)
        assert time.monotonic() - started > 0.5  # it waited for the holder
    finally:
        holder.wait(timeout=30)
    with cache_lock(cache, timeout_s=1):  # and released it
        pass


def test_cli_gc_json(cache: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), NO_COLOR="1")
    proc = subprocess.run(
        [sys.executable, "-m", "navcache", "gc", str(cache), "--ttl-days", "30", "--dry-run", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] and {r["path"] for r in report["removed"]} >= {"engines/old__cpu_fp32.onnx"}
    bad = subprocess.run(
        [sys.executable, "-m", "navcache", "gc", str(cache / "missing")], capture_output=True, text=True, env=env
    )
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_scan_memos_go_with_their_shards(cache: Path) -> None:
    old_key, live_key = "a" * 64, "b" * 64
    _artifact(cache, f"descriptors/{old_key[:32]}.tiles.npy", 100, 50)  # unnamed, old: removed
    _artifact(cache, f"descriptors/{live_key[:32]}.tiles.npy", 100, 1)  # within the TTL: kept
    memos = {name: cache / "descriptors" / f".navcache-scan-{name}" for name in ("old", "live", "dangling")}
    memos["old"].write_bytes(ScanMemo(old_key, ()).to_json())
    memos["live"].write_bytes(ScanMemo(live_key, ()).to_json())
    memos["dangling"].write_text("not json")
    dry = collect_garbage(cache, ttl_days=30, dry_run=True)
    assert {"descriptors/.navcache-scan-old", "descriptors/.navcache-scan-dangling"} <= _paths(dry.removed)
    assert all(m.exists() for m in memos.values())
    report = collect_garbage(cache, ttl_days=30)
    assert "descriptors/.navcache-scan-live" not in _paths(report.removed)
    assert [name for name, m in memos.items() if m.exists()] == ["live"]
