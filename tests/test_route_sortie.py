"""A route sortie as a crew flies one: a long, bending trail as a LineString with corridor_m, over coarse
EPSG:4326 imagery with a nodata border, provisioned, signed, verified on the command line and opened onboard."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import Geod
from shapely.geometry import LineString, Point, shape

import navcache_runtime as nr
from navcache.sortie import load_sortie
from tests.support.cli import navcache
from tests.support.realistic import bending_route, coarse_orthophoto, route_sortie
from tests.support.sorties import Assets

GEOD = Geod(ellps="WGS84")


@pytest.fixture(scope="module")
def trail_sortie(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trail")
    # A 30 km trail that winds (a swing every 6 km), over 20 m/px EPSG:4326 imagery with a nodata border
    route = bending_route(10.85, 47.35, 30.0, step_km=0.25)
    west, south, east, north = LineString(route["coordinates"]).bounds
    ortho = coarse_orthophoto(
        root / "ortho.tif", west=west - 0.03, south=south - 0.03, east=east + 0.03, north=north + 0.03, m_per_px=20.0
    )
    return route_sortie(
        root / "trail.toml",
        assets,
        route=route,
        corridor_m=300,
        orthophoto=ortho,
        cache_dir=root / "cache",
        zoom=14,  # 6.5 m/px tiles over 20 m/px imagery: within max_upsampling
        threshold=80.0,  # lakes are blank
    )


def test_the_signed_area_is_the_corridor_and_the_route_is_kept(trail_sortie: Path) -> None:
    sortie = load_sortie(trail_sortie)
    signed = shape(sortie.signed_area_geojson)
    assert sortie.area_geojson["type"] == "LineString"
    assert signed.geom_type in ("Polygon", "MultiPolygon") and signed.equals_exact(sortie.area, 0)
    route = LineString(sortie.area_geojson["coordinates"])
    assert route.length > 0.2 and signed.covers(route)  # ~30 km of trail (degrees), all inside the corridor


def test_a_route_sortie_provisions_signs_verifies_and_opens_onboard(
    trail_sortie: Path, assets: Assets, tmp_path: Path
) -> None:
    proc = navcache("provision", str(trail_sortie), "--json", home=tmp_path / "prefect-home")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["verified"] is True and summary["tiles"]["storage_tiles"] > 25
    cache = Path(summary["cache_dir"])

    verify = navcache("verify", str(cache), "--trusted-keys", str(assets.trusted_keys), home=tmp_path)
    assert verify.returncode == 0 and "VERIFIED" in verify.stdout, verify.stdout + verify.stderr

    envelope = json.loads((cache / "manifest.dsse.json").read_text())
    predicate = json.loads(base64.b64decode(envelope["payload"]))["predicate"]
    assert predicate["area"]["type"] in ("Polygon", "MultiPolygon")
    route = predicate["route"]
    assert route["type"] == "LineString" and route["corridor_cm"] == 30_000
    assert len(route["coordinates"]) == len(load_sortie(trail_sortie).area_geojson["coordinates"])
    # the signed corridor holds the takeoff (the verifier checked it) and every vertex of the route
    corridor = shapely.transform(shape(predicate["area"]), lambda xy: xy / 1e7)
    assert all(corridor.buffer(1e-6).covers(Point(lon / 1e7, lat / 1e7)) for lon, lat in route["coordinates"])

    with nr.open_cache(cache, assets.trusted_keys) as onboard:
        tile_rgb = np.full((256, 256, 3), 120, np.uint8)
        descriptor = onboard.describe(onboard.preprocess(tile_rgb)[None])[0]
        start_lon, start_lat = route["coordinates"][0][0] / 1e7, route["coordinates"][0][1] / 1e7
        hits = onboard.query(descriptor, k=3, near=(start_lat, start_lon, 2_000))
        assert hits and all(hit.tile[0] == 14 for hit in hits)


def test_a_takeoff_off_the_corridor_is_refused_before_anything_is_written(trail_sortie: Path, tmp_path: Path) -> None:
    text = trail_sortie.read_text()
    moved = tmp_path / "off.toml"
    sortie = load_sortie(trail_sortie)
    lat, lon = sortie.takeoff
    # 3 km from the trail's start, in the first direction that leaves the corridor
    off_lon, off_lat = next(
        (p[0], p[1])
        for p in (GEOD.fwd(lon, lat, heading, 3_000)[:2] for heading in range(0, 360, 15))
        if not sortie.area.buffer(0.005).covers(Point(p[0], p[1]))
    )
    moved.write_text(text.replace(f"lat = {lat}", f"lat = {off_lat}").replace(f"lon = {lon}", f"lon = {off_lon}"))
    proc = navcache("provision", str(moved), home=tmp_path / "prefect-home")
    assert proc.returncode == 2, proc.stderr
    assert "outside the route corridor" in proc.stderr
    assert not (tmp_path / "prefect-home").exists()
