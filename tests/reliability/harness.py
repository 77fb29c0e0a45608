"""Run `navcache provision` as the crew do (a subprocess against a Prefect server), break it, check the cache.

A kill is a SIGKILL of the run's whole process group — what a power cut or the OOM killer does: no
``finally``, no ``atexit``. The moment is chosen by watching the cache directory for the first file of a
stage (or a seeded delay), plus a seeded jitter of a few milliseconds.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navcache_runtime.integrity import SCAN_MEMO_PREFIX, SIDECAR_SUFFIX, TEMP_PREFIX, verify_artifact
from navcache_runtime.layout import MANIFEST_NAME
from navcache_runtime.verify import verify_cache
from tests.support.isolation import REPO

ARTIFACT_DIRS = ("engines", "descriptors", "index", "coverage")


@dataclass(frozen=True)
class Trigger:
    """When to kill: the first file under the cache matching one of ``patterns`` (relative POSIX globs), or,
    with no patterns, ``delay_s`` after start; then ``jitter_ms`` more."""

    name: str
    patterns: tuple[str, ...] = ()
    delay_s: float = 0.0
    jitter_ms: float = 0.0


STAGES: dict[str, tuple[str, ...]] = {
    "compile": ("engines/*",),
    "engine-temp": (f"engines/{TEMP_PREFIX}*",),
    "engine-sidecar": (f"engines/*{SIDECAR_SUFFIX}",),
    "shard": ("descriptors/*",),
    "shard-temp": (f"descriptors/{TEMP_PREFIX}*",),
    "shard-table": ("descriptors/*.tiles.npy*",),
    "index": ("index/*",),
    "index-temp": (f"index/{TEMP_PREFIX}*",),
    "coverage": ("coverage/*",),
    "manifest-temp": (f"{TEMP_PREFIX}*{MANIFEST_NAME}",),
}


def seeded_trigger(stage: str, seed: int, max_jitter_ms: float = 40.0) -> Trigger:
    rng = random.Random(f"{stage}-{seed}")
    if stage == "delay":
        return Trigger(f"delay-{seed}", delay_s=rng.uniform(0.5, 5.0))
    return Trigger(f"{stage}-{seed}", STAGES[stage], jitter_ms=rng.uniform(0.0, max_jitter_ms))


@dataclass
class KillResult:
    trigger: Trigger
    landed: bool  # the run was still going when it was killed
    matched: str | None  # the file that fired the trigger
    seconds: float
    pid: int
    returncode: int | None


@dataclass
class CacheState:
    """What is on disk: complete (sidecar-verified) artifacts, incomplete ones, and temp files."""

    complete: set[str] = field(default_factory=set)
    incomplete: set[str] = field(default_factory=set)
    temps: set[str] = field(default_factory=set)

    def complete_in(self, dirname: str, suffix: str = "") -> set[str]:
        return {p for p in self.complete if p.startswith(dirname + "/") and p.endswith(suffix)}


def cache_state(root: Path) -> CacheState:
    state = CacheState()
    for path in iter_files(root):
        rel = path.relative_to(root).as_posix()
        if path.name.startswith(TEMP_PREFIX):
            state.temps.add(rel)
        elif path.name.startswith(SCAN_MEMO_PREFIX):
            continue  # ground-side scan memo, written atomically; not an artifact
        elif rel.split("/")[0] in ARTIFACT_DIRS and not path.name.endswith(SIDECAR_SUFFIX):
            try:
                verify_artifact(path)
                state.complete.add(rel)
            except Exception:  # missing/bad sidecar or torn file: that is what we are counting
                state.incomplete.add(rel)
    return state


def iter_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            yield Path(dirpath) / name


def manifest_subjects(root: Path) -> set[str]:
    import base64

    envelope = json.loads((root / MANIFEST_NAME).read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    return {s["name"] for s in statement["subject"]}


def verifies(root: Path, trusted: Path) -> tuple[bool, str]:
    report = verify_cache(root, trusted, mode="operator")
    return report.ok, "; ".join(str(f) for f in report.failures)


class Navcache:
    """Runs the CLI in subprocesses bound to one Prefect API (``PREFECT_API_URL``) and client home."""

    def __init__(self, api_url: str, home: Path) -> None:
        self.api_url = api_url
        self.home = home

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(
            os.environ,
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            NO_COLOR="1",
            COLUMNS="200",
            PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]),
        )
        env.pop("NAVCACHE_FAULT_INJECT", None)
        env.update(extra)
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "navcache", *args]

    def run(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, env=self.env(**env), timeout=timeout, check=False
        )

    def start(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(**env),
            start_new_session=True,  # its own process group: the kill takes everything it started
        )

    def provision(self, sortie: Path, cache: Path, *extra: str, **env: str) -> tuple[int, dict[str, Any] | None, str]:
        proc = self.run("provision", str(sortie), "--cache-dir", str(cache), "--json", *extra, **env)
        summary = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None
        return proc.returncode, summary, proc.stderr

    def verify_cli(self, cache: Path, trusted: Path) -> subprocess.CompletedProcess[str]:
        return self.run("verify", str(cache), "--trusted-keys", str(trusted))

    def provision_and_kill(self, sortie: Path, cache: Path, trigger: Trigger, timeout: float = 120) -> KillResult:
        proc = self.start("provision", str(sortie), "--cache-dir", str(cache), "--json")
        drain = [threading.Thread(target=s.read, daemon=True) for s in (proc.stdout, proc.stderr) if s is not None]
        for thread in drain:  # never let a full pipe stall the child
            thread.start()
        started = time.monotonic()
        matched = _wait_for(proc, cache, trigger, started, timeout)
        if matched is not None and trigger.jitter_ms:
            time.sleep(trigger.jitter_ms / 1000)
        landed = proc.poll() is None
        if landed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return KillResult(trigger, landed, matched, time.monotonic() - started, proc.pid, proc.returncode)


def _wait_for(proc: subprocess.Popen[str], cache: Path, trigger: Trigger, started: float, timeout: float) -> str | None:
    if not trigger.patterns:
        deadline = started + trigger.delay_s
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        return f"after {trigger.delay_s:.2f} s"
    dirs = sorted({(cache / p).parent for p in trigger.patterns})

    def listing() -> set[str]:
        found = set()
        for directory in dirs:
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            found |= {(directory / name).relative_to(cache).as_posix() for name in names}
        return found

    existing = listing()  # files of an earlier good cache do not mark this run's stage
    while proc.poll() is None and time.monotonic() - started < timeout:
        for rel in listing() - existing:
            if any(fnmatch.fnmatch(rel, p) for p in trigger.patterns):
                return rel
        time.sleep(0.0005)
    return None


def write_record(path: Path, row: dict[str, Any]) -> None:
    """Append one outcome to the run log the docs table is made from (one JSON object per line)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
