"""`navcache gc`: remove cache artifacts the current manifest does not name, by age (TTL) and size budget.

What is considered: regular files directly in the artifact folders (``engines/``, ``descriptors/``,
``index/``, ``coverage/``, ``selftest/``) with a known artifact suffix (both from
:data:`navcache_runtime.layout.ARTIFACT_SUFFIXES`), each together with its ``.sha256`` sidecar (a sidecar whose artifact
is gone is its own unit), plus orphaned ``.navcache-tmp-*`` files anywhere under the cache whose writer is dead,
scan-memo entries (``descriptors/.navcache-scan-*``) whose shard is gone, self-test memos
(``selftest/.navcache-scan-selftest-*``) whose onboard query set is gone, and per-view self-test memos
(``selftest/.navcache-scan-selftest-views-*``) that no remaining self-test memo names.
What is never removed: anything the current manifest names (artifact or sidecar), the manifest, lock files,
sub-directories (compile caches) and files gc does not recognise. gc holds the cache lock while it works,
so it waits for a running provision and a provision waits for it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navcache_runtime.layout import (
    ARTIFACT_SUFFIXES,
    DESCRIPTORS_DIR,
    MANIFEST_NAME,
    SCAN_MEMO_PREFIX,
    SELFTEST_DIR,
    SELFTEST_MEMO_PREFIX,
    SIDECAR_SUFFIX,
    TEMP_PREFIX,
)

from .errors import NavcacheError
from .lock import cache_lock
from .selftest import VIEW_MEMO_PREFIX

log = logging.getLogger(__name__)
_PID = re.compile(r"\(pid (\d+)\)")

DAY_S = 86400.0
#: A temp file whose writer's pid still runs is left alone unless it is this old (pid reuse, other hosts).
TEMP_MAX_AGE_S = DAY_S


class GcError(NavcacheError):
    """gc cannot decide safely what the cache needs (e.g. an unreadable manifest); nothing was removed."""


@dataclass(frozen=True)
class GcItem:
    path: str  # relative to the cache root (POSIX); the artifact, its sidecar goes with it
    size: int  # bytes, sidecar included
    age_days: float
    reason: str


@dataclass
class GcReport:
    cache_root: Path
    dry_run: bool
    removed: list[GcItem] = field(default_factory=list)
    kept: list[GcItem] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def freed(self) -> int:
        return self.bytes_before - self.bytes_after

    def as_dict(self) -> dict[str, Any]:
        def rows(items: list[GcItem]) -> list[dict[str, Any]]:
            return [
                {"path": i.path, "size": i.size, "age_days": round(i.age_days, 3), "reason": i.reason} for i in items
            ]

        return {
            "cache_root": str(self.cache_root),
            "dry_run": self.dry_run,
            "removed": rows(self.removed),
            "kept": rows(self.kept),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "freed": self.freed,
        }


@dataclass
class _Unit:
    rel: str
    files: list[Path]
    size: int
    mtime: float


def manifest_names(cache_root: Path) -> set[str] | None:
    """Relative paths the current manifest names (read without checking the signature: gc only needs to know
    what to keep). None when there is no manifest; GcError when there is one that cannot be read."""
    path = cache_root / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        envelope = json.loads(raw)
        statement = json.loads(base64.b64decode(envelope["payload"], validate=True))
        names = {str(s["name"]) for s in statement["subject"]}
        names |= {str(n) for n in statement.get("predicate", {}).get("artifacts", {})}
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise GcError(
            f"the manifest cannot be read ({type(exc).__name__}: {exc}), so gc cannot tell what the cache needs",
            where=str(path),
            hint="re-provision the cache (or restore the manifest) before running gc",
        ) from None
    return names


def _units(cache_root: Path) -> Iterator[_Unit]:
    for dirname, suffixes in ARTIFACT_SUFFIXES.items():
        directory = cache_root / dirname
        if not directory.is_dir():
            continue
        entries = {p.name: p for p in directory.iterdir() if p.is_file() and not p.is_symlink()}
        for name, path in sorted(entries.items()):
            if name.startswith(TEMP_PREFIX):
                continue  # handled by the temp sweep
            if name.endswith(SIDECAR_SUFFIX):
                if name[: -len(SIDECAR_SUFFIX)] in entries:
                    continue  # goes with its artifact
                files = [path]  # orphan sidecar: its artifact is gone
            elif name.endswith(suffixes):
                files = [path] + ([entries[name + SIDECAR_SUFFIX]] if name + SIDECAR_SUFFIX in entries else [])
            else:
                continue
            stats = [f.stat() for f in files]
            yield _Unit(f"{dirname}/{name}", files, sum(s.st_size for s in stats), max(s.st_mtime for s in stats))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _orphan_temps(cache_root: Path, now: float) -> Iterator[tuple[Path, str]]:
    """Temp files whose writer is gone (pid dead on this host) or that are older than TEMP_MAX_AGE_S."""
    for dirpath, _dirs, files in os.walk(cache_root):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = Path(dirpath) / name
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            pid_text = name[len(TEMP_PREFIX) :].split("-", 1)[0]
            pid = int(pid_text) if pid_text.isdigit() else None
            if pid is not None and pid != os.getpid() and not _pid_alive(pid):
                yield path, f"orphan temp file of a dead writer (pid {pid})"
            elif age > TEMP_MAX_AGE_S:
                yield path, f"temp file older than {TEMP_MAX_AGE_S / 3600:.0f} h"


def sweep_orphan_temps(cache_root: Path, *, dry_run: bool = False, now: float | None = None) -> list[GcItem]:
    """Remove temp files left by killed writers. Call it holding the cache lock (no live provision then
    writes here); writers outside the lock keep their files while their pid runs."""
    now = time.time() if now is None else now
    removed = []
    for path, reason in _orphan_temps(cache_root, now):
        try:
            stat = path.stat()
            if not dry_run:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(
            GcItem(path.relative_to(cache_root).as_posix(), stat.st_size, (now - stat.st_mtime) / DAY_S, reason)
        )
    return removed


def summarise_temps(items: list[GcItem], verb: str = "removed") -> str:
    """One line for the temp files :func:`sweep_orphan_temps` returned (a run killed mid-write can leave
    hundreds): how many, their size, per top-level directory, and the writers' pids."""
    per_dir: dict[str, int] = {}
    for item in items:
        top = item.path.split("/", 1)[0] if "/" in item.path else "."
        per_dir[top] = per_dir.get(top, 0) + 1
    pids = sorted({int(m.group(1)) for item in items if (m := _PID.search(item.reason))})
    more = ", ..." if len(pids) > 5 else ""
    writers = f" (pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids[:5]))}{more})" if pids else ""
    where = ", ".join(f"{n} in {d}/" for d, n in sorted(per_dir.items()))
    size = sum(item.size for item in items)
    return (
        f"{verb} {len(items)} temp file{'s' if len(items) != 1 else ''} ({size:,} bytes) left by interrupted "
        f"runs{writers}: {where}"
    )


def _drop_stale(
    path: Path, stat: os.stat_result, cache_root: Path, reason: str, *, dry_run: bool, now: float
) -> GcItem:
    """Remove one stale memo (unless ``dry_run``; one already gone counts as removed) and describe it."""
    if not dry_run:
        path.unlink(missing_ok=True)
    return GcItem(path.relative_to(cache_root).as_posix(), stat.st_size, (now - stat.st_mtime) / DAY_S, reason)


def _stale_scan_memos(cache_root: Path, removed: set[str], *, dry_run: bool, now: float) -> list[GcItem]:
    """Scan-memo entries pointing at a shard that is gone (or that this gc removes), or unreadable."""
    directory = cache_root / DESCRIPTORS_DIR
    if not directory.is_dir():
        return []
    from .descriptors import ScanMemo, shard_paths  # imagery and numpy: only when there are shards

    stale = []
    for path in sorted(directory.glob(f"{SCAN_MEMO_PREFIX}*")):
        try:
            stat = path.stat()
            memo = ScanMemo.from_json(path.read_bytes())
        except OSError:
            continue
        if memo is not None:
            table = shard_paths(directory, memo.key)[1]
            if table.is_file() and table.relative_to(cache_root).as_posix() not in removed:
                continue
        stale.append(_drop_stale(path, stat, cache_root, "scan memo of a shard that is gone", dry_run=dry_run, now=now))
    return stale


def _stale_self_test_memos(cache_root: Path, removed: set[str], *, dry_run: bool, now: float) -> list[GcItem]:
    """Self-test memos whose onboard query set is gone (or that this gc removes), or unreadable; then the
    per-view memos (:class:`navcache.selftest.ViewMemo`) that no remaining self-test memo names."""
    directory = cache_root / SELFTEST_DIR
    stale = []
    paths = sorted(directory.glob(f"{SELFTEST_MEMO_PREFIX}*")) if directory.is_dir() else []
    named_views: set[str] = set()
    for path in paths:
        if path.name.startswith(VIEW_MEMO_PREFIX):
            continue
        try:
            stat = path.stat()
            record = json.loads(path.read_bytes())
        except OSError:
            continue
        except ValueError:
            record = None
        if not isinstance(record, dict):
            record = {}
        onboard, views = record.get("onboard_name"), record.get("view_memo_name")
        if isinstance(onboard, str) and (directory / onboard).is_file() and f"{SELFTEST_DIR}/{onboard}" not in removed:
            if isinstance(views, str):
                named_views.add(views)
            continue
        stale.append(
            _drop_stale(path, stat, cache_root, "self-test memo whose views are gone", dry_run=dry_run, now=now)
        )
    for path in paths:
        if not path.name.startswith(VIEW_MEMO_PREFIX) or path.name in named_views:
            continue
        try:
            stat = path.stat()
        except OSError:
            continue
        reason = "per-view self-test memo no live self-test memo names"
        stale.append(_drop_stale(path, stat, cache_root, reason, dry_run=dry_run, now=now))
    return stale


def collect_garbage(
    cache_root: Path,
    *,
    ttl_days: float | None = 30.0,
    max_bytes: int | None = None,
    dry_run: bool = False,
    lock_timeout_s: float = 600.0,
    now: float | None = None,
) -> GcReport:
    """Remove unreferenced artifacts older than ``ttl_days`` and, oldest first, as many more unreferenced ones
    as it takes to bring the cache's artifacts under ``max_bytes``. Holds the cache lock throughout."""
    cache_root = Path(cache_root)
    if not cache_root.is_dir():
        raise GcError("no such cache directory", where=str(cache_root), hint="pass the cache root of a provision")
    if ttl_days is not None and ttl_days < 0:
        raise GcError(f"--ttl-days must be >= 0, got {ttl_days}", where="--ttl-days")
    if max_bytes is not None and max_bytes < 0:
        raise GcError(f"--max-bytes must be >= 0, got {max_bytes}", where="--max-bytes")
    with cache_lock(cache_root, lock_timeout_s):
        now = time.time() if now is None else now
        report = GcReport(cache_root, dry_run)
        referenced = manifest_names(cache_root)
        units = list(_units(cache_root))
        report.bytes_before = sum(u.size for u in units)
        candidates: list[_Unit] = []
        for unit in units:
            age = (now - unit.mtime) / DAY_S
            names = {f.relative_to(cache_root).as_posix() for f in unit.files}
            if referenced is not None and names & referenced:
                report.kept.append(GcItem(unit.rel, unit.size, age, "named by the current manifest"))
            else:
                candidates.append(unit)
        remove: dict[str, str] = {}
        for unit in candidates:
            if ttl_days is not None and (now - unit.mtime) / DAY_S > ttl_days:
                remove[unit.rel] = f"not in the manifest, older than {ttl_days:g} days"
        if max_bytes is not None:
            total = report.bytes_before - sum(u.size for u in candidates if u.rel in remove)
            for unit in sorted(candidates, key=lambda u: u.mtime):  # oldest first
                if total <= max_bytes:
                    break
                if unit.rel not in remove:
                    remove[unit.rel] = f"not in the manifest; cache over its {max_bytes} byte budget"
                    total -= unit.size
            if total > max_bytes:
                log.warning(
                    "%s: the artifacts the manifest needs take %d bytes, over the %d byte budget; gc never "
                    "removes them",
                    cache_root,
                    total,
                    max_bytes,
                )
        freed = 0
        for unit in candidates:
            age = (now - unit.mtime) / DAY_S
            if unit.rel not in remove:
                why = "not in the manifest, but within the TTL" + (" and the size budget" if max_bytes else "")
                report.kept.append(GcItem(unit.rel, unit.size, age, why))
                continue
            if not dry_run:
                for file in unit.files:  # artifact first: a sidecar without artifact is harmless
                    file.unlink(missing_ok=True)
            freed += unit.size
            report.removed.append(GcItem(unit.rel, unit.size, age, remove[unit.rel]))
        report.removed += sweep_orphan_temps(cache_root, dry_run=dry_run, now=now)
        report.removed += _stale_scan_memos(cache_root, set(remove), dry_run=dry_run, now=now)
        report.removed += _stale_self_test_memos(cache_root, set(remove), dry_run=dry_run, now=now)
        report.bytes_after = report.bytes_before - freed
        log.info(
            "gc %s: %s %d items (%d bytes), kept %d",
            cache_root,
            "would remove" if dry_run else "removed",
            len(report.removed),
            freed,
            len(report.kept),
        )
        return report
