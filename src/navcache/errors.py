"""Errors the ground crew can act on. Each says what is wrong, where, and how to fix it; the CLI prints
them without a traceback and exits with a code from :class:`ExitCode`."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """What every ``navcache`` command's exit status means; README's exit-code table lists the same rows
    (a test holds them together). Scripts can rely on these: 2 and 3 guarantee nothing was written."""

    OK = 0
    #: provision: the run started (Prefect, lock, writes) and then failed, whatever the error's kind; nothing
    #: was signed, the previous manifest and every file it names are intact. verify/inspect: the cache was
    #: checked and REFUSED.
    FAILED = 1
    #: bad input or usage (sortie file, models, imagery, keys, options): refused before Prefect starts or
    #: anything is written. verify: the cache directory or trusted-keys file is missing or invalid.
    REFUSED = 2
    #: another run held the cache lock past --lock-timeout (provision, gc); nothing was written.
    LOCKED = 3
    #: interrupted (Ctrl-C); atomic writes leave the previous cache intact.
    INTERRUPTED = 130


class NavcacheError(Exception):
    """Base for provisioning errors. ``where`` names the file/field; ``hint`` the fix."""

    #: the exit status when this error refuses input *before* a run starts; once the flow has started, any
    #: error exits ExitCode.FAILED (or LOCKED), whatever its class (the CLI decides, see ExitCode).
    exit_code: int = ExitCode.REFUSED

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" (fix: {self.hint})"
        return text


class SortieError(NavcacheError):
    """The sortie file or something it points to is invalid (bad TOML, unknown field, bad area...)."""


class SourceError(NavcacheError):
    """The orthophoto source cannot be read or does not cover the area."""


class TileBudgetError(SortieError):
    """The area needs more tiles than the configured budget allows."""


class ProvisionError(NavcacheError):
    """A provisioning step failed; the previous good cache is untouched."""

    exit_code = ExitCode.FAILED


class CoverageError(ProvisionError):
    """Coverage is below the threshold; the previous manifest stays in force."""


class SelfTestError(ProvisionError):
    """The self-test's recall is below the sortie's min_recall_at_5; the previous manifest stays in force."""


class CacheLockedError(ProvisionError):
    """Another run holds the cache lock and did not release it in time."""

    exit_code = ExitCode.LOCKED


class ManifestError(NavcacheError):
    """Signing or key handling failed (unknown key, key not on the allowlist, bad passphrase...)."""


def type_phrase(value: Any) -> str:
    """How an error names the TOML/JSON type of a bad value: "an integer", "a string", "an array"..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def short_repr(value: Any, limit: int = 60) -> str:
    """A bad value as an error quotes it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
