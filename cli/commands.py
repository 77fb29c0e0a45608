"""`navcache`: provision (ground), plan, keygen, verify (delegates to the onboard verifier), inspect, gc, trust,
server and serve.

User mistakes print one clear error (what, where, how to fix) and exit non-zero; never a traceback. Exit
statuses are :class:`navcache.errors.ExitCode` (README's exit-code table). Everything the user reads is printed
literally (``markup=False`` or :class:`rich.text.Text`): sortie text such as ``[tiles]`` or ``[[backbones]][0]``
in a message, a path or a sortie id is never taken for console markup.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from navcache import progress
from navcache.descriptors import bound_malloc_arenas
from navcache.errors import CacheLockedError, ExitCode, NavcacheError, ProvisionError
from navcache.summary import ProvisionSummary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build and check onboard navigation caches for GPS-denied drones.",
)
err = Console(stderr=True)
out = Console()
log = logging.getLogger("navcache")


class _OurRecordsOnly(logging.Filter):
    """The console carries navcache's own records; Prefect's go to its API (the UI) and, for failures, the
    CLI prints one clean error itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("navcache_flows") and record.levelno >= logging.ERROR:
            return False  # the flow's failure line is for the run log; the CLI prints that error once itself
        return record.name.split(".")[0] in ("navcache", "navcache_runtime", "navcache_tasks", "navcache_flows")


class _PreflightOnce(logging.Filter):
    """The CLI validates the input before Prefect starts (:func:`navcache.run_input.check_input`); the flow
    run takes that result and logs its lines again, so its run log has them. The lines the CLI's preflight
    printed are dropped once each when the flow logs them again, so ``-v`` shows them once; anything new (or
    different) is still printed."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self._pending: list[tuple[str, int, str]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if self.recording:
            self._pending.append(key)
        elif key in self._pending:
            self._pending.remove(key)
            return False
        return True


_preflight_once = _PreflightOnce()


def _setup_logging(verbose: bool) -> None:
    # No telemetry from the ephemeral server: these machines are offline and it would log an error.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
    handler.addFilter(_OurRecordsOnly())
    handler.addFilter(_preflight_once)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)  # the console's level; the run log gets INFO
    for name in ("navcache", "navcache_runtime", "navcache_tasks", "navcache_flows"):
        logging.getLogger(name).setLevel(logging.INFO)


def _quiet_prefect_console() -> None:
    """Prefect logs to the console and to its API; keep the API (the UI shows every log) and silence the
    console, where our own progress, warnings and summary speak to the crew. Errors are reported once, by us."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    import prefect.logging.handlers as handlers  # noqa: F401  (configures Prefect logging on import)
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.server", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, (PrefectConsoleHandler, logging.StreamHandler)) and not hasattr(handler, "api"):
                handler.setLevel(logging.CRITICAL + 1)
    for name in ("prefect.server", "uvicorn", "uvicorn.error", "docket", "prefect._internal"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _fail(message: str, code: int) -> None:
    # Literal text (never markup: "[tiles]" must survive) on one line however narrow the terminal.
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run_failed(exc: NavcacheError) -> None:
    """An error raised once the flow has started: exit FAILED whatever its class (a SourceError from a shard
    read comes after writing began, so it is not "refused before anything is written"), LOCKED for the lock
    timeout."""
    if isinstance(exc, CacheLockedError):
        _fail(f"{exc}; nothing was written", ExitCode.LOCKED)
    untouched = "; the run stopped, the previous cache and manifest are untouched"
    _fail(f"{exc}{'' if isinstance(exc, ProvisionError) else untouched}", ExitCode.FAILED)


def _row(table: Table, *cells: str) -> None:
    table.add_row(*(Text(cell) for cell in cells))  # literal: names and paths may hold brackets


def _summary_table(summary: ProvisionSummary) -> Table:
    table = Table(title=Text(f"sortie {summary.sortie_id}: cache {summary.cache_dir}"))
    table.add_column("step")
    table.add_column("result")
    for engine in summary.engines:
        extra = f", max error {engine.max_abs_error:.2g}" if engine.max_abs_error is not None else ""
        _row(
            table,
            f"engine {engine.backbone}",
            f"{engine.outcome} in {engine.seconds:.2f} s{extra}"
            + (f" ({engine.reason})" if engine.outcome == "BUILT" else ""),
        )
    tiles, shards, index, cov = summary.tiles, summary.shards, summary.index, summary.coverage
    _row(table, "tiles", f"{tiles.storage_tiles} storage tiles, {tiles.chunks} retrieval chunks")
    _row(
        table,
        "shards",
        f"{shards.computed} computed, {shards.reused} reused ({shards.inferred_chunks} chunks through the "
        f"engine in {shards.inference_batches} batches)",
    )
    _row(
        table,
        "index",
        f"{index.type}, {index.vectors} vectors, recall@1 {index.recall_at_1:.3f}, recall@10 {index.recall_at_10:.3f}",
    )
    _row(
        table,
        "coverage",
        f"{cov.percent:.2f} % (threshold {cov.threshold} %): {cov.covered} covered, "
        f"{cov.blank} blank, {cov.missing} missing",
    )
    st = summary.self_test
    gate = "report only" if st.min_recall_at_5 is None else f"min {st.min_recall_at_5}"
    _row(
        table,
        "self-test",
        f"{st.samples} views: recall@1 {st.recall_at_1:.3f}, recall@5 {st.recall_at_5:.3f} ({gate}); "
        f"within one chunk {st.near_recall_at_1:.3f} / {st.near_recall_at_5:.3f}; {st.finding}",
    )
    imagery = summary.imagery
    if imagery.upsampling is not None:
        _row(
            table,
            "imagery",
            f"valid over ~{imagery.estimated_coverage_percent:.1f} % of the area; upsampling "
            f"{imagery.upsampling:.2f}x ({imagery.imagery_m_per_px:.3g} m/px imagery, "
            f"{imagery.tile_m_per_px:.3g} m/px tiles)",
        )
    _row(
        table,
        "manifest",
        f"v{summary.manifest_version} {summary.manifest} — {'verified' if summary.verified else 'NOT VERIFIED'}",
    )
    return table


@app.command()
def provision(
    sortie: Annotated[Path, typer.Argument(help="the sortie file (TOML)")],
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="override the sortie's cache_dir")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the summary as JSON on stdout")] = False,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait for another run on the same cache")] = 600.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    dask_address: Annotated[
        str | None, typer.Option("--dask-address", help="describe the shards on this Dask scheduler (tcp://host:8786)")
    ] = None,
) -> None:
    """Run the provision-sortie flow: on the local server when `navcache server start` runs one, else on an
    ephemeral Prefect API (PREFECT_API_URL, when set, wins)."""
    from navcache.server import announce

    # The first line (where the run is recorded) before anything heavy is imported: at once at a terminal,
    # after preflight otherwise (a refusal stays the one line a script reads).
    announced = announce(sortie, now=sys.stderr.isatty())
    _setup_logging(verbose)
    from navcache.run_input import check_input
    from navcache_runtime import InferenceRuntimeError

    _preflight_once.recording = True
    try:  # bad input fails here, in a second, before Prefect starts or anything is written
        check_input(sortie, cache_dir)
    except NavcacheError as exc:
        _fail(str(exc), ExitCode.REFUSED)
    finally:
        _preflight_once.recording = False
    announced()
    _quiet_prefect_console()

    bars = Progress(
        TextColumn("{task.description:>12}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=json_output,
    )
    ids: dict[str, Any] = {}

    def report(stage: str, amount: int, total: int | None) -> None:
        if stage not in ids:
            ids[stage] = bars.add_task(stage, total=total)
        if total is not None:
            bars.update(ids[stage], total=total)
        bars.advance(ids[stage], amount)

    progress.install(report)
    try:
        from navcache_flows.provision_sortie import provision_sortie

        with bars:
            document = provision_sortie(str(sortie), str(cache_dir) if cache_dir else None, lock_timeout, dask_address)
    except NavcacheError as exc:
        _run_failed(exc)
    except InferenceRuntimeError as exc:
        _fail(str(exc), ExitCode.FAILED)
    except RuntimeError as exc:  # Prefect's "Timed out while attempting to connect to ephemeral Prefect API"
        if "Prefect API" not in str(exc):
            raise
        _fail(
            f"{exc} (fix: run again on a less busy machine, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "
            "or point PREFECT_API_URL at a running server); the previous cache and manifest are untouched",
            ExitCode.FAILED,
        )
    except OSError as exc:  # full disk, I/O error: every write is atomic, so nothing old was touched
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(
            f"{where}{exc.strerror or exc}; the previous cache and manifest are untouched "
            "(fix: free space or check the disk, then provision again)",
            ExitCode.FAILED,
        )
    finally:
        progress.install(None)
    summary = ProvisionSummary.from_dict(document)
    if json_output:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        out.print(_summary_table(summary))
    raise typer.Exit(ExitCode.OK if summary.verified else ExitCode.FAILED)


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="the demo folder")] = Path("examples/demo"),
    json_output: Annotated[bool, typer.Option("--json")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate the demo's orthophoto, models and operator key (first run only), then provision it."""
    _setup_logging(verbose)
    from navcache.demo import ensure_demo_assets
    from navcache.keys import generate_keypair

    err.print(f"preparing demo assets in {directory / 'generated'} (first run: about a minute)", markup=False)

    def make_keys(keys: Path) -> None:
        generate_keypair(keys, name="operator")

    ensure_demo_assets(directory, make_keys=make_keys)
    provision(directory / "sortie.toml", cache_dir=None, json_output=json_output, lock_timeout=600.0, verbose=verbose)


@app.command()
def keygen(
    directory: Annotated[Path, typer.Option("--dir", help="where to write the key pair")] = Path("keys"),
    name: Annotated[str, typer.Option(help="key name (file stem)")] = "operator",
    passphrase_env: Annotated[str | None, typer.Option(help="encrypt the private key with $VAR's value")] = None,
    no_passphrase: Annotated[
        bool, typer.Option("--no-passphrase", help="leave the private key unencrypted (CI, the demo)")
    ] = False,
) -> None:
    """Write an Ed25519 key pair (private key mode 0600, passphrase-encrypted PKCS#8 unless --no-passphrase)
    and add it to trusted_keys.json. The passphrase comes from --passphrase-env or a prompt on a terminal."""
    _setup_logging(False)
    from navcache.keys import generate_keypair

    passphrase = None
    if passphrase_env and no_passphrase:
        _fail("--passphrase-env and --no-passphrase contradict each other; give one", ExitCode.REFUSED)
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            _fail(f"${passphrase_env} is empty or unset", ExitCode.REFUSED)
        passphrase = value.encode() if value else None
    elif not no_passphrase:
        if not sys.stdin.isatty():
            _fail(
                "the private key is encrypted with a passphrase by default, and there is no terminal to ask for one "
                "(fix: --passphrase-env VAR, or --no-passphrase for CI and tests)",
                ExitCode.REFUSED,
            )
        value = typer.prompt("passphrase for the private key", hide_input=True, confirmation_prompt=True)
        if not value:
            _fail("empty passphrase (fix: type one, or use --no-passphrase)", ExitCode.REFUSED)
        passphrase = value.encode()
    try:
        paths = generate_keypair(directory, name=name, passphrase=passphrase)
    except NavcacheError as exc:
        _fail(str(exc), exc.exit_code)
    out.print(
        f"private key {paths.private_key}\npublic key  {paths.public_key}\ntrusted     {paths.trusted_keys}"
        f"\nkeyid       {paths.keyid}",
        markup=False,
        highlight=False,
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,  # --help goes to the onboard verifier's parser, which knows the real options
)
def verify(ctx: typer.Context) -> None:
    """Verify a cache with the onboard verifier (exit 0 verified, 1 refused, 2 usage; see --help)."""
    from navcache_runtime.cli import main as runtime_main

    args = list(ctx.args)
    if not any(arg in ("--state", "--no-state") or arg.startswith("--state=") for arg in args):
        args.append("--no-state")  # a ground check: the rollback state lives on the drone (on there by default)
    try:
        code = runtime_main(["verify", *args])
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed); or a message
        if isinstance(exc.code, str):
            _fail(exc.code.removeprefix("error: "), ExitCode.REFUSED)
        code = int(exc.code or 0)
    raise typer.Exit(code)


@app.command()
def inspect(
    cache: Annotated[Path, typer.Argument(help="the cache directory")],
    trusted_keys: Annotated[Path | None, typer.Option("--trusted-keys", help="also verify against these")] = None,
) -> None:
    """Show what a cache holds: sortie, manifest version and expiry, engines, index, coverage."""
    from navcache_runtime.cli import main as runtime_main

    raise typer.Exit(
        runtime_main(["inspect", str(cache), *(["--trusted-keys", str(trusted_keys)] if trusted_keys else [])])
    )


@app.command()
def gc(
    cache: Annotated[Path, typer.Argument(help="the cache directory")],
    ttl_days: Annotated[float, typer.Option(help="remove unreferenced artifacts older than this")] = 30.0,
    max_bytes: Annotated[
        int | None, typer.Option(help="also remove unreferenced ones, oldest first, down to this")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what would go; remove nothing")] = False,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait for a running provision")] = 600.0,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Remove engines, shards, indexes and coverage files the current manifest does not name (by TTL/size)."""
    _setup_logging(verbose)
    from navcache.gc import collect_garbage

    try:
        report = collect_garbage(
            cache, ttl_days=ttl_days, max_bytes=max_bytes, dry_run=dry_run, lock_timeout_s=lock_timeout
        )
    except NavcacheError as exc:
        _fail(str(exc), exc.exit_code)  # gc: the lock timeout is LOCKED, anything else refused before removing
    if json_output:
        print(json.dumps(report.as_dict(), indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    table = Table(
        title=Text(f"gc {cache}: {verb} {len(report.removed)}, kept {len(report.kept)}, {report.freed} bytes freed")
    )
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("age (days)", justify="right")
    table.add_column("action")
    table.add_column("why")
    for action, items in ((verb, report.removed), ("kept", report.kept)):
        for item in items:
            _row(table, item.path, str(item.size), f"{item.age_days:.1f}", action, item.reason)
    out.print(table)


@app.command()
def plan(
    sortie: Annotated[Path, typer.Argument(help="the sortie file (TOML)")],
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="override the sortie's cache_dir")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the plan as JSON on stdout")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Show what `provision` would do (tiles, chunks, shards, imagery coverage and upsampling, cache size,
    engines reused or built) without writing anything or starting Prefect. Exit 2 when provision would refuse."""
    _setup_logging(verbose)
    from navcache.plan import plan_sortie

    try:
        result = plan_sortie(sortie, cache_dir)
    except NavcacheError as exc:
        _fail(str(exc), exc.exit_code)
    if json_output:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        imagery, size = result.imagery, result.size
        table = Table(title=Text(f"plan for sortie {result.sortie_id}: cache {result.cache_dir}"))
        table.add_column("item")
        table.add_column("plan")
        _row(table, "tiles", f"{result.storage_tiles:,} storage tiles at zoom {result.zoom}, {result.chunks:,} chunks")
        _row(table, "shards", f"{result.shards:,}")
        _row(table, "imagery", imagery.source)
        _row(
            table,
            "coverage",
            f"valid imagery over about {result.estimated_coverage_percent:.1f} % of the area "
            f"(estimated from {imagery.samples:,} points)",
        )
        if imagery.upsampling is None:
            _row(table, "upsampling", f"unknown (tiles {imagery.tile_m_per_px:.3g} m/px)")
        else:
            _row(
                table,
                "upsampling",
                f"{imagery.upsampling:.3g}x (imagery {imagery.imagery_m_per_px:.3g} m/px, "
                f"tiles {imagery.tile_m_per_px:.3g} m/px)",
            )
        for engine in result.engines:
            _row(table, f"engine {engine.backbone}", f"{engine.action.upper()} ({engine.reason})")
        _row(
            table,
            "cache size",
            f"about {size.total / 2**20:.1f} MiB (engines {size.engines / 2**20:.1f}, descriptors "
            f"{size.descriptors / 2**20:.1f}, index {size.index / 2**20:.1f})",
        )
        out.print(table)  # warnings (upsampling) were logged to stderr by the preflight it ran
    if result.refusal is not None:
        _fail(f"provision would refuse this sortie: {result.refusal}", ExitCode.REFUSED)


def serve(
    name: Annotated[str, typer.Option(help="the deployment's name")] = "ground-station",
    limit: Annotated[int, typer.Option(help="sorties provisioned at the same time")] = 1,
) -> None:
    """Serve provision-sortie for a ground station without a work pool: this process polls for runs of the
    deployment `provision-sortie/NAME` and runs them (start them from the UI or `prefect deployment run`)."""
    from navcache.server import running

    state = running()
    if not os.environ.get("PREFECT_API_URL"):
        if state is None:
            _say("error: no Prefect server to serve to (fix: `navcache server start`, or set PREFECT_API_URL)")
            raise typer.Exit(ExitCode.REFUSED)
        os.environ["PREFECT_API_URL"] = state.api_url
    _say(f"serving provision-sortie/{name} to {os.environ['PREFECT_API_URL']} (Ctrl-C stops)")
    from navcache_flows.provision_sortie import provision_sortie

    provision_sortie.serve(name=name, limit=limit, tags=["navcache", "serve"], print_starting_message=True)


def _say(text: str) -> None:
    # stderr, unstyled: stdout stays free for --json output of the commands that print it.
    print(text, file=sys.stderr, flush=True)


from navcache.server import app as server_app  # noqa: E402  (the `navcache server …` commands)
from navcache.trust_cli import app as trust_app  # noqa: E402  (the `navcache trust …` commands)

app.add_typer(trust_app, name="trust")
app.add_typer(server_app, name="server")
app.command("serve")(serve)


def main() -> None:
    bound_malloc_arenas()  # first, before any thread (Prefect's, the progress bars') makes its own arena
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; the previous cache is untouched", markup=False, highlight=False)
        sys.exit(ExitCode.INTERRUPTED)
