"""verify_cache of a multi-GB cache (a few large files, signed manifest) vs. coreutils ``sha256sum`` and
hashlib single-threaded over the same files, in the same run.

Goal (issue 7): verify throughput ≥ 0.9x single-core hashlib; more with parallel hashing. Files are read
from the page cache (they were just written), so this measures hashing, not the disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .common import interleaved, print_machine, print_table, ratio, sha256_files, write_random_file, write_result

GOAL = 0.9
ISSUED = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def make_signed_cache(root: Path, sizes: list[int]) -> tuple[list[Path], Path]:
    """Write ``sizes`` random files plus a tiny coverage table under ``root`` and sign a manifest over them
    (DSSE envelope written directly: sign_manifest would verify, i.e. hash everything, once more)."""
    from navcache.keys import generate_keypair, load_private_key
    from navcache.manifest import MANIFEST_NAME, build_statement, canonical_payload, make_envelope
    from navcache_runtime.coverage import coverage_digest

    files = [write_random_file(root / "blobs" / f"part-{i}.bin", size, seed=i) for i, size in enumerate(sizes)]
    tiles = [[17, 68000 + i, 45000, 0] for i in range(4)]
    codes = {"0": "covered", "1": "missing", "2": "blank"}
    (root / "coverage.json").write_text(json.dumps({"tiles": tiles, "codes": codes}))
    digest = coverage_digest([((z, x, y), "covered") for z, x, y, _ in tiles])
    keys = generate_keypair(root.parent / "keys")
    names = [p.relative_to(root).as_posix() for p in files] + ["coverage.json"]
    statement = build_statement(
        root,
        names,
        sortie_id="BENCH-VERIFY",
        takeoff=(47.3977, 8.5456),
        area_geojson={
            "type": "Polygon",
            "coordinates": [[[8.5, 47.37], [8.6, 47.37], [8.6, 47.42], [8.5, 47.42], [8.5, 47.37]]],
        },
        host={"arch": "x86_64"},
        coverage={"digest": digest, "total": 4, "covered": 4, "path": "coverage.json"},
        version=1,
        issued_at=ISSUED,
        expires=ISSUED + timedelta(days=2),
        tool_version="navcache bench",
    )
    envelope = make_envelope(canonical_payload(statement), [load_private_key(keys.private_key)])
    (root / MANIFEST_NAME).write_bytes(envelope)
    return files, keys.trusted_keys


def run(quick: bool) -> Path:
    from navcache_runtime.verify import VerifierConfig, verify_cache

    info = print_machine()
    sizes = [64 * 2**20] * 4 if quick else [512 * 2**20] * 4 + [64 * 2**20] * 4  # 256 MiB / 2.25 GiB
    repeat = 2 if quick else 3
    total = sum(sizes)
    with tempfile.TemporaryDirectory(prefix="navcache-bench-verify-") as tmp:
        root = Path(tmp) / "cache"
        files, trusted = make_signed_cache(root, sizes)
        now = ISSUED + timedelta(hours=1)

        def verify(workers: int | None) -> None:
            report = verify_cache(root, trusted, now=now, config=VerifierConfig(hash_workers=workers))
            if not report.ok:
                raise RuntimeError(f"bench cache does not verify: {report.failures}")

        fns: dict[str, Callable[[], Any]] = {
            "hashlib sha256, 1 thread (baseline)": lambda: sha256_files(files),
            "verify_cache, 1 hash worker": lambda: verify(1),
            "verify_cache, default workers": lambda: verify(None),
        }
        sha256sum = shutil.which("sha256sum")
        if sha256sum:
            fns["coreutils sha256sum"] = lambda: subprocess.run(
                [sha256sum, *map(str, files)], check=True, capture_output=True
            )
        stats = interleaved(fns, repeat)
    base = stats["hashlib sha256, 1 thread (baseline)"]
    rows: list[list[Any]] = []
    results = {}
    for name, s in stats.items():
        throughput = ratio(base.p50_ms, s.p50_ms)  # > 1: faster than single-core hashlib
        rows.append([name, s.p50_ms / 1000, total / s.p50_ms / 1e6, throughput])
        results[name] = {**s.__dict__, "gb_per_s": total / s.p50_ms / 1e6, "throughput_vs_hashlib_1t": throughput}
    print_table(
        f"verify a {total / 2**30:.2f} GiB cache ({len(files)} files), p50 of {repeat}, interleaved",
        ["path", "p50 s", "GB/s", "throughput vs hashlib 1 thread"],
        rows,
    )
    single = results["verify_cache, 1 hash worker"]["throughput_vs_hashlib_1t"]
    print(f"goal (≥ {GOAL}x single core): {'met' if single >= GOAL else 'MISSED'} ({single:.2f}x)")
    return write_result(
        "verify",
        {
            "quick": quick,
            "bytes": total,
            "files": len(files),
            "repeat": repeat,
            "results": results,
            "goal_met": single >= GOAL,
            "cores": info["cores"],
        },
    )
