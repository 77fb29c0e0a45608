"""Provisioning end to end, the flow function in-process under a temporary Prefect API
(``prefect_test_harness``: its server start is excluded from every figure):

* ``warm``: an unchanged sortie re-provisioned vs. hashlib sha256 of every cache file (one pass), plus
  the fixed Prefect overhead (a no-op flow with one no-op task under the same API);
* ``incremental``: one storage tile of ~100 changed in the orthophoto (1 %) → re-provision time as a
  fraction of the cold provision (goal ≤ 5 %);
* ``cold``: the cold provision's wall time (its comparison with the sum of bare parts is not built yet).

The sortie is the test suite's: the demo's synthetic orthophoto, both demo backbones, z18, a 10x10-tile area."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import print_machine, print_table, ratio, sha256_files, write_result

GOAL_WARM = 1.5  # not set by the issue in numbers: "little more than hashing the cache"
GOAL_INCREMENTAL = 0.05


def _area(side: int = 10) -> tuple[dict[str, Any], list[Any]]:
    from navcache.tiles import tile_bounds, tile_for_lonlat
    from navcache.types import TileId
    from tests.support.sorties import CENTER_LAT, CENTER_LON

    c = tile_for_lonlat(CENTER_LON, CENTER_LAT, 18)
    tiles = [TileId(18, c.x - side // 2 + i, c.y - side // 2 + j) for i in range(side) for j in range(side)]
    w, n = tile_bounds(tiles[0])[0] + 1e-6, tile_bounds(tiles[0])[3] - 1e-6
    e, s = tile_bounds(tiles[-1])[2] - 1e-6, tile_bounds(tiles[-1])[1] + 1e-6
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}, tiles


def _change_one_tile(ortho: Path, tile: Any) -> None:
    """Overwrite a 40x40-pixel patch of the orthophoto at the centre of ``tile`` with noise."""
    import rasterio
    from rasterio.windows import Window

    from navcache.tiles import tile_bounds

    w, s, e, n = tile_bounds(tile)
    with rasterio.open(ortho, "r+") as ds:
        from rasterio.warp import transform

        xs, ys = transform("EPSG:4326", ds.crs, [(w + e) / 2], [(s + n) / 2])
        row, col = ds.index(xs[0], ys[0])
        data = np.random.default_rng(7).integers(0, 256, (ds.count, 40, 40), dtype=np.uint8).astype(ds.dtypes[0])
        ds.write(data, window=Window(col - 20, row - 20, 40, 40))


def _provision(sortie: Path) -> tuple[float, dict[str, Any]]:
    from navcache_flows.provision_sortie import provision_sortie

    started = time.perf_counter()
    summary = provision_sortie(str(sortie))
    return time.perf_counter() - started, summary


def _noop_overhead(repeat: int) -> float:
    from prefect import flow, task

    @task
    def noop() -> int:
        return 1

    @flow
    def noop_flow() -> int:
        return noop()

    noop_flow()  # first call imports and registers
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        noop_flow()
        samples.append(time.perf_counter() - started)
    return float(np.median(samples))


def _measure(quick: bool) -> dict[str, Any]:
    from prefect.testing.utilities import prefect_test_harness

    from tests.support.sorties import make_assets, write_sortie

    repeat = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="navcache-bench-prov-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
        assets = make_assets(tmp / "assets")
        area, tiles = _area()
        cache = tmp / "cache"
        sortie = write_sortie(tmp / "bench.toml", assets, area=area, cache_dir=cache, threshold=90.0)
        with prefect_test_harness(server_startup_timeout=120):
            overhead = _noop_overhead(repeat)
            cold_s, cold = _provision(sortie)
            warm = [_provision(sortie)[0] for _ in range(repeat)]
            files = sorted(p for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".navcache"))
            hashes = []
            for _ in range(repeat):
                started = time.perf_counter()
                total = sha256_files(files)
                hashes.append(time.perf_counter() - started)
            _change_one_tile(assets.ortho, tiles[len(tiles) // 2 + 5])
            incr_s, incr = _provision(sortie)
    return {
        "quick": quick,
        "tiles": len(tiles),
        "prefect_noop_flow_s": overhead,
        "cold_s": cold_s,
        "cold_shards": cold["shards"],
        "warm_s": float(np.median(warm)),
        "warm_samples_s": warm,
        "cache_files": len(files),
        "cache_bytes": total,
        "sha256_all_s": float(np.median(hashes)),
        "incremental_s": incr_s,
        "incremental_shards": incr["shards"],
    }


def _report(name: str, quick: bool, data: dict[str, Any]) -> Path:
    info = print_machine()
    warm_ratio = ratio(data["warm_s"], data["sha256_all_s"])
    incr_frac = ratio(data["incremental_s"], data["cold_s"])
    rows = [
        [
            "sha256 of every cache file (baseline)",
            data["sha256_all_s"],
            1.0,
            f"{data['cache_files']} files, {data['cache_bytes'] / 1e6:.1f} MB",
        ],
        ["Prefect no-op flow + task (fixed overhead)", data["prefect_noop_flow_s"], "", ""],
        ["cold provision", data["cold_s"], "", f"shards {data['cold_shards']}"],
        ["warm re-provision (unchanged)", data["warm_s"], warm_ratio, "ratio vs sha256"],
        ["warm minus fixed Prefect overhead", data["warm_s"] - data["prefect_noop_flow_s"], "", ""],
        [
            "incremental (1 tile of 100 changed)",
            data["incremental_s"],
            incr_frac,
            f"fraction of cold; shards {data['incremental_shards']}",
        ],
    ]
    print_table(f"provision ({data['tiles']} z18 tiles, 2 backbones)", ["run", "seconds", "ratio", "note"], rows)
    print(
        f"incremental goal (≤ {GOAL_INCREMENTAL:.0%} of cold): {'met' if incr_frac <= GOAL_INCREMENTAL else 'MISSED'}"
    )
    return write_result(
        name,
        {**data, "warm_ratio_vs_sha256": warm_ratio, "incremental_fraction_of_cold": incr_frac, "cores": info["cores"]},
    )


_CACHE: dict[bool, dict[str, Any]] = {}


def _data(quick: bool) -> dict[str, Any]:
    """One measurement serves warm, incremental and cold (`python -m bench all` runs it once)."""
    if quick not in _CACHE:
        _CACHE[quick] = _measure(quick)
    return _CACHE[quick]


def run_warm(quick: bool) -> Path:
    return _report("warm", quick, _data(quick))


def run_incremental(quick: bool) -> Path:
    return _report("incremental", quick, _data(quick))


def run_cold(quick: bool) -> Path:
    return _report("cold", quick, _data(quick))


run = run_warm
