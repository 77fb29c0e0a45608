"""Shared benchmark plumbing: machine description, timing statistics, result files."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"
LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "faiss-cpu", "prefect")

# What `bench all` would otherwise set up again for every benchmark: the test suite's generated assets and a
# temporary Prefect API, each made by the first benchmark that asks and kept until the process exits.
_process_scope = contextlib.ExitStack()
atexit.register(_process_scope.close)
_assets: Any = None
_api_url: str | None = None


def bench_assets(root: Path) -> Any:
    """The test suite's assets (``tests.support.sorties.make_assets``: the demo orthophoto, both demo models,
    a key pair) copied into ``root``, so a benchmark may change them; generated once per process (17 s on 2
    cores) rather than once per benchmark of ``bench all``."""
    global _assets
    from tests.support.sorties import make_assets

    if _assets is None:
        keep = Path(_process_scope.enter_context(tempfile.TemporaryDirectory(prefix="navcache-bench-assets-")))
        _assets = make_assets(keep / "assets")
    shutil.copytree(_assets.root, root)
    moved = {
        f.name: root / value.relative_to(_assets.root)
        for f in dataclasses.fields(_assets)
        if isinstance(value := getattr(_assets, f.name), Path)
    }
    return dataclasses.replace(_assets, **moved)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """A temporary Prefect API (``prefect_test_harness``) for flow runs in this process and the child processes
    it starts; yields its URL. Started by the first benchmark that asks (25 s on 2 cores: a fresh database)
    and kept until the process exits, so ``bench all`` pays for it once; no figure includes its start."""
    global _api_url
    if _api_url is None:
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; it only logs errors
        _process_scope.enter_context(prefect_test_harness(server_startup_timeout=180))
        _api_url = str(PREFECT_API_URL.value())
    yield _api_url


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu, "python": platform.python_version(), "versions": versions}


@dataclass(frozen=True)
class Stats:
    n: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        ms = sorted(s * 1000 for s in seconds)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        return cls(len(ms), statistics.fmean(ms), statistics.median(ms), p99, ms[0])


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Stats, Any]:
    samples, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - started)
    return Stats.of(samples), result


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "at": stamp, "machine": machine(), **payload}, indent=2) + "\n")
    return path


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row))
    Console(width=180).print(table)


def print_machine() -> dict[str, Any]:
    """Print (and return) the machine line every benchmark starts with: noisy shared hosts need it."""
    info = machine()
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"machine: {info['cores']} cores, {info['cpu']}, gpu {info['gpu']}, python {info['python']}; {versions}")
    return info


def sha256_files(paths: list[Path], chunk_size: int = 1 << 20) -> int:
    """Bare baseline: hashlib sha256 of each file, one pass, one thread, reused buffer. Returns bytes read."""
    import hashlib

    total = 0
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                digest.update(view[:n])
                total += n
    return total


def write_random_file(path: Path, size: int, seed: int = 0, block: int = 8 << 20) -> Path:
    """``size`` pseudo-random bytes (incompressible, so no filesystem shortcut flatters a reader)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        left = size
        while left > 0:
            n = min(block, left)
            handle.write(rng.bytes(n))
            left -= n
    return path


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else float("nan")


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, Stats]:
    """Time several callables round-robin, so a neighbour's load spike hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: Stats.of(s) for name, s in samples.items()}
