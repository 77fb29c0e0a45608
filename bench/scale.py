"""Scale: large sorties over reprojected imagery, with gdal2tiles alongside (``python -m bench scale``).

A square sortie of ``side x side`` zoom-17 tiles over a generated orthophoto in **EPSG:4326** (not Web
Mercator, as crews' imagery is), 4 m/px, RGB, tiled 256 x 256, DEFLATE, internal overviews, with a ragged
nodata border of a few percent of its width on every side (as an orthophoto's footprint is): the raster's
extent is the sortie's square, so gdal2tiles cuts the same tiles. Per size, in one run:

* **cold** provision (an empty cache), **warm** (unchanged) and **incremental** (1 % of the tiles, a
  contiguous patch, overwritten in the orthophoto in place) — each the ``provision-sortie`` flow in a fresh
  Python process (its own imports are not counted: the figure is the flow call), against a Prefect API
  started once by this process, so each process's **peak RSS** (``ru_maxrss``) is the provisioning's own;
  the per-step split comes from the flow run's task runs (per task name: first start to last end);
* **gdal2tiles** (Debian's ``gdal2tiles.py``, as a crew would cut tiles without navcache) cutting the same
  orthophoto at the same zoom to PNG, one process per core, wall time and peak RSS of its process tree —
  skipped, and the row says so, where it is not installed or past ``GDAL2TILES_MAX_TILES`` (it would take
  longer than the rest of the run);
* **plan only** at a larger size: the flow's plan step (chunk enumeration, storage tiles, shard plans) and
  ``navcache plan``'s count, wall time and the peak RSS they add, in a fresh process.

Sizes: ``--quick`` a 12 x 12 sortie and a 1e4-tile plan (well under a minute, for CI); the default 100 x 100
(1e4 tiles) and a 1e6-tile plan; ``--full`` adds 316 x 316 (1e5 tiles). Goals (issue 17): peak RSS ≤ 1 GB at
1e5 tiles, incremental ≤ 5 % of cold at the full size.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import bench_assets, prefect_api, print_machine, print_table, ratio, write_result

REPO = Path(__file__).resolve().parents[1]
ZOOM = 17
M_PER_PX = 4.0
NODATA = 0
GOAL_PEAK_RSS_BYTES = 1 << 30
GOAL_INCREMENTAL = 0.05
#: gdal2tiles cuts ~20-60 tiles/s on 2 cores: past this size it would take longer than the rest of the run.
GDAL2TILES_MAX_TILES = 20_000
CENTER_LAT, CENTER_LON = 48.137, 11.575
_RESULT_MARK = "SCALE-RESULT "


# --- inputs -----------------------------------------------------------------------------------------------


def square_area(side: int, zoom: int = ZOOM) -> tuple[list[Any], tuple[float, float, float, float]]:
    """``side x side`` tiles around the bench's centre, row-major (north row first), and their exact
    (west, south, east, north) bounds."""
    from navcache.tiles import tile_bounds, tile_for_lonlat
    from navcache.types import TileId

    c = tile_for_lonlat(CENTER_LON, CENTER_LAT, zoom)
    x0, y0 = c.x - side // 2, c.y - side // 2
    tiles = [TileId(zoom, x0 + i, y0 + j) for j in range(side) for i in range(side)]
    west, _, _, north = tile_bounds(tiles[0])
    _, south, east, _ = tile_bounds(tiles[-1])
    return tiles, (west, south, east, north)


def box_polygon(bounds: tuple[float, float, float, float], inset: float = 1e-6) -> dict[str, Any]:
    """GeoJSON Polygon of a lon/lat box, inset so that it touches no tile beyond the box's own."""
    w, s, e, n = bounds[0] + inset, bounds[1] + inset, bounds[2] - inset, bounds[3] - inset
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _smooth_rows(coarse: np.ndarray, cell: int, r0: int, r1: int, width: int) -> np.ndarray:
    """Rows ``r0:r1`` (full width) of ``coarse`` bilinearly upsampled ``cell`` times: one strip of a large
    smooth field without holding the field."""
    fy = (np.arange(r0, r1) + 0.5) / cell - 0.5
    iy = np.clip(np.floor(fy).astype(np.int64), 0, coarse.shape[0] - 2)
    wy = np.clip(fy - iy, 0, 1)[:, None].astype(np.float32)
    rows = coarse[iy] * (1 - wy) + coarse[iy + 1] * wy
    fx = (np.arange(width) + 0.5) / cell - 0.5
    ix = np.clip(np.floor(fx).astype(np.int64), 0, coarse.shape[1] - 2)
    wx = np.clip(fx - ix, 0, 1)[None, :].astype(np.float32)
    return np.asarray(rows[:, ix] * (1 - wx) + rows[:, ix + 1] * wx, dtype=np.float32)


def _border(t: np.ndarray, seed: int) -> np.ndarray:
    """A ragged nodata border depth (fraction of the raster's side) along an edge, ``t`` in [0, 1]."""
    return 0.025 + 0.012 * np.sin(2 * math.pi * (7 * t + seed * 0.1)) + 0.008 * np.sin(2 * math.pi * 23 * t)


def generate_orthophoto(path: Path, bounds: tuple[float, float, float, float], m_per_px: float = M_PER_PX) -> Path:
    """An RGB GeoTIFF in EPSG:4326 over ``bounds``, ``m_per_px`` on the ground, textured at two scales plus
    pixel noise, nodata (0, declared) in a ragged band along every edge, tiled 256, DEFLATE, internal
    overviews. Written in strips of 256 rows, so memory stays flat whatever the size."""
    import rasterio
    from rasterio.enums import Resampling

    from tests.support.realistic import degrees_per_px, rgb_geotiff_profile

    west, south, east, north = bounds
    lat_c = (south + north) / 2
    dx, dy = degrees_per_px(m_per_px, lat_c)
    width, height = math.ceil((east - west) / dx), math.ceil((north - south) / dy)
    dx, dy = (east - west) / width, (north - south) / height  # the extent is exactly the sortie's square
    rng = np.random.default_rng(17)
    fields = rng.random((height // 64 + 2, width // 64 + 2), dtype=np.float32)
    detail = rng.random((height // 6 + 2, width // 6 + 2), dtype=np.float32)
    profile = rgb_geotiff_profile(width, height, west=west, north=north, dx=dx, dy=dy, nodata=NODATA)
    u = (np.arange(width) + 0.5) / width
    left, right = _border(np.linspace(0, 1, height), 1), _border(np.linspace(0, 1, height), 2)
    top, bottom = _border(u, 3), _border(u, 4)
    with rasterio.open(path, "w", **profile) as ds:
        for r0 in range(0, height, 256):
            r1 = min(height, r0 + 256)
            base = _smooth_rows(fields, 64, r0, r1, width) * 150 + _smooth_rows(detail, 6, r0, r1, width) * 60
            base += rng.random(base.shape, dtype=np.float32) * 40
            rgb = np.clip(np.stack([base * 0.8, base, base * 0.6]), 1, 254).astype(np.uint8)
            v = ((np.arange(r0, r1) + 0.5) / height)[:, None]
            nodata = (
                (u[None, :] < left[r0:r1, None])
                | (1 - u[None, :] < right[r0:r1, None])
                | (v < top[None, :])
                | (1 - v < bottom[None, :])
            )
            rgb[:, nodata] = NODATA
            ds.write(rgb, window=((r0, r1), (0, width)))
        ds.build_overviews([4, 16, 64], Resampling.average)
    return path


def write_sortie(path: Path, assets: Any, area: dict[str, Any], cache: Path, budget: int) -> Path:
    from navcache.sortie import TileSpec
    from tests.support.sorties import write_sortie as write_test_sortie

    sortie = write_test_sortie(path, assets, area=area, cache_dir=cache, zoom=ZOOM, threshold=80.0)
    text = sortie.read_text().replace("shard_block = 8", f"shard_block = {TileSpec.shard_block}")
    text = text.replace("budget = 5000", f"budget = {budget}\nmax_upsampling = 8.0")
    sortie.write_text(text)
    return sortie


# --- measurements (each in a fresh process) ---------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux carries that across
    ``execve``, so a child would report its (large) parent's peak at the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class RssSampler:
    """This process's resident set every ``interval`` seconds on a daemon thread: (unix time, bytes)."""

    def __init__(self, interval: float = 0.1) -> None:
        import threading

        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _rss_bytes()))
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_between(self, start: float, end: float) -> int:
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return max(inside, default=0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _task_spans(flow_run_id: Any, rss: RssSampler | None = None) -> dict[str, dict[str, float]]:
    """Per task name (mapped shards as one, ``describe-shard``): wall span from the first start to the last
    end, the sum of the task runs' own run times, and the peak RSS sampled within the span."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    spans: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.start_time is None or run.end_time is None:
            continue
        # mapped shards are named shard-X-Y; unnamed task runs get a 3-hex-digit suffix
        name = re.sub(r"-[0-9a-f]{3}$", "", re.sub(r"^shard-\d+-\d+$", "describe-shard", run.name))
        entry = spans.setdefault(name, {"start": run.start_time, "end": run.end_time, "busy_s": 0.0, "runs": 0})
        entry["start"] = min(entry["start"], run.start_time)
        entry["end"] = max(entry["end"], run.end_time)
        entry["busy_s"] += run.total_run_time.total_seconds()
        entry["runs"] += 1
    first = min((e["start"] for e in spans.values()), default=None)
    return {
        name: {
            "offset_s": (e["start"] - first).total_seconds(),
            "span_s": (e["end"] - e["start"]).total_seconds(),
            "busy_s": e["busy_s"],
            "runs": e["runs"],
            "peak_rss_bytes": rss.peak_between(e["start"].timestamp(), e["end"].timestamp()) if rss else 0,
        }
        for name, e in sorted(spans.items(), key=lambda item: item[1]["start"])
    }


def _child_provision(sortie: str) -> dict[str, Any]:
    started = time.perf_counter()
    from navcache_flows.provision_sortie import provision_sortie

    imported = time.perf_counter() - started
    rss_after_import = _peak_rss_bytes()
    with RssSampler() as rss:
        started = time.perf_counter()
        state = provision_sortie(sortie, return_state=True)
        seconds = time.perf_counter() - started
    summary = state.result()
    return {
        "flow_s": seconds,
        "import_s": imported,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_after_import_bytes": rss_after_import,
        "steps": _task_spans(state.state_details.flow_run_id, rss),
        "shards": summary["shards"],
        "tiles": summary["tiles"],
        "coverage_percent": summary["coverage"]["percent"],
        "index": {k: summary["index"][k] for k in ("type", "vectors", "recall_at_10")},
    }


def _child_plan(sortie: str) -> dict[str, Any]:
    """The flow's plan step (library calls only) and ``navcache plan``'s count over the same sortie."""
    from navcache.plan import plan_sortie
    from navcache.preflight import run_preflight
    from navcache_flows.provision_sortie import plan_tiles

    spec = run_preflight(Path(sortie)).sortie
    before = _rss_bytes()
    with RssSampler(0.02) as rss:
        started = time.perf_counter()
        _, storage, plans = plan_tiles.fn(spec)  # the flow's own step, without the task-run bookkeeping
        flow_plan_s = time.perf_counter() - started
    flow_plan_rss = max(rss.peak_between(0, time.time()), _rss_bytes()) - before
    counts = (sum(len(plan) for plan in plans), len(storage), len(plans))
    del storage, plans
    started = time.perf_counter()
    plan = plan_sortie(Path(sortie))
    return {
        "chunks": counts[0],
        "storage_tiles": counts[1],
        "shards": counts[2],
        "flow_plan_s": flow_plan_s,
        "flow_plan_added_rss_bytes": flow_plan_rss,
        "navcache_plan_s": time.perf_counter() - started,
        "navcache_plan_chunks": plan.chunks,
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def _in_child(kind: str, sortie: Path, api_url: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(PREFECT_LOGGING_LEVEL="ERROR", PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "bench.scale", kind, str(sortie)], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    lines = [line for line in out.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if out.returncode or not lines:
        raise RuntimeError(f"bench.scale {kind} {sortie} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return {**json.loads(lines[-1][len(_RESULT_MARK) :]), "process_s": wall}


def gdal2tiles_command() -> list[str] | None:
    """``gdal2tiles.py`` (or ``gdal2tiles``) from PATH, or None."""
    for name in ("gdal2tiles.py", "gdal2tiles"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _gdal2tiles(ortho: Path, out: Path) -> dict[str, Any] | None:
    """Wall time, peak RSS (the largest process of its tree) and output of gdal2tiles cutting ``ortho`` at
    the bench's zoom to PNG, one process per core, in a wrapper process so only its tree is measured."""
    command = gdal2tiles_command()
    if command is None:
        return None
    processes = os.cpu_count() or 1
    args = [*command, "--xyz", "-z", str(ZOOM), "-r", "bilinear", "-w", "none", "-q"]
    args += [f"--processes={processes}", str(ortho), str(out)]
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(json.dumps({'rc': rc, 's': time.perf_counter() - t,"
        " 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    if measured["rc"]:
        raise RuntimeError(f"gdal2tiles failed (exit {measured['rc']}): {done.stderr[-2000:]}")
    files = [p for p in out.rglob("*.png")]
    return {
        "seconds": measured["s"],
        "peak_rss_bytes": measured["rss"],
        "tiles": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "processes": processes,
    }


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith(".navcache"))


def _one_size(tmp: Path, side: int, assets: Any, api_url: str) -> dict[str, Any]:
    from bench.provision import _change_tiles, _changed_patch

    tiles, bounds = square_area(side)
    root = tmp / f"side{side}"
    root.mkdir()
    started = time.perf_counter()
    ortho = generate_orthophoto(root / "ortho-4326.tif", bounds)
    generate_s = time.perf_counter() - started
    cache = root / "cache"
    budget = max(5000, 2 * side * side)
    sortie = write_sortie(root / "scale.toml", _assets_with(assets, ortho), box_polygon(bounds), cache, budget)
    cold = _in_child("provision", sortie, api_url)
    cache_bytes = _dir_bytes(cache)
    warm = _in_child("provision", sortie, api_url)
    changed = _changed_patch(tiles, side, 0)
    _change_tiles(ortho, changed)
    incremental = _in_child("provision", sortie, api_url)
    gdal = _gdal2tiles(ortho, root / "gdal2tiles") if len(tiles) <= GDAL2TILES_MAX_TILES else None
    return {
        "side": side,
        "tiles": len(tiles),
        "orthophoto": {"bytes": ortho.stat().st_size, "generate_s": generate_s, "m_per_px": M_PER_PX},
        "cold": cold,
        "warm": warm,
        "incremental": incremental,
        "changed_tiles": len(changed),
        "cache_bytes": cache_bytes,
        "gdal2tiles": gdal,
    }


def _assets_with(assets: Any, ortho: Path) -> Any:
    import dataclasses

    return dataclasses.replace(assets, ortho=ortho)


def _plan_only(tmp: Path, side: int, assets: Any) -> dict[str, Any]:
    """A plan of ``side x side`` tiles over a coarse (32 m/px) orthophoto of the same kind: no provisioning."""
    _, bounds = square_area(side)
    root = tmp / f"plan{side}"
    root.mkdir()
    ortho = generate_orthophoto(root / "ortho-4326.tif", bounds, m_per_px=32.0)
    area = box_polygon(bounds)
    sortie = write_sortie(root / "plan.toml", _assets_with(assets, ortho), area, root / "cache", 2 * side * side)
    sortie.write_text(sortie.read_text().replace("max_upsampling = 8.0", "max_upsampling = 64.0"))
    return {"side": side, **_in_child("plan", sortie, None)}


def _measure(quick: bool, full: bool) -> dict[str, Any]:
    sides = [12] if quick else [100, 316] if full else [100]
    plan_side = 100 if quick else 1000
    sizes = []
    with tempfile.TemporaryDirectory(prefix="navcache-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        assets = bench_assets(tmp / "assets")
        with prefect_api() as api_url:
            for side in sides:
                sizes.append(_one_size(tmp, side, assets, api_url))
        plan = _plan_only(tmp, plan_side, assets)
    # Peak memory follows how many shards are described at once: record the bound the runs worked under.
    from navcache_flows.provision_sortie import shards_in_flight

    return {
        "quick": quick,
        "full": full,
        "zoom": ZOOM,
        "sizes": sizes,
        "plan_only": plan,
        "shards_in_flight": shards_in_flight(),
    }


# --- report -----------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _step_line(steps: dict[str, dict[str, float]], flow_s: float) -> str:
    shown = sorted(steps.items(), key=lambda item: -item[1]["span_s"])[:6]
    parts = [f"{name} {v['span_s']:.1f} ({v['peak_rss_bytes'] / 2**20:,.0f} MiB)" for name, v in shown]
    outside = flow_s - sum(v["span_s"] for v in steps.values())
    return ", ".join(parts) + f"; outside tasks ≤ {max(outside, 0.0):.1f}"


def report(data: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for size in data["sizes"]:
        n = size["tiles"]
        cold, warm, incr = size["cold"], size["warm"], size["incremental"]
        rows.append(
            [
                f"{n:,} tiles cold",
                cold["flow_s"],
                f"{n / cold['flow_s']:,.0f}",
                _mb(cold["peak_rss_bytes"]),
                _mb(size["cache_bytes"]),
                _step_line(cold["steps"], cold["flow_s"]),
            ]
        )
        rows.append(
            [
                f"{n:,} tiles warm",
                warm["flow_s"],
                f"{ratio(warm['flow_s'], cold['flow_s']):.1%} of cold",
                _mb(warm["peak_rss_bytes"]),
                "",
                _step_line(warm["steps"], warm["flow_s"]),
            ]
        )
        rows.append(
            [
                f"{n:,} tiles incremental ({size['changed_tiles']} changed)",
                incr["flow_s"],
                f"{ratio(incr['flow_s'], cold['flow_s']):.1%} of cold",
                _mb(incr["peak_rss_bytes"]),
                "",
                _step_line(incr["steps"], incr["flow_s"]),
            ]
        )
        gdal = size["gdal2tiles"]
        if gdal is None:
            why = "is not installed" if gdal2tiles_command() is None else f"is run up to {GDAL2TILES_MAX_TILES:,} tiles"
            rows.append([f"{n:,} tiles gdal2tiles", "", "", "", "", f"skipped: gdal2tiles {why}"])
        else:
            rows.append(
                [
                    f"{n:,} tiles gdal2tiles (cut only, PNG)",
                    gdal["seconds"],
                    f"{gdal['tiles'] / gdal['seconds']:,.0f}",
                    _mb(gdal["peak_rss_bytes"]),
                    _mb(gdal["bytes"]),
                    f"{gdal['tiles']:,} tiles, {gdal['processes']} processes; navcache cold "
                    f"{ratio(cold['flow_s'], gdal['seconds']):.2f}x its time",
                ]
            )
    plan = data["plan_only"]
    rows.append(
        [
            f"{plan['chunks']:,} tiles plan only",
            plan["flow_plan_s"],
            "",
            _mb(plan["peak_rss_bytes"]),
            "",
            f"flow plan step adds {_mb(plan['flow_plan_added_rss_bytes'])}; "
            f"navcache plan {plan['navcache_plan_s']:.1f} s",
        ]
    )
    return rows


def run(quick: bool, full: bool = False) -> Path:
    info = print_machine()
    data = _measure(quick, full)
    print_table(
        f"scale: z{ZOOM} sorties over EPSG:4326 imagery ({M_PER_PX:g} m/px, ragged nodata border), 2 backbones",
        ["run", "seconds", "tiles/s", "peak RSS", "size", "note (per-step spans, s)"],
        report(data),
    )
    biggest = data["sizes"][-1]
    incr_frac = ratio(biggest["incremental"]["flow_s"], biggest["cold"]["flow_s"])
    peak = max(max(s[k]["peak_rss_bytes"] for k in ("cold", "warm", "incremental")) for s in data["sizes"])
    print(f"incremental goal (≤ {GOAL_INCREMENTAL:.0%} of cold) at {biggest['tiles']:,} tiles: {incr_frac:.1%}")
    print(f"peak RSS goal (≤ 1 GiB at 1e5 tiles): largest run {_mb(peak)}")
    return write_result("scale", {**data, "cores": info["cores"]})


def _child_main(argv: list[str]) -> None:
    kind, sortie = argv
    result = _child_provision(sortie) if kind == "provision" else _child_plan(sortie)
    print(_RESULT_MARK + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
