"""`navcache trust …`: create, edit, sign, show and ship the signed trust root (see :mod:`navcache.trustroot`).

Every command works on a *trust directory* holding ``root-1.json``, ``root-2.json``, …. Errors print one
line (what, where, how to fix) and exit 2; never a traceback.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from navcache_runtime.trust import TrustedKeysError, keyid_for

from .errors import ManifestError, NavcacheError
from .keys import Signer, load_public_key, load_signer

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The signed trust root: which operator keys may sign caches (rotation, revocation, recovery).",
)
err = Console(stderr=True)
out = Console()

TrustDir = Annotated[Path, typer.Option("--dir", help="the trust directory (root-N.json files)")]
Role = Annotated[str, typer.Option("--role", help="'operator' (signs caches) or 'root' (signs the trust root)")]
PassphraseEnv = Annotated[str | None, typer.Option(help="read the private key's passphrase from $VAR")]
EXIT_USAGE = 2


def _fail(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def _public(paths: list[Path]) -> list[tuple[object, str]]:
    return [(load_public_key(path), path.stem) for path in paths]


def _signer(spec: str, passphrase_env: str | None, directory: Path) -> Signer:
    """A private key file (prompting for its passphrase on a terminal) or an ``sslib:`` signer URI."""
    from .trustroot import latest_version, root_path

    candidates = []
    version = latest_version(directory)
    for number in (version, version - 1):
        if number >= 1:
            try:
                from navcache_runtime.trustroot import parse_root

                root = parse_root(root_path(directory, number).read_bytes(), source=f"root-{number}.json")
            except (OSError, TrustedKeysError):
                continue
            candidates += [(keyid, root.keys[keyid]) for keyid in root.root.keyids]
    passphrase = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            _fail(f"${passphrase_env} is empty or unset")
        passphrase = (value or "").encode()
    try:
        return load_signer(spec, passphrase, public_keys=candidates)
    except ManifestError as exc:
        if "encrypted but no passphrase" not in str(exc) or not sys.stdin.isatty():
            raise
    value = typer.prompt(f"passphrase for {spec}", hide_input=True)
    return load_signer(spec, value.encode(), public_keys=candidates)


def _run(action: object) -> None:
    try:
        action()  # type: ignore[operator]
    except NavcacheError as exc:
        _fail(str(exc))
    except TrustedKeysError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}")


@app.command()
def init(
    directory: TrustDir,
    root_key: Annotated[list[Path], typer.Option(help="a root key's public key (.pub); repeat for several")],
    operator_key: Annotated[list[Path], typer.Option(help="an operator key's public key (.pub); repeat")],
    root_threshold: Annotated[int, typer.Option(help="root signatures needed for the next version")] = 1,
    operator_threshold: Annotated[int, typer.Option(help="operator signatures needed on a manifest")] = 1,
    expires_days: Annotated[int, typer.Option(help="the trust root expires after this many days")] = 365,
    max_manifest_validity_days: Annotated[int, typer.Option(help="cap on a manifest's validity")] = 30,
    sign_with: Annotated[list[str] | None, typer.Option(help="root private key (or sslib: URI) to sign with")] = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Create root-1.json (and sign it with the root keys given by --sign-with)."""
    from .trustroot import init_root, root_status

    def action() -> None:
        path = init_root(
            directory,
            root_keys=_public(root_key),  # type: ignore[arg-type]
            operator_keys=_public(operator_key),  # type: ignore[arg-type]
            root_threshold=root_threshold,
            operator_threshold=operator_threshold,
            expires=datetime.now(UTC) + timedelta(days=expires_days),
            max_manifest_validity=timedelta(days=max_manifest_validity_days),
        )
        from .trustroot import sign_root

        for spec in sign_with or []:
            sign_root(directory, _signer(spec, passphrase_env, directory))
        status = root_status(directory)
        out.print(Text(f"{path}: version 1 {'complete' if status.complete else 'NOT complete: ' + status.problem}"))

    _run(action)


@app.command("add-key")
def add_key(
    directory: TrustDir,
    key: Annotated[Path, typer.Option("--key", help="the public key (.pub) to add")],
    role: Role = "operator",
    name: Annotated[str | None, typer.Option(help="display name (default: the file stem)")] = None,
) -> None:
    """Write the next trust-root version with this key added to a role (then sign it: `navcache trust sign`)."""
    from .trustroot import edit_root

    def action() -> None:
        path = edit_root(directory, add_keys=[(role, load_public_key(key), name or key.stem)])
        out.print(Text(f"{path}: written unsigned; sign it with a threshold of the previous and the new root keys"))

    _run(action)


@app.command("revoke-key")
def revoke_key(
    directory: TrustDir,
    keyid: Annotated[str, typer.Option("--keyid", help="the keyid (or a unique prefix) to revoke")],
    role: Role = "operator",
) -> None:
    """Write the next version without this key; caches it signed are refused once drones see that version."""
    from .trustroot import edit_root

    def action() -> None:
        path = edit_root(directory, revoke_keyids=[(role, keyid)])
        out.print(Text(f"{path}: written unsigned; sign it, then ship it with the next cache (`navcache trust ship`)"))

    _run(action)


@app.command("set")
def set_policy(
    directory: TrustDir,
    root_threshold: Annotated[int | None, typer.Option(help="root signatures needed")] = None,
    operator_threshold: Annotated[int | None, typer.Option(help="operator signatures needed on a manifest")] = None,
    expires_days: Annotated[int | None, typer.Option(help="the new version expires after this many days")] = None,
    max_manifest_validity_days: Annotated[int | None, typer.Option(help="cap on a manifest's validity")] = None,
    min_manifest_version: Annotated[int | None, typer.Option(help="manifests below this version are refused")] = None,
) -> None:
    """Write the next version with new thresholds, expiry or manifest policy."""
    from .trustroot import edit_root

    thresholds = {
        role: value for role, value in (("root", root_threshold), ("operator", operator_threshold)) if value is not None
    }

    def action() -> None:
        path = edit_root(
            directory,
            thresholds=thresholds,
            expires=datetime.now(UTC) + timedelta(days=expires_days) if expires_days else None,
            max_manifest_validity=timedelta(days=max_manifest_validity_days) if max_manifest_validity_days else None,
            min_manifest_version=min_manifest_version,
        )
        out.print(Text(f"{path}: written unsigned; sign it (`navcache trust sign`)"))

    _run(action)


@app.command()
def sign(
    directory: TrustDir,
    key: Annotated[str, typer.Option("--key", help="a root private key, or sslib:<keyid>:<private key URI>")],
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Add one root key's signature to the newest version."""
    from .trustroot import root_status, sign_root

    def action() -> None:
        signer = _signer(key, passphrase_env, directory)
        path = sign_root(directory, signer)
        status = root_status(directory)
        state = "complete" if status.complete else f"not complete yet: {status.problem}"
        out.print(Text(f"{path}: signed by {keyid_for(signer.public_key())[:12]}…; {state}"))

    _run(action)


@app.command()
def show(
    directory: TrustDir,
    version: Annotated[int | None, typer.Option(help="the version to show (default: the newest)")] = None,
) -> None:
    """Print a version: keys, roles, thresholds, policy, who signed it and whether drones would accept it."""
    from .trustroot import root_status

    def action() -> None:
        status = root_status(directory, version)
        root = status.root
        out.print(
            Text(
                f"trust root v{root.version} ({status.path}): expires {root.expires:%Y-%m-%dT%H:%M:%SZ}; "
                f"manifests valid at most {timedelta(seconds=root.max_manifest_validity_s)}, version >= "
                f"{root.min_manifest_version}; "
                + ("COMPLETE (drones accept it)" if status.complete else f"NOT COMPLETE: {status.problem}")
            )
        )
        table = Table()
        for column in ("keyid", "name", "role", "signed this version"):
            table.add_column(column)
        for keyid in sorted(root.keys):
            roles = [name for name, role in (("root", root.root), ("operator", root.operator)) if keyid in role.keyids]
            table.add_row(keyid, root.names.get(keyid, ""), ", ".join(roles), "yes" if keyid in root.signers else "")
        for keyid in sorted(root.revoked):
            table.add_row(keyid, root.names.get(keyid, ""), "REVOKED", "")
        out.print(table)
        out.print(
            Text(
                f"thresholds: root {root.root.threshold} of {len(root.root.keyids)}, operator "
                f"{root.operator.threshold} of {len(root.operator.keyids)}"
            )
        )

    _run(action)


@app.command()
def ship(
    directory: TrustDir,
    cache: Annotated[Path, typer.Argument(help="the cache directory to ship the trust-root versions with")],
) -> None:
    """Copy every complete version into CACHE/trust/, where drones take up the versions they lack."""
    from .trustroot import ship_roots

    def action() -> None:
        if not cache.is_dir():
            raise ManifestError("cache directory does not exist", where=str(cache))
        shipped = ship_roots(directory, cache)
        out.print(Text(f"shipped {len(shipped)} version(s) into {cache / 'trust'}"))

    _run(action)
