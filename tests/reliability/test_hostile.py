"""Hostile input: areas, ONNX files and orthophotos that are wrong on purpose.

Every case ends in one of two ways: preflight accepts the sortie, or it raises a ``NavcacheError`` /
``InferenceRuntimeError`` with a message. Never another exception, and preflight writes nothing at all
(the whole working folder and the shared assets folder are snapshotted before and after). A few
representative cases also run the real CLI (``python -m navcache provision``) in a subprocess: exit 2,
one ``error:`` line, no traceback, nothing created anywhere (the cache dir included: preflight fails first).

The property tests run a modest number of examples by default (``-m "not slow"``); the ``slow`` variants
run the same properties with many more. Nothing here needs the Prefect server or a full provision.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from navcache.errors import NavcacheError, SortieError, SourceError, TileBudgetError
from navcache.preflight import preflight
from navcache_runtime import InferenceRuntimeError
from tests.support.sorties import CENTER_LAT, CENTER_LON, Assets, block_tiles, tiles_polygon, write_sortie

CLEAN_ERRORS = (NavcacheError, InferenceRuntimeError)
TAKEOFF = (CENTER_LAT, CENTER_LON)

FAST = settings(
    max_examples=int(os.environ.get("NAVCACHE_HOSTILE_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # CI: the same examples every run; the slow variant explores
)
SLOW = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the property ----------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under the roots: kind, size and mtime (a write of the same size still shows)."""
    seen: dict[str, tuple[str, int, int]] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            kind = "dir" if path.is_dir() else "link" if path.is_symlink() else "file"
            seen[str(path)] = (kind, 0 if kind == "dir" else info.st_size, 0 if kind == "dir" else info.st_mtime_ns)
    return seen


def clean_preflight(sortie: Path, work: Path, assets: Assets) -> BaseException | None:
    """Run preflight; return None (accepted) or the clean error. Anything else fails the test."""
    before = snapshot(work, assets.root)
    try:
        preflight(sortie, work / "cache")
        outcome: BaseException | None = None
    except CLEAN_ERRORS as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        assert "Traceback" not in str(exc)
        outcome = exc
    after = snapshot(work, assets.root)
    assert after == before, f"preflight wrote: {sorted(set(after) ^ set(before)) or 'modified files'}"
    assert not (work / "cache").exists()
    return outcome


def good_area() -> dict[str, Any]:
    first, _ = block_tiles()
    return tiles_polygon(first)


def sortie_with(
    work: Path,
    assets: Assets,
    *,
    area: dict[str, Any] | None = None,
    corridor_m: float | None = None,
    zoom: int = 18,
    vpr_onnx: Path | None = None,
    ortho: Path | None = None,
) -> Path:
    takeoff = None if area is None else TAKEOFF  # None: write_sortie puts it inside the good area
    area = good_area() if area is None else area
    path = write_sortie(
        work / "sortie.toml", assets, area=area, cache_dir=work / "cache", zoom=zoom, vpr_onnx=vpr_onnx, takeoff=takeoff
    )
    text = path.read_text()
    if corridor_m is not None:
        text = text.replace("[area]\n", f"[area]\ncorridor_m = {corridor_m!r}\n", 1)
    if ortho is not None:
        text = text.replace(f'geotiff = "{assets.ortho}"', f'geotiff = "{ortho}"', 1)
    path.write_text(text)
    return path


def navcache_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PREFECT_HOME=str(cwd / "prefect-home"), NO_COLOR="1", COLUMNS="200")
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "navcache", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )


# -- GeoJSON areas -----------------------------------------------------------------------------------------
def closed(points: list[list[float]]) -> list[list[float]]:
    return [*points, points[0]]


def rect(w: float, s: float, e: float, n: float) -> list[list[float]]:
    return closed([[w, s], [e, s], [e, n], [w, n]])


def poly(*rings: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": list(rings)}


near = st.floats(-0.02, 0.02, allow_nan=False)
small = st.floats(1e-5, 0.01, allow_nan=False)


@st.composite
def bowties(draw: st.DrawFn) -> dict[str, Any]:
    x, y = CENTER_LON + draw(near), CENTER_LAT + draw(near)
    dx, dy = draw(small), draw(small)
    return poly(closed([[x - dx, y - dy], [x + dx, y + dy], [x + dx, y - dy], [x - dx, y + dy]]))


@st.composite
def antimeridian(draw: st.DrawFn) -> dict[str, Any]:
    # Strictly more than 180 degrees apart: a ring from 90 to -90 is a legal 180-degree-wide area across the
    # prime meridian (RFC 7946 reads it that way), not an antimeridian crossing.
    west = draw(st.floats(90.0, 180.0, exclude_min=True))
    east = draw(st.floats(-180.0, -90.0, exclude_max=True))
    south = draw(st.floats(-80.0, 70.0))
    return poly(rect(west, south, east, south + draw(st.floats(0.001, 10.0))))


@st.composite
def polar(draw: st.DrawFn) -> dict[str, Any]:
    lat = draw(st.floats(85.0512, 90.0) | st.floats(-90.0, -85.0512))
    lon = draw(st.floats(-179.0, 178.0))
    return poly(rect(lon, min(lat, math.copysign(84.0, lat)), lon + 1.0, lat))


EMPTY_AREAS = [
    {"type": "Polygon", "coordinates": []},
    {"type": "Polygon", "coordinates": [[]]},
    {"type": "MultiPolygon", "coordinates": []},
    {"type": "MultiPolygon", "coordinates": [[]]},
    {"type": "Polygon", "coordinates": [closed([[CENTER_LON, CENTER_LAT]] * 4)]},  # one point, repeated
    {"type": "Polygon", "coordinates": [closed([[11.57, 48.13], [11.58, 48.14], [11.59, 48.15]])]},  # collinear
    {"type": "LineString", "coordinates": []},
    {"type": "FeatureCollection", "features": []},
    {"type": "Feature", "geometry": None, "properties": {}},
    {"type": "GeometryCollection", "geometries": []},
    {},
    {"type": "Polygon"},
]


@st.composite
def enormous(draw: st.DrawFn) -> dict[str, Any]:
    """A continent around the takeoff; at zoom 17 it needs ~10^9 chunks (budget 5000)."""
    return poly(
        rect(
            draw(st.floats(-10.0, 5.0)),
            draw(st.floats(35.0, 45.0)),
            draw(st.floats(20.0, 40.0)),
            draw(st.floats(55.0, 70.0)),
        )
    )


@st.composite
def slivers(draw: st.DrawFn) -> dict[str, Any]:
    width = draw(st.sampled_from([0.0, 1e-15]) | st.floats(0.0, 1e-6))
    length = draw(st.floats(1e-6, 0.01))
    x, y = CENTER_LON, CENTER_LAT - length / 2
    if draw(st.booleans()):
        return poly(rect(x, y, x + width, y + length))
    # a diagonal needle: three points almost on a line
    return poly(closed([[x, y], [x + length, y + length], [x + length, y + length + width]]))


@st.composite
def holed(draw: st.DrawFn) -> dict[str, Any]:
    w, s, e, n = CENTER_LON - 0.01, CENTER_LAT - 0.01, CENTER_LON + 0.01, CENTER_LAT + 0.01
    kind = draw(st.sampled_from(["inside", "under takeoff", "outside", "crossing", "equal", "two overlapping"]))
    holes = {
        "inside": [rect(w + 0.001, s + 0.001, w + 0.002, s + 0.002)],
        "under takeoff": [rect(CENTER_LON - 0.001, CENTER_LAT - 0.001, CENTER_LON + 0.001, CENTER_LAT + 0.001)],
        "outside": [rect(e + 1, n + 1, e + 2, n + 2)],
        "crossing": [rect(e - 0.001, s + 0.001, e + 0.01, s + 0.002)],
        "equal": [rect(w, s, e, n)],
        "two overlapping": [
            rect(w + 0.001, s + 0.001, w + 0.003, s + 0.003),
            rect(w + 0.002, s + 0.002, w + 0.004, s + 0.004),
        ],
    }[kind]
    return poly(rect(w, s, e, n), *holes)


@st.composite
def multipolygons(draw: st.DrawFn) -> dict[str, Any]:
    good = rect(CENTER_LON - 0.005, CENTER_LAT - 0.005, CENTER_LON + 0.005, CENTER_LAT + 0.005)
    bad = draw(
        st.sampled_from(
            [
                [draw(bowties())["coordinates"][0]],  # a self-intersecting part
                [good],  # the same part twice: overlapping parts
                [rect(CENTER_LON + 0.005, CENTER_LAT - 0.005, CENTER_LON + 0.01, CENTER_LAT)],  # shares an edge
                [[[CENTER_LON, CENTER_LAT], [CENTER_LON + 1, CENTER_LAT]]],  # a ring too short
                [rect(CENTER_LON + 0.1, CENTER_LAT, CENTER_LON + 0.1, CENTER_LAT)],  # zero area
                [],  # an empty part
                [draw(polar())["coordinates"][0]],
                "not a polygon",
            ]
        )
    )
    parts = [[good], bad]
    if draw(st.booleans()):
        parts.reverse()
    return {"type": "MultiPolygon", "coordinates": parts}


@st.composite
def random_rings(draw: st.DrawFn) -> dict[str, Any]:
    """3-8 random vertices near the takeoff: mostly self-intersecting, sometimes fine."""
    points = draw(
        st.lists(st.tuples(near, near), min_size=3, max_size=8).map(
            lambda ps: [[CENTER_LON + x, CENTER_LAT + y] for x, y in ps]
        )
    )
    return poly(closed(points))


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
junk_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)


@st.composite
def junk(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["Polygon", "MultiPolygon", "LineString", "Point", "Feature", "Polygonn", 7]))
    return {"type": kind, "coordinates": draw(junk_values)}


@st.composite
def routes(draw: st.DrawFn) -> tuple[dict[str, Any], float]:
    """LineString routes with a corridor: local, across the antimeridian, towards a pole, degenerate."""
    kind = draw(st.sampled_from(["local", "antimeridian", "polar", "repeated point", "long"]))
    corridor = draw(st.floats(1.0, 50_000.0))
    if kind == "local":
        coords = [[CENTER_LON - 0.01, CENTER_LAT], [CENTER_LON + 0.01, CENTER_LAT + draw(near)]]
    elif kind == "antimeridian":
        lat = draw(st.floats(-60.0, 60.0))
        coords = [[179.99, lat], [-179.99, lat]] if draw(st.booleans()) else [[179.0, lat], [180.0, lat]]
    elif kind == "polar":
        coords = [[CENTER_LON, 84.0], [CENTER_LON, draw(st.floats(84.5, 85.05))]]
    elif kind == "repeated point":
        coords = [[CENTER_LON, CENTER_LAT]] * draw(st.integers(1, 4))
    else:
        coords = [[CENTER_LON, CENTER_LAT], [CENTER_LON + draw(st.floats(1.0, 20.0)), CENTER_LAT]]
    return {"type": "LineString", "coordinates": coords}, corridor


AREA_KINDS: dict[str, st.SearchStrategy[Any]] = {
    "bowtie": bowties(),
    "antimeridian": antimeridian(),
    "polar": polar(),
    "empty": st.sampled_from(EMPTY_AREAS),
    "enormous": enormous(),
    "sliver": slivers(),
    "holes": holed(),
    "multipolygon": multipolygons(),
    "random ring": random_rings(),
    "junk": junk(),
}
#: What the error must say, for kinds that must always fail.
AREA_MUST_FAIL: dict[str, tuple[type[NavcacheError], str]] = {
    "bowtie": (SortieError, "self-intersecting"),
    "antimeridian": (SortieError, "antimeridian"),
    "polar": (SortieError, "Web-Mercator latitude"),
    "empty": (SortieError, ""),
    "enormous": (TileBudgetError, "budget"),
}  # slivers may pass: 1e-7 degrees wide still has a surface, and the takeoff lies in it
area_cases = st.one_of(*(st.tuples(st.just(k), s) for k, s in AREA_KINDS.items()))


def check_area(assets: Assets, work: Path, kind: str, area: dict[str, Any]) -> None:
    zoom = 17 if kind == "enormous" else 18
    outcome = clean_preflight(sortie_with(work, assets, area=area, zoom=zoom), work, assets)
    if kind in AREA_MUST_FAIL:
        error_type, phrase = AREA_MUST_FAIL[kind]
        assert isinstance(outcome, error_type), f"{kind}: {outcome!r} for {json.dumps(area)[:300]}"
        assert phrase in str(outcome), str(outcome)


@FAST
@given(case=area_cases)
def test_hostile_areas_fail_cleanly(assets: Assets, tmp_path_factory: pytest.TempPathFactory, case: Any) -> None:
    check_area(assets, tmp_path_factory.mktemp("area"), *case)


@pytest.mark.slow
@SLOW
@given(case=area_cases)
def test_hostile_areas_fail_cleanly_many(assets: Assets, tmp_path_factory: pytest.TempPathFactory, case: Any) -> None:
    check_area(assets, tmp_path_factory.mktemp("area"), *case)


@FAST
@given(case=routes())
def test_hostile_routes_fail_cleanly(assets: Assets, tmp_path_factory: pytest.TempPathFactory, case: Any) -> None:
    area, corridor = case
    work = tmp_path_factory.mktemp("route")
    clean_preflight(sortie_with(work, assets, area=area, corridor_m=corridor), work, assets)


def test_enormous_area_hits_the_tile_budget_fast(assets: Assets, tmp_path: Path) -> None:
    import time

    area = poly(rect(-10.0, 35.0, 40.0, 70.0))  # Europe at zoom 17: ~10^10 tiles
    started = time.perf_counter()
    outcome = clean_preflight(sortie_with(tmp_path, assets, area=area, zoom=17), tmp_path, assets)
    assert isinstance(outcome, TileBudgetError) and "budget" in str(outcome), outcome
    assert time.perf_counter() - started < 5.0


# -- ONNX files ----------------------------------------------------------------------------------------
def onnx_model(
    *,
    input_name: str = "image",
    dims: list[int | str | None] | None = None,
    output_type: int | None = None,
    opset: int = 17,
    with_output: bool = True,
) -> bytes:
    from onnx import TensorProto, helper

    dims = [None, 3, 128, 128] if dims is None else dims
    image = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)
    out_type = TensorProto.FLOAT if output_type is None else output_type
    # a descriptor is [N, D]: the image's spatial maximum per channel
    nodes = [helper.make_node("ReduceMax", [input_name], ["pooled"], axes=[2, 3], keepdims=0)]
    nodes.append(helper.make_node("Cast", ["pooled"], ["descriptor"], to=out_type))
    outputs = [helper.make_tensor_value_info("descriptor", out_type, [None, None])] if with_output else []
    graph = helper.make_graph(nodes, "hostile", [image], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return bytes(model.SerializeToString())


ELEM_TYPES = st.sampled_from([1, 2, 3, 5, 6, 7, 9, 10, 11, 16])  # FLOAT, UINT8, INT8, INT16, INT32, INT64, BOOL...
dims_strategy = st.lists(
    st.one_of(st.integers(0, 2**62), st.sampled_from([3, 128, 2**31]), st.sampled_from(["N", "batch", ""]), st.none()),
    max_size=6,
)


@st.composite
def onnx_blobs(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["truncated", "random bytes", "bit flip", "built"]))
    good = _vpr_bytes()
    if kind == "truncated":
        return kind, good[: draw(st.integers(0, len(good) - 1))]
    if kind == "random bytes":
        return kind, draw(st.binary(max_size=4096))
    if kind == "bit flip":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(data)
    return kind, onnx_model(
        input_name=draw(st.sampled_from(["image", "input", "x", "IMAGE", "image "]) | st.text(max_size=6)),
        dims=draw(st.none() | dims_strategy),
        output_type=draw(ELEM_TYPES),
        opset=draw(st.sampled_from([13, 17, 21])),
        with_output=draw(st.booleans()),
    )


_VPR_BYTES: list[bytes] = []


def _vpr_bytes() -> bytes:
    return _VPR_BYTES[0]


@pytest.fixture(scope="module", autouse=True)
def vpr_bytes(assets: Assets) -> None:
    _VPR_BYTES[:] = [assets.vpr_onnx.read_bytes()]


def check_onnx(assets: Assets, work: Path, kind: str, blob: bytes) -> None:
    model = work / "hostile.onnx"
    model.write_bytes(blob)
    outcome = clean_preflight(sortie_with(work, assets, vpr_onnx=model), work, assets)
    if kind in ("truncated", "random bytes"):
        assert isinstance(outcome, SortieError), f"{kind} ONNX accepted ({len(blob)} bytes)"


@FAST
@given(case=onnx_blobs())
def test_hostile_onnx_fails_cleanly(assets: Assets, tmp_path_factory: pytest.TempPathFactory, case: Any) -> None:
    check_onnx(assets, tmp_path_factory.mktemp("onnx"), *case)


@pytest.mark.slow
@SLOW
@given(case=onnx_blobs())
def test_hostile_onnx_fails_cleanly_many(assets: Assets, tmp_path_factory: pytest.TempPathFactory, case: Any) -> None:
    check_onnx(assets, tmp_path_factory.mktemp("onnx"), *case)


ONNX_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "wrong input name": (lambda: onnx_model(input_name="pixels"), "has no input 'image'"),
    "wrong rank": (lambda: onnx_model(dims=[None, 128, 128]), "rank 3"),
    "int64 output": (lambda: onnx_model(output_type=7), "INT64"),
    "huge declared dims": (lambda: onnx_model(dims=[None, 3, 2**31, 2**31]), "fixed at 2147483648"),
    "no outputs": (lambda: onnx_model(with_output=False), "no outputs"),
    "valid": (lambda: onnx_model(), ""),
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_defects_are_named(case: str, assets: Assets, tmp_path: Path) -> None:
    build, phrase = ONNX_CASES[case]
    model = tmp_path / "hostile.onnx"
    model.write_bytes(build())
    outcome = clean_preflight(sortie_with(tmp_path, assets, vpr_onnx=model), tmp_path, assets)
    if not phrase:
        assert outcome is None, outcome
    else:
        assert isinstance(outcome, SortieError) and phrase in str(outcome), outcome


def test_onnx_external_data_pointing_outside_is_refused(assets: Assets, tmp_path: Path) -> None:
    """An initializer whose external data names ../../ (path traversal) or a missing file."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("float_data")
    for key, value in (("location", "../../../../etc/passwd"), ("offset", "0"), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    model = onnx.ModelProto()
    model.ParseFromString(onnx_model())
    model.graph.initializer.append(weight)
    path = tmp_path / "external.onnx"
    path.write_bytes(model.SerializeToString())
    outcome = clean_preflight(sortie_with(tmp_path, assets, vpr_onnx=path), tmp_path, assets)
    assert isinstance(outcome, SortieError), outcome


# -- orthophotos -------------------------------------------------------------------------------------------
CRSES = [
    "EPSG:4326",
    "EPSG:3857",
    "EPSG:32632",  # the demo's UTM zone
    "EPSG:32601",  # UTM zone 1, by the antimeridian
    "EPSG:3413",  # polar stereographic north
    "EPSG:27700",  # British National Grid
    "+proj=ortho +lat_0=-45 +lon_0=170 +datum=WGS84",
    "+proj=geos +h=35785831 +lon_0=-75 +datum=WGS84",
    "+proj=tmerc +lat_0=89 +lon_0=0 +k=1 +x_0=0 +y_0=0 +datum=WGS84",
    None,
]


@st.composite
def geotiffs(draw: st.DrawFn) -> dict[str, Any]:
    crs = draw(st.sampled_from(CRSES))
    crs_is_degrees = crs == "EPSG:4326"
    if draw(st.booleans()):  # on top of the area, in the raster's CRS
        from pyproj import Transformer

        if crs is None:
            x0, y0 = CENTER_LON, CENTER_LAT
        else:
            try:
                x0, y0 = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(CENTER_LON, CENTER_LAT)
            except Exception:
                x0, y0 = math.inf, math.inf
        if not (math.isfinite(x0) and math.isfinite(y0)):
            x0, y0 = 0.0, 0.0
    else:
        span = 180.0 if crs_is_degrees else 2e7
        x0, y0 = draw(st.floats(-span, span)), draw(st.floats(-span, span))
    size = draw(st.integers(1, 16))
    pixel = draw(st.floats(1e-9, 1e-2) if crs_is_degrees else st.floats(1e-3, 1e6))
    return {
        "crs": crs,
        "origin": (x0 - pixel * size / 2, y0 + pixel * size / 2),
        "pixel": pixel,
        "size": size,
        "count": draw(st.sampled_from([1, 3, 4])),
        "dtype": draw(st.sampled_from(["uint8", "uint8", "uint8", "uint16", "float32"])),
        "nodata_everywhere": draw(st.booleans()),
        "rotated": draw(st.booleans()) and draw(st.booleans()),
    }


def write_geotiff(path: Path, spec: dict[str, Any]) -> Path:
    import rasterio
    from rasterio.transform import Affine, from_origin

    transform = from_origin(*spec["origin"], spec["pixel"], spec["pixel"])
    if spec["rotated"]:
        transform = transform * Affine.rotation(30.0)
    size, count = spec["size"], spec["count"]
    data = np.zeros((count, size, size), spec["dtype"]) if spec["nodata_everywhere"] else None
    if data is None:
        data = np.random.default_rng(0).integers(1, 255, (count, size, size)).astype(spec["dtype"])
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=count,
        dtype=spec["dtype"],
        crs=spec["crs"],
        transform=transform,
        nodata=0,
    ) as ds:
        ds.write(data)
    return path


@st.composite
def orthophotos(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["geotiff", "geotiff", "truncated", "random bytes"]))
    if kind == "geotiff":
        return kind, draw(geotiffs())
    if kind == "truncated":
        return kind, draw(st.integers(0, 64 * 1024))
    return kind, draw(st.binary(max_size=2048))


_ORTHO_BYTES: dict[str, bytes] = {}


def check_ortho(assets: Assets, work: Path, kind: str, spec: Any) -> BaseException | None:
    ortho = work / "hostile.tif"
    if kind == "geotiff":
        write_geotiff(ortho, spec)
    elif kind == "truncated":
        if "ortho" not in _ORTHO_BYTES:
            _ORTHO_BYTES["ortho"] = assets.ortho.read_bytes()
        whole = _ORTHO_BYTES["ortho"]
        ortho.write_bytes(whole[: min(spec, len(whole) - 1)])
    else:
        ortho.write_bytes(spec)
    return clean_preflight(sortie_with(work, assets, ortho=ortho), work, assets)


@FAST
@given(case=orthophotos())
def test_hostile_orthophotos_fail_cleanly(assets: Assets, tmp_path_factory: pytest.TempPathFactory, case: Any) -> None:
    check_ortho(assets, tmp_path_factory.mktemp("ortho"), *case)


@pytest.mark.slow
@SLOW
@given(case=orthophotos())
def test_hostile_orthophotos_fail_cleanly_many(
    assets: Assets, tmp_path_factory: pytest.TempPathFactory, case: Any
) -> None:
    check_ortho(assets, tmp_path_factory.mktemp("ortho"), *case)


def _spec(**overrides: Any) -> dict[str, Any]:
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(CENTER_LON, CENTER_LAT)
    spec = {
        "crs": "EPSG:32632",
        "origin": (x - 1500.0, y + 1500.0),
        "pixel": 250.0,
        "size": 12,
        "count": 3,
        "dtype": "uint8",
        "nodata_everywhere": False,
        "rotated": False,
    }
    return spec | overrides


def test_nodata_everywhere_is_refused_by_preflight(assets: Assets, tmp_path: Path) -> None:
    """Preflight surveys the raster's valid pixels under the area (not only its footprint): a raster that is
    nodata everywhere there is refused before anything is written, naming where the imagery lies."""
    outcome = check_ortho(assets, tmp_path, "geotiff", _spec(nodata_everywhere=True))
    assert isinstance(outcome, SourceError) and "no valid pixels over the area" in outcome.message, outcome


def test_orthophoto_in_another_crs_far_away_is_no_overlap(assets: Assets, tmp_path: Path) -> None:
    outcome = check_ortho(assets, tmp_path, "geotiff", _spec(crs="EPSG:27700", origin=(400_000.0, 300_000.0)))
    assert isinstance(outcome, SourceError) and "does not overlap" in str(outcome), outcome


def test_orthophoto_without_crs_is_refused(assets: Assets, tmp_path: Path) -> None:
    outcome = check_ortho(assets, tmp_path, "geotiff", _spec(crs=None))
    assert isinstance(outcome, SourceError) and "georeferencing" in str(outcome), outcome


# -- the real CLI ----------------------------------------------------------------------------------------
def _cli_bowtie(work: Path, assets: Assets) -> tuple[Path, str]:
    x, y, d = CENTER_LON, CENTER_LAT, 0.001
    area = poly(closed([[x - d, y - d], [x + d, y + d], [x + d, y - d], [x - d, y + d]]))
    return sortie_with(work, assets, area=area), "self-intersecting"


def _cli_enormous(work: Path, assets: Assets) -> tuple[Path, str]:
    return sortie_with(work, assets, area=poly(rect(-10.0, 35.0, 40.0, 70.0)), zoom=17), "budget"


def _cli_antimeridian(work: Path, assets: Assets) -> tuple[Path, str]:
    return sortie_with(work, assets, area=poly(rect(179.0, 10.0, -179.0, 11.0))), "antimeridian"


def _cli_int64(work: Path, assets: Assets) -> tuple[Path, str]:
    model = work / "int64.onnx"
    model.write_bytes(onnx_model(output_type=7))
    return sortie_with(work, assets, vpr_onnx=model), "INT64"


def _cli_random_onnx(work: Path, assets: Assets) -> tuple[Path, str]:
    model = work / "noise.onnx"
    model.write_bytes(np.random.default_rng(6).bytes(3000))
    return sortie_with(work, assets, vpr_onnx=model), "noise.onnx"


def _cli_truncated_tif(work: Path, assets: Assets) -> tuple[Path, str]:
    ortho = work / "cut.tif"
    ortho.write_bytes(assets.ortho.read_bytes()[:100])
    return sortie_with(work, assets, ortho=ortho), "cut.tif"


def _cli_far_crs(work: Path, assets: Assets) -> tuple[Path, str]:
    ortho = write_geotiff(work / "far.tif", _spec(crs="EPSG:3413", origin=(0.0, 0.0)))
    return sortie_with(work, assets, ortho=ortho), "far.tif"


CLI_CASES: dict[str, Callable[[Path, Assets], tuple[Path, str]]] = {
    "bowtie area": _cli_bowtie,
    "continent at z17": _cli_enormous,
    "antimeridian": _cli_antimeridian,
    "int64 descriptor": _cli_int64,
    "random-bytes onnx": _cli_random_onnx,
    "truncated tiff": _cli_truncated_tif,
    "polar-stereo raster far away": _cli_far_crs,
}
FAST_CLI = ("bowtie area", "continent at z17", "int64 descriptor", "truncated tiff")


@pytest.mark.parametrize("case", [c if c in FAST_CLI else pytest.param(c, marks=pytest.mark.slow) for c in CLI_CASES])
def test_cli_prints_one_clear_error_and_writes_nothing(case: str, assets: Assets, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sortie, phrase = CLI_CASES[case](work, assets)
    before = snapshot(tmp_path, assets.root)
    proc = navcache_cli("provision", str(sortie), cwd=work)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error:" in proc.stderr and phrase in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(tmp_path, assets.root) == before  # no cache dir, no prefect home, nothing in the cwd
