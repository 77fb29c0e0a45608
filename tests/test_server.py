"""`navcache server start|status|stop`: a real background `prefect server` with its home under the user's data
directory, and what `provision` says about it in its first line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), HOME=str(tmp_path / "home"))
    env.pop("NAVCACHE_PREFECT_HOME", None)
    return env


def navcache(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "navcache", *args],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def test_status_without_a_server_says_how_to_start_one(tmp_path: Path) -> None:
    proc = navcache(tmp_path, "server", "status")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "not running; start it with `navcache server start`" in proc.stderr
    assert not (tmp_path / "data" / "navcache" / "prefect" / "server.json").exists()


def test_the_first_line_names_the_ephemeral_api_when_no_server_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from navcache import server

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("NAVCACHE_PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started = time.perf_counter()
    later = server.announce(Path("s.toml"), now=False)
    assert time.perf_counter() - started < 1.0
    assert capsys.readouterr().err == ""  # deferred: printed after preflight
    later()
    assert "provisioning s.toml: ephemeral Prefect API" in capsys.readouterr().err
    assert "PREFECT_API_URL" not in os.environ
    assert server.home() == tmp_path / "data" / "navcache" / "prefect"


@pytest.mark.slow
def test_start_status_stop_round_trip_and_provision_uses_the_running_server(tmp_path: Path) -> None:
    home = tmp_path / "data" / "navcache" / "prefect"
    started = navcache(tmp_path, "server", "start", "--port", str(_free_port()))
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url.startswith("http://127.0.0.1:")
        assert (home / "server.json").is_file() and (home / "server.log").is_file()
        assert (home / "prefect.db").is_file() or any(home.glob("*.db"))  # its own SQLite, not ~/.prefect
        status = navcache(tmp_path, "server", "status")
        assert status.returncode == 0 and status.stdout.strip() == url, status.stderr
        again = navcache(tmp_path, "server", "start")
        assert again.returncode == 0 and "already running" in again.stderr and again.stdout.strip() == url

        from navcache import server

        os.environ["XDG_DATA_HOME"] = str(tmp_path / "data")
        try:
            saved = os.environ.pop("PREFECT_API_URL", None)
            server.announce(Path("s.toml"))
            assert os.environ["PREFECT_API_URL"] == f"{url}/api"
        finally:
            os.environ.pop("PREFECT_API_URL", None)
            if saved is not None:
                os.environ["PREFECT_API_URL"] = saved
            del os.environ["XDG_DATA_HOME"]
    finally:
        stopped = navcache(tmp_path, "server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    assert not (home / "server.json").exists()
    status = navcache(tmp_path, "server", "status")
    assert status.returncode == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_without_a_server_says_how_to_get_one(tmp_path: Path) -> None:
    proc = navcache(tmp_path, "serve")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no Prefect server to serve to (fix: `navcache server start`, or set PREFECT_API_URL)" in proc.stderr
