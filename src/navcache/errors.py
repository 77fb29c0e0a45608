"""Errors the ground crew can act on. Each says what is wrong, where, and how to fix it; the CLI prints
them without a traceback and exits non-zero."""

from __future__ import annotations


class NavcacheError(Exception):
    """Base for provisioning errors. ``where`` names the file/field; ``hint`` the fix."""

    exit_code = 2

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

    exit_code = 1


class CoverageError(ProvisionError):
    """Coverage is below the threshold; the previous manifest stays in force."""


class CacheLockedError(ProvisionError):
    """Another run holds the cache lock and did not release it in time."""


class ManifestError(NavcacheError):
    """Signing or key handling failed (unknown key, key not on the allowlist, bad passphrase...)."""
