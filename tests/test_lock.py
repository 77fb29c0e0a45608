from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from navcache.errors import CacheLockedError
from navcache.lock import HOLDER_NAME, cache_lock
from tests.support.isolation import REPO

HOLD = """
import sys, time
from pathlib import Path
from navcache.lock import cache_lock
with cache_lock(Path(sys.argv[1]), timeout_s=5):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(root: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_waits_then_fails_naming_the_holder(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        started = time.monotonic()
        with (
            pytest.raises(CacheLockedError, match=rf"still locked by pid {proc.pid} on .* after 1 s"),
            cache_lock(tmp_path, timeout_s=1),
        ):
            pass
        assert time.monotonic() - started >= 1
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_never_blocks_the_next_run(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    started = time.monotonic()
    with cache_lock(tmp_path, timeout_s=5):
        assert time.monotonic() - started < 1  # the kernel released the flock with the process
        assert str(os.getpid()) in (tmp_path / HOLDER_NAME).read_text()
    assert not (tmp_path / HOLDER_NAME).exists()


def test_sequential_runs_take_and_release_the_lock_each_time(tmp_path: Path) -> None:
    for _ in range(3):
        with cache_lock(tmp_path, timeout_s=1):
            assert (tmp_path / HOLDER_NAME).is_file()
        assert not (tmp_path / HOLDER_NAME).exists()
