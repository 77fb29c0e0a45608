"""Everything that can be wrong with a sortie's inputs, checked in about a second before anything is written.

:func:`preflight` (what ``navcache provision`` and the flow run first) loads the sortie file and then refuses,
with a :class:`~navcache.errors.NavcacheError` of exit code 2 naming the problem, the place and the fix:

* models that do not fit the sortie (:func:`navcache.model_checks.validate_models`); signing keys that do not exist,
  and an ``sslib:`` signer that does not load (unknown keyid, backend not installed, private key missing or
  not the allowlisted key);
* a cache directory that cannot be written: the directory (or, when it does not exist yet, the nearest
  existing folder above it, which must let us create it) is checked with ``os.access`` and the file
  system's read-only flag, creating nothing;
* imagery that cannot serve the area, found by a **survey**: points spread evenly over the area in Web
  Mercator (the centres of a grid of 4 x 4 cells per storage tile, finer for areas that would get fewer
  than :data:`SURVEY_MIN_POINTS`, coarser when the area's bounding box would need more than
  :data:`SURVEY_MAX_CELLS` cells; the cells inside found by one GDAL rasterisation
  of the area, at most :data:`SURVEY_MAX_POINTS` kept) are looked up in the imagery without decoding a tile:
  a GeoTIFF's valid-pixel mask read once, decimated, over the points' window (an overview when the raster
  has one), an XYZ folder's or MBTiles file's tile index at the sortie zoom. The share of valid points is
  the **estimated coverage** (of the area; provisioning counts storage tiles, which stick out over the
  area's edge, so the two differ by the imagery along that edge); preflight refuses when it is
  below ``coverage_threshold`` by more than :data:`COVERAGE_MARGIN` points (the estimate cannot see blank
  tiles, so provisioning may find less, never much more), and always when it is 0 (nodata over the whole
  area). Imagery that does not overlap the area, and a GeoTIFF whose blocks under the area are cut short or
  unreadable (a truncated copy), are refused too.

The survey also measures the **upsampling factor**: the imagery's ground resolution near the area (a
raster's pixel measured on the ellipsoid; a tile store's finest zoom level) over the storage tiles' (Web
Mercator at the sortie zoom and tile size). Above ``[tiles] max_upsampling`` preflight warns (tiles would be
nearly flat colour) and names the zoom that would fit. :func:`run_preflight` returns both in a
:class:`PreflightReport` (``navcache plan`` and the run summary show them).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize
from shapely.geometry import box

from navcache_runtime.trust import TrustedKeysError
from navcache_runtime.trustroot import TrustRoot, load_trust_anchor

from .errors import ManifestError, NavcacheError, SortieError, SourceError
from .host_probe import shards_in_flight
from .imagery import (
    TileSource,
    ground_m_per_px,
    native_m_per_px,
    open_tile_source,
    tiles_present,
    valid_at,
    zoom_levels,
)
from .keys import load_signer
from .model_checks import validate_models
from .sortie import Sortie, load_sortie
from .tiles import lat_to_px, lon_to_px, px_to_lat, px_to_lon
from .types import Bounds, TileId

logger = logging.getLogger(__name__)

#: Percentage points the estimated coverage may fall below the threshold before preflight refuses.
COVERAGE_MARGIN = 5.0
#: Cells of the sampling grid over the area's bounding box (a 4,000 km route needs no more than this).
SURVEY_MAX_CELLS = 4_000_000
#: Points looked up at most (evenly thinned beyond this).
SURVEY_MAX_POINTS = 100_000
#: Points wanted at least: the grid gets finer than 4 x 4 cells per tile for small areas.
SURVEY_MIN_POINTS = 10_000
#: Tiles decoded for a source that offers no cheaper look (none of the shipped kinds).
_DECODED_SAMPLE = 64
#: The cache layout's folders; each that exists must be writable too.
_CACHE_FOLDERS = ("engines", "descriptors", "index", "coverage")


@dataclass(frozen=True)
class ImagerySurvey:
    """What the imagery holds over the area, estimated without decoding tiles (see the module docstring)."""

    source: str  # the source's describe()
    bounds: Bounds  # where the imagery lies, lon/lat
    zoom: int
    samples: int  # points looked up
    estimated_coverage_percent: float  # valid points over all points, 0..100
    imagery_m_per_px: float | None  # ground resolution of the imagery near the area; None when unknown
    tile_m_per_px: float  # ground resolution of a storage tile's pixel at the area
    upsampling: float | None  # imagery_m_per_px / tile_m_per_px; above 1 tiles are finer than the imagery
    zoom_levels: tuple[int, ...] | None  # the zoom levels of a tile store (XYZ, MBTiles); None for rasters

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "bounds": [round(v, 6) for v in self.bounds],
            "samples": self.samples,
            "estimated_coverage_percent": round(self.estimated_coverage_percent, 2),
            "imagery_m_per_px": None if self.imagery_m_per_px is None else round(self.imagery_m_per_px, 4),
            "tile_m_per_px": round(self.tile_m_per_px, 4),
            "upsampling": None if self.upsampling is None else round(self.upsampling, 3),
            "zoom_levels": None if self.zoom_levels is None else list(self.zoom_levels),
        }

    def line(self) -> str:
        """One log line: coverage estimate and resolution."""
        if self.upsampling is None:
            resolution = f"imagery resolution unknown, tiles {self.tile_m_per_px:.3g} m/px"
        else:
            resolution = (
                f"upsampling {self.upsampling:.3g}x (imagery {self.imagery_m_per_px:.3g} m/px, "
                f"tiles {self.tile_m_per_px:.3g} m/px at zoom {self.zoom})"
            )
        return (
            f"imagery: valid pixels over about {self.estimated_coverage_percent:.1f} % of the area "
            f"({self.samples:,} points); {resolution}"
        )


@dataclass(frozen=True)
class PreflightReport:
    sortie: Sortie
    imagery: ImagerySurvey
    warnings: tuple[str, ...]
    refusal: NavcacheError | None = None  # set only by run_preflight(refuse=False): why provision would refuse


def preflight(sortie_path: Path, cache_dir: Path | None = None) -> Sortie:
    """Load and validate the sortie file, its models, keys, cache directory and imagery; raise a
    NavcacheError naming the problem. Writes nothing."""
    return run_preflight(sortie_path, cache_dir).sortie


def run_preflight(sortie_path: Path, cache_dir: Path | None = None, *, refuse: bool = True) -> PreflightReport:
    """:func:`preflight` with what it learned. ``refuse=False`` (``navcache plan``) still raises for input
    that cannot be surveyed (bad sortie file, models, keys, cache directory, unreadable imagery) but returns
    a coverage refusal in :attr:`PreflightReport.refusal` instead of raising it."""
    sortie = load_sortie(sortie_path, cache_dir_override=cache_dir)
    sortie = validate_models(sortie)  # may settle the vpr batch profile from the model
    check_keys(sortie)
    check_cache_dir(sortie, from_option=cache_dir is not None)
    shards_in_flight()  # refuses a malformed $NAVCACHE_SHARDS_IN_FLIGHT now, not when the run starts
    survey = survey_imagery(sortie)
    logger.info("%s", survey.line())
    refusal = coverage_refusal(sortie, survey)
    if refusal is not None and refuse:
        raise refusal
    warnings = tuple(resolution_warnings(sortie, survey))
    for warning in warnings:
        logger.warning("%s", warning)
    return PreflightReport(sortie, survey, warnings, refusal)


# --- keys and cache directory -----------------------------------------------------------------------------


def check_keys(sortie: Sortie) -> None:
    """Refuse key files that do not exist, and load an ``sslib:`` signer now (its backend, its private key,
    the match with the allowlisted public key, and the secret from ``$NAVCACHE_SIGNER_SECRET`` when the
    signer needs one), so a bad one is refused before the run, not after it."""
    for path, what in ((sortie.signing_key, "signing_key"), (sortie.trusted_keys, "trusted_keys")):
        if isinstance(path, Path) and not path.is_file():
            raise SourceError(
                f"{what} {path} does not exist",
                where=f"{sortie.path.name} {what}",
                hint="create a key pair with `navcache keygen --dir DIR` and point the sortie at it",
            )
    if isinstance(sortie.signing_key, str):
        _check_sslib_signer(sortie, sortie.signing_key)


def _check_sslib_signer(sortie: Sortie, spec: str) -> None:
    """Load the signer as signing will (same allowlist, same secrets from the environment); loading signs
    nothing."""
    if sortie.trusted_keys is None:  # load_sortie requires trusted_keys beside an sslib: signer
        raise SortieError("an sslib: signing_key needs trusted_keys", where=f"{sortie.path.name} trusted_keys")
    try:
        anchor = load_trust_anchor(sortie.trusted_keys)
    except TrustedKeysError as exc:
        raise ManifestError(
            str(exc),
            where=f"{sortie.path.name} trusted_keys",
            hint="point trusted_keys at the operator allowlist or trust root the signer's key is on",
        ) from None
    trusted = anchor.operator_keys() if isinstance(anchor, TrustRoot) else anchor
    try:
        load_signer(spec, public_keys=trusted.keys.items())
    except ManifestError as exc:
        raise ManifestError(
            f"cannot use the signer {spec}: {exc.message}",
            where=f"{sortie.path.name} signing_key",
            hint=exc.hint or "check the keyid and the private key URI",
        ) from None


def check_cache_dir(sortie: Sortie, *, from_option: bool = False) -> None:
    """Refuse a cache directory this process cannot write (or create), creating nothing."""
    target = Path(os.path.abspath(sortie.cache_dir))
    where = "--cache-dir" if from_option else f"{sortie.path.name} cache_dir"
    fix = "choose a writable cache_dir (or --cache-dir)"
    existing = target
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if existing != target and not existing.is_dir():
        raise SortieError(
            f"cache directory {target} cannot be created: {existing} is a file, not a folder",
            where=where,
            hint=fix,
        )
    checks = [existing] if existing != target else [target, *(target / f for f in _CACHE_FOLDERS)]
    for folder in checks:
        if not folder.exists():
            continue
        if not os.access(folder, os.W_OK | os.X_OK):
            why = "is on a read-only file system" if _read_only_fs(folder) else "is not writable by this user"
            if folder == existing and existing != target:
                message = f"cache directory {target} cannot be created: {folder} {why}"
            else:
                message = f"cache directory {target} cannot be written: {folder} {why}"
            raise SortieError(message, where=where, hint=f"{fix}, or make {folder} writable (chmod/chown, remount)")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# --- imagery ----------------------------------------------------------------------------------------------


def survey_imagery(sortie: Sortie) -> ImagerySurvey:
    """Open the imagery, refuse it when it misses the area or its blocks under the area cannot be read, and
    estimate its valid-pixel coverage of the area's storage tiles and its resolution (module docstring)."""
    spec = sortie.orthophoto
    with open_tile_source(spec.kind, spec.paths, sortie.tiles.size) as source:
        bounds = source.bounds_lonlat()
        if not box(*bounds).intersects(sortie.area):
            raise SourceError(
                f"the orthophoto covers {_span(bounds)}, which does not overlap the sortie area "
                f"({_span(sortie.area.bounds)})",
                where=str(spec.path),
                hint="point [orthophoto] at imagery of the flight area, or fix [area]",
            )
        zoom, size = sortie.tiles.zoom, sortie.tiles.size
        px, py = sample_points(sortie)
        valid = _valid_points(source, zoom, size, px, py)
        lon, lat = _reference_point(sortie, bounds)
        imagery_res = native_m_per_px(source, lon, lat)
        levels = zoom_levels(source)
        description = source.describe()
    tile_res = ground_m_per_px(lat, zoom, size)
    return ImagerySurvey(
        source=description,
        bounds=bounds,
        zoom=zoom,
        samples=len(valid),
        estimated_coverage_percent=float(valid.mean() * 100.0) if len(valid) else 0.0,
        imagery_m_per_px=imagery_res,
        tile_m_per_px=tile_res,
        upsampling=None if imagery_res is None else imagery_res / tile_res,
        zoom_levels=levels,
    )


def sample_points(sortie: Sortie) -> tuple[np.ndarray, np.ndarray]:
    """Points spread evenly over the area, as global pixel coordinates at the sortie zoom (see the module
    docstring): cell centres inside the area of a grid aligned with the storage tiles."""
    size, world = sortie.tiles.size, sortie.tiles.size << sortie.tiles.zoom
    area = shapely.transform(
        sortie.area, lambda xy: np.column_stack((lon_to_px(xy[:, 0], world), lat_to_px(xy[:, 1], world)))
    )
    west, north, east, south = area.bounds  # pixel rows grow southwards
    x0, y0 = math.floor(west / size) * size, math.floor(north / size) * size

    def cells(side: float) -> int:
        return math.ceil((east - x0) / side) * math.ceil((south - y0) / side)

    cell = size / 4
    while cells(cell) > SURVEY_MAX_CELLS:
        cell *= 2
    # A small area (or a narrow corridor at a low zoom): finer cells, for SURVEY_MIN_POINTS points or so.
    while area.area / cell**2 < SURVEY_MIN_POINTS and cell > 1 and cells(cell / 2) <= SURVEY_MAX_CELLS:
        cell /= 2
    width, height = max(1, math.ceil((east - x0) / cell)), max(1, math.ceil((south - y0) / cell))
    # Routes are densified to ~1 km vertices; a tenth of a cell is all the sampling grid can tell apart.
    area = area.simplify(cell / 10)
    inside = rasterize(
        [area], out_shape=(height, width), transform=Affine(cell, 0, x0, 0, cell, y0), fill=0, dtype="uint8"
    )
    rows, cols = np.nonzero(inside)
    if len(rows) > SURVEY_MAX_POINTS:
        keep = np.linspace(0, len(rows) - 1, SURVEY_MAX_POINTS).astype(np.int64)
        rows, cols = rows[keep], cols[keep]
    if not len(rows):  # an area smaller than one cell: its own point
        point = area.representative_point()
        return np.array([point.x]), np.array([point.y])
    return x0 + (cols + 0.5) * cell, y0 + (rows + 0.5) * cell


def _valid_points(source: TileSource, zoom: int, size: int, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Per point (global pixels at ``zoom``), whether the imagery has a valid pixel there."""
    world = size << zoom
    valid = valid_at(source, px_to_lon(px, world), px_to_lat(py, world))
    if valid is not None:
        return valid
    n = 1 << zoom
    keys, index = np.unique((px // size).astype(np.int64) * n + (py // size).astype(np.int64), return_inverse=True)
    unique = np.column_stack((keys // n, keys % n))
    present = tiles_present(source, zoom, unique)
    if present is not None:
        return present[index]
    # A source with no cheap look: decode a few of the tiles under the points, spread over the area.
    picks = np.unique(np.linspace(0, len(unique) - 1, min(len(unique), _DECODED_SAMPLE)).astype(np.int64))
    fractions = np.zeros(len(unique))
    decoded = np.zeros(len(unique), bool)
    for i in picks:
        tile = source.read_tile(TileId(zoom, int(unique[i, 0]), int(unique[i, 1])))
        fractions[i], decoded[i] = (0.0 if tile is None else tile.valid_fraction), True
    return fractions[index][decoded[index]] >= 0.5


def _reference_point(sortie: Sortie, bounds: Bounds) -> tuple[float, float]:
    """Where resolution is measured: inside the part of the area the imagery covers, else the area."""
    overlap = sortie.area.intersection(box(*bounds))
    point = (overlap if not overlap.is_empty else sortie.area).representative_point()
    return float(point.x), float(point.y)


def _span(bounds: Any) -> str:
    west, south, east, north = bounds
    return f"lon {west:.5f}..{east:.5f}, lat {south:.5f}..{north:.5f}"


def coverage_refusal(sortie: Sortie, survey: ImagerySurvey) -> SourceError | None:
    """Why provisioning would stop at coverage, when the estimate says so with a clear margin; else None."""
    estimate, threshold = survey.estimated_coverage_percent, sortie.coverage_threshold
    where = str(sortie.orthophoto.path)
    tiles = f"the area ({survey.samples:,} points sampled at zoom {survey.zoom})"
    if survey.zoom_levels is not None and survey.zoom not in survey.zoom_levels:
        levels = survey.zoom_levels
        return SourceError(
            f"the tiles hold zoom levels {_levels(levels)}, not the sortie's zoom {survey.zoom}: the imagery has "
            "no tile of the area",
            where=where,
            hint=f"set [tiles] zoom to one of {_levels(levels)}, or cut the tiles at zoom {survey.zoom}",
        )
    if estimate == 0.0:
        return SourceError(
            f"the orthophoto has no valid pixels over the area: all {survey.samples:,} points sampled in it are "
            f"nodata or outside the imagery (the imagery spans {_span(survey.bounds)}; the area "
            f"{_span(sortie.area.bounds)})",
            where=where,
            hint="check the imagery's nodata value and extent (gdalinfo -stats), or point [orthophoto] at "
            "imagery of the flight area",
        )
    if estimate < threshold - COVERAGE_MARGIN:
        return SourceError(
            f"the orthophoto's valid pixels cover only about {estimate:.1f} % of {tiles}, below "
            f"coverage_threshold {threshold:g} % (the imagery spans {_span(survey.bounds)}; the area "
            f"{_span(sortie.area.bounds)})",
            where=where,
            hint="clip the area or route to the imagery, extend the imagery over the area, or lower coverage_threshold",
        )
    return None


def _levels(levels: tuple[int, ...]) -> str:
    if not levels:
        return "none"
    if list(levels) == list(range(levels[0], levels[-1] + 1)) and len(levels) > 2:
        return f"{levels[0]}-{levels[-1]}"
    return ", ".join(map(str, levels))


def resolution_warnings(sortie: Sortie, survey: ImagerySurvey) -> list[str]:
    limit = sortie.tiles.max_upsampling
    if survey.upsampling is None or survey.upsampling <= limit:
        return []
    zoom = survey.zoom - math.ceil(math.log2(survey.upsampling / limit))
    advice = f"set [tiles] zoom = {zoom} or lower" if zoom >= 10 else "use finer imagery"
    return [
        f"the imagery is {survey.imagery_m_per_px:.3g} m/px near the area but zoom {survey.zoom} tiles are "
        f"{survey.tile_m_per_px:.3g} m/px: each imagery pixel is upsampled {survey.upsampling:.0f}x (more than "
        f"[tiles] max_upsampling = {limit:g}), so tiles are nearly flat colour and their descriptors cannot tell "
        f"neighbours apart; {advice} (or raise max_upsampling)"
    ]
