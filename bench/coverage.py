"""Coverage walk over 1e6 storage tiles (goal ≤ 1 s) and tile enumeration for a 50 km x 50 km area at z17.

Baselines in the same run: the coverage digest as implemented before issue 7 (a per-row Python loop over
sorted tuples; kept here as :func:`reference_coverage_digest`, which tests also compare against), and
morecantile's tile enumeration for the area's bounding box."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .common import Stats, print_machine, print_table, ratio, timed, write_result

GOAL_WALK_S = 1.0
ZOOM = 17


def reference_coverage_digest(statuses: Iterable[tuple[tuple[int, int, int], str]]) -> str:
    """``navcache_runtime.coverage.coverage_digest`` before issue 7, verbatim: the byte-for-byte reference."""
    from navcache_runtime.coverage import COVERAGE_STATUSES

    rows = sorted(statuses)
    digest = hashlib.sha256()
    previous = None
    for (z, x, y), status in rows:
        if status not in COVERAGE_STATUSES:
            raise ValueError(f"unknown coverage status {status!r} for tile {z}/{x}/{y}")
        if previous == (z, x, y):
            raise ValueError(f"tile {z}/{x}/{y} appears twice in the coverage table")
        previous = (z, x, y)
        digest.update(f"{z}/{x}/{y} {status}\n".encode("ascii"))
    return digest.hexdigest()


def walk_inputs(side: int, seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """A ``side x side`` block of z17 storage tiles; ~97 % described, ~1 % blank, the rest missing."""
    from navcache.tiles import ChunkGrid

    grid = ChunkGrid(ZOOM)
    x0, y0 = 68000, 45000
    xs, ys = np.meshgrid(np.arange(x0, x0 + side), np.arange(y0, y0 + side), indexing="ij")
    tiles = np.column_stack((xs.ravel(), ys.ravel())).astype(np.int64)
    pick = np.random.default_rng(seed).random(len(tiles))
    return grid, tiles, tiles[pick < 0.97], tiles[(pick >= 0.97) & (pick < 0.98)]


def area_50km(lat: float = 48.137, lon: float = 11.575, side_m: float = 50_000.0) -> Any:
    import shapely

    dlat = side_m / 111_320.0
    dlon = side_m / (111_320.0 * math.cos(math.radians(lat)))
    return shapely.box(lon - dlon / 2, lat - dlat / 2, lon + dlon / 2, lat + dlat / 2)


def run(quick: bool) -> Path:
    from navcache.coverage_walk import coverage_walk
    from navcache_runtime.coverage import COVERAGE_STATUSES, coverage_digest, coverage_digest_arrays

    info = print_machine()
    side = 1000  # 1e6 tiles: the size, also in --quick (one walk takes about a second)
    repeat = 3 if quick else 7
    grid, tiles, described, blank = walk_inputs(side)
    walk, report = timed(lambda: coverage_walk(grid, tiles, described, blank, 99.0), repeat)
    statuses = list(report.statuses())
    ref, ref_digest = timed(lambda: reference_coverage_digest(statuses), max(1, repeat // 2))
    generic, generic_digest = timed(lambda: coverage_digest(statuses), max(1, repeat // 2))
    arrays, array_digest = timed(lambda: coverage_digest_arrays(ZOOM, report.tile_xy, report.codes), repeat)
    if not ref_digest == generic_digest == array_digest == report.digest:
        raise RuntimeError("coverage digests disagree with the reference implementation")
    # The walk's classification alone (bare numpy), to show what the digest adds.
    keys = np.sort((tiles[:, 0] << ZOOM) | tiles[:, 1])
    bare, _ = timed(lambda: np.isin(keys, (described[:, 0] << ZOOM) | described[:, 1]), repeat)
    walk_before_ms = walk.p50_ms - arrays.p50_ms + ref.p50_ms  # the same walk with the old digest inside

    area = area_50km()
    enum, enumerated = timed(lambda: grid.storage_tiles_for_area(area), repeat)
    enum_arr, arr = timed(lambda: grid.chunk_array_for_area(area), repeat)
    rows: list[list[Any]] = [
        ["coverage walk, 1e6 tiles (after)", walk.p50_ms, walk.p99_ms, ratio(walk.p50_ms, bare.p50_ms), "≤ 1000 ms"],
        ["  of which digest, vectorised (after)", arrays.p50_ms, arrays.p99_ms, "", ""],
        ["  digest, pre-issue-7 loop (before)", ref.p50_ms, ref.p99_ms, "", ""],
        ["  digest, coverage_digest on tuples (verifier)", generic.p50_ms, generic.p99_ms, "", ""],
        [
            "coverage walk with the old digest (before, derived)",
            walk_before_ms,
            "",
            ratio(walk_before_ms, bare.p50_ms),
            "",
        ],
        ["bare numpy classification only (baseline)", bare.p50_ms, bare.p99_ms, 1.0, ""],
        [f"enumerate z17 tiles, 50x50 km ({len(enumerated):,}) as TileIds", enum.p50_ms, enum.p99_ms, "", ""],
        [f"enumerate z17 tiles, 50x50 km ({len(arr):,}) as array", enum_arr.p50_ms, enum_arr.p99_ms, "", ""],
    ]
    baseline: dict[str, Any] = {}
    try:
        import morecantile

        tms = morecantile.tms.get("WebMercatorQuad")
        w, s, e, n = area.bounds
        mc, mc_tiles = timed(lambda: list(tms.tiles(w, s, e, n, [ZOOM])), repeat)
        rows.append([f"morecantile tiles() of the bbox ({len(mc_tiles):,}) (baseline)", mc.p50_ms, mc.p99_ms, "", ""])
        baseline = {"morecantile": mc.__dict__, "morecantile_tiles": len(mc_tiles)}
        rows[-3][3] = ratio(enum.p50_ms, mc.p50_ms)
        rows[-2][3] = ratio(enum_arr.p50_ms, mc.p50_ms)
    except ImportError:
        pass
    print_table(
        f"coverage (z{ZOOM}; p50/p99 of {repeat})",
        ["step", "p50 ms", "p99 ms", "ratio vs baseline", "goal"],
        rows,
    )
    ok = walk.p99_ms <= GOAL_WALK_S * 1000
    print(f"goal (walk ≤ {GOAL_WALK_S} s): {'met' if ok else 'MISSED'}")
    return write_result(
        "coverage",
        {
            "quick": quick,
            "tiles": len(tiles),
            "walk": walk.__dict__,
            "digest_vectorised": arrays.__dict__,
            "digest_reference_before": ref.__dict__,
            "digest_generic_tuples": generic.__dict__,
            "walk_before_derived_p50_ms": walk_before_ms,
            "bare_classification": bare.__dict__,
            "enumerate_50km_z17": {"tiles": len(enumerated), **enum.__dict__},
            "enumerate_50km_z17_array": {"tiles": len(arr), **enum_arr.__dict__},
            **baseline,
            "goal_met": ok,
            "statuses": list(COVERAGE_STATUSES),
            "cores": info["cores"],
        },
    )


__all__ = ["Stats", "reference_coverage_digest", "run"]
