"""Onboard command line: ``python -m navcache_runtime verify|inspect|selftest`` (also ``navcache-onboard``;
on the ground ``navcache verify|inspect``).

Standard library only (argparse, plain text), so it runs on the drone with just the runtime package.

Exit codes, the same for every command:

- 0: verified (``selftest``: and the signed views found their tiles; ``inspect`` without keys: read);
- 1: refused: the cache was checked and did not verify, or the self-test failed;
- 2: a usage or configuration error on this side, nothing checked: argparse's usage errors, a malformed
  option value (``--now`` not an ISO 8601 time with a zone, a ``--runtime-config`` missing or invalid), a
  cache directory that does not exist, a trusted-keys file or trust root that is missing or invalid. Each
  is one ``error:`` line on stderr, except the trusted keys: those are the report's one failure
  (``trusted_keys_invalid``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import load_runtime_config
from .errors import FailureCode, InferenceRuntimeError, RuntimeConfigError, printable
from .integrity import open_regular
from .layout import ENGINES_DIR, INDEX_DIR, MANIFEST_NAME, SIDECAR_SUFFIX
from .manifest_format import loads_strict
from .naming import parse_engine_name
from .trustroot import default_state_path
from .verify import CacheVerificationError, VerificationReport, verify_cache


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _print_report(report: VerificationReport) -> None:
    """The text report. Every name and message goes through ``printable`` (no control character reaches
    the terminal, so no line can be forged or erased), and the verdict is always the last line."""
    rows = [
        [printable(a.path), "OK" if a.ok else "FAIL", "" if a.ok else printable(f"{a.reason}: {a.message}")]
        for a in report.artifacts
    ]
    if rows:
        print(_table(rows, ["artifact", "status", "reason"]))
        print()
    for failure in report.failures:
        print(f"FAIL  {failure}")
    # Files a failed or older run left are one line, not one warning each (--json lists them all).
    extras = [w for w in report.warnings if w.code == FailureCode.EXTRA_FILE]
    for warning in report.warnings:
        if warning.code != FailureCode.EXTRA_FILE:
            print(f"warn  {warning}")
    if extras:
        named = ", ".join(printable(w.subject) for w in extras[:3]) + (", ..." if len(extras) > 3 else "")
        print(
            f"warn  [{FailureCode.EXTRA_FILE}] {len(extras)} file(s) in the cache are not listed in the manifest "
            f"(left by earlier or failed runs; `navcache gc CACHE` removes them): {named}"
        )
    verdict = "VERIFIED" if report.ok else "REFUSED"
    print(
        f"{verdict}: {printable(report.cache_root)} ({report.mode}) sortie {printable(report.sortie_id)} "
        f"version {report.version}, expires {printable(report.expires)}; {len(report.artifacts)} artifacts, "
        f"{len(report.failures)} failures, "
        f"{report.bytes_hashed / 1e6:.1f} MB hashed in {report.elapsed_s:.2f} s"
    )


def _parse_now(text: str | None) -> datetime | None:
    """``--now`` as an aware datetime; ValueError with the message to print when it is not one."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--now {text!r} is not an ISO 8601 time (e.g. 2026-11-23T08:00:00Z)") from None
    if moment.tzinfo is None:
        raise ValueError("--now needs a time zone (e.g. 2026-11-23T08:00:00Z)")
    return moment


def cmd_verify(args: argparse.Namespace) -> int:
    if not args.cache.is_dir():
        print(f"error: cache directory {printable(args.cache)} does not exist", file=sys.stderr)
        return 2
    try:
        now = _parse_now(args.now)
    except ValueError as exc:  # the message quotes the argument with repr: terminal-safe as it stands
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = verify_cache(
            args.cache,
            args.trusted_keys,
            mode=args.mode,
            now=now,
            state_path=None if args.no_state else (args.state or default_state_path()),
            strict_extra=args.strict_extra or None,
        )
    except InferenceRuntimeError as exc:  # unreadable or invalid trusted-keys file
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    if args.json:
        print(report.to_json())
    else:
        _print_report(report)
    return _exit_code(report)


def _exit_code(report: VerificationReport) -> int:
    if FailureCode.TRUSTED_KEYS_INVALID in report.codes:
        return 2  # a configuration problem on this side, not a verdict on the cache
    return 0 if report.ok else 1


def _read_statement(cache: Path) -> dict[str, Any]:
    with open_regular(cache / MANIFEST_NAME) as handle:  # bounded, and a FIFO or directory here cannot hang it
        raw = handle.read(16 << 20)
    envelope = loads_strict(raw, allow_floats=False)
    return dict(loads_strict(base64.b64decode(envelope["payload"], validate=True)))


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        statement = _read_statement(args.cache)
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        print(f"error: cannot read {printable(args.cache / MANIFEST_NAME)}: {printable(exc)}", file=sys.stderr)
        return 2
    predicate = _dict(statement.get("predicate"))
    status = "UNVERIFIED (give --trusted-keys to verify)"
    code = 0
    if args.trusted_keys is not None:
        report = verify_cache(args.cache, args.trusted_keys, mode="operator")
        status = "VERIFIED" if report.ok else f"REFUSED ({len(report.failures)} failures: run verify for details)"
        code = _exit_code(report)
        if report.statement is not None:  # show what was verified, not a second read of the file
            statement, predicate = report.statement, report.predicate
    # Without --trusted-keys nothing here is verified: every field may have any JSON type, so each is
    # type-checked before use (a malformed manifest is shown as far as it goes, never a traceback).
    predicate = _dict(predicate)
    raw_subjects = statement.get("subject")
    subjects = [
        s["name"]
        for s in (raw_subjects if isinstance(raw_subjects, list) else [])
        if isinstance(s, dict) and isinstance(s.get("name"), str)
    ]
    lengths = _dict(predicate.get("artifacts"))
    sizes: Counter[str] = Counter()
    for name in subjects:
        length = _dict(lengths.get(name)).get("length", 0)
        sizes[name.split("/")[0]] += length if isinstance(length, int) else 0
    coverage = _dict(predicate.get("coverage"))
    percent = coverage.get("percent_x100", 0)
    print(
        # Unverified, signed or not: every value from the manifest is escaped before it reaches the terminal.
        f"cache      {printable(args.cache)}\nmanifest   version {printable(predicate.get('version'))}, "
        f"issued {printable(predicate.get('issued_at'))}, expires {printable(predicate.get('expires'))} — {status}"
    )
    print(
        f"sortie     {printable(predicate.get('sortie_id'))}; "
        f"coverage {(percent if isinstance(percent, int) else 0) / 100:.2f} % "
        f"({printable(coverage.get('covered'))} of {printable(coverage.get('total'))} tiles)"
    )
    print(
        f"artifacts  {len(subjects)}: "
        + ", ".join(f"{printable(k)} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items()))
    )
    engines = []
    for name in subjects:
        if name.startswith(f"{ENGINES_DIR}/") and not name.endswith(SIDECAR_SUFFIX):
            try:
                parsed = parse_engine_name(Path(name).name)
            except InferenceRuntimeError:
                continue
            engines.append(
                [
                    printable(parsed.model),
                    parsed.runtime_label,
                    parsed.precision,
                    printable(", ".join(f"{k}={v}" for k, v in parsed.host.pinned().items())),
                    "yes" if parsed.eager else "",
                ]
            )
    if engines:
        print()
        print(_table(engines, ["engine", "runtime", "precision", "tied to", "eager"]))
    for name in subjects:
        if name.startswith(f"{INDEX_DIR}/") and name.endswith(".json"):
            try:
                with open_regular(args.cache / name) as handle:  # a FIFO or directory here must not hang it
                    report_doc = _dict(json.loads(handle.read(1 << 20)))
            except (OSError, ValueError):
                continue
            print(
                "\nindex      "
                + printable(
                    f"{report_doc.get('index_type')} over {report_doc.get('n')} vectors of dim "
                    f"{report_doc.get('dim')}; recall@1 {report_doc.get('recall_at_1')}, "
                    f"recall@10 {report_doc.get('recall_at_10')}"
                )
            )
    self_test = _dict(predicate.get("self_test"))
    if self_test:
        onboard = _dict(self_test.get("onboard"))
        rates = {k: self_test.get(k) for k in ("recall_at_1_x1000", "recall_at_5_x1000", "near_recall_at_5_x1000")}
        shown = {k: f"{v / 1000:.3f}" if isinstance(v, int) else "?" for k, v in rates.items()}
        print(
            "\nself-test  "
            + printable(
                f"{self_test.get('samples')} views: recall@1 {shown['recall_at_1_x1000']}, "
                f"recall@5 {shown['recall_at_5_x1000']} (within one chunk {shown['near_recall_at_5_x1000']}); "
                f"{self_test.get('finding')}"
            )
        )
        if onboard:
            print(
                "           "
                + printable(
                    f"onboard: {onboard.get('queries')} signed views, at least {onboard.get('min_hits_at_5')} must "
                    f"find their tile (python -m navcache_runtime selftest)"
                )
            )
    return code


def cmd_selftest(args: argparse.Namespace) -> int:
    """Verify, open the cache with this airframe's runtime and run the signed query views through it."""
    from .cache import open_cache  # needs the strategy's library and faiss; verify does not

    if not args.cache.is_dir():
        print(f"error: cache directory {printable(args.cache)} does not exist", file=sys.stderr)
        return 2
    try:
        runtime_config = None if args.runtime_config is None else load_runtime_config(args.runtime_config)
    except RuntimeConfigError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    try:
        with open_cache(
            args.cache,
            args.trusted_keys,
            runtime_config=runtime_config,
            state_path=None if args.no_state else (args.state or default_state_path()),
        ) as cache:
            result = cache.self_test()
    except CacheVerificationError as exc:
        _print_report(exc.report)
        return _exit_code(exc.report)
    except InferenceRuntimeError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "passed": result.passed}, indent=2))
    else:
        print(("PASSED: " if result.passed else "REFUSED: ") + printable(result.summary()))
    return 0 if result.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="navcache", description="Onboard cache verification.")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify a cache before take-off (fail-closed)")
    verify.add_argument("cache", type=Path, help="the cache directory")
    verify.add_argument(
        "--trusted-keys",
        "--trust-root",
        dest="trusted_keys",
        type=Path,
        required=True,
        help="a signed trust root (root-N.json; newer versions shipped in CACHE/trust/ are taken up) or a plain "
        "trusted_keys.json (pinned, no rotation)",
    )
    verify.add_argument(
        "--mode",
        choices=("airborne", "operator"),
        default="airborne",
        help="operator also re-derives the coverage digest from the coverage table",
    )
    verify.add_argument("--now", help="verify as of this time (ISO 8601 with zone); default: now")
    verify.add_argument(
        "--state",
        type=Path,
        help="the device's rollback state (the trust root it holds is kept beside it); default: $NAVCACHE_STATE "
        "or /var/lib/navcache/state.json",
    )
    verify.add_argument(
        "--no-state", action="store_true", help="switch rollback protection off (tests, ground checks; never onboard)"
    )
    verify.add_argument("--strict-extra", action="store_true", help="fail on files the manifest does not list")
    verify.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    verify.set_defaults(handler=cmd_verify)
    inspect = sub.add_parser("inspect", help="show what a cache holds")
    inspect.add_argument("cache", type=Path)
    inspect.add_argument("--trusted-keys", type=Path, help="also verify against these keys")
    inspect.set_defaults(handler=cmd_inspect)
    selftest = sub.add_parser(
        "selftest", help="run the cache's signed query views through this airframe's engine and index"
    )
    selftest.add_argument("cache", type=Path, help="the cache directory")
    selftest.add_argument(
        "--trusted-keys", "--trust-root", dest="trusted_keys", type=Path, required=True, help="as for verify"
    )
    selftest.add_argument("--runtime-config", type=Path, help="the airframe's runtime config (default: the cache's)")
    selftest.add_argument("--state", type=Path, help="as for verify")
    selftest.add_argument("--no-state", action="store_true", help="as for verify")
    selftest.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    selftest.set_defaults(handler=cmd_selftest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


def console_main() -> None:
    sys.exit(main())
