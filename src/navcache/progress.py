"""In-process progress reporting: the CLI installs a reporter (rich progress bars); library and tasks call
:func:`advance`. With no reporter installed, calls do nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable

Reporter = Callable[[str, int, int | None], None]  # (stage, advance by, new total or None)

_lock = threading.Lock()
_reporter: Reporter | None = None


def install(reporter: Reporter | None) -> None:
    global _reporter
    with _lock:
        _reporter = reporter


def advance(stage: str, amount: int = 1, total: int | None = None) -> None:
    reporter = _reporter
    if reporter is not None:
        reporter(stage, amount, total)
