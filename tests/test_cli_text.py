"""What the ground crew read and the exit codes scripts rely on, through the real `navcache` command.

Every error path is checked for its exact text (bracketed sortie names such as ``[tiles]`` and
``[[backbones]][0]`` once vanished as console markup) and for its exit code against README's table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from navcache.errors import ExitCode
from navcache.lock import cache_lock
from navcache.sortie import _TABLES
from tests.support.cli import navcache as run_navcache
from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie

README = Path(__file__).resolve().parents[1] / "README.md"


def navcache(*args: str, home: Path, columns: int = 60) -> subprocess.CompletedProcess[str]:
    # A narrow terminal on purpose: an error is still one line, never wrapped.
    return run_navcache(*args, home=home, columns=columns)


@pytest.fixture
def good(assets: Assets, tmp_path: Path) -> Path:
    first, _ = block_tiles()
    return write_sortie(tmp_path / "sortie.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "cache")


def _refused_with(proc: subprocess.CompletedProcess[str], line: str | re.Pattern[str]) -> None:
    assert proc.returncode == ExitCode.REFUSED, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    if isinstance(line, str):
        assert lines[0] == line
    else:
        assert line.fullmatch(lines[0]), lines[0]


# --- exact error text -------------------------------------------------------------------------------------


def test_unknown_field_in_tiles_keeps_its_table_name(good: Path, tmp_path: Path) -> None:
    good.write_text(good.read_text().replace("zoom = 18", "zom = 18"))
    proc = navcache("provision", str(good), home=tmp_path / "home")
    valid = ", ".join(_TABLES["tiles"])
    _refused_with(
        proc,
        f"error: sortie.toml [tiles].zom: unknown field 'zom' in [tiles] (fix: did you mean 'zoom'? "
        f"valid fields: {valid})",
    )
    assert not (tmp_path / "cache").exists()


def test_error_in_a_backbone_names_backbones_index(good: Path, tmp_path: Path) -> None:
    good.write_text(good.read_text().replace('input = "image"', 'input = "img"', 1))
    proc = navcache("provision", str(good), home=tmp_path / "home")
    _refused_with(
        proc,
        "error: sortie.toml [[backbones]][0].input: backbone 'tiny_vpr': the model has no input 'img'; "
        "its inputs are 'image' (fix: set input = 'image')",
    )


def test_orthophoto_outside_the_area_hint_names_both_tables(assets: Assets, tmp_path: Path) -> None:
    first, _ = block_tiles()
    far = [type(t)(t.z, t.x + 2000, t.y) for t in first]
    sortie = write_sortie(tmp_path / "far.toml", assets, area=tiles_polygon(far), cache_dir=tmp_path / "cache")
    proc = navcache("provision", str(sortie), home=tmp_path / "home")
    number = r"-?\d+\.\d{5}"
    _refused_with(
        proc,
        re.compile(
            re.escape(f"error: {assets.ortho}: the orthophoto covers lon ")
            + f"{number}\\.\\.{number}, lat {number}\\.\\.{number}"
            + re.escape(", which does not overlap the sortie area (lon ")
            + f"{number}\\.\\.{number}, lat {number}\\.\\.{number}"
            + re.escape(") (fix: point [orthophoto] at imagery of the flight area, or fix [area])")
        ),
    )
    assert not (tmp_path / "cache").exists()


def test_swapped_takeoff_hint_reads_lat_lon(good: Path, tmp_path: Path) -> None:
    text = good.read_text()
    lat, lon = (re.search(rf"^{k} = (.+)$", text, re.M).group(1) for k in ("lat", "lon"))  # type: ignore[union-attr]
    good.write_text(text.replace(f"lat = {lat}\nlon = {lon}", f"lat = {lon}\nlon = {lat}"))
    proc = navcache("provision", str(good), home=tmp_path / "home")
    _refused_with(
        proc,
        re.compile(
            re.escape(f"error: sortie.toml [takeoff]: takeoff (lat {float(lon):g}, lon {float(lat):g}) lies ")
            + r"[\d,]+"
            + re.escape(
                " m outside the area (fix: fix [takeoff] (lat/lon, not lon/lat?) or extend the area to include it)"
            )
        ),
    )


def test_bracketed_sortie_id_is_quoted_back_literally(good: Path, tmp_path: Path) -> None:
    good.write_text(good.read_text().replace('sortie_id = "test-sortie"', 'sortie_id = "crew[1]"'))
    proc = navcache("provision", str(good), home=tmp_path / "home")
    assert proc.returncode == ExitCode.REFUSED
    assert proc.stderr.startswith("error: sortie.toml sortie_id: sortie_id 'crew[1]' is not a valid flight id")


def test_empty_passphrase_variable(tmp_path: Path) -> None:
    env_name = "NAVCACHE_TEST_EMPTY_PASSPHRASE"
    os.environ.pop(env_name, None)
    proc = navcache("keygen", "--dir", str(tmp_path / "keys"), "--passphrase-env", env_name, home=tmp_path / "home")
    _refused_with(proc, f"error: ${env_name} is empty or unset")


# --- one exit-code table ----------------------------------------------------------------------------------


def _readme_exit_codes() -> dict[int, str]:
    text = README.read_text()
    section = text.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \| .+ \|$", section, re.M)
    return {int(code): name for code, name in rows}


def test_readme_exit_code_table_is_the_exit_code_enum() -> None:
    assert _readme_exit_codes() == {member.value: member.name for member in ExitCode}


def test_lock_timeout_exits_locked_for_provision_and_gc(good: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with cache_lock(cache, 5):
        proc = navcache("provision", str(good), "--lock-timeout", "0.5", home=tmp_path / "home")
        gc = navcache("gc", str(cache), "--lock-timeout", "0.5", home=tmp_path / "home")
    assert proc.returncode == ExitCode.LOCKED, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {cache}: cache {cache} is still locked by pid {os.getpid()}")
    assert line.endswith(
        "(fix: wait for that run to finish, or provision into another --cache-dir); nothing was written"
    )
    assert not (cache / "engines").exists() and not (cache / "descriptors").exists()
    assert gc.returncode == ExitCode.LOCKED, gc.stderr


def test_a_source_error_after_the_run_started_exits_failed(
    good: Path, assets: Assets, tmp_path: Path, prefect_harness: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GeoTIFF passes preflight, then is truncated once the engines are built (as a copy still being
    written, or a disk going bad, would be): the shard read raises SourceError — an "input" error class —
    after engines were written, so the exit is FAILED, not REFUSED."""
    import navcache.progress as progress_module

    ortho = tmp_path / "ortho.tif"
    ortho.write_bytes(assets.ortho.read_bytes())
    good.write_text(good.read_text().replace(str(assets.ortho), str(ortho)))
    real_install = progress_module.install

    def install(reporter: progress_module.Reporter | None) -> None:
        def truncating(stage: str, amount: int, total: int | None) -> None:
            if stage == "descriptors" and ortho.stat().st_size > 4096:
                with ortho.open("r+b") as handle:
                    handle.truncate(4096)
            if reporter is not None:
                reporter(stage, amount, total)

        real_install(truncating if reporter is not None else None)

    monkeypatch.setattr(progress_module, "install", install)
    from navcache_cli import app

    result = CliRunner().invoke(app, ["provision", str(good), "--json"])
    assert result.exit_code == ExitCode.FAILED, result.output
    assert (tmp_path / "cache" / "engines").is_dir(), result.output  # work had been written: this is not a refusal
    assert not (tmp_path / "cache" / "manifest.dsse.json").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {ortho}")
    assert [line for line in result.stderr.splitlines() if str(ortho) in line] == [last]  # said once
    assert last.endswith("; the run stopped, the previous cache and manifest are untouched")


def test_nothing_describable_exits_failed_and_says_blank_not_missing(
    good: Path, assets: Assets, tmp_path: Path
) -> None:
    """Imagery over the whole area, but every chunk blank under a contrast floor no chunk reaches
    ([orthophoto] blank_std = 200): preflight passes, the run builds engines and shards, coverage is 0 %."""
    text = good.read_text()
    good.write_text(text.replace(f'geotiff = "{assets.ortho}"', f'geotiff = "{assets.ortho}"\nblank_std = 200.0'))
    proc = navcache("provision", str(good), home=tmp_path / "home", columns=200)
    assert proc.returncode == ExitCode.FAILED, proc.stderr
    assert (tmp_path / "cache" / "engines").is_dir() and not (tmp_path / "cache" / "manifest.dsse.json").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: no chunk of the area can be described: 4 blank, 0 missing (fix: the imagery is nodata or "
        "near-uniform there: use imagery with detail, or lower [orthophoto] blank_std if it is faint but usable)"
    )


def _half_flat_orthophoto(source: Path, out: Path, east_of_lon: float, lat: float) -> Path:
    """A copy of ``source`` whose pixels east of a meridian (less a 12 m margin for the UTM grid's tilt)
    are one flat grey: valid pixels, no detail, like a lake or snow."""
    import numpy as np
    import rasterio
    from pyproj import Transformer

    with rasterio.open(source) as src:
        profile, data = src.profile, src.read()
        x, _ = Transformer.from_crs("EPSG:4326", src.crs, always_xy=True).transform(east_of_lon, lat)
        col = int((x - 12.0 - src.transform.c) / src.transform.a)
    data[:, :, max(col, 0) :] = np.array([90, 120, 80], np.uint8)[:, None, None]
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def test_coverage_failure_hint_tells_blank_tiles_from_missing_ones(assets: Assets, tmp_path: Path) -> None:
    """Half the area is over flat imagery (a lake): preflight sees valid pixels everywhere, the run then finds
    2 of 4 tiles blank and stops below the threshold with FAILED and the blank fix, not "extend the orthophoto"."""
    from navcache.tiles import tile_bounds

    first, _ = block_tiles()
    east_column = max(t.x for t in first)
    west, south, _, north = tile_bounds(next(t for t in first if t.x == east_column))
    ortho = _half_flat_orthophoto(assets.ortho, tmp_path / "lake.tif", west, (south + north) / 2)
    sortie = write_sortie(tmp_path / "lake.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "cache")
    sortie.write_text(sortie.read_text().replace(str(assets.ortho), str(ortho)))
    proc = navcache("provision", str(sortie), home=tmp_path / "home", columns=200)
    assert proc.returncode == ExitCode.FAILED, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: test-lake: coverage 50.00 % is below the threshold 99 % (0 missing, 2 blank of 4 tiles) "
        "(fix: the imagery is nodata or near-uniform over 2 tiles (blank): use imagery with detail there, or lower "
        "[orthophoto] blank_std if it is faint but usable; or lower coverage_threshold (the previous manifest "
        "stays in force))"
    )


# --- a real run: summary, -v, verify ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def provisioned(
    assets: Assets, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One real provision into a cache whose path holds brackets, with -v."""
    root = tmp_path_factory.mktemp("run")
    first, _ = block_tiles()
    cache = root / "cache[a]"
    sortie = write_sortie(root / "sortie.toml", assets, area=tiles_polygon(first), cache_dir=cache)
    proc = navcache("provision", str(sortie), "-v", home=root / "home", columns=200)
    assert proc.returncode == ExitCode.OK, proc.stderr
    return cache, proc


def test_summary_and_progress_print_names_literally(provisioned: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    cache, proc = provisioned
    assert f"sortie test-sortie: cache {cache}" in proc.stdout
    assert f"v1 {cache}/manifest.dsse.json — verified" in proc.stdout
    assert re.search(r"^\s+descriptors ━+ 4/4", proc.stderr, re.M)
    # the self-test and the imagery's resolution are in the summary too (one table row each)
    assert re.search(r"self-test +│ 4 views: recall@1 [01]\.\d{3}, recall@5 1\.000 \(report only\)", proc.stdout)
    assert "too few chunks (4) to judge the descriptor space" in proc.stdout
    assert re.search(
        r"imagery +│ valid over ~100\.0 % of the area; upsampling \d\.\d\dx \(0\.6 m/px imagery", proc.stdout
    ), proc.stdout


def test_gc_table_prints_paths_literally(
    provisioned: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    cache, _ = provisioned
    proc = navcache("gc", str(cache), "--dry-run", home=tmp_path / "home", columns=250)
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert f"gc {cache}: would remove 0, kept" in proc.stdout
    assert "named by the current manifest" in proc.stdout


def test_verbose_prints_preflight_lines_once(provisioned: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, proc = provisioned
    lines = [line.strip() for line in proc.stderr.splitlines()]
    for line in (
        "INFO     sortie test-sortie: 4 chunks at z18, 2 backbone(s), runtime onnx_trt_ep",
        "INFO     backbone tiny_vpr: ONNX model tiny_vpr.onnx checked",
        "INFO     backbone local_features: ONNX model local_features.onnx checked",
    ):
        assert lines.count(line) == 1, proc.stderr


def test_verify_help_shows_the_onboard_options(tmp_path: Path) -> None:
    proc = navcache("verify", "--help", home=tmp_path / "home", columns=120)
    assert proc.returncode == ExitCode.OK
    for option in ("--trusted-keys", "--mode {airborne,operator}", "--now", "--state", "--strict-extra", "--json"):
        assert option in proc.stdout, proc.stdout


def test_verify_exit_codes(
    provisioned: tuple[Path, subprocess.CompletedProcess[str]], assets: Assets, tmp_path: Path
) -> None:
    cache, _ = provisioned
    home = tmp_path / "home"
    ok = navcache("verify", str(cache), "--trusted-keys", str(assets.trusted_keys), home=home)
    assert ok.returncode == ExitCode.OK, ok.stdout + ok.stderr
    no_keys = navcache("verify", str(cache), "--trusted-keys", str(tmp_path / "none.json"), home=home)
    assert no_keys.returncode == ExitCode.REFUSED
    bad_now = navcache("verify", str(cache), "--trusted-keys", str(assets.trusted_keys), "--now", "x", home=home)
    assert bad_now.returncode == ExitCode.REFUSED
    assert bad_now.stderr.strip().splitlines() == [
        "error: --now 'x' is not an ISO 8601 time (e.g. 2026-11-23T08:00:00Z)"
    ]
    index = next((cache / "index").glob("*.faiss"))
    original = index.read_bytes()
    try:
        index.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        refused = navcache("verify", str(cache), "--trusted-keys", str(assets.trusted_keys), home=home)
    finally:
        index.write_bytes(original)
    assert refused.returncode == ExitCode.FAILED
    assert "REFUSED" in refused.stdout


def test_leftovers_are_one_line_in_verify_and_in_the_temp_sweep(
    provisioned: tuple[Path, subprocess.CompletedProcess[str]], assets: Assets, tmp_path: Path
) -> None:
    """A failed run leaves files the manifest does not name, and a killed one temp files: each kind is one
    summary line, not one warning per file."""
    from navcache.gc import summarise_temps, sweep_orphan_temps
    from navcache_runtime.integrity import TEMP_PREFIX

    cache, _ = provisioned
    leftovers = [cache / "descriptors" / f"{i:032x}.desc.npy" for i in range(5)]
    try:
        for path in leftovers:
            path.write_bytes(b"left by a failed run")
        proc = navcache("verify", str(cache), "--trusted-keys", str(assets.trusted_keys), home=tmp_path / "home")
    finally:
        for path in leftovers:
            path.unlink()
    assert proc.returncode == ExitCode.OK
    warned = [line for line in proc.stdout.splitlines() if "extra_file" in line]
    assert warned == [
        "warn  [extra_file] 5 file(s) in the cache are not listed in the manifest (left by earlier or failed runs; "
        "`navcache gc CACHE` removes them): descriptors/00000000000000000000000000000000.desc.npy, "
        "descriptors/00000000000000000000000000000001.desc.npy, "
        "descriptors/00000000000000000000000000000002.desc.npy, ..."
    ]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    other = tmp_path / "cache"
    for directory, n in (("engines", 1), ("descriptors", 3)):
        (other / directory).mkdir(parents=True)
        for i in range(n):
            (other / directory / f"{TEMP_PREFIX}{pid}-{i:08x}-x.npy").write_bytes(b"12345")
    swept = sweep_orphan_temps(other)
    assert summarise_temps(swept) == (
        f"removed 4 temp files (20 bytes) left by interrupted runs (pid {pid}): 3 in descriptors/, 1 in engines/"
    )
    assert not list(other.rglob(f"{TEMP_PREFIX}*"))
