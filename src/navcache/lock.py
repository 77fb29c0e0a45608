"""One writer per cache root. ``filelock`` uses an OS lock (flock), which the kernel releases when the
holder dies, so a killed run never blocks the next one; a small holder file says who holds it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import CacheLockedError

log = logging.getLogger(__name__)

LOCK_NAME = ".navcache.lock"
HOLDER_NAME = ".navcache.lock.holder"


def _holder(cache_root: Path) -> str:
    try:
        info = json.loads((cache_root / HOLDER_NAME).read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "another navcache run"


@contextlib.contextmanager
def cache_lock(cache_root: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """Hold the cache root's lock; wait up to ``timeout_s`` (logging who holds it), then fail clearly."""
    cache_root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache_root / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("cache %s is locked by %s; waiting up to %.0f s", cache_root, _holder(cache_root), timeout_s)
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise CacheLockedError(
                f"cache {cache_root} is still locked by {_holder(cache_root)} after {timeout_s:.0f} s",
                where=str(cache_root),
                hint="wait for that run to finish, or provision into another --cache-dir",
            ) from None
    try:
        holder = {
            "pid": os.getpid(),
            "host": platform.node(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (cache_root / HOLDER_NAME).write_text(json.dumps(holder))
        yield
    finally:
        with contextlib.suppress(OSError):
            (cache_root / HOLDER_NAME).unlink()
        lock.release()
