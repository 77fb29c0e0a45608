"""The flight area: the GeoJSON a sortie's ``[area]`` gives, turned into the lon/lat shape the cache covers
and the manifest signs.

Accepted documents: a bare geometry, a Feature, or a FeatureCollection with exactly one feature, whose
geometry is one of :data:`AREA_TYPES`:

* ``Polygon`` / ``MultiPolygon``: every ring closed (first position repeated at the end) with at least 4
  positions; the result must be a valid polygon with a surface (no self-intersection).
* ``LineString``: a route of at least two distinct positions; the area is every point within ``corridor_m``
  metres of it. The route is buffered in pieces of about 50 km, each in a local azimuthal-equidistant
  projection centred on the piece (scale error < 1e-4 over it), and densified to ~1 km vertices before
  returning to lon/lat, so a long route stays true to its metres and its edges stay where they were drawn.

Every position is ``[lon, lat]`` in degrees: longitude within [-180, 180], latitude within the Web-Mercator
range (±85.0511, :data:`navcache.tiles.MAX_LATITUDE`). An area that spans more than 180 degrees of longitude
(it crosses the antimeridian) is refused: split it into one sortie per side.

Two checks tie the area to the rest of the sortie: the manifest signs the area's vertices and the drone's
verifier caps their number (:attr:`navcache_runtime.verify.VerifierConfig.max_area_vertices`), so
:func:`check_signable` refuses an area over that cap before anything runs; and :func:`check_takeoff`
refuses a takeoff outside the area, saying how many metres (geodesic) it lies outside.

Errors are :class:`navcache.errors.SortieError` with the ``where`` the caller passes (the sortie field the
area came from, e.g. ``sortie.toml [area].geojson``) and a ``hint`` saying how to fix it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, mapping
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from navcache_runtime.verify import VerifierConfig

from .errors import SortieError, short_repr, type_phrase
from .tiles import MAX_LATITUDE

AREA_TYPES = ("Polygon", "MultiPolygon", "LineString")

_DENSIFY_M = 1000.0  # vertex spacing when moving lines between lon/lat and local projections
_PIECE_M = 50_000.0  # a route is buffered in pieces this long, each in its own local projection


def parse_geojson(text: str, what: str, where: str) -> Any:
    """The JSON document in ``text`` (``what`` names it in errors: "the GeoJSON string", a file path);
    NaN and Infinity are refused, as GeoJSON has no such numbers."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SortieError(
            f"invalid JSON in {what}: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            where=where,
            hint="check the GeoJSON (quotes, commas, brackets)",
        ) from None
    except (ValueError, RecursionError) as exc:
        raise SortieError(f"invalid JSON in {what}: {exc}", where=where, hint="check the GeoJSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number GeoJSON allows")


def area_geometry(doc: Any, where: str) -> dict[str, Any]:
    """The geometry object of a GeoJSON document (unwrapped from a Feature or a one-feature
    FeatureCollection), of one of :data:`AREA_TYPES` and with coordinates (not yet checked)."""
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list) or len(features) != 1:
            count = len(features) if isinstance(features, list) else "no"
            raise SortieError(
                f"a FeatureCollection area must hold exactly one feature, it has {count}",
                where=where,
                hint="merge the features into one (Multi)Polygon, or split the flight into several sorties",
            )
        doc = features[0]
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        doc = doc.get("geometry")
        if not isinstance(doc, dict):
            raise SortieError(
                "the area Feature has no geometry", where=where, hint="give the Feature a Polygon geometry"
            )
    if not isinstance(doc, dict):
        raise SortieError(f"the area must be a GeoJSON object, got {type_phrase(doc)}", where=where)
    kind = doc.get("type")
    if kind not in AREA_TYPES:
        raise SortieError(
            f"area type {short_repr(kind)} is not supported",
            where=where,
            hint=f"use one of: {', '.join(AREA_TYPES)} (a Feature or a one-feature FeatureCollection may wrap it)",
        )
    if "coordinates" not in doc:
        raise SortieError(f"the {kind} has no coordinates", where=where, hint="add its coordinates")
    return doc


def area_shape(geometry: dict[str, Any], corridor_m: float | None, where: str) -> Polygon | MultiPolygon:
    """The lon/lat shape of an :func:`area_geometry`: the (Multi)Polygon itself, or for a LineString route
    the corridor of ``corridor_m`` metres around it (``corridor_m`` is required for a route)."""
    kind, coords = geometry["type"], geometry["coordinates"]
    if kind == "Polygon":
        polygons = [_polygon_rings(coords, "coordinates", where)]
    elif kind == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            raise SortieError("the MultiPolygon area is empty", where=where, hint="give at least one polygon")
        polygons = [_polygon_rings(p, f"coordinates[{i}]", where) for i, p in enumerate(coords)]
    else:  # LineString
        if not isinstance(coords, list):
            raise SortieError("the LineString route must be an array of positions", where=where)
        points = np.asarray([_position(p, f"coordinates[{i}]", where) for i, p in enumerate(coords)])
        if len(points) < 2 or not np.any(points != points[0]):
            raise SortieError("the route needs at least two distinct positions", where=where, hint="the area is empty")
        _check_antimeridian(points[:, 0], where)
        assert corridor_m is not None  # the sortie reader requires corridor_m for a LineString
        return _buffer_route(points, corridor_m, where)

    lons = np.concatenate([ring[:, 0] for rings in polygons for ring in rings])
    _check_antimeridian(lons, where)
    try:
        shapes = [Polygon(rings[0], rings[1:]) for rings in polygons]
        area: Polygon | MultiPolygon = shapes[0] if kind == "Polygon" else MultiPolygon(shapes)
    except (ValueError, shapely.errors.GEOSException) as exc:
        raise SortieError(f"the area is not a valid {kind}: {exc}", where=where) from None
    if area.is_empty:
        raise SortieError("the area is empty", where=where, hint="draw a polygon with a surface")
    if not area.is_valid:
        reason = explain_validity(area)
        what = "self-intersecting" if "self-intersection" in reason.lower() else "not a valid polygon"
        raise SortieError(
            f"the area is {what}: {reason}",
            where=where,
            hint="redraw it without crossing edges, or repair it (QGIS: Fix Geometries; shapely: make_valid)",
        )
    if area.area == 0:
        raise SortieError(
            "the area is empty (it encloses no surface)", where=where, hint="draw a polygon with a surface"
        )
    return area


def _position(value: Any, path: str, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, list)
        or len(value) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise SortieError(f"coordinate {path} must be [lon, lat], got {short_repr(value)}", where=where)
    try:
        lon, lat = float(value[0]), float(value[1])
    except OverflowError:  # JSON integers have no size limit
        lon = lat = math.inf
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise SortieError(f"coordinate {path} is not finite: {short_repr(value)}", where=where)
    if not -180.0 <= lon <= 180.0:
        raise SortieError(
            f"coordinate {path} [{lon:g}, {lat:g}] has longitude outside [-180, 180]",
            where=where,
            hint="GeoJSON is [lon, lat] in degrees from -180 to 180; areas crossing the antimeridian are "
            "not supported (split the area)",
        )
    if not -MAX_LATITUDE <= lat <= MAX_LATITUDE:
        raise SortieError(
            f"coordinate {path} [{lon:g}, {lat:g}] is outside the Web-Mercator latitude range [-85.0511, 85.0511]",
            where=where,
            hint="GeoJSON order is [lon, lat]; polar areas cannot be tiled in Web Mercator",
        )
    return lon, lat


def _ring(value: Any, path: str, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise SortieError(f"ring {path} must be an array of positions, got {type_phrase(value)}", where=where)
    points = [_position(p, f"{path}[{i}]", where) for i, p in enumerate(value)]
    if len(points) < 4:
        raise SortieError(
            f"ring {path} has {len(points)} positions; a closed ring needs at least 4",
            where=where,
            hint="draw at least a triangle",
        )
    if points[0] != points[-1]:
        raise SortieError(
            f"area not closed: ring {path} starts at [{points[0][0]:g}, {points[0][1]:g}] "
            f"but ends at [{points[-1][0]:g}, {points[-1][1]:g}]",
            where=where,
            hint="repeat the first position at the end of every ring (GeoJSON rings are closed)",
        )
    return np.asarray(points, dtype=np.float64)


def _polygon_rings(value: Any, path: str, where: str) -> list[np.ndarray]:
    if not isinstance(value, list) or not value:
        raise SortieError(f"polygon {path} must be a non-empty array of rings", where=where, hint="the area is empty")
    return [_ring(r, f"{path}[{i}]", where) for i, r in enumerate(value)]


def _check_antimeridian(lons: np.ndarray, where: str) -> None:
    if float(lons.max() - lons.min()) > 180.0:
        raise SortieError(
            f"the area spans longitudes {lons.min():g} to {lons.max():g}: crossing the antimeridian "
            "(or spanning more than half the globe) is not supported",
            where=where,
            hint="split the area at the antimeridian into one sortie per side",
        )


def _local_transformer(lon: float, lat: float) -> Any:
    """lon/lat (WGS84) → metres in an azimuthal-equidistant projection centred on (lon, lat); ``direction=
    "INVERSE"`` goes back. Built from a PROJ pipeline string: the same numbers as ``Transformer.from_crs``
    with an aeqd CRS, at ~0.3 ms instead of ~20 ms, which matters for a long route's many pieces."""
    from pyproj import Transformer

    return Transformer.from_pipeline(
        "+proj=pipeline +step +proj=unitconvert +xy_in=deg +xy_out=rad "
        f"+step +proj=aeqd +lat_0={lat:.9f} +lon_0={lon:.9f} +ellps=WGS84"
    )


def _buffer_route(points: np.ndarray, corridor_m: float, where: str) -> Polygon | MultiPolygon:
    """Every point within ``corridor_m`` metres of the route. Buffered in pieces of about _PIECE_M, each
    in an azimuthal-equidistant projection at its centre (scale error < 1e-4 over the piece), then
    densified before returning to lon/lat so the edges stay where they were drawn."""
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    line = shapely.segmentize(LineString(points), _DENSIFY_M / 111_320.0)  # ~1 km in lon/lat
    coords = np.asarray(line.coords)
    seg = geod.inv(coords[:-1, 0], coords[:-1, 1], coords[1:, 0], coords[1:, 1])[2]
    along = np.concatenate([[0.0], np.cumsum(seg)])
    pieces = []
    start = 0
    while start < len(coords) - 1:
        stop = int(np.searchsorted(along, along[start] + _PIECE_M, side="right"))
        stop = min(max(stop, start + 2), len(coords))
        part = coords[start:stop]
        centre = part[len(part) // 2]
        forward = _local_transformer(*centre)
        x, y = forward.transform(part[:, 0], part[:, 1])
        buffered = shapely.segmentize(LineString(np.column_stack((x, y))).buffer(corridor_m, quad_segs=16), _DENSIFY_M)
        lon_lat = shapely.transform(
            buffered, lambda xy, t=forward: np.column_stack(t.transform(xy[:, 0], xy[:, 1], direction="INVERSE"))
        )
        west, south, east, north = lon_lat.bounds
        if east - west > 180.0:  # pyproj wraps longitudes: a piece over the antimeridian jumps by ~360
            raise SortieError(
                "the route corridor crosses the antimeridian, which is not supported",
                where=where,
                hint="split the route at the antimeridian into one sortie per side",
            )
        if south < -MAX_LATITUDE or north > MAX_LATITUDE:
            raise SortieError(
                "the route corridor reaches beyond the Web-Mercator latitude limit (85.0511)",
                where=where,
                hint="keep the route and its corridor within +-85.05 degrees latitude",
            )
        pieces.append(lon_lat)
        start = stop - 1
    try:
        area = shapely.union_all(pieces)
        if not area.is_valid:
            area = shapely.make_valid(area)
    except shapely.errors.GEOSException as exc:
        raise SortieError(f"cannot build the route corridor: {exc}", where=where, hint="simplify the route") from None
    if not isinstance(area, (Polygon, MultiPolygon)):  # make_valid may return a collection
        area = shapely.union_all([g for g in shapely.get_parts(area) if isinstance(g, (Polygon, MultiPolygon))])
    return area


def geojson_of(area: BaseGeometry) -> dict[str, Any]:
    """The GeoJSON geometry of a shape, with lists where shapely's ``mapping`` gives tuples (GeoJSON, and
    the manifest's canonical JSON, have lists)."""
    return dict(_geojson_lists(mapping(area)))


def _geojson_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _geojson_lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_geojson_lists(v) for v in value]
    return value


def _distance_m(area: BaseGeometry, lon: float, lat: float) -> float:
    """Geodesic distance from a point to the area: in an azimuthal-equidistant projection centred on
    the point, distances from the centre are true."""

    forward = _local_transformer(lon, lat)
    dense = shapely.segmentize(area, 0.01)
    local = shapely.transform(dense, lambda xy: np.column_stack(forward.transform(xy[:, 0], xy[:, 1])))
    return float(local.distance(Point(0.0, 0.0)))


def check_signable(area: BaseGeometry, where: str) -> None:
    """The manifest signs the area's vertices and the drone's verifier caps their number; a route corridor
    is densified, so a very long route can pass that cap. Refuse it now, not after the run."""
    limit = VerifierConfig().max_area_vertices
    vertices = int(shapely.get_num_coordinates(area))
    if vertices > limit:
        raise SortieError(
            f"the area has {vertices:,} vertices; a signed manifest holds at most {limit:,}",
            where=where,
            hint="simplify the area or the route, or split the flight into several sorties",
        )


def check_takeoff(area: BaseGeometry, lat: float, lon: float, corridor_m: float | None, where: str) -> None:
    """The takeoff lies inside the area (for a route, inside its corridor)."""
    if area.covers(Point(lon, lat)):
        return
    distance = _distance_m(area, lon, lat)
    inside = "the route corridor" if corridor_m is not None else "the area"
    raise SortieError(
        f"takeoff (lat {lat:g}, lon {lon:g}) lies {distance:,.0f} m outside {inside}",
        where=where,
        hint="fix [takeoff] (lat/lon, not lon/lat?) or extend the area to include it",
    )


__all__ = [
    "AREA_TYPES",
    "area_geometry",
    "area_shape",
    "check_signable",
    "check_takeoff",
    "geojson_of",
    "parse_geojson",
]
