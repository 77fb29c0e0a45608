"""Benchmark helpers on tiny inputs, the vectorised coverage digest against the per-row reference loop,
and the cheapest subcommand end to end (`python -m bench coverage --quick` is ~15 s on 2 busy cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import common
from bench.coverage import reference_coverage_digest, walk_inputs
from navcache.coverage_walk import coverage_walk
from navcache_runtime.coverage import COVERAGE_STATUSES, coverage_digest, coverage_digest_arrays

REPO = Path(__file__).resolve().parents[1]


def _rows(zoom: int, xy: np.ndarray, codes: np.ndarray) -> list[tuple[tuple[int, int, int], str]]:
    return [((zoom, x, y), COVERAGE_STATUSES[c]) for (x, y), c in zip(xy.tolist(), codes.tolist(), strict=True)]


@pytest.mark.parametrize("zoom", [0, 1, 9, 17, 22, 30])
@pytest.mark.parametrize("seed", range(5))
def test_coverage_digest_is_byte_identical_to_the_reference(zoom: int, seed: int) -> None:
    rng = np.random.default_rng(seed * 31 + zoom)
    n = 1 << zoom
    xy = np.unique(rng.integers(0, n, (int(rng.integers(0, 400)), 2)), axis=0)
    xy = rng.permutation(xy)  # unsorted input: both must sort
    codes = rng.integers(0, len(COVERAGE_STATUSES), len(xy))
    rows = _rows(zoom, xy, codes)
    expected = reference_coverage_digest(rows)
    assert coverage_digest(rows) == expected
    assert coverage_digest_arrays(zoom, xy, codes) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 30).flatmap(
        lambda z: st.tuples(
            st.just(z),
            st.lists(st.tuples(st.integers(0, (1 << z) - 1), st.integers(0, (1 << z) - 1)), unique=True, max_size=60),
            st.randoms(use_true_random=False),
        )
    )
)
def test_coverage_digest_matches_the_reference_on_random_tables(
    case: tuple[int, list[tuple[int, int]], object],
) -> None:
    zoom, tiles, rnd = case
    codes = np.array([rnd.randrange(3) for _ in tiles], dtype=np.int64)  # type: ignore[attr-defined]
    xy = np.array(tiles, dtype=np.int64).reshape(-1, 2)
    rows = _rows(zoom, xy, codes)
    expected = reference_coverage_digest(rows)
    assert coverage_digest(rows) == coverage_digest_arrays(zoom, xy, codes) == expected


def test_coverage_digest_errors_are_unchanged() -> None:
    rows = [((17, 1, 2), "covered"), ((17, 1, 2), "blank")]
    for fn in (reference_coverage_digest, coverage_digest):
        with pytest.raises(ValueError, match="17/1/2 appears twice"):
            fn(rows)
        with pytest.raises(ValueError, match="unknown coverage status 'stale' for tile 17/1/3"):
            fn([((17, 1, 3), "stale")])
    with pytest.raises(ValueError, match="17/1/2 appears twice"):
        coverage_digest_arrays(17, np.array([[1, 2], [1, 2]]), np.array([0, 2]))
    with pytest.raises(ValueError, match="unknown coverage status '7'"):
        coverage_digest_arrays(17, np.array([[1, 3]]), np.array([7]))


def test_coverage_walk_digest_equals_the_reference_on_a_block() -> None:
    grid, tiles, described, blank = walk_inputs(60, seed=3)
    report = coverage_walk(grid, tiles, described, blank, 90.0)
    assert report.digest == reference_coverage_digest(list(report.statuses()))
    assert report.covered + report.blank + report.missing == 3600


def test_sha256_files_and_random_file(tmp_path: Path) -> None:
    a = common.write_random_file(tmp_path / "a.bin", 3 * 2**20 + 5, seed=1)
    b = common.write_random_file(tmp_path / "b.bin", 10, seed=2)
    assert a.stat().st_size == 3 * 2**20 + 5 and b.stat().st_size == 10
    assert a.read_bytes() != common.write_random_file(tmp_path / "c.bin", a.stat().st_size, seed=3).read_bytes()
    assert common.sha256_files([a, b], chunk_size=1 << 16) == a.stat().st_size + 10


def test_stats_timing_and_interleaving() -> None:
    stats = common.Stats.of([0.003, 0.001, 0.002])
    assert (stats.n, stats.min_ms, stats.p50_ms, stats.p99_ms) == (3, 1.0, 2.0, 3.0)
    calls: list[str] = []
    out = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2)
    assert calls == ["a", "b", "a", "b"] and out["a"].n == out["b"].n == 2
    assert common.ratio(3.0, 2.0) == 1.5 and np.isnan(common.ratio(1.0, 0.0))


def test_write_result_records_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    path = common.write_result("unit", {"x": 1})
    data = json.loads(path.read_text())
    assert data["benchmark"] == "unit" and data["x"] == 1
    assert data["machine"]["cores"] and "numpy" in data["machine"]["versions"]


def test_python_m_bench_lists_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    )
    names = ("engine-hit", "verify", "coverage", "index", "descriptors", "warm", "incremental", "cold", "runtime")
    for name in (*names, "server", "scale"):
        assert name in out.stdout


@pytest.mark.timeout(120)
def test_bench_coverage_quick_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "coverage", "--quick"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "machine:" in out.stdout and "coverage walk" in out.stdout
    result = Path(out.stdout.strip().splitlines()[-1].split("results: ")[1])
    data = json.loads(result.read_text())
    result.unlink()  # a smoke run is not a figure worth keeping
    assert data["tiles"] == 1_000_000 and data["machine"]["cores"]


def test_scale_orthophoto_is_4326_with_a_ragged_nodata_border_over_the_exact_square(tmp_path: Path) -> None:
    import rasterio

    from bench import scale

    tiles, bounds = scale.square_area(4)
    assert len(tiles) == 16 and tiles[0].z == scale.ZOOM and tiles[-1].x - tiles[0].x == 3
    ortho = scale.generate_orthophoto(tmp_path / "o.tif", bounds, m_per_px=20.0)
    with rasterio.open(ortho) as ds:
        assert ds.crs.to_epsg() == 4326 and ds.nodata == scale.NODATA and ds.overviews(1)
        assert np.allclose(tuple(ds.bounds), bounds, atol=1e-12)  # gdal2tiles cuts the sortie's own tiles
        pixels = ds.read()
    nodata = np.all(pixels == scale.NODATA, axis=0)
    edges = (nodata[0], nodata[-1], nodata[:, 0], nodata[:, -1])
    assert all(edge.mean() > 0.5 for edge in edges) and not nodata[nodata.shape[0] // 2, nodata.shape[1] // 2]
    assert 0.02 < nodata.mean() < 0.25  # a border band, not a blank raster
    assert pixels[:, ~nodata].std() > 10  # textured: tiles are described, not blank


def test_scale_box_polygon_selects_exactly_the_square(tmp_path: Path) -> None:
    import shapely.geometry

    from bench import scale
    from navcache.tiles import ChunkGrid

    tiles, bounds = scale.square_area(3)
    area = shapely.geometry.shape(scale.box_polygon(bounds))
    assert ChunkGrid(scale.ZOOM).chunks_for_area(area) == sorted(tiles)


@pytest.mark.parametrize("n", [0, 1, 7, 70_000])
def test_coverage_table_bytes_equal_json_dumps_of_the_report(n: int) -> None:
    from navcache.tiles import ChunkGrid

    rng = np.random.default_rng(n)
    xy = np.column_stack((60_000 + np.arange(n) % 300, 40_000 + np.arange(n) // 300))
    report = coverage_walk(ChunkGrid(17), xy, xy[rng.random(n) < 0.7], xy[rng.random(n) < 0.2], 50.0)
    assert report.to_json_bytes() == json.dumps(report.to_json(), separators=(",", ":")).encode()


def test_bench_assets_are_made_once_per_process_and_copied_for_each_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support import sorties

    made: list[Path] = []

    def make_small_assets(root: Path) -> sorties.Assets:  # the same layout as make_assets, bytes instead of models
        made.append(root)
        paths = [root / name for name in ("ortho.tif", "models/vpr.onnx", "models/local.onnx", "keys/k", "keys/t")]
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(path.name.encode())
        return sorties.Assets(root, *paths)

    monkeypatch.setattr(sorties, "make_assets", make_small_assets)
    monkeypatch.setattr(common, "_assets", None)
    first = common.bench_assets(tmp_path / "a")
    first.ortho.write_bytes(b"changed by the first benchmark")
    second = common.bench_assets(tmp_path / "b")
    assert len(made) == 1
    assert second.root == tmp_path / "b" and second.vpr_onnx == tmp_path / "b" / "models" / "vpr.onnx"
    assert second.ortho.read_bytes() == b"ortho.tif" and second.trusted_keys.read_bytes() == b"t"
