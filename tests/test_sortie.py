"""The sortie file: loading, every validation error (message / where / hint), robustness. The model files
themselves are checked in tests/test_model_checks.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyproj import Geod

from navcache.errors import SortieError, TileBudgetError
from navcache.keys import generate_keypair, load_public_key, load_signer
from navcache.preflight import check_keys
from navcache.sortie import Sortie, TileSpec, load_sortie
from navcache.summary import trusted_keys
from navcache_runtime.types import BuildConfig, InputProfile
from tests.support.sortie_files import (
    BASE_DOC,
    POLYGON,
    Flight,
    backbone_entry,
    dump_toml,
    make_files,
)

GEOD = Geod(ellps="WGS84")


@pytest.fixture(scope="module")
def flight_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flight")
    make_files(root)
    return root


@pytest.fixture
def flight(tmp_path: Path) -> Flight:
    make_files(tmp_path)
    return Flight(tmp_path, copy.deepcopy(BASE_DOC))


def set_area(flight: Flight, geometry: dict[str, Any], **extra: Any) -> None:
    flight.doc["area"] = {"geojson": json.dumps(geometry), **extra}


# --- loading ----------------------------------------------------------------------------------------------

DOCUMENTED = """\
sortie_id = "demo-001"
runtime = "onnx_trt_ep"
cache_dir = "cache"
signing_key = "keys/operator.key"
trusted_keys = "keys/trusted_keys.json"
coverage_threshold = 98.5
expires_hours = 48

[takeoff]
lat = 48.137
lon = 11.575

[area]
geojson = '''{"type": "Polygon", "coordinates": [[[11.55, 48.12], [11.60, 48.12], [11.60, 48.15],
             [11.55, 48.15], [11.55, 48.12]]]}'''

[tiles]
zoom = 17
size = 256
chunk_span = 2
overlap = 0.5
budget = 250000
shard_block = 32

[orthophoto]
xyz = "tiles/"

[descriptors]
batch_size = 8

[[backbones]]
name = "tiny_vpr"
onnx = "models/tiny_vpr.onnx"
role = "vpr"
precision = "fp16"
input = "image"
output = "descriptor"
[backbones.profile]
min = [1, 3, 64, 64]
opt = [8, 3, 64, 64]
max = [16, 3, 64, 64]
[backbones.builder_options]
timing_cache = true

[[backbones]]
name = "local.feat-v2"
onnx = "models/tiny_vpr.onnx"
role = "local"
precision = "fp32"
shape = [1, 3, 64, 64]
"""


def test_loads_the_documented_layout(flight: Flight) -> None:
    (flight.root / "tiles").mkdir()
    path = flight.root / "sortie.toml"
    path.write_text(DOCUMENTED)
    sortie = load_sortie(path)
    root = flight.root.resolve()
    assert sortie.sortie_id == "demo-001"
    assert sortie.runtime == "onnx_trt_ep"
    assert sortie.path == path.resolve()
    assert sortie.takeoff == (48.137, 11.575)
    assert sortie.area.equals(shapely.geometry.shape(POLYGON))
    assert sortie.area_geojson["type"] == "Polygon"
    assert sortie.corridor_m is None
    assert sortie.tiles == TileSpec(zoom=17, size=256, chunk_span=2, overlap=0.5, budget=250000, shard_block=32)
    assert sortie.orthophoto.kind == "xyz" and sortie.orthophoto.path == root / "tiles"
    assert sortie.signing_key == root / "keys" / "operator.key"
    assert sortie.trusted_keys == root / "keys" / "trusted_keys.json"
    assert sortie.cache_dir == root / "cache"
    assert (sortie.coverage_threshold, sortie.expires_hours, sortie.batch_size) == (98.5, 48, 8)
    assert [b.name for b in sortie.backbones] == ["tiny_vpr", "local.feat-v2"]
    vpr = sortie.vpr
    assert vpr.name == "tiny_vpr" and vpr.output_name == "descriptor" and vpr.precision == "fp16"
    assert vpr.profile == InputProfile("image", (1, 3, 64, 64), (8, 3, 64, 64), (16, 3, 64, 64))
    config = vpr.build_config()
    assert config == BuildConfig(
        precision="fp16", input_shapes=(vpr.profile,), builder_options={"timing_cache": True}, model_name="tiny_vpr"
    )
    local = sortie.backbones[1]
    assert local.role == "local" and local.input_name == "image" and local.output_name is None
    assert local.profile == InputProfile.fixed("image", (1, 3, 64, 64))
    assert sortie.grid.span == 2 and sortie.grid.overlap == 0.5


def test_optional_fields_take_their_defaults(flight: Flight) -> None:
    for key in ("cache_dir", "trusted_keys", "coverage_threshold", "expires_hours", "tiles", "descriptors"):
        del flight.doc[key]
    del flight.doc["backbones"][0]["input"]
    sortie = flight.load()
    assert sortie.tiles == TileSpec()
    assert sortie.trusted_keys is None
    assert sortie.cache_dir == flight.root.resolve() / "cache"
    assert (sortie.coverage_threshold, sortie.expires_hours, sortie.batch_size) == (99.0, 72, 16)
    assert sortie.vpr.input_name == "image"


def test_relative_paths_resolve_against_the_sortie_folder_not_the_cwd(
    flight: Flight, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    sortie = flight.load()
    root = flight.root.resolve()
    assert sortie.vpr.onnx == root / "models" / "tiny_vpr.onnx"
    assert sortie.orthophoto.path == root / "ortho.tif"
    assert sortie.cache_dir == root / "cache"


def test_absolute_paths_are_kept(flight: Flight) -> None:
    flight.doc["signing_key"] = str((flight.root / "keys" / "operator.key").resolve())
    assert flight.load().signing_key == (flight.root / "keys" / "operator.key").resolve()


def test_a_securesystemslib_signer_is_kept_as_written_and_signs(flight: Flight) -> None:
    flight.doc["signing_key"] = "sslib:3f2a9c1e:file2:keys/operator.key"
    assert flight.load().signing_key == "sslib:3f2a9c1e:file2:keys/operator.key"  # a URI, not a sortie path
    keys = generate_keypair(flight.root / "ops")
    uri = f"sslib:{keys.keyid[:10]}:file2:{keys.private_key}"
    flight.doc.update(signing_key=uri, trusted_keys=str(keys.trusted_keys))
    sortie = flight.load()
    assert sortie.signing_key == uri and trusted_keys(sortie) == keys.trusted_keys
    check_keys(sortie)
    signer = load_signer(sortie.signing_key, public_keys=[(keys.keyid, load_public_key(keys.public_key))])
    signer.public_key().verify(signer.sign(b"payload"), b"payload")


def test_cache_dir_override_wins_and_is_relative_to_the_cwd(
    flight: Flight, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    assert flight.load(cache_dir_override=Path("other")).cache_dir == cwd.resolve() / "other"
    (cwd / "afile").write_text("x")
    error = flight.error(cache_dir_override=Path("afile"))
    assert error.where == "--cache-dir" and "not a directory" in error.message


def test_area_from_a_feature_collection_file(flight: Flight) -> None:
    feature = {"type": "Feature", "properties": {"name": "ops box"}, "geometry": POLYGON}
    (flight.root / "area.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    flight.doc["area"] = {"file": "area.geojson"}
    sortie = flight.load()
    assert sortie.area_geojson == POLYGON
    assert sortie.area.equals(shapely.geometry.shape(POLYGON))


def test_area_as_an_inline_table(flight: Flight) -> None:
    flight.doc["area"] = {"geojson": POLYGON}
    assert flight.load().area.equals(shapely.geometry.shape(POLYGON))


def test_multipolygon_area(flight: Flight) -> None:
    other = [[[11.62, 48.12], [11.63, 48.12], [11.63, 48.13], [11.62, 48.12]]]
    set_area(flight, {"type": "MultiPolygon", "coordinates": [POLYGON["coordinates"], other]})
    assert flight.load().area.geom_type == "MultiPolygon"


# --- file-level errors ------------------------------------------------------------------------------------


def test_malformed_toml_names_the_line(flight: Flight) -> None:
    path = flight.root / "sortie.toml"
    path.write_text('sortie_id = "a"\nruntime = "onnx_trt_ep"\n[tiles]\nzoom = 17\nsize = \n')
    with pytest.raises(SortieError) as info:
        load_sortie(path)
    error = info.value
    assert error.where == "sortie.toml line 5"
    assert "malformed TOML" in error.message and "size =" in error.message
    assert error.hint and "syntax" in error.hint


def test_unclosed_array_points_at_the_end(flight: Flight) -> None:
    path = flight.root / "sortie.toml"
    path.write_text('sortie_id = "a"\nshape = [1,\n2\n')
    with pytest.raises(SortieError) as info:
        load_sortie(path)
    assert info.value.where == "sortie.toml line 3"


def test_missing_file_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(SortieError, match="cannot read the sortie file"):
        load_sortie(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'sortie_id = "a"\nruntime = "\xff"\n')
    with pytest.raises(SortieError) as info:
        load_sortie(bad)
    assert info.value.where == "bad.toml line 2" and "UTF-8" in info.value.message


@pytest.mark.parametrize(
    ("mutate", "where", "suggestion"),
    [
        (lambda d: d["tiles"].update(zom=17), "sortie.toml [tiles].zom", "did you mean 'zoom'?"),
        (lambda d: d.update(sortie_di="x"), "sortie.toml sortie_di", "did you mean 'sortie_id'?"),
        (lambda d: d["backbones"][0].update(inptu="x"), "sortie.toml [[backbones]][0].inptu", "did you mean 'input'?"),
        (lambda d: d["takeoff"].update(alt=500), "sortie.toml [takeoff].alt", "valid fields: lat, lon"),
        (lambda d: d.update(zoom=17), "sortie.toml zoom", "'zoom' belongs in [tiles]"),
    ],
)
def test_unknown_fields_are_rejected_with_a_suggestion(
    flight: Flight, mutate: Any, where: str, suggestion: str
) -> None:
    mutate(flight.doc)
    error = flight.error()
    assert error.where == where
    assert "unknown field" in error.message
    assert error.hint and suggestion in error.hint and "valid fields:" in error.hint


def test_unknown_field_lists_every_valid_field(flight: Flight) -> None:
    flight.doc["tiles"]["zom"] = 17
    hint = flight.error().hint or ""
    for field in ("zoom", "size", "chunk_span", "overlap", "budget", "shard_block"):
        assert field in hint


@pytest.mark.parametrize(
    ("mutate", "where", "text"),
    [
        (lambda d: d.pop("runtime"), "sortie.toml runtime", "missing required field 'runtime'"),
        (lambda d: d.update(runtime="tensorrtt"), "sortie.toml runtime", "not one of: tensorrt, onnx_trt_ep"),
        (lambda d: d.update(sortie_id="a b"), "sortie.toml sortie_id", "not a valid flight id"),
        (lambda d: d.update(sortie_id=7), "sortie.toml sortie_id", "must be a string"),
        (lambda d: d["tiles"].update(zoom=9), "sortie.toml [tiles].zoom", "out of range"),
        (lambda d: d["tiles"].update(zoom=17.0), "sortie.toml [tiles].zoom", "must be an integer"),
        (lambda d: d["tiles"].update(size=300), "sortie.toml [tiles].size", "not supported"),
        (lambda d: d["tiles"].update(chunk_span=5), "sortie.toml [tiles].chunk_span", "out of range"),
        (lambda d: d["tiles"].update(overlap=0.8), "sortie.toml [tiles].overlap", "out of range"),
        (lambda d: d["tiles"].update(overlap=math.nan), "sortie.toml [tiles].overlap", "out of range"),
        (lambda d: d["tiles"].update(shard_block=4), "sortie.toml [tiles].shard_block", "out of range"),
        (lambda d: d["tiles"].update(budget=0), "sortie.toml [tiles].budget", "out of range"),
        (lambda d: d.update(coverage_threshold=101), "sortie.toml coverage_threshold", "out of range"),
        (lambda d: d.update(expires_hours=True), "sortie.toml expires_hours", "must be an integer"),
        (lambda d: d["descriptors"].update(batch_size=0), "sortie.toml [descriptors].batch_size", "out of range"),
        (lambda d: d.update(tiles=3), "sortie.toml tiles", "must be a table"),
        (lambda d: d.pop("takeoff"), "sortie.toml takeoff", "missing required field"),
        (lambda d: d["takeoff"].update(lat="48"), "sortie.toml [takeoff].lat", "must be a number"),
        (lambda d: d.update(signing_key="keys/missing.key"), "sortie.toml signing_key", "does not exist"),
        (lambda d: d.update(trusted_keys="keys"), "sortie.toml trusted_keys", "is not a file"),
        (lambda d: d.update(signing_key=""), "sortie.toml signing_key", "not a usable path"),
        (lambda d: d.update(signing_key="sslib:3f2a9c1e"), "sortie.toml signing_key", "not a securesystemslib"),
        (
            lambda d: (d.update(signing_key="sslib:3f2a9c1e:hsm:"), d.pop("trusted_keys")),
            "sortie.toml signing_key",
            "needs trusted_keys",
        ),
    ],
)
def test_bad_values_name_the_field(flight: Flight, mutate: Any, where: str, text: str) -> None:
    mutate(flight.doc)
    error = flight.error()
    assert error.where == where
    assert text in error.message
    assert error.hint or "missing" not in text


def test_misspelt_choice_suggests_the_right_one(flight: Flight) -> None:
    flight.doc["runtime"] = "tensorrtt"
    assert "did you mean 'tensorrt'?" in (flight.error().hint or "")
    flight.doc["runtime"] = "onnx_trt_ep"
    flight.doc["backbones"][0]["precision"] = "fp8"
    error = flight.error()
    assert error.where == "sortie.toml [[backbones]][0].precision"
    assert "fp32, fp16, int8" in (error.hint or "")


# --- orthophoto -------------------------------------------------------------------------------------------


def test_orthophoto_needs_exactly_one_source(flight: Flight) -> None:
    flight.doc["orthophoto"] = {"geotiff": "ortho.tif", "mbtiles": "ortho.tif"}
    error = flight.error()
    assert error.where == "sortie.toml [orthophoto]" and "geotiff and mbtiles" in error.message
    flight.doc["orthophoto"] = {}
    assert "got none" in flight.error().message


def test_xyz_source_must_be_a_directory(flight: Flight) -> None:
    flight.doc["orthophoto"] = {"xyz": "ortho.tif"}
    error = flight.error()
    assert error.where == "sortie.toml [orthophoto].xyz" and "is not a directory" in error.message


def test_mbtiles_source_must_exist(flight: Flight) -> None:
    flight.doc["orthophoto"] = {"mbtiles": "area.mbtiles"}
    error = flight.error()
    assert error.where == "sortie.toml [orthophoto].mbtiles" and "does not exist" in error.message
    assert str(flight.root.resolve()) in (error.hint or "")


# --- area -------------------------------------------------------------------------------------------------


def test_area_not_closed(flight: Flight) -> None:
    ring = [*POLYGON["coordinates"][0][:-1], [11.551, 48.12]]
    set_area(flight, {"type": "Polygon", "coordinates": [ring]})
    error = flight.error()
    assert error.where == "sortie.toml [area].geojson"
    assert "area not closed" in error.message and "[11.551, 48.12]" in error.message
    assert "repeat the first position" in (error.hint or "")


def test_self_intersecting_area(flight: Flight) -> None:
    bowtie = [[11.55, 48.12], [11.60, 48.15], [11.60, 48.12], [11.55, 48.15], [11.55, 48.12]]
    set_area(flight, {"type": "Polygon", "coordinates": [bowtie]})
    error = flight.error()
    assert "self-intersecting" in error.message and "Self-intersection[" in error.message
    assert error.hint and "crossing edges" in error.hint


def test_empty_area(flight: Flight) -> None:
    set_area(flight, {"type": "Polygon", "coordinates": []})
    assert "non-empty" in flight.error().message
    set_area(flight, {"type": "MultiPolygon", "coordinates": []})
    assert "empty" in flight.error().message


def test_area_outside_web_mercator(flight: Flight) -> None:
    ring = [[11.55, 84.0], [11.60, 84.0], [11.60, 86.0], [11.55, 84.0]]
    set_area(flight, {"type": "Polygon", "coordinates": [ring]})
    error = flight.error()
    assert "coordinates[0][2] [11.6, 86]" in error.message and "Web-Mercator" in error.message
    assert "[lon, lat]" in (error.hint or "")


def test_longitude_out_of_range_mentions_the_antimeridian(flight: Flight) -> None:
    ring = [[179.5, 10.0], [181.0, 10.0], [181.0, 11.0], [179.5, 10.0]]
    set_area(flight, {"type": "Polygon", "coordinates": [ring]})
    error = flight.error()
    assert "[181, 10]" in error.message and "antimeridian" in (error.hint or "")


def test_antimeridian_crossing_is_not_supported(flight: Flight) -> None:
    ring = [[179.5, 10.0], [-179.5, 10.0], [-179.5, 11.0], [179.5, 11.0], [179.5, 10.0]]
    set_area(flight, {"type": "Polygon", "coordinates": [ring]})
    error = flight.error()
    assert "antimeridian" in error.message and "not supported" in error.message
    assert "split the area" in (error.hint or "")


def test_unsupported_geometry_type_lists_the_allowed_ones(flight: Flight) -> None:
    set_area(flight, {"type": "Point", "coordinates": [11.575, 48.137]})
    error = flight.error()
    assert "'Point' is not supported" in error.message
    assert "Polygon, MultiPolygon, LineString" in (error.hint or "")


def test_feature_collection_with_two_features_is_rejected(flight: Flight) -> None:
    feature = {"type": "Feature", "geometry": POLYGON, "properties": {}}
    set_area(flight, {"type": "FeatureCollection", "features": [feature, feature]})
    assert "exactly one feature, it has 2" in flight.error().message


def test_invalid_geojson_string_names_line_and_column(flight: Flight) -> None:
    flight.doc["area"] = {"geojson": '{"type": "Polygon",\n "coordinates": [[1, 2,]]}'}
    error = flight.error()
    assert error.where == "sortie.toml [area].geojson" and "line 2" in error.message
    flight.doc["area"] = {"geojson": '{"type": "Polygon", "coordinates": [[[NaN, 1]]]}'}
    assert "NaN" in flight.error().message


def test_area_needs_exactly_one_source(flight: Flight) -> None:
    flight.doc["area"] = {}
    assert "exactly one of geojson or file" in flight.error().message


def test_takeoff_outside_the_area_gives_the_distance(flight: Flight) -> None:
    flight.doc["takeoff"] = {"lat": 48.137, "lon": 11.62}  # east of the east edge at 11.60
    error = flight.error()
    expected = GEOD.inv(11.60, 48.137, 11.62, 48.137)[2]
    assert error.where == "sortie.toml [takeoff]"
    metres = float(error.message.split(" lies ")[1].split(" m ")[0].replace(",", ""))
    assert metres == pytest.approx(expected, rel=0.01)
    assert "lat/lon" in (error.hint or "")


def test_takeoff_on_the_boundary_is_inside(flight: Flight) -> None:
    flight.doc["takeoff"] = {"lat": 48.137, "lon": 11.60}
    assert flight.load().takeoff == (48.137, 11.60)


def test_budget_is_checked_when_loading(flight: Flight) -> None:
    flight.doc["tiles"].update(zoom=19, budget=100)
    with pytest.raises(TileBudgetError) as info:
        flight.load()
    assert info.value.where == "sortie.toml [tiles].budget"
    assert "the budget is 100" in info.value.message
    assert "[tiles].zoom" in (info.value.hint or "")


# --- corridors --------------------------------------------------------------------------------------------

ROUTE = {"type": "LineString", "coordinates": [[11.50, 48.10], [11.56, 48.13], [11.65, 48.13], [11.70, 48.20]]}


def test_linestring_needs_corridor_m(flight: Flight) -> None:
    set_area(flight, ROUTE)
    flight.doc["takeoff"] = {"lat": 48.13, "lon": 11.60}
    error = flight.error()
    assert error.where == "sortie.toml [area].corridor_m"
    assert "needs corridor_m" in error.message and "corridor_m = 400" in (error.hint or "")


def test_corridor_m_only_for_linestrings(flight: Flight) -> None:
    set_area(flight, POLYGON, corridor_m=400)
    error = flight.error()
    assert error.where == "sortie.toml [area].corridor_m" and "only to LineString" in error.message


def test_corridor_m_must_be_positive(flight: Flight) -> None:
    set_area(flight, ROUTE, corridor_m=0)
    assert "out of range" in flight.error().message


def _min_geodesic_distances(points: np.ndarray, route: np.ndarray) -> np.ndarray:
    dense = np.asarray(shapely.segmentize(shapely.LineString(route), 0.0002).coords)
    out = []
    for lon, lat in points:
        dist = GEOD.inv(np.full(len(dense), lon), np.full(len(dense), lat), dense[:, 0], dense[:, 1])[2]
        out.append(dist.min())
    return np.asarray(out)


@pytest.mark.parametrize("corridor_m", [150.0, 400.0, 2000.0])
def test_corridor_width_is_right_in_metres(flight: Flight, corridor_m: float) -> None:
    set_area(flight, ROUTE, corridor_m=corridor_m)
    flight.doc["takeoff"] = {"lat": 48.13, "lon": 11.60}
    sortie = flight.load()
    assert sortie.corridor_m == corridor_m and sortie.area_geojson == ROUTE
    assert sortie.area.geom_type == "Polygon" and sortie.area.is_valid
    boundary = np.asarray(sortie.area.exterior.coords)[::3]
    distances = _min_geodesic_distances(boundary, np.asarray(ROUTE["coordinates"]))
    # every boundary point lies corridor_m from the route (caps and joins included)
    assert np.all(np.abs(distances / corridor_m - 1.0) < 0.03), (distances.min(), distances.max())


def test_long_route_is_buffered_piecewise_without_losing_width(flight: Flight) -> None:
    # ~190 km with a bend: several 50 km pieces, each in its own local projection
    route = {"type": "LineString", "coordinates": [[10.0, 47.5], [11.2, 48.3], [12.4, 48.0]]}
    set_area(flight, route, corridor_m=500)
    flight.doc["takeoff"] = {"lat": 47.5, "lon": 10.0}
    flight.doc["tiles"]["zoom"] = 14
    area = flight.load().area
    assert area.geom_type == "Polygon" and len(area.interiors) == 0
    boundary = np.asarray(area.exterior.coords)
    sample = boundary[:: max(1, len(boundary) // 60)]
    distances = _min_geodesic_distances(sample, np.asarray(route["coordinates"]))
    assert np.all(np.abs(distances / 500 - 1.0) < 0.03), (distances.min(), distances.max())


def test_takeoff_outside_the_corridor(flight: Flight) -> None:
    set_area(flight, ROUTE, corridor_m=400)
    flight.doc["takeoff"] = {"lat": 48.14, "lon": 11.60}  # ~1.1 km north of the middle leg
    error = flight.error()
    metres = float(error.message.split(" lies ")[1].split(" m ")[0].replace(",", ""))
    expected = GEOD.inv(11.60, 48.13, 11.60, 48.14)[2] - 400
    assert metres == pytest.approx(expected, rel=0.02)
    assert "route corridor" in error.message


def test_corridor_crossing_the_antimeridian_is_rejected(flight: Flight) -> None:
    set_area(flight, {"type": "LineString", "coordinates": [[179.99, 10.0], [179.99, 10.1]]}, corridor_m=5000)
    flight.doc["takeoff"] = {"lat": 10.05, "lon": 179.99}
    assert "antimeridian" in flight.error().message


# --- backbones --------------------------------------------------------------------------------------------


def test_missing_onnx_names_backbone_and_path(flight: Flight) -> None:
    flight.doc["backbones"] = [backbone_entry("dinov2_vpr", onnx="models/dinov2.onnx")]
    error = flight.error()
    assert error.where == "sortie.toml [[backbones]][0].onnx"
    assert "'dinov2_vpr'" in error.message
    assert str(flight.root.resolve() / "models" / "dinov2.onnx") in error.message and "does not exist" in error.message


def test_two_vpr_backbones_are_rejected(flight: Flight) -> None:
    flight.doc["backbones"] = [backbone_entry("a"), backbone_entry("b")]
    error = flight.error()
    assert "exactly one backbone must have role 'vpr', found 'a', 'b'" in error.message
    assert 'role = "local"' in (error.hint or "")


def test_no_vpr_backbone_is_rejected(flight: Flight) -> None:
    flight.doc["backbones"] = [backbone_entry("a", "local")]
    assert "found none" in flight.error().message
    flight.doc["backbones"] = []
    assert "no backbone" in flight.error().message
    del flight.doc["backbones"]
    assert flight.error().where == "sortie.toml backbones"


def test_backbone_names_are_unique_and_schema_safe(flight: Flight) -> None:
    flight.doc["backbones"] = [backbone_entry("a"), backbone_entry("a", "local")]
    error = flight.error()
    assert error.where == "sortie.toml [[backbones]][1].name" and "used twice" in error.message
    for bad in ("dino__v2", "_x", "has space", "x/y"):
        flight.doc["backbones"] = [backbone_entry(bad)]
        error = flight.error()
        assert error.where == "sortie.toml [[backbones]][0].name" and "single '_'" in (error.hint or ""), bad


def test_shape_or_profile_exactly_one(flight: Flight) -> None:
    backbone = backbone_entry("a")
    del backbone["shape"]
    flight.doc["backbones"] = [backbone]
    assert "exactly one of shape" in flight.error().message
    flight.doc["backbones"] = [
        backbone_entry("a", profile={"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [1, 3, 8, 8]})
    ]
    error = flight.error()
    assert error.where == "sortie.toml [[backbones]][0]" and "exactly one of shape" in error.message
    backbone["profile"] = {"min": [4, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [8, 3, 8, 8]}
    flight.doc["backbones"] = [backbone]
    error = flight.error()
    assert error.where == "sortie.toml [[backbones]][0].profile" and "min <= opt <= max" in error.message
    backbone["profile"] = {"min": [1, 3, 8, 8], "opt": [2, 3, 8, 8]}
    assert flight.error().where == "sortie.toml [[backbones]][0].profile.max"
    flight.doc["backbones"] = [backbone_entry("a", shape=[8, 0, 1])]
    assert "positive integers" in flight.error().message


def test_builder_options_must_be_scalars(flight: Flight) -> None:
    flight.doc["backbones"] = [backbone_entry("a", builder_options={"layers": [1, 2]})]
    assert flight.error().where == "sortie.toml [[backbones]][0].builder_options.layers"


# --- robustness (property-based) ----------------------------------------------------------------------------

SLOW_OK = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["", "image", "vpr", "fp16", "ortho.tif", "keys", "../x", "~nobody/x", "a\x00b"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _paths(value, (*prefix, i))
    return out


@settings(SLOW_OK, max_examples=120)
@given(text=st.text(max_size=200))
def test_garbage_text_raises_only_sortie_errors(flight_files: Path, text: str) -> None:
    path = flight_files / "garbage.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(SortieError):
        load_sortie(path)


@SLOW_OK
@given(data=st.data())
def test_mutated_sorties_raise_only_sortie_errors(flight_files: Path, data: st.DataObject) -> None:
    doc = copy.deepcopy(BASE_DOC)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(toml_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(toml_values)
    path = flight_files / "mutated.toml"
    path.write_text(dump_toml(doc), encoding="utf-8", errors="surrogatepass")
    try:
        sortie = load_sortie(path)
    except SortieError:
        return
    assert isinstance(sortie, Sortie)


near = st.floats(min_value=-0.06, max_value=0.06, allow_nan=False)
coordinate = st.one_of(
    st.tuples(near, near).map(lambda p: [11.575 + p[0], 48.137 + p[1]]),
    st.lists(st.one_of(st.floats(), st.integers(), st.booleans(), st.none()), max_size=3),
)
ring = st.lists(coordinate, min_size=0, max_size=8).map(lambda r: r + r[:1] if r and len(r) % 2 else r)


def _star(spokes: list[tuple[float, float]]) -> dict[str, Any]:
    """A star-shaped ring around the takeoff: mostly valid polygons that contain it."""
    ring = [[11.575 + r * math.cos(a), 48.137 + r * math.sin(a)] for a, r in sorted(spokes)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


stars = st.lists(st.tuples(st.floats(0, 2 * math.pi), st.floats(0.0, 0.05)), min_size=3, max_size=10).map(_star)
routes = st.lists(st.tuples(near, near), min_size=1, max_size=5).map(
    lambda offsets: {
        "type": "LineString",
        "coordinates": [[11.575, 48.137]] + [[11.575 + dx, 48.137 + dy] for dx, dy in offsets],
    }
)
geometries = st.one_of(
    stars,
    routes,
    st.builds(lambda rings: {"type": "Polygon", "coordinates": rings}, st.lists(ring, max_size=3)),
    st.builds(
        lambda polys: {"type": "MultiPolygon", "coordinates": polys}, st.lists(st.lists(ring, max_size=2), max_size=3)
    ),
    st.builds(lambda line: {"type": "LineString", "coordinates": line}, st.lists(coordinate, max_size=5)),
    st.builds(lambda kind, c: {"type": kind, "coordinates": c}, st.text(max_size=12), toml_values),
    toml_values,
)


@SLOW_OK
@given(geometry=geometries, corridor=st.one_of(st.none(), st.floats(min_value=-10, max_value=3000)))
def test_random_geometries_raise_only_sortie_errors(flight_files: Path, geometry: Any, corridor: float | None) -> None:
    doc = copy.deepcopy(BASE_DOC)
    doc["area"] = {"file": "area.geojson"}
    if corridor is not None:
        doc["area"]["corridor_m"] = corridor
    (flight_files / "area.geojson").write_text(json.dumps(geometry))
    path = flight_files / "geometry.toml"
    path.write_text(dump_toml(doc))
    try:
        sortie = load_sortie(path)
    except SortieError:
        return
    assert sortie.area.is_valid and not sortie.area.is_empty
    assert sortie.area.covers(shapely.Point(sortie.takeoff[1], sortie.takeoff[0]))
