"""Deploy and scale the Prefect way: descriptor batching on a Dask cluster, and a real `prefect server` with a
process work pool, a deployment from deployments/prefect.yaml, a worker and `prefect deployment run`."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from navcache_runtime import verify_cache
from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def _untimed(value: Any) -> Any:
    """A JSON value without its wall-clock fields (``build_s`` and the like), which no runner can match."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not k.endswith("_s")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def tree_digest(root: Path) -> dict[str, str]:
    """Relative file name → sha256 of its bytes, for every file under root; the index report (JSON, and its
    sidecar which hashes it) is compared without its timings."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(root).as_posix()
        if path.suffix == ".json":
            data = json.dumps(_untimed(json.loads(path.read_text())), sort_keys=True).encode()
        elif path.name.endswith(".json.sha256"):
            data = b"(hash of the report, which carries timings)"
        else:
            data = path.read_bytes()
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


# ---------------------------------------------------------------------------------------------- Dask scale-out


@pytest.mark.usefixtures("prefect_harness")
def test_dask_cluster_produces_byte_identical_shards_and_index(assets: Assets, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    from navcache_flows.provision_sortie import provision_sortie

    first, second = block_tiles()
    area = tiles_polygon(first + second)  # two shards, so the map really spreads over both workers
    local = write_sortie(tmp_path / "local.toml", assets, area=area, cache_dir=tmp_path / "local")
    dask = write_sortie(tmp_path / "dask.toml", assets, area=area, cache_dir=tmp_path / "dask")

    baseline = provision_sortie(str(local))
    # An "existing" cluster: two worker processes, reached only through its scheduler address.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        scaled = provision_sortie(str(dask), dask_address=cluster.scheduler_address)

    assert baseline["shards"]["total"] == scaled["shards"]["total"] == 2
    assert scaled["shards"]["computed"] == 2 and scaled["verified"]
    for sub in ("descriptors", "index"):
        expected = tree_digest(tmp_path / "local" / sub)
        assert expected, f"the default runner wrote nothing under {sub}/"
        assert tree_digest(tmp_path / "dask" / sub) == expected, f"{sub}/ differs between Dask and the default runner"
    assert verify_cache(tmp_path / "dask", assets.trusted_keys, mode="operator").ok


# ------------------------------------------------------------------------------------- real server + deployment

POOL = "navcache"
AIRFRAME = "airframe-a"
SERVER_START_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def server_accepts_null_filters(api: str) -> bool:
    """prefect 3.8.8's clients send ``"limit": null`` in filter bodies; fastapi ≥ 0.151 answers 422 to them, so
    workers, `prefect deploy` and the UI cannot talk to the server (fastapi 0.150 substitutes the default)."""
    import httpx

    response = httpx.post(f"{api}/deployments/filter", json={"limit": None, "sort": None, "offset": 0}, timeout=10)
    return response.status_code == 200


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `prefect server start` on loopback with its own PREFECT_HOME; yields the env for CLI calls."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "NAVCACHE_REPO": str(REPO),  # resolved by the pull step when deploying
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(
                    f"`prefect server start` did not answer within {SERVER_START_S:.0f} s "
                    f"(exit code {server.poll()}); its log: {home / 'server.log'}"
                )
            time.sleep(0.5)
        if not server_accepts_null_filters(api):
            import fastapi

            pytest.skip(
                f"the Prefect server on fastapi {fastapi.__version__} rejects prefect 3.8.8's null filter limits "
                "(422): pin fastapi==0.150.0 (docs/fleet.md)"
            )
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.slow
def test_deploy_worker_and_deployment_run_produce_a_verified_cache(
    prefect_server: dict[str, str], assets: Assets, tmp_path: Path
) -> None:
    env = prefect_server
    prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
    # One compile at a time on this host, as on a companion computer.
    prefect_cli(env, "concurrency-limit", "create", f"navcache-compile:{platform.node()}", "1")
    deployed = prefect_cli(
        env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", timeout=180
    )
    assert f"provision-sortie/{AIRFRAME}" in deployed.stdout

    first, _ = block_tiles()
    cache = tmp_path / "cache"
    sortie = write_sortie(tmp_path / "fleet.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "unused")
    run = prefect_cli(
        env,
        "deployment",
        "run",
        f"provision-sortie/{AIRFRAME}",
        "-p",
        f"sortie={sortie}",
        "-p",
        f"cache_dir={cache}",
    )
    flow_run_id = next(line.split()[-1] for line in run.stdout.splitlines() if "UUID" in line)

    # The airframe's worker picks the run up from its queue, runs it in a subprocess and exits.
    worker = subprocess.run(
        [*PREFECT, "worker", "start", "--pool", POOL, "--work-queue", AIRFRAME, "--run-once"],
        cwd=tmp_path,  # the pull step, not the worker's cwd, must find the code
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    state = flow_run_state(env, flow_run_id)
    assert state == "COMPLETED", (
        f"flow run {flow_run_id} ended {state}:\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
    )
    report = verify_cache(cache, assets.trusted_keys, mode="operator")
    assert report.ok, report.summary()


def flow_run_state(env: dict[str, str], flow_run_id: str) -> str:
    import httpx

    response = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{flow_run_id}", timeout=10)
    response.raise_for_status()
    return str(response.json()["state_type"])
