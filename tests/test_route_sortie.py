"""A route sortie as a crew flies one: a long, bending trail as a LineString with corridor_m, over imagery
in another CRS, provisioned, signed, verified on the command line and opened onboard."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import Geod
from shapely.geometry import LineString, Point, shape

import navcache_runtime as nr
from navcache.demo import generate_orthophoto
from navcache.sortie import load_sortie
from tests.support.sorties import Assets, write_sortie
from tests.test_cli import navcache

CENTRE_LAT, CENTRE_LON = 47.40, 10.95
GEOD = Geod(ellps="WGS84")


def bending_trail(length_m: float = 30_000.0, step_m: float = 250.0, seed: int = 3) -> list[list[float]]:
    """A hiking-trail-like route: heading drifts and switches back, several hundred vertices, kept within
    ~9 km of the centre."""
    rng = np.random.default_rng(seed)
    lon, lat = CENTRE_LON - 0.08, CENTRE_LAT - 0.05
    heading = 60.0
    points = [[lon, lat]]
    for i in range(int(length_m / step_m)):
        heading += 25.0 * math.sin(i / 9.0) + rng.normal(0.0, 6.0)
        next_lon, next_lat, _ = GEOD.fwd(lon, lat, heading, step_m)
        if GEOD.inv(CENTRE_LON, CENTRE_LAT, next_lon, next_lat)[2] > 9_000:  # turn back towards the centre
            heading = GEOD.inv(lon, lat, CENTRE_LON, CENTRE_LAT)[0]
            next_lon, next_lat, _ = GEOD.fwd(lon, lat, heading, step_m)
        lon, lat = next_lon, next_lat
        points.append([round(lon, 7), round(lat, 7)])
    return points


@pytest.fixture(scope="module")
def trail_sortie(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trail")
    # 24 km of coarse (20 m/px) UTM imagery around the trail: the tiles are reprojected from another CRS
    ortho = generate_orthophoto(
        root / "ortho.tif", center_lat=CENTRE_LAT, center_lon=CENTRE_LON, size_m=24_000, gsd_m=20.0, seed=11
    )
    route = {"type": "LineString", "coordinates": bending_trail()}
    start = route["coordinates"][0]
    sortie = write_sortie(
        root / "trail.toml",
        Assets(assets.root, ortho, assets.vpr_onnx, assets.local_onnx, assets.signing_key, assets.trusted_keys),
        area=route,
        cache_dir=root / "cache",
        zoom=15,
        threshold=95.0,
        takeoff=(start[1], start[0]),
    )
    text = sortie.read_text().replace("[area]\n", "[area]\ncorridor_m = 300\n", 1)
    sortie.write_text(text)
    return sortie


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
    assert summary["verified"] is True and summary["tiles"]["storage_tiles"] > 30
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
        assert hits and all(hit.tile.z == 15 for hit in hits)


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
