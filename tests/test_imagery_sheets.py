"""Imagery as mapping agencies ship it: one orthophoto cut into GeoTIFF sheets (in one CRS, and in two UTM
zones), or a GDAL VRT over the sheets, reads and describes like the single file, and the scan memo works
per sheet; and the window warp gives the pixels and descriptors of GDAL's tile-by-tile warp."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

import navcache_runtime as nr
from navcache.descriptors import (
    DESCRIBED,
    DescriptorEngine,
    Preprocessing,
    ShardResult,
    classify,
    describe_shard,
    load_shard,
)
from navcache.errors import SortieError, SourceError
from navcache.imagery import GeoTiffMosaicSource, GeoTiffSource, TileSource, open_tile_source, source_version
from navcache.sortie import load_sortie
from navcache.tiles import ChunkGrid, ShardPlan, plan_shards, tile_bounds, tile_for_lonlat
from navcache.types import Tile, TileId
from navcache_runtime import BuildConfig, InputProfile
from tests.support.sorties import CENTER_LAT, CENTER_LON, Assets, block_tiles, tiles_polygon, write_sortie
from tests.support.sources import CountingSource

ZOOM = 18
GRID = ChunkGrid(ZOOM, 256)
SPLIT = 4  # sheets per side: 16 sheets of about 625 m (1,042 px) over the 2.5 km demo orthophoto
EAST_CRS = "EPSG:32633"  # the demo orthophoto is in UTM 32N; its east half goes to the next zone


def _cut_sheets(ortho: Path, directory: Path, reproject_east: bool) -> list[Path]:
    """Cut ``ortho`` into SPLIT x SPLIT sheet files (same profile, tiled, DEFLATE); with ``reproject_east``
    the eastern half of the sheets is warped into EAST_CRS (bilinear, nodata around the rotated data), as
    an agency delivers sheets on both sides of a zone boundary."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(ortho) as ds:
        cols = np.linspace(0, ds.width, SPLIT + 1).astype(int)
        rows = np.linspace(0, ds.height, SPLIT + 1).astype(int)
        for i in range(SPLIT):
            for j in range(SPLIT):
                window = Window(cols[j], rows[i], cols[j + 1] - cols[j], rows[i + 1] - rows[i])
                data = ds.read(window=window)
                profile = dict(ds.profile, width=window.width, height=window.height)
                profile["transform"] = ds.window_transform(window)
                path = directory / f"sheet_{i}_{j}.tif"
                if reproject_east and j >= SPLIT // 2:
                    left, bottom, right, top = rasterio.windows.bounds(window, ds.transform)
                    transform, width, height = calculate_default_transform(
                        ds.crs, EAST_CRS, window.width, window.height, left, bottom, right, top, resolution=0.6
                    )
                    warped = np.zeros((ds.count, height, width), np.uint8)
                    reproject(
                        data,
                        warped,
                        src_transform=profile["transform"],
                        src_crs=ds.crs,
                        src_nodata=ds.nodata,
                        dst_transform=transform,
                        dst_crs=EAST_CRS,
                        dst_nodata=ds.nodata,
                        resampling=Resampling.bilinear,
                    )
                    profile.update(crs=EAST_CRS, transform=transform, width=width, height=height)
                    data = warped
                with rasterio.open(path, "w", **profile) as out:
                    out.write(data)
                paths.append(path)
    return sorted(paths)


def _write_vrt(path: Path, ortho: Path, sheets: list[Path]) -> Path:
    """A minimal GDAL VRT mosaicking same-CRS sheets (what ``gdalbuildvrt`` writes, by hand: rasterio cannot
    build VRTs, and GDAL's command-line tools are not a dependency)."""
    with rasterio.open(ortho) as ds:
        width, height, crs, gt, nodata = ds.width, ds.height, ds.crs.to_wkt(), ds.transform.to_gdal(), ds.nodata
        inverse = ~ds.transform
    bands = []
    for band, colour in enumerate(("Red", "Green", "Blue"), start=1):
        sources = []
        for sheet in sheets:
            with rasterio.open(sheet) as s:
                col, row = (round(v) for v in inverse @ (s.transform.c, s.transform.f))
                sources.append(
                    f'<ComplexSource><SourceFilename relativeToVRT="1">{sheet.relative_to(path.parent)}'
                    f"</SourceFilename><SourceBand>{band}</SourceBand>"
                    f'<SrcRect xOff="0" yOff="0" xSize="{s.width}" ySize="{s.height}"/>'
                    f'<DstRect xOff="{col}" yOff="{row}" xSize="{s.width}" ySize="{s.height}"/>'
                    f"<NODATA>{nodata:g}</NODATA></ComplexSource>"
                )
        bands.append(
            f'<VRTRasterBand dataType="Byte" band="{band}"><NoDataValue>{nodata:g}</NoDataValue>'
            f"<ColorInterp>{colour}</ColorInterp>{''.join(sources)}</VRTRasterBand>"
        )
    path.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{crs.replace("<", "&lt;")}</SRS>'
        f"<GeoTransform>{', '.join(repr(v) for v in gt)}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    return path


@pytest.fixture(scope="module")
def sheets(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("sheets")
    return {
        "same-crs": _cut_sheets(assets.ortho, root / "same", reproject_east=False),
        "two-utm-zones": _cut_sheets(assets.ortho, root / "zones", reproject_east=True),
    }


def _coarse_wgs84(ortho: Path, path: Path) -> Path:
    """``ortho`` warped to EPSG:4326 at about 2.5 m (coarser than z18 tiles' 0.4 m: upsampled, as regional
    imagery is), with nodata around the rotated footprint: a nodata border inside the raster's extent."""
    with rasterio.open(ortho) as ds:
        transform, width, height = calculate_default_transform(
            ds.crs, "EPSG:4326", ds.width, ds.height, *ds.bounds, resolution=(3.4e-5, 2.3e-5)
        )
        warped = np.zeros((ds.count, height, width), np.uint8)
        reproject(
            ds.read(),
            warped,
            src_transform=ds.transform,
            src_crs=ds.crs,
            src_nodata=ds.nodata,
            dst_transform=transform,
            dst_crs="EPSG:4326",
            dst_nodata=0,
            resampling=Resampling.bilinear,
        )
        profile = dict(ds.profile, crs="EPSG:4326", transform=transform, width=width, height=height, nodata=0)
    with rasterio.open(path, "w", **profile) as out:
        out.write(warped)
    return path


@pytest.fixture(scope="module")
def engine(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> DescriptorEngine:
    """The demo's VPR backbone (128 px), compiled through the real runtime as provisioning does."""
    runtime = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(tmp_path_factory.mktemp("eng"))})
    shape = (3, 128, 128)
    profile = InputProfile("image", (1, *shape), (8, *shape), (16, *shape))
    entry = runtime.compile_engine(assets.vpr_onnx, BuildConfig(precision="fp32", input_shapes=(profile,)))
    return DescriptorEngine(runtime, runtime.deserialize_engine(entry), "image", None, entry.sha256, 8)


def _centre_block(size: int) -> list[TileId]:
    """size x size zoom-18 tiles around the orthophoto's centre: they cross sheet seams both ways."""
    centre = tile_for_lonlat(CENTER_LON, CENTER_LAT, ZOOM)
    half = size // 2
    return [
        TileId(ZOOM, centre.x + dx, centre.y + dy)
        for dy in range(-half, size - half)
        for dx in range(-half, size - half)
    ]


def _shard() -> ShardPlan:
    """The 4 x 4 shard block holding the orthophoto's centre tile, which the central seams cross both ways:
    four sheets, each under part of the shard."""
    centre = tile_for_lonlat(CENTER_LON, CENTER_LAT, ZOOM)
    x0, y0 = centre.x // 4 * 4, centre.y // 4 * 4
    (plan,) = plan_shards([TileId(ZOOM, x0 + dx, y0 + dy) for dy in range(4) for dx in range(4)], 4)
    return plan


def _compare(reference: TileSource, other: TileSource, tiles: list[TileId]) -> dict[str, float]:
    """Per-pixel agreement of two sources over ``tiles`` (validity, mean and max absolute difference)."""
    valid_mismatch = differing = 0
    total = 0
    abs_sum = 0.0
    worst = 0
    for tile in tiles:
        a, b = reference.read_tile(tile), other.read_tile(tile)
        assert (a is None) == (b is None), tile
        if a is None or b is None:
            continue
        total += a.valid.size
        valid_mismatch += int((a.valid != b.valid).sum())
        both = a.valid & b.valid
        diff = np.abs(a.rgb.astype(np.int16) - b.rgb.astype(np.int16))[both]
        abs_sum += float(diff.sum()) / 3
        differing += int(diff.any(axis=-1).sum())
        worst = max(worst, int(diff.max(initial=0)))
    return {
        "valid_mismatch": valid_mismatch / total,
        "mean_abs": abs_sum / total,
        "differing": differing / total,
        "max_abs": worst,
    }


@pytest.mark.parametrize(
    ("layout", "max_valid_mismatch", "max_mean_abs", "max_differing"),
    [
        # Cut from the raster: mosaicked on their grid before warping, so the very pixels of the single file.
        ("same-crs", 0.0, 0.0, 0.0),
        # Half the sheets resampled once more into the next UTM zone: a bilinear blur over those sheets.
        ("two-utm-zones", 0.001, 1.0, 0.5),
    ],
)
def test_sheets_read_the_same_tiles_as_the_single_file(
    assets: Assets,
    sheets: dict[str, list[Path]],
    layout: str,
    max_valid_mismatch: float,
    max_mean_abs: float,
    max_differing: float,
) -> None:
    paths = sheets[layout]
    # One row of tiles beyond the orthophoto's west edge too: None from both.
    west = tile_for_lonlat(CENTER_LON - 0.03, CENTER_LAT, ZOOM)
    tiles = [*_centre_block(6), west]
    with GeoTiffSource(assets.ortho) as one, open_tile_source("geotiff", paths, 256) as many:
        assert isinstance(many, GeoTiffMosaicSource)
        assert many.read_tile(west) is None and many.raw_digest(west) == "none"
        assert max(len(many.sheets_of(t)) for t in tiles) == 4  # a tile on the corner of four sheets
        figures = _compare(one, many, tiles)
        bounds_one, bounds_many = one.bounds_lonlat(), many.bounds_lonlat()
    print(f"\n{layout}: {figures}")
    assert figures["valid_mismatch"] <= max_valid_mismatch
    assert figures["mean_abs"] <= max_mean_abs
    assert figures["differing"] <= max_differing
    assert np.allclose(bounds_one, bounds_many, atol=1e-3)  # reprojected sheets: bounds of rotated data


def _describe(source: TileSource, engine: DescriptorEngine, out: Path) -> ShardResult:
    return describe_shard(
        _shard(),
        source=source,
        grid=GRID,
        engine=engine,
        preprocessing=Preprocessing(128, 128),
        out_dir=out,
    )


def _described(result: ShardResult) -> dict[TileId, np.ndarray]:
    descriptors, table = load_shard(result)
    chunks = [TileId(int(r["z"]), int(r["x"]), int(r["y"])) for r in table if r["status"] == DESCRIBED]
    return dict(zip(chunks, descriptors.astype(np.float32), strict=True))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    ("layout", "min_cosine", "min_centred"), [("same-crs", 0.999, 0.99), ("two-utm-zones", 0.999, 0.9)]
)
def test_sheets_give_the_descriptors_of_the_single_file(
    assets: Assets,
    sheets: dict[str, list[Path]],
    engine: DescriptorEngine,
    tmp_path: Path,
    layout: str,
    min_cosine: float,
    min_centred: float,
) -> None:
    with GeoTiffSource(assets.ortho) as one:
        reference = _described(_describe(one, engine, tmp_path / "one"))
    with GeoTiffMosaicSource(sheets[layout]) as many:
        got = _described(_describe(many, engine, tmp_path / "many"))
    assert set(got) == set(reference) and len(got) == 16
    ref = np.stack([reference[c] for c in reference])
    new = np.stack([got[c] for c in reference])
    cosines = [_cosine(a, b) for a, b in zip(ref, new, strict=True)]
    # The small demo backbone maps all tiles close together (neighbouring tiles have cosine ~0.997), so also
    # compare with the shard's mean descriptor removed: that is the part that tells tiles apart.
    mean = ref.mean(axis=0)
    centred = [_cosine(a - mean, b - mean) for a, b in zip(ref, new, strict=True)]
    neighbours = [_cosine(a, b) for a, b in itertools.pairwise(ref)]
    print(
        f"\n{layout}: cosine per tile min {min(cosines):.6f} median {np.median(cosines):.6f}; "
        f"mean-removed min {min(centred):.4f} median {np.median(centred):.4f}; "
        f"neighbouring tiles max {max(neighbours):.4f}"
    )
    assert min(cosines) > min_cosine
    assert min(cosines) > max(neighbours)  # the same tile from sheets is closer than any other tile
    assert min(centred) > min_centred


@pytest.mark.parametrize(
    ("layout", "max_valid_mismatch", "max_mean_abs", "max_descriptor_diff"),
    [
        # Pillow's separable resize against GDAL's warper: one rounding apart, and validity at the nodata edge.
        ("wgs84-nodata-border", 0.002, 0.6, 2e-3),
        # Pillow's mesh transform (it truncates where GDAL rounds: half a level on average) over sheets in two
        # UTM zones, composited: the same, at the zone seam too.
        ("two-utm-zones", 0.002, 0.6, 2e-3),
    ],
)
def test_the_window_warp_keeps_the_pixels_and_descriptors_of_the_tile_by_tile_gdal_warp(
    assets: Assets,
    sheets: dict[str, list[Path]],
    engine: DescriptorEngine,
    tmp_path: Path,
    layout: str,
    max_valid_mismatch: float,
    max_mean_abs: float,
    max_descriptor_diff: float,
) -> None:
    paths = [_coarse_wgs84(assets.ortho, tmp_path / "wgs84.tif")] if layout == "wgs84-nodata-border" else sheets[layout]
    with open_tile_source("geotiff", paths, 256) as probe:
        west, south, _, north = probe.bounds_lonlat()
    # 8 x 8 tiles across the west edge (the nodata border, tiles outside the raster) and 6 x 6 at the centre.
    edge = tile_for_lonlat(west, (south + north) / 2, ZOOM)
    tiles = [TileId(ZOOM, edge.x + dx, edge.y + dy) for dx in range(-3, 5) for dy in range(-4, 4)]
    tiles += _centre_block(6)
    reference = (
        GeoTiffSource(paths[0], 256, (1, 1), gdal_warp=True)
        if len(paths) == 1
        else GeoTiffMosaicSource(paths, 256, (1, 1), gdal_warp=True)
    )
    with reference, open_tile_source("geotiff", paths, 256) as windowed:
        assert isinstance(windowed, (GeoTiffSource, GeoTiffMosaicSource))
        figures = _compare(reference, windowed, tiles)
        before = {t: reference.read_tile(t) for t in tiles}
        after = {t: windowed.read_tile(t) for t in tiles}
    statuses = {t: (classify(before[t]), classify(after[t])) for t in tiles}
    assert {a for a, _ in statuses.values()} >= {DESCRIBED}, "the block holds described tiles"
    assert all(a == b for a, b in statuses.values()), "the blank/missing/described decisions are the same"
    described = [t for t, (status, _) in statuses.items() if status == DESCRIBED]
    prep = Preprocessing(128, 128)

    def descriptors(read: dict[TileId, Tile | None]) -> np.ndarray:
        batches = [
            engine.describe(np.stack([prep(read[t].rgb) for t in described[k : k + 8]]))  # type: ignore[union-attr]
            for k in range(0, len(described), 8)
        ]
        return np.concatenate(batches)

    diff = np.abs(
        descriptors(before).astype(np.float16).astype(np.float32)
        - descriptors(after).astype(np.float16).astype(np.float32)
    )
    print(f"\n{layout}: {figures}; {len(described)} described tiles, descriptor max abs diff {diff.max():.2e}")
    assert figures["valid_mismatch"] <= max_valid_mismatch
    assert figures["mean_abs"] <= max_mean_abs
    assert diff.max() <= max_descriptor_diff


def test_editing_one_sheet_rescans_only_tiles_over_it(
    sheets: dict[str, list[Path]], engine: DescriptorEngine, tmp_path: Path
) -> None:
    paths = [Path(shutil.copy(p, tmp_path)) for p in sheets["two-utm-zones"]]
    out = tmp_path / "desc"
    with GeoTiffMosaicSource(paths) as source:
        cold = _describe(source, engine, out)
        over = {p: {c for c in _shard().chunks if p in source.sheets_of(c)} for p in paths}
    edited = next(p for p in paths if 0 < len(over[p]) < 16)  # a sheet under part of the shard
    with GeoTiffMosaicSource(paths) as source:
        warm_source = CountingSource(source)
        warm = _describe(warm_source, engine, out)
    assert warm_source.reads == [] and not warm.computed and warm.key == cold.key
    # Noise on the edited sheet under the middle of one of its chunks; GDAL rewrites only the blocks under it.
    w, s, e, n = tile_bounds(sorted(over[edited])[0])
    with rasterio.open(edited, "r+") as ds:
        (x,), (y,) = transform_points("EPSG:4326", ds.crs, [(w + e) / 2], [(s + n) / 2])
        row, col = ds.index(x, y)
        noise = np.random.default_rng(5).integers(1, 256, (ds.count, 16, 16), dtype=np.uint8)
        ds.write(noise, window=Window(col - 8, row - 8, 16, 16))
    with GeoTiffMosaicSource(paths) as source:
        counting = CountingSource(source)
        again = _describe(counting, engine, out)
    assert again.computed and again.key != cold.key
    assert counting.reads and set(counting.reads) <= over[edited]  # decoded: only tiles over the edited sheet
    assert 1 <= again.inferred <= len(over[edited])  # and only those ran the engine


def test_a_vrt_reads_as_one_raster_and_digests_per_source_file(
    assets: Assets, sheets: dict[str, list[Path]], tmp_path: Path
) -> None:
    paths = [Path(shutil.copy(p, tmp_path)) for p in sheets["same-crs"]]
    vrt = _write_vrt(tmp_path / "ortho.vrt", assets.ortho, paths)
    tiles = _centre_block(6)
    with GeoTiffSource(assets.ortho) as one, open_tile_source("geotiff", vrt, 256) as mosaic:
        assert isinstance(mosaic, GeoTiffSource)
        figures = _compare(one, mosaic, tiles)
        before = mosaic.raw_digests(tiles)
    assert figures["valid_mismatch"] == 0 and figures["max_abs"] <= 1, figures  # the VRT mosaics before warping
    with GeoTiffMosaicSource(paths) as listed:
        over = {t for t in tiles if paths[5] in listed.sheets_of(t)}
    assert before is not None and 0 < len(over) < len(tiles)
    # A write to one sheet moves the digests of exactly the tiles over it; so does the shared-source version.
    version = source_version([vrt])
    with rasterio.open(paths[5], "r+") as ds:
        ds.write(np.full((ds.count, 4, 4), 9, np.uint8), window=Window(0, 0, 4, 4))
    assert source_version([vrt]) != version
    with open_tile_source("geotiff", vrt, 256) as mosaic:
        after = mosaic.raw_digests(tiles)
    assert after is not None
    assert {t for t, a, b in zip(tiles, before, after, strict=True) if a != b} == over
    paths[6].unlink()
    with pytest.raises(SourceError) as info:
        GeoTiffSource(vrt)
    assert f"the VRT names source file {paths[6]}, which does not exist" in info.value.message
    assert info.value.where == str(vrt)


def _sortie(tmp_path: Path, assets: Assets, geotiff: str) -> Path:
    sortie = write_sortie(
        tmp_path / "s.toml", assets, area=tiles_polygon(block_tiles()[0]), cache_dir=tmp_path / "cache"
    )
    text = sortie.read_text().replace(f'geotiff = "{assets.ortho}"', f"geotiff = {geotiff}")
    sortie.write_text(text)
    return sortie


def test_the_sortie_accepts_a_file_a_glob_a_list_or_a_vrt(assets: Assets, tmp_path: Path) -> None:
    sheet_dir = tmp_path / "sheets"
    sheet_dir.mkdir()
    for name in ("b.tif", "a.tif", "c.TIF"):
        (sheet_dir / name).write_bytes(b"")  # parsing checks files exist; opening them is the source's job
    (tmp_path / "ortho.vrt").write_text("<VRTDataset/>")
    spec = load_sortie(_sortie(tmp_path, assets, '"sheets/*.tif"')).orthophoto
    assert spec.kind == "geotiff" and spec.paths == (sheet_dir / "a.tif", sheet_dir / "b.tif")
    assert spec.path == sheet_dir / "a.tif"
    spec = load_sortie(_sortie(tmp_path, assets, '["sheets/c.TIF", "sheets/[ab].tif", "sheets/a.tif"]')).orthophoto
    assert spec.paths == (sheet_dir / "a.tif", sheet_dir / "b.tif", sheet_dir / "c.TIF")  # sorted, once each
    spec = load_sortie(_sortie(tmp_path, assets, '"ortho.vrt"')).orthophoto
    assert spec.paths == (tmp_path / "ortho.vrt",) and spec.path == tmp_path / "ortho.vrt"
    spec = load_sortie(_sortie(tmp_path, assets, f'"{assets.ortho}"')).orthophoto
    assert spec.paths == (assets.ortho,) and spec.path == assets.ortho


@pytest.mark.parametrize(
    ("value", "message", "hint"),
    [
        (
            '"tiles/*.tif"',
            "geotiff glob 'tiles/*.tif' matches no file under {root}",
            'fix the pattern (relative patterns start at {root}), e.g. "sheets/*.tif"',
        ),
        (
            '["sheets/a.tif", "sheets/gone.tif"]',
            "orthophoto (geotiff) {root}/sheets/gone.tif does not exist",
            "fix the path (relative paths start at {root})",
        ),
        (
            '["ortho.vrt", "sheets/a.tif"]',
            "geotiff mixes a VRT (ortho.vrt) with 1 other file(s)",
            "give the .vrt alone, or list the sheets (a glob) without it",
        ),
        (
            '"sheets/*"',
            "geotiff glob 'sheets/*' also matches a.tif.ovr, which is not a sheet",
            'narrow the pattern to the rasters, e.g. "sheets/*.tif"',
        ),
        (
            "[]",
            "geotiff must be a path, a glob or an array of them, got an empty array",
            'give a file, a glob or a list of files: geotiff = "sheets/*.tif" or geotiff = ["a.tif", "b.tif"]',
        ),
        (
            '["a.tif", 3]',
            "geotiff must be a path, a glob or an array of them, got an array (['a.tif', 3])",
            'give a file, a glob or a list of files: geotiff = "sheets/*.tif" or geotiff = ["a.tif", "b.tif"]',
        ),
    ],
)
def test_bad_orthophoto_sheets_are_refused_naming_the_field(
    assets: Assets, tmp_path: Path, value: str, message: str, hint: str
) -> None:
    (tmp_path / "sheets").mkdir()
    (tmp_path / "sheets" / "a.tif").write_bytes(b"")
    (tmp_path / "sheets" / "a.tif.ovr").write_bytes(b"")
    (tmp_path / "ortho.vrt").write_text("<VRTDataset/>")
    sortie = _sortie(tmp_path, assets, value)
    with pytest.raises(SortieError) as info:
        load_sortie(sortie)
    root = tmp_path.resolve()
    assert info.value.message == message.format(root=root)
    assert info.value.where == f"{sortie.name} [orthophoto].geotiff"
    assert info.value.hint == hint.format(root=root)


@pytest.mark.usefixtures("prefect_harness")
def test_a_sortie_over_sheets_in_two_crss_provisions_and_verifies(
    assets: Assets, sheets: dict[str, list[Path]], tmp_path: Path
) -> None:
    from navcache_flows.provision_sortie import provision_sortie

    first, second = block_tiles()
    area = tiles_polygon(first + second)
    sortie = write_sortie(tmp_path / "s.toml", assets, area=area, cache_dir=tmp_path / "cache")
    glob = f"{sheets['two-utm-zones'][0].parent}/*.tif"
    sortie.write_text(sortie.read_text().replace(f'geotiff = "{assets.ortho}"', f'geotiff = "{glob}"'))
    cold = provision_sortie(str(sortie))
    assert cold["verified"] and cold["coverage"]["percent"] == 100.0
    assert cold["tiles"] == {"storage_tiles": 8, "chunks": 8} and cold["shards"]["computed"] == 2
    warm = provision_sortie(str(sortie))
    assert warm["verified"] and warm["shards"]["reused"] == 2 and warm["shards"]["inferred_chunks"] == 0
    report = nr.verify_cache(tmp_path / "cache", assets.trusted_keys, mode="operator")
    assert report.ok, report.summary()
