"""Preflight refuses in about a second what would fail minutes later, on inputs shaped like a real crew's:
coarse EPSG:4326 imagery with a ragged nodata border, long bending routes."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import securesystemslib.signer as sslib_signer

from navcache.errors import ManifestError, SortieError, SourceError
from navcache.imagery import GeoTiffSource, ground_m_per_px
from navcache.keys import SIGNER_SECRET_ENV, KeyPaths, generate_keypair
from navcache.preflight import COVERAGE_MARGIN, check_cache_dir, check_keys, run_preflight
from navcache.sortie import load_sortie
from tests.support.cli import navcache
from tests.support.realistic import (
    bending_route,
    coarse_orthophoto,
    cut_tiles,
    mbtiles_file,
    route_sortie,
    truncated_copy,
    xyz_folder,
)
from tests.support.sortie_files import write_document
from tests.support.sorties import Assets
from tests.test_keys import PIN_SCHEME, PinToken

# A 22 x 22 km orthophoto at 100 m/px; routes start inside it and fly east.
BOX = {"west": 11.0, "south": 47.6, "east": 11.3, "north": 47.8}
START = (11.05, 47.70)


@pytest.fixture(scope="module")
def ortho(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return coarse_orthophoto(tmp_path_factory.mktemp("imagery") / "ortho.tif", **BOX)


def _sortie(tmp_path: Path, assets: Assets, ortho: Path, *, km: float = 15, **kwargs: object) -> Path:
    route = bending_route(*START, km, heading_deg=90)
    options: dict = {"corridor_m": 300, "orthophoto": ortho, "cache_dir": tmp_path / "cache", "zoom": 14} | kwargs
    return route_sortie(tmp_path / "s.toml", assets, route=route, **options)


def test_a_long_route_over_a_sliver_of_imagery_is_refused_in_about_a_second(
    assets: Assets, ortho: Path, tmp_path: Path
) -> None:
    # 300 km of trail, 15 of them over the imagery: the run would describe every tile, then fail at coverage.
    sortie = _sortie(tmp_path, assets, ortho, km=300, zoom=16)
    started = time.perf_counter()
    with pytest.raises(SourceError, match=r"valid pixels cover only about \d+\.\d % of the area") as refused:
        run_preflight(sortie)
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"preflight took {elapsed:.1f} s"
    text = str(refused.value)
    assert "below coverage_threshold 99 %" in text and "the imagery spans lon 11.00000..11.30" in text
    assert "clip the area or route to the imagery" in text
    assert not (tmp_path / "cache").exists()


def test_the_estimate_matches_the_valid_pixels_of_the_decoded_tiles(
    assets: Assets, tmp_path: Path, ortho: Path
) -> None:
    """Over the ragged nodata border (255, and an explicit nodata value 0), the estimate agrees with the
    valid pixels of the area's tiles read as provisioning reads them."""
    for nodata in (255, 0):
        image = coarse_orthophoto(tmp_path / f"ortho-{nodata}.tif", **BOX, nodata=nodata, seed=3)
        # From inside the imagery out across its eastern edge and beyond.
        sortie = _sortie(tmp_path, assets, image, km=25, zoom=14, threshold=0.0)
        report = run_preflight(sortie)
        spec = load_sortie(sortie)
        tiles = spec.grid.storage_tiles_for_area(spec.area)
        with GeoTiffSource(image) as source:
            decoded = [source.read_tile(t) for t in tiles]
        actual = 100.0 * np.mean([0.0 if t is None else t.valid_fraction for t in decoded])
        assert 20.0 < report.imagery.estimated_coverage_percent < 90.0
        assert report.imagery.estimated_coverage_percent == pytest.approx(actual, abs=8.0)


def test_a_threshold_within_the_margin_of_the_estimate_passes_and_beyond_it_is_refused(
    assets: Assets, ortho: Path, tmp_path: Path
) -> None:
    estimate = run_preflight(_sortie(tmp_path, assets, ortho, km=25, threshold=0.0)).imagery.estimated_coverage_percent
    run_preflight(_sortie(tmp_path, assets, ortho, km=25, threshold=round(estimate + COVERAGE_MARGIN - 1, 1)))
    with pytest.raises(SourceError, match="below coverage_threshold"):
        run_preflight(_sortie(tmp_path, assets, ortho, km=25, threshold=round(estimate + COVERAGE_MARGIN + 1, 1)))


def test_imagery_that_is_nodata_over_the_whole_area_is_refused(assets: Assets, tmp_path: Path) -> None:
    blank = coarse_orthophoto(tmp_path / "blank.tif", **BOX, all_nodata=True)
    with pytest.raises(SourceError, match="has no valid pixels over the area") as refused:
        run_preflight(_sortie(tmp_path, assets, blank, threshold=0.0))  # refused whatever the threshold
    assert "gdalinfo -stats" in str(refused.value)


def test_a_truncated_geotiff_is_refused_naming_the_cut(assets: Assets, ortho: Path, tmp_path: Path) -> None:
    cut = truncated_copy(ortho, tmp_path / "cut.tif", keep=0.6)
    with rasterio.open(cut) as ds:  # GDAL still opens it: the header comes first
        assert ds.width > 0
    with pytest.raises(SourceError, match=r"the file is truncated: it is [\d,]+ bytes") as refused:
        run_preflight(_sortie(tmp_path, assets, cut))
    assert "copy or export the orthophoto again" in str(refused.value)
    assert not (tmp_path / "cache").exists()


def test_a_corrupt_block_under_the_area_is_refused(assets: Assets, ortho: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(ortho.read_bytes())
    with rasterio.open(broken) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_0_0", "TIFF", bidx=1))
    with broken.open("r+b") as f:  # same length, garbage DEFLATE stream
        f.seek(offset)
        f.write(bytes(range(256)) * (size // 256) + b"\xff" * (size % 256))
    with pytest.raises(SourceError, match="the blocks under the area cannot be read"):
        run_preflight(_sortie(tmp_path, assets, broken))


def test_a_cache_dir_below_a_file_is_refused_creating_nothing(assets: Assets, ortho: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    sortie = _sortie(tmp_path, assets, ortho, cache_dir=blocker / "deep" / "cache")
    with pytest.raises(SortieError, match="is a file, not a folder") as refused:
        run_preflight(sortie)
    assert str(refused.value).startswith("s.toml cache_dir: cache directory")
    with pytest.raises(SortieError, match="--cache-dir: cache directory"):
        run_preflight(sortie, cache_dir=blocker / "cache")
    assert blocker.is_file() and not (tmp_path / "cache").exists()


def _signed_by(sortie: Path, signing_key: str, trusted_keys: Path) -> Path:
    doc = tomllib.loads(sortie.read_text(encoding="utf-8"))
    return write_document(sortie, doc | {"signing_key": signing_key, "trusted_keys": str(trusted_keys)})


@pytest.fixture
def operator(tmp_path: Path) -> KeyPaths:
    return generate_keypair(tmp_path / "ops", passphrase=None)


# Each securesystemslib signer that would fail at signing time, after the whole run: (private key URI after
# "sslib:<keyid>:", with {key} for the operator's key file and {other} for another key's; what the error says).
BAD_SIGNERS = {
    "unknown keyid": ("deadbeef:file2:{key}", "no allowed key matches keyid 'deadbeef'"),
    "missing key file": ("{keyid}:file2:{key}.gone", "cannot read the private key: No such file or directory"),
    "another key's file": ("{keyid}:file2:{other}", "the private key does not match the allowlisted key"),
    "unknown scheme": ("{keyid}:nokms:projects/p/keys/k", "securesystemslib has no signer for private key URIs"),
    "backend not installed": ("{keyid}:hv:ops/1", "the securesystemslib backend for hv: keys is not installed"),
    "HSM (ECDSA keys only)": ("{keyid}:hsm:", "securesystemslib's hsm: signer cannot sign with an Ed25519 key"),
}


@pytest.mark.parametrize("case", BAD_SIGNERS)
def test_a_securesystemslib_signer_that_would_not_sign_is_refused_in_preflight(
    case: str, assets: Assets, ortho: Path, operator: KeyPaths, tmp_path: Path
) -> None:
    if case == "backend not installed" and importlib.util.find_spec("hvac") is not None:
        pytest.skip("hvac (the vault backend) is installed here")
    other = generate_keypair(tmp_path / "other", passphrase=None)
    uri, says = BAD_SIGNERS[case]
    spec = "sslib:" + uri.format(keyid=operator.keyid[:10], key=operator.private_key, other=other.private_key)
    sortie = _signed_by(_sortie(tmp_path, assets, ortho), spec, operator.trusted_keys)
    with pytest.raises(ManifestError) as refused:
        run_preflight(sortie)
    text = str(refused.value)
    assert text.startswith(f"s.toml signing_key: cannot use the signer {spec}: {says}"), text
    assert "(fix: " in text and "\n" not in text and refused.value.exit_code == 2
    assert not (tmp_path / "cache").exists()


def test_a_securesystemslib_signer_that_loads_passes_preflight(
    assets: Assets, ortho: Path, operator: KeyPaths, tmp_path: Path
) -> None:
    spec = f"sslib:{operator.keyid[:10]}:file2:{operator.private_key}"
    sortie = _signed_by(_sortie(tmp_path, assets, ortho, km=25, threshold=0.0), spec, operator.trusted_keys)
    assert run_preflight(sortie).sortie.signing_key == spec


def test_a_signer_that_needs_a_pin_is_refused_in_preflight_until_the_variable_gives_it(
    assets: Assets, ortho: Path, operator: KeyPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sslib_signer.SIGNER_FOR_URI_SCHEME, PIN_SCHEME, PinToken)
    spec = f"sslib:{operator.keyid[:10]}:{PIN_SCHEME}:{operator.private_key}"
    sortie = _signed_by(_sortie(tmp_path, assets, ortho, km=25, threshold=0.0), spec, operator.trusted_keys)
    monkeypatch.delenv(SIGNER_SECRET_ENV, raising=False)
    with pytest.raises(ManifestError) as refused:
        run_preflight(sortie)
    assert str(refused.value) == (
        f"s.toml signing_key: cannot use the signer {spec}: the signer needs its pin from $NAVCACHE_SIGNER_SECRET, "
        "which is unset or empty (fix: set NAVCACHE_SIGNER_SECRET to the pin in the environment of the process "
        "that signs (the shell that runs navcache, or the Prefect worker's environment))"
    )
    assert refused.value.exit_code == 2 and not (tmp_path / "cache").exists()
    monkeypatch.setenv(SIGNER_SECRET_ENV, PinToken.PIN)
    assert run_preflight(sortie).sortie.signing_key == spec


def test_a_key_file_gone_since_the_sortie_was_loaded_is_named_by_the_sortie_file_name(
    assets: Assets, ortho: Path, operator: KeyPaths, tmp_path: Path
) -> None:
    sortie = load_sortie(_signed_by(_sortie(tmp_path, assets, ortho), str(operator.private_key), operator.trusted_keys))
    operator.private_key.unlink()
    with pytest.raises(SourceError) as refused:
        check_keys(sortie)
    assert refused.value.where == "s.toml signing_key" and refused.value.exit_code == 2
    assert str(refused.value).startswith(f"s.toml signing_key: signing_key {operator.private_key} does not exist")


def test_provision_refuses_a_wrong_signer_keyid_with_exit_2_before_prefect_or_any_write(
    assets: Assets, ortho: Path, operator: KeyPaths, tmp_path: Path
) -> None:
    sortie = _signed_by(
        _sortie(tmp_path, assets, ortho, km=25, threshold=0.0),
        f"sslib:deadbeef:file2:{operator.private_key}",
        operator.trusted_keys,
    )
    proc = navcache("provision", str(sortie), home=tmp_path / "prefect-home", timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "signing_key: cannot use the signer sslib:deadbeef:" in proc.stderr, proc.stderr
    assert "no allowed key matches keyid 'deadbeef'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "prefect-home").exists()


def _unprivileged(check: object) -> str | None:
    """Run ``check()`` as user nobody (root may write anywhere); its SortieError message, or None."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        message = ""
        try:
            os.setgid(65534)
            os.setuid(65534)
            check()  # type: ignore[operator]
        except SortieError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {type(exc).__name__}: {exc}"
        os.write(write, json.dumps(message).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        return json.loads(pipe.read()) or None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_a_read_only_cache_dir_or_parent_is_refused_creating_nothing() -> None:
    base = Path(tempfile.mkdtemp(prefix="navcache-ro-"))  # pytest's own folders are closed to other users
    base.chmod(0o755)  # anyone may look inside, only its owner write
    (base / "cache" / "engines").mkdir(parents=True)
    (base / "cache").chmod(0o777)
    (base / "cache" / "engines").chmod(0o555)

    def sortie_for(cache: Path) -> SimpleNamespace:
        return SimpleNamespace(cache_dir=cache, path=base / "s.toml")

    def run(cache: Path) -> str | None:
        def check() -> None:
            check_cache_dir(sortie_for(cache))  # type: ignore[arg-type]

        return _unprivileged(check) if os.geteuid() == 0 else _catch(check)

    new = run(base / "new" / "cache")
    assert new is not None and "cannot be created" in new and f"{base} is not writable by this user" in new
    engines = run(base / "cache")
    assert engines is not None and "cannot be written" in engines and "engines is not writable" in engines
    assert "choose a writable cache_dir (or --cache-dir)" in engines
    assert not (base / "new").exists()
    (base / "cache" / "engines").chmod(0o755)
    shutil.rmtree(base)


def _catch(check: object) -> str | None:
    try:
        check()  # type: ignore[operator]
    except SortieError as exc:
        return str(exc)
    return None


def test_upsampling_is_measured_and_warned_above_max_upsampling(
    assets: Assets, ortho: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="navcache.preflight"):
        report = run_preflight(_sortie(tmp_path, assets, ortho, zoom=17))
    survey = report.imagery
    tile = ground_m_per_px(47.70, 17, 256)
    assert survey.imagery_m_per_px == pytest.approx(100.0, rel=0.03)
    assert survey.tile_m_per_px == pytest.approx(tile, rel=0.01)
    assert survey.upsampling == pytest.approx(100.0 / tile, rel=0.04)  # ~125x
    (warning,) = report.warnings
    assert "upsampled 125x" in warning and "max_upsampling = 4" in warning and "zoom = 12 or lower" in warning
    assert warning in caplog.text and "imagery: valid pixels over about" in caplog.text

    quiet = run_preflight(_sortie(tmp_path, assets, ortho, zoom=17, tiles_extra="max_upsampling = 200"))
    assert quiet.warnings == ()
    assert run_preflight(_sortie(tmp_path, assets, ortho, zoom=12)).warnings == ()  # ~2x: fine


def test_max_upsampling_is_validated(assets: Assets, ortho: Path, tmp_path: Path) -> None:
    with pytest.raises(SortieError, match=r"\[tiles\]\.max_upsampling"):
        load_sortie(_sortie(tmp_path, assets, ortho, tiles_extra="max_upsampling = 0.5"))


def test_tile_stores_are_surveyed_by_tile_index_and_resolution_by_their_finest_zoom(
    assets: Assets, ortho: Path, tmp_path: Path
) -> None:
    tiles = cut_tiles(ortho, range(12, 14))
    folder, mbtiles = xyz_folder(tiles, tmp_path / "xyz"), mbtiles_file(tiles, tmp_path / "ortho.mbtiles")
    geotiff = run_preflight(_sortie(tmp_path, assets, ortho, km=25, zoom=13, threshold=0.0)).imagery
    for kind, path in (("xyz", folder), ("mbtiles", mbtiles)):
        survey = run_preflight(_sortie(tmp_path, assets, path, km=25, zoom=13, threshold=0.0, kind=kind)).imagery
        assert survey.zoom_levels == (12, 13)
        assert survey.upsampling == pytest.approx(1.0)  # the sortie zoom is the finest level, same tile size
        # Tile existence counts a tile with any valid pixel: a little more than the raster's valid pixels.
        assert geotiff.estimated_coverage_percent - 2 <= survey.estimated_coverage_percent
        assert survey.estimated_coverage_percent <= geotiff.estimated_coverage_percent + 20
        with pytest.raises(SourceError, match=r"zoom levels 12, 13, not the sortie's zoom 14") as refused:
            run_preflight(_sortie(tmp_path, assets, path, zoom=14, kind=kind))
        assert "set [tiles] zoom to one of 12, 13" in str(refused.value)


def test_provision_refuses_the_sliver_with_exit_2_before_prefect_or_any_write(
    assets: Assets, ortho: Path, tmp_path: Path
) -> None:
    sortie = _sortie(tmp_path, assets, ortho, km=300, zoom=16)
    started = time.perf_counter()
    proc = navcache("provision", str(sortie), home=tmp_path / "prefect-home", timeout=300)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    assert "valid pixels cover only about" in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < 20, f"refused after {elapsed:.1f} s"  # interpreter start and imports included
    assert not (tmp_path / "cache").exists() and not (tmp_path / "prefect-home").exists()


@pytest.mark.slow
def test_the_full_size_unclipped_trail_is_refused_quickly(assets: Assets, ortho: Path, tmp_path: Path) -> None:
    """A 4,026 km trail at zoom 17 over a small orthophoto: a run would walk 67,549 tiles for about a minute
    and stop at 1.96 % coverage, so preflight must refuse it in seconds."""
    route = bending_route(*START, 4026, heading_deg=90, bend_km=20, swing_deg=60)
    sortie = route_sortie(
        tmp_path / "s.toml", assets, route=route, corridor_m=300, orthophoto=ortho, cache_dir=tmp_path / "c", zoom=17
    )
    started = time.perf_counter()
    with pytest.raises(SourceError, match="valid pixels cover only about 0.6 %"):
        run_preflight(sortie)
    assert time.perf_counter() - started < 15.0


def test_the_survey_of_a_tile_never_decodes_it(ortho: Path) -> None:
    """valid_at reads the mask once for all points; no tile is warped (read_tile is never called)."""
    from navcache.imagery import valid_at

    with GeoTiffSource(ortho) as source:
        source.read_tile = None  # type: ignore[method-assign,assignment]
        inside = valid_at(source, np.array([11.15, 11.15, 12.0]), np.array([47.70, 47.601, 47.70]))
    assert inside is not None and inside.tolist() == [True, False, False]  # centre, ragged corner, outside


def test_sheets_are_surveyed_like_the_single_file_they_were_cut_from(
    assets: Assets, ortho: Path, tmp_path: Path
) -> None:
    from rasterio.windows import Window

    sheets = tmp_path / "sheets"
    sheets.mkdir()
    with rasterio.open(ortho) as ds:
        half = ds.width // 2
        for name, window in (("a", Window(0, 0, half, ds.height)), ("b", Window(half, 0, ds.width - half, ds.height))):
            profile = ds.profile | {
                "width": window.width,
                "height": window.height,
                "transform": ds.window_transform(window),
            }
            with rasterio.open(sheets / f"{name}.tif", "w", **profile) as out:
                out.write(ds.read(window=window))
    whole = run_preflight(_sortie(tmp_path, assets, ortho, km=25, threshold=0.0)).imagery
    split = run_preflight(_sortie(tmp_path, assets, sheets / "*.tif", km=25, threshold=0.0)).imagery
    assert "2 GeoTIFF sheets" in split.source
    assert split.estimated_coverage_percent == pytest.approx(whole.estimated_coverage_percent, abs=0.5)
    assert split.upsampling == pytest.approx(whole.upsampling, rel=1e-6)
