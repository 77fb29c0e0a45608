"""`navcache server start|stop|status`: a local Prefect server that is just there.

``server start`` runs ``prefect server start`` in the background on loopback, with its home (SQLite database,
settings) under the user's data directory (``$XDG_DATA_HOME/navcache/prefect``, else
``~/.local/share/navcache/prefect``; ``NAVCACHE_PREFECT_HOME`` overrides), its output in ``server.log`` there
and its pid and URL in ``server.json``. ``navcache provision`` records its runs there when it is running (it
sets ``PREFECT_API_URL``) and says how to start it when it is not. Nothing here imports Prefect: the first line
of ``provision`` is printed before Prefect is imported.

:func:`running` tells the CLI's ``navcache serve`` (Prefect's ``serve`` for a ground station without a work pool)
where to serve the provision-sortie flow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from .errors import ExitCode

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
START_TIMEOUT_S = 180.0  # a loaded 2-core machine needs minutes for the first start (database migrations)
STOP_TIMEOUT_S = 30.0

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="A local Prefect server (UI and run history) in the background: start, stop, status.",
)


def home() -> Path:
    """The server's PREFECT_HOME: under the user's data directory, never ~/.prefect (the user's own Prefect)."""
    override = os.environ.get("NAVCACHE_PREFECT_HOME")
    if override:
        return Path(override)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "navcache" / "prefect"


def state_path() -> Path:
    return home() / "server.json"


def log_path() -> Path:
    return home() / "server.log"


@dataclass(frozen=True)
class ServerState:
    pid: int
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def _read_state() -> ServerState | None:
    try:
        data = json.loads(state_path().read_text())
        return ServerState(pid=int(data["pid"]), port=int(data["port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not a server.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _healthy(state: ServerState, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{state.api_url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def running() -> ServerState | None:
    """The server started by ``navcache server start``, when its process is alive and its API answers."""
    state = _read_state()
    if state is None or not _alive(state.pid) or not _healthy(state):
        return None
    return state


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _server_env(port: int) -> dict[str, str]:
    # Only this server's settings: the user's PREFECT_* (an API URL, another profile) must not leak into it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {
        "PREFECT_HOME": str(home()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",  # the browser calls it; its default is port 4200
    }


def start_server(port: int | None = None, wait_s: float = START_TIMEOUT_S) -> tuple[ServerState, bool]:
    """Start the background server (or find it running): ``(state, started_now)``. Raises RuntimeError with
    the log's path when it does not answer within ``wait_s``."""
    current = running()
    if current is not None:
        return current, False
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
    elif not _port_free(port):
        raise RuntimeError(f"port {port} on {HOST} is in use (fix: --port another one, or stop what uses it)")
    with log_path().open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
            env=_server_env(port),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: `stop` ends the server and its children together
            cwd=root,
        )
    state = ServerState(pid=process.pid, port=port)
    state_path().write_text(json.dumps({"pid": state.pid, "port": state.port, "started": time.time()}))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            state_path().unlink(missing_ok=True)
            raise RuntimeError(f"prefect server exited with status {process.returncode}; see {log_path()}")
        if _healthy(state, timeout=2.0):
            return state, True
        time.sleep(0.5)
    raise RuntimeError(
        f"prefect server did not answer within {wait_s:.0f} s (still starting? `navcache server status`); "
        f"see {log_path()}"
    )


def stop_server(timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the background server; False when none was running."""
    state = _read_state()
    if state is None or not _alive(state.pid):
        state_path().unlink(missing_ok=True)
        return False
    try:
        os.killpg(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(state.pid):
        time.sleep(0.2)
    if _alive(state.pid):
        try:
            os.killpg(state.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state_path().unlink(missing_ok=True)
    return True


def _say(text: str) -> None:
    # stderr: stdout stays free for --json output of the commands that print it.
    print(text, file=sys.stderr, flush=True)


@app.command("start")
def start(
    port: Annotated[int | None, typer.Option(help=f"port on {HOST} (default {DEFAULT_PORT}, else a free one)")] = None,
    wait: Annotated[float, typer.Option(help="seconds to wait for the server to answer")] = START_TIMEOUT_S,
) -> None:
    """Start the local Prefect server in the background (UI and run history for `navcache provision`)."""
    _say(f"starting prefect server on {HOST} (home {home()}) ...")
    try:
        state, started = start_server(port, wait)
    except RuntimeError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(ExitCode.FAILED) from None
    _say(f"{'started' if started else 'already running'}: {state.url} (pid {state.pid}, log {log_path()})")
    print(state.url)


@app.command("status")
def status() -> None:
    """Whether the local Prefect server runs, and where (exit 0 when it answers, 1 when not)."""
    state = running()
    if state is None:
        stale = _read_state()
        note = f" (pid {stale.pid} in {state_path()} is not answering)" if stale and _alive(stale.pid) else ""
        _say(f"not running{note}; start it with `navcache server start`")
        raise typer.Exit(ExitCode.FAILED)
    _say(f"running: {state.url} (pid {state.pid}, home {home()}, log {log_path()})")
    print(state.url)


@app.command("stop")
def stop() -> None:
    """Stop the local Prefect server (its runs stay in its database for the next start)."""
    _say("stopped" if stop_server() else "not running")


def announce(sortie: Path, *, now: bool = True) -> Callable[[], None]:
    """``provision``'s first line, decided before Prefect is imported: where the run will be recorded. Sets
    ``PREFECT_API_URL`` to the local server when it runs and no API is configured. Printed at once when ``now``
    (an operator's terminal: the first line within a second), else by the function returned, called once the
    input passed preflight (so a refusal stays the one line a script reads)."""
    configured = os.environ.get("PREFECT_API_URL")
    state = None if configured else running()
    if configured:
        line = f"provisioning {sortie}: recording the run at {configured}"
    elif state is not None:
        os.environ["PREFECT_API_URL"] = state.api_url
        line = f"provisioning {sortie}: recording the run on the local server, UI {state.url}/runs"
    else:
        line = (
            f"provisioning {sortie}: ephemeral Prefect API (it takes seconds to start; `navcache server start` "
            "once keeps a UI with every run and starts faster)"
        )
    if now:
        _say(line)
        return lambda: None
    return lambda: _say(line)
