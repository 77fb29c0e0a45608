"""Reliability suite fixtures: one real `prefect server` per session, real sortie inputs, baseline caches."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import Navcache
from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie

SERVER_START_TIMEOUT_S = 120.0
#: Set NAVCACHE_RELIABILITY_LOG=path to append every scenario's outcome (JSON lines) for docs/reliability.md.
RECORD_ENV = "NAVCACHE_RELIABILITY_LOG"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1:<free port> with its own PREFECT_HOME, started once per session
    (the ephemeral server would cost ~10 s per provision) and stopped at the end."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                pytest.skip(f"prefect server did not start on port {port} (rc {server.poll()}): {tail}")
            time.sleep(0.25)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)


@pytest.fixture(scope="session")
def navcache(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Navcache:
    return Navcache(prefect_api, tmp_path_factory.mktemp("prefect-client-home"))


@pytest.fixture(scope="session")
def sorties(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ "small": one shard block (4 tiles); "both": that block and its neighbour (2 shards). Each run passes
    its own --cache-dir."""
    directory = tmp_path_factory.mktemp("sorties")
    first, second = block_tiles()
    placeholder = directory / "unused-cache"
    return {
        "small": write_sortie(directory / "small.toml", assets, area=tiles_polygon(first), cache_dir=placeholder),
        "both": write_sortie(
            directory / "both.toml", assets, area=tiles_polygon(first + second), cache_dir=placeholder
        ),
    }


@pytest.fixture(scope="session")
def warm_small(navcache: Navcache, sorties: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good cache of the "small" sortie (manifest v1), provisioned once; tests copy it."""
    cache = tmp_path_factory.mktemp("warm-small") / "cache"
    code, summary, stderr = navcache.provision(sorties["small"], cache)
    assert code == 0 and summary is not None, stderr
    return cache


@pytest.fixture(scope="session")
def warm_both(navcache: Navcache, sorties: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("warm-both") / "cache"
    code, summary, stderr = navcache.provision(sorties["both"], cache)
    assert code == 0 and summary is not None, stderr
    return cache


def copy_cache(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture
def record() -> Iterator[object]:
    path = os.environ.get(RECORD_ENV)

    def write(**row: object) -> None:
        if path:
            from tests.reliability.harness import write_record

            write_record(Path(path), row)

    yield write
