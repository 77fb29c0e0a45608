"""The CLI as the crew runs it, side by side in one run: a warm re-provision of the demo (``navcache provision``,
a fresh process each time, wall clock) on an ephemeral Prefect API (before: what every run paid) and on the
local server from ``navcache server start`` (after), and the first-output latency of each — the time from
starting the command to its first byte on stderr, at a terminal (a pseudo-terminal here) and in a pipe.

The demo's assets are copied from examples/demo/generated when present (else generated), provisioned once
cold through the server; the server gets a throwaway home (``XDG_DATA_HOME`` in the run's temp dir) and is
stopped before the ephemeral runs. ``--quick`` measures the server's side only.
Goal (issue 15): warm re-provision ≤ 3 s with the server running; first line ≤ 1 s in either case."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import print_machine, print_table, write_result

REPO = Path(__file__).resolve().parents[1]
GOAL_WARM_SERVER_S = 3.0
GOAL_FIRST_LINE_S = 1.0
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def _env(data_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(XDG_DATA_HOME=str(data_home), PYTHONUNBUFFERED="1", COLUMNS="160")
    env.pop("NAVCACHE_PREFECT_HOME", None)
    return env


def _timed_cli(args: list[str], env: dict[str, str], tty: bool) -> tuple[float, float, int, float]:
    """(seconds to the first stderr byte, wall seconds, exit status, seconds to the first byte after the
    first line) of ``navcache ARGS``; stderr on a pseudo-terminal when ``tty`` (as an operator sees it), else
    on a pipe. The last figure is when the CLI printed its first output before it had a first line of its
    own: the progress bars, once Prefect is up."""
    command = [sys.executable, "-m", "navcache", *args]
    started = time.perf_counter()
    if tty:
        master, slave = pty.openpty()
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        reader = master
    else:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert process.stderr is not None
        reader = process.stderr.fileno()
    first = second = float("nan")
    seen = b""
    while True:
        ready, _, _ = select.select([reader], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # the pty's other end closed
                chunk = b""
            if chunk and first != first:
                first = time.perf_counter() - started
            if chunk and second != second:
                seen += chunk
                newline = seen.find(b"\n")
                # Visible text after the first line (Rich's cursor codes are not output anyone sees).
                if newline >= 0 and _ANSI.sub(b"", seen[newline + 1 :]).strip():
                    second = time.perf_counter() - started
            if not chunk and process.poll() is not None:
                break
        elif process.poll() is not None:
            break
    status = process.wait()
    wall = time.perf_counter() - started
    if tty:
        os.close(master)
    return first, wall, status, second


def _measure(quick: bool) -> dict[str, Any]:
    """The server's side first (started, then the cold demo through it and the warm runs), then, unless
    ``quick``, the same warm runs on an ephemeral API once the server is stopped. ``quick`` (CI) leaves the
    ephemeral side out: each of its runs starts an API of its own (17 s here), which is what the server is
    for; the full run measures both."""
    repeat = 1 if quick else 5
    kinds = ("server",) if quick else ("server", "ephemeral")
    with tempfile.TemporaryDirectory(prefix="navcache-bench-server-") as tmp:
        root = Path(tmp)
        demo = root / "x" / "demo"  # the demo sortie's cache_dir ../../cache/demo lands in root/cache
        demo.mkdir(parents=True)
        shutil.copy(REPO / "examples" / "demo" / "sortie.toml", demo)
        if (REPO / "examples" / "demo" / "generated").is_dir():
            shutil.copytree(REPO / "examples" / "demo" / "generated", demo / "generated")
        env = _env(root / "data")
        sortie = str(demo / "sortie.toml")

        rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
        pipe_first: dict[str, list[float]] = {k: [] for k in kinds}

        def warm(kind: str) -> None:
            for _ in range(repeat):
                first, wall, code, progress = _timed_cli(["provision", sortie], env, tty=True)
                assert code == 0, f"warm provision ({kind}) exited {code}"
                rows[kind].append((first, wall, progress))
            pipe_first[kind].append(_timed_cli(["provision", sortie], env, tty=False)[0])

        _, server_start_s, code, _ = _timed_cli(["server", "start"], env, tty=False)
        assert code == 0, "navcache server start failed"
        try:
            _, cold_s, status, _ = _timed_cli(["demo", "--dir", str(demo)], env, tty=False)
            assert status == 0, f"the cold demo provision failed (exit {status})"
            warm("server")
        finally:
            _timed_cli(["server", "stop"], env, tty=False)
        if "ephemeral" in kinds:
            warm("ephemeral")
    med = {k: [float(np.median([sample[i] for sample in v])) for i in range(3)] for k, v in rows.items()}
    return {
        "repeat": repeat,
        "cold_demo_s": cold_s,
        "server_start_s": server_start_s,
        **{
            kind: {
                "first_line_tty_s": med[kind][0],
                "warm_wall_s": med[kind][1],
                "progress_tty_s": med[kind][2],
            }
            for kind in kinds
        },
        "first_line_pipe_s": {k: float(np.median(v)) for k, v in pipe_first.items()},
        "samples": {k: [list(s) for s in v] for k, v in rows.items()},
    }


def run(quick: bool) -> Path:
    info = print_machine()
    data = _measure(quick)
    labels = {
        "ephemeral": "warm re-provision, ephemeral API (before)",
        "server": "warm re-provision, local server (after)",
    }
    rows = []
    for kind, label in labels.items():
        if kind not in data:
            rows.append([label, "full run only", "", "", ""])
            continue
        row = data[kind]
        pipe = data["first_line_pipe_s"][kind]
        rows.append([label, row["warm_wall_s"], row["first_line_tty_s"], pipe, row["progress_tty_s"]])
    print_table(
        f"navcache provision of the demo, CLI wall clock (median of {data['repeat']})",
        [
            "run",
            "wall (s)",
            "first line, terminal (s)",
            "first line, pipe (s)",
            "progress bars (s): first output before",
        ],
        rows,
    )
    cold = data["cold_demo_s"]
    print(f"server start {data['server_start_s']:.1f} s (once); cold demo through the server {cold:.1f} s")
    warm_met = data["server"]["warm_wall_s"] <= GOAL_WARM_SERVER_S
    first_met = max(data[k]["first_line_tty_s"] for k in labels if k in data) <= GOAL_FIRST_LINE_S
    print(f"warm with the server ≤ {GOAL_WARM_SERVER_S} s: {'met' if warm_met else 'MISSED'}")
    print(f"first line at a terminal ≤ {GOAL_FIRST_LINE_S} s: {'met' if first_met else 'MISSED'}")
    return write_result("server", {**data, "cores": info["cores"]})
