"""A provision run's input, read and validated once per run.

The run's preflight (:func:`navcache.preflight.run_preflight`: the sortie file, its models, keys, cache
directory and imagery) happens once, wherever the run starts:

* ``navcache provision`` calls :func:`check_input` before Prefect starts (bad input is refused there, exit
  2, with nothing written); the result is kept in this process for the flow run that follows;
* the flow's run name (:func:`run_name`, the sortie id) and its body (:func:`take_input`) use what was kept;
  when nothing was (a deployment, a direct call), the run-name step validates and keeps it, and the body
  takes it. A refusal found there is kept too, so the body raises that error without validating again.

What is kept is taken by the body: each run validates afresh. Kept results are keyed by the sortie path
and cache-directory override as given, and by the sortie file's size and modification time, so an edited
file is never served from a stale result. When the CLI validated, the body logs the report's lines again
(the survey line and any warnings), so the flow run's log has them either way, once.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .errors import NavcacheError
from .preflight import PreflightReport, run_preflight

log = logging.getLogger("navcache.preflight")

_Key = tuple[str, str | None, tuple[int, int] | None]
# The report (and whether the run must log its lines again: checked outside the run) or the refusal.
_kept: dict[_Key, tuple[PreflightReport, bool] | NavcacheError] = {}
_lock = threading.Lock()


def _key(sortie_path: Path, cache_dir: Path | None) -> _Key:
    try:
        stat = os.stat(sortie_path)
        version: tuple[int, int] | None = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        version = None
    return (str(sortie_path), None if cache_dir is None else str(cache_dir), version)


def check_input(sortie_path: Path, cache_dir: Path | None = None, *, relog: bool = True) -> PreflightReport:
    """Validate the run's input (raising the refusal) and keep the report for the run that follows (which
    logs its lines again when ``relog``: the check ran outside the run's log)."""
    report = run_preflight(sortie_path, cache_dir)
    with _lock:
        _kept[_key(sortie_path, cache_dir)] = (report, relog)
    return report


def run_name(sortie_path: Path, cache_dir: Path | None = None) -> str:
    """The flow run's name: the sortie id, validating the input if nothing was kept for it (the file's
    stem when it is refused; the run's body then raises the refusal)."""
    with _lock:
        kept = _kept.get(_key(sortie_path, cache_dir))
    if isinstance(kept, NavcacheError):
        return sortie_path.stem
    if kept is not None:
        return kept[0].sortie.sortie_id
    try:  # inside the flow run: its lines are in the run log already
        return check_input(sortie_path, cache_dir, relog=False).sortie.sortie_id
    except NavcacheError as exc:
        with _lock:
            _kept[_key(sortie_path, cache_dir)] = exc  # the body raises it, without validating again
        return sortie_path.stem


def take_input(sortie_path: Path, cache_dir: Path | None = None) -> PreflightReport:
    """The kept report for this run (taken: a later run validates afresh), or the input validated now."""
    with _lock:
        kept = _kept.pop(_key(sortie_path, cache_dir), None)
    if kept is None:
        return run_preflight(sortie_path, cache_dir)
    if isinstance(kept, NavcacheError):
        raise kept
    report, relog = kept
    if relog:
        log.info("%s", report.imagery.line())
        for warning in report.warnings:
            log.warning("%s", warning)
    return report
