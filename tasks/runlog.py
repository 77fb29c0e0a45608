"""What the operator reads in a flow run: navcache's own log lines in the run log, failures as one clear
message, and retries only where trying again can help.

- :func:`install` (called when the Prefect layer is imported) attaches navcache's loggers to the run log
  (Prefect's API log handler, only inside a flow or task run, at INFO) and adds :class:`ReadableFailures` to
  Prefect's run loggers: a navcache error is logged as its message, without the Prefect traceback around it;
  a retry is logged at WARNING with the failing path.
- :func:`clean_failures` wraps the flow function: a navcache error ends the run ``Failed`` with the error's
  own text as the state message (the exception still reaches a direct caller such as the CLI).
- :func:`gate` turns a quality check (coverage, verify) into a red task run with that message.
- :func:`transient_only` is the ``retry_condition_fn`` of every retried task.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.states import Completed, Failed, State

from navcache.errors import NavcacheError
from navcache_runtime import InferenceRuntimeError
from navcache_runtime.errors import OutOfMemoryError

#: The loggers whose records belong in the run log (the library, the runtime, this layer and the flow).
NAVCACHE_LOGGERS = ("navcache", "navcache_runtime", "navcache_tasks", "navcache_flows")
#: Prefect's own run loggers, where the engine reports failures and retries.
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

#: OSErrors that come back the same on every try: the file is not there or may not be read or written.
_DETERMINISTIC_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.ENAMETOOLONG}
)

_REPORTED = "_navcache_reported"  # set on an exception once a task run's log has shown its message


def is_transient(exc: BaseException) -> bool:
    """Whether trying again can help. Deterministic: a navcache error (malformed input, a numerical mismatch
    against the reference, coverage), a runtime error other than out-of-memory, a missing or unreadable file,
    and programming errors (TypeError, ValueError, KeyError, ...). Transient: out of memory, I/O and network
    errors, time-outs, and a build failure the builder marked transient."""
    transient = getattr(exc, "transient", None)
    if isinstance(transient, bool):
        return transient  # BackboneBuildError knows its cause
    if isinstance(exc, (OutOfMemoryError, MemoryError, TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (NavcacheError, InferenceRuntimeError)):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _DETERMINISTIC_ERRNOS
    return False


def transient_only(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """``retry_condition_fn``: retry a failed task run only when its error is transient."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def where(exc: BaseException) -> str:
    """The failing path (or field) of an error, for the retry line."""
    if isinstance(exc, OSError) and exc.filename:
        return str(exc.filename)
    if isinstance(exc, NavcacheError) and exc.where:
        return exc.where
    return ""


class ReadableFailures(logging.Filter):
    """On Prefect's run loggers: a navcache error is logged as its own message (no traceback, no ``repr``);
    a failed gate's state is not repeated (its "Finished in state Failed('…')" line says it); a retry is a
    WARNING that names the failing path."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message.startswith("Task run failed with %s") and len(record.args or ()) == 5:
            _kind, failure, attempt, retries, when = record.args  # type: ignore[misc]
            exc = failure if isinstance(failure, BaseException) else None
            text = str(exc) if exc is not None else getattr(failure, "message", None) or str(failure)
            path = where(exc) if exc is not None else ""
            record.msg = "retry %s/%s (%s) after a transient failure%s: %s"
            record.args = (attempt, retries, when, f" at {path}" if path and path not in text else "", text)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if record.exc_info and exc is None:
            if message.startswith("Task run failed with state:"):
                return False  # a gate returned its Failed state: the engine's "Finished in state" line follows
            record.exc_info = None  # exc_info=True outside an except block: "NoneType: None"
        if isinstance(exc, NavcacheError):
            if message.startswith("Encountered exception during execution") and getattr(exc, _REPORTED, False):
                return False  # a task run's log already says it, once
            if record.name.startswith("prefect.task_runs"):
                setattr(exc, _REPORTED, True)
            record.msg, record.args = str(exc), ()
            record.exc_info, record.exc_text = None, None
        return True


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler for navcache's loggers, only inside a flow or task run (outside one, e.g. the
    CLI's preflight, Prefect would warn that there is no run to log to)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        super().emit(record)


_installed = False


def install() -> None:
    """Idempotent: navcache's loggers into the run log at INFO, readable failures on Prefect's run loggers.
    The loggers are set to INFO so the run log gets its lines whatever the console shows (the CLI's console
    handler has its own level)."""
    global _installed
    if _installed:
        return
    _installed = True
    handler = _RunLogHandler(level=logging.INFO)
    for name in NAVCACHE_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    readable = ReadableFailures()
    for name in PREFECT_RUN_LOGGERS:
        logging.getLogger(name).addFilter(readable)


R = TypeVar("R")


def clean_failures(fn: Callable[..., R]) -> Callable[..., R]:
    """For the flow function: a navcache error ends the run ``Failed`` with the error's own text as the state
    message and no traceback in the run log; logged once (by the task run that raised it, or here). A direct
    caller (the CLI, tests) still gets the exception: Prefect raises a failed state's data."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NavcacheError as exc:
            if not getattr(exc, _REPORTED, False):
                logging.getLogger("navcache_flows").error("%s", exc)
            return Failed(message=str(exc), data=exc)

    return run


def gate(passed: bool, error: Callable[[], NavcacheError], summary: str) -> State[Any]:
    """A quality gate's task body: Completed with ``summary``, or Failed with the error's message (the task
    run turns red with that one line; :func:`raise_if_failed` ends the flow with it)."""
    if passed:
        logging.getLogger("navcache_tasks").info("%s", summary)
        return Completed(message=summary)
    exc = error()
    setattr(exc, _REPORTED, True)  # the task run's "Finished in state Failed(…)" line says it
    return Failed(message=str(exc), data=exc)


def raise_if_failed(state: State[R]) -> R:
    """The value of a gate's state, or its error raised (a navcache error: the flow ends with its message)."""
    return state.result()
