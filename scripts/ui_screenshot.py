"""Screenshot the Prefect UI of a real provision-sortie run (docs/ui-*.png), in headless Chromium.

Starts `prefect server start` on a free loopback port with a throwaway PREFECT_HOME, provisions a tiny sortie
(the test suite's synthetic orthophoto and models) against it, with one descriptor shard made to fail once so
the UI shows a retried task, then one sortie whose coverage is below its threshold, and loads the flow run
pages, their logs and the artifacts: docs/ui-flow-run.png, docs/ui-run-log.png, docs/ui-failure.png,
docs/ui-failure-log.png, docs/ui-artifact-engines.png, docs/ui-artifact-coverage.png,
docs/ui-artifact-manifest.png.

    python scripts/ui_screenshot.py [--out docs] [--keep-server]

Needs Debian's chromium (`apt-get install -y chromium`); CI machines start without it, so this is a
documented script rather than a default test. About 2.5 minutes on 2 cores. prefect 3.8.8's UI and clients
need fastapi 0.150 (see docs/fleet.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SERVER_START_S = 90.0
LOG_HEIGHT_PX = 4200  # the flow-run page grows with its log: tall enough for the whole of a run's log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("chromium not found: install it with `apt-get install -y chromium`")


def start_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The UI's JS calls this URL from the browser; its default is port 4200.
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    sys.exit(f"prefect server did not start within {SERVER_START_S:.0f} s; see {home / 'server.log'}")


def fail_first_shard_once() -> None:
    """Test hook, this script only: the first shard raises once, so describe-shard's retry shows in the UI."""
    import navcache_tasks.descriptors as descriptors

    real = descriptors.describe_job_shard
    failed: list[bool] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise OSError("simulated transient read error (ui_screenshot.py's flaky-once hook)")
        return real(*args, **kwargs)

    descriptors.describe_job_shard = flaky


def provision(work: Path) -> tuple[str, str]:
    """Run a two-shard sortie against the server (one shard fails once and is retried), then one whose coverage
    is below its threshold; returns the two flow run ids (completed, failed)."""
    sys.path.insert(0, str(REPO))  # tests.support builds the synthetic assets
    from navcache_flows.provision_sortie import provision_sortie
    from tests.support.sorties import block_tiles, make_assets, tiles_polygon, write_sortie

    assets = make_assets(work / "assets")
    first, second = block_tiles()
    sortie = write_sortie(work / "ui-demo.toml", assets, area=tiles_polygon(first + second), cache_dir=work / "cache")
    fail_first_shard_once()
    state = provision_sortie(str(sortie), return_state=True)
    if not state.is_completed():
        sys.exit(f"the flow run ended {state.type.value}: {state.message}")
    # One tile 20 km east, outside the orthophoto: 8 of 9 tiles covered, below a 92 % threshold.
    far = [type(t)(t.z, t.x + 100, t.y) for t in first[:1]]
    area = tiles_polygon(first + second + far)
    short = write_sortie(work / "ui-short.toml", assets, area=area, cache_dir=work / "cache", threshold=92.0)
    failed = provision_sortie(str(short), return_state=True)
    if not failed.is_failed():
        sys.exit(f"the coverage failure run ended {failed.type.value}, not Failed")
    return str(state.state_details.flow_run_id), str(failed.state_details.flow_run_id)


def screenshot(chromium: str, url: str, out: Path, profile: Path, budget_ms: int = 20000, height: int = 1200) -> None:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",  # the UI is a JS app: let it fetch and render first
        "--run-all-compositor-stages-before-draw",
        f"--window-size=1600,{height}",
        f"--screenshot={out}",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"chromium failed ({done.returncode}) on {url}:\n{done.stderr[-2000:]}")
    print(f"{out} ← {url}")


def artifact_for(ui: str, flow_run_id: str, kind: str) -> str:
    """The id of the flow run's artifact whose key starts with ``kind`` (see navcache_tasks.reporting)."""
    import httpx

    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 50, "offset": 0}
    response = httpx.post(f"{ui}/api/artifacts/filter", json=body, timeout=10)
    response.raise_for_status()
    for artifact in response.json():
        if (artifact.get("key") or "").startswith(kind):
            return str(artifact["id"])
    sys.exit(f"no {kind!r} artifact on flow run {flow_run_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for ui-*.png (default: docs/)")
    parser.add_argument("--keep-server", action="store_true", help="leave the server running to look around")
    args = parser.parse_args()
    chromium = find_chromium()

    work = Path(tempfile.mkdtemp(prefix="navcache-ui-"))
    home = work / "prefect-home"
    home.mkdir()
    port = free_port()
    server = start_server(home, port)
    try:
        # The flow runs in this process against the server (set before Prefect reads its settings).
        os.environ |= {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        }
        flow_run_id, failed_id = provision(work)
        ui = f"http://127.0.0.1:{port}"
        args.out.mkdir(parents=True, exist_ok=True)
        chrome = work / "chrome"
        screenshot(chromium, f"{ui}/runs/flow-run/{flow_run_id}", args.out / "ui-flow-run.png", chrome)
        # The run log, whole (a tall window): navcache's own lines, the retried shard at WARNING.
        log_shot = args.out / "ui-run-log.png"
        screenshot(chromium, f"{ui}/runs/flow-run/{flow_run_id}?tab=Logs", log_shot, chrome, height=LOG_HEIGHT_PX)
        # The failure: the red coverage-gate task run, the state message, and its one-line log.
        screenshot(chromium, f"{ui}/runs/flow-run/{failed_id}", args.out / "ui-failure.png", chrome)
        failure_log = args.out / "ui-failure-log.png"
        screenshot(chromium, f"{ui}/runs/flow-run/{failed_id}?tab=Logs", failure_log, chrome, height=LOG_HEIGHT_PX)
        # The keyed artifacts (engine table, coverage report with its map, manifest) each have a page of their own.
        for kind in ("engines", "coverage", "manifest"):
            artifact_id = artifact_for(ui, flow_run_id, kind)
            shot = args.out / f"ui-artifact-{kind}.png"
            screenshot(chromium, f"{ui}/artifacts/artifact/{artifact_id}", shot, work / "chrome")
        if args.keep_server:
            print(f"server at {ui} (PREFECT_HOME={home}); Ctrl-C to stop")
            server.wait()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        if not args.keep_server:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
