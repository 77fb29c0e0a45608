"""The demo's orthophoto: a procedural rural landscape written as a GeoTIFF in a UTM CRS (so provisioning
has to reproject it to Web-Mercator tiles, as it must for real orthophotos).

:func:`generate_orthophoto` writes a 3-band uint8 GeoTIFF (tiled, DEFLATE), ``NODATA_BORDER_PX`` columns of
nodata (0) along the east edge and no 0 anywhere else; :func:`orthophoto_grid` gives its pixel grid without
rendering. The scene is vector geometry (Voronoi land parcels, roads, farm tracks, a river, a lake,
buildings with shadows) burned with ``rasterio.features.rasterize`` and textured with vectorised numpy, so
a 4000x4000 px scene takes a few seconds. The same arguments give a byte-identical file.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import shapely
from affine import Affine
from PIL import Image
from shapely import affinity
from shapely.geometry import LineString, MultiPoint, Point, Polygon, box

from navcache_runtime.integrity import fsync_dir, fsync_file, temp_path_for

logger = logging.getLogger(__name__)

NODATA = 0
NODATA_BORDER_PX = 12  # columns of nodata along the east edge, to exercise nodata handling


@dataclass(frozen=True)
class OrthoGrid:
    """The pixel grid of a generated orthophoto (north-up, square pixels)."""

    crs: str
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the CRS."""
        left, top = self.transform.c, self.transform.f
        return left, top + self.transform.e * self.height, left + self.transform.a * self.width, top


def orthophoto_grid(
    *,
    center_lat: float = 48.137,
    center_lon: float = 11.575,
    size_m: float = 2500,
    gsd_m: float = 0.6,
    crs: str = "EPSG:32632",
) -> OrthoGrid:
    """The grid :func:`generate_orthophoto` writes for these arguments (origin snapped to ``gsd_m``)."""
    if size_m <= 0 or gsd_m <= 0:
        raise ValueError(f"size_m and gsd_m must be positive, got {size_m}, {gsd_m}")
    xs, ys = rasterio.warp.transform("EPSG:4326", crs, [center_lon], [center_lat])
    n = math.ceil(size_m / gsd_m)
    west = round((xs[0] - n * gsd_m / 2) / gsd_m) * gsd_m
    north = round((ys[0] + n * gsd_m / 2) / gsd_m) * gsd_m
    return OrthoGrid(crs=crs, transform=Affine(gsd_m, 0.0, west, 0.0, -gsd_m, north), width=n, height=n)


def generate_orthophoto(
    path: Path,
    *,
    center_lat: float = 48.137,
    center_lon: float = 11.575,
    size_m: float = 2500,
    gsd_m: float = 0.6,
    crs: str = "EPSG:32632",
    seed: int = 7,
) -> Path:
    """Write a synthetic 3-band uint8 orthophoto GeoTIFF (tiled, DEFLATE, nodata 0 on a thin east border)
    centred on (``center_lat``, ``center_lon``), ``size_m`` on a side at ``gsd_m`` metres per pixel.
    Atomic (temp file + ``os.replace``); the same arguments give the same bytes."""
    path = Path(path)
    grid = orthophoto_grid(center_lat=center_lat, center_lon=center_lon, size_m=size_m, gsd_m=gsd_m, crs=crs)
    rgb = _render_scene(grid.width, grid.height, gsd_m, np.random.default_rng(seed))
    rgb[:, :, -NODATA_BORDER_PX:] = NODATA
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": 3,
        "dtype": "uint8",
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "zlevel": 3,  # level 6 is 3x slower for 3% less
        "interleave": "pixel",
        "photometric": "RGB",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(rgb)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote demo orthophoto %s (%dx%d px, %s)", path, grid.width, grid.height, crs)
    return path


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cell_px: float) -> np.ndarray:
    """Value noise in [-1, 1] with features about ``cell_px`` pixels across (bicubic upsampling)."""
    w, h = max(2, math.ceil(width / cell_px) + 1), max(2, math.ceil(height / cell_px) + 1)
    small = Image.fromarray(rng.uniform(-1.0, 1.0, (h, w)).astype(np.float32), mode="F")
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def _wavy_line(
    rng: np.random.Generator, start: tuple[float, float], end: tuple[float, float], wiggle: float
) -> LineString:
    """A gently curving line from ``start`` to ``end`` (a few smoothed lateral offsets)."""
    (x0, y0), (x1, y1) = start, end
    t = np.linspace(0.0, 1.0, 40)
    length = math.hypot(x1 - x0, y1 - y0)
    nx, ny = -(y1 - y0) / length, (x1 - x0) / length
    offset = np.zeros_like(t)
    for k in range(1, 4):
        offset += rng.uniform(-wiggle, wiggle) / k * np.sin(math.pi * k * t + rng.uniform(0, math.pi))
    offset *= np.sin(math.pi * t)  # endpoints stay put
    return LineString(np.column_stack([x0 + (x1 - x0) * t + nx * offset, y0 + (y1 - y0) * t + ny * offset]))


def _burn(shapes: list[tuple[Any, int]], height: int, width: int, gsd: float, dtype: str = "uint8") -> np.ndarray:
    """Rasterize ``(geometry in metres, value)`` pairs onto the scene grid (x east, y south, origin NW)."""
    if not shapes:
        return np.zeros((height, width), dtype)
    return rasterio.features.rasterize(
        shapes, out_shape=(height, width), transform=Affine.scale(gsd), fill=0, dtype=dtype
    )


def _mask(geoms: list[Any], height: int, width: int, gsd: float) -> np.ndarray:
    return _burn([(g, 1) for g in geoms if not g.is_empty], height, width, gsd).astype(bool)


# Land-use classes of the parcels.
_FIELD, _MEADOW, _FOREST, _VILLAGE = 0, 1, 2, 3
_FIELD_COLOURS = np.array(
    [
        [112, 138, 64],  # young wheat
        [150, 160, 80],  # barley
        [196, 178, 104],  # ripe grain
        [176, 150, 112],  # stubble
        [128, 100, 74],  # ploughed soil
        [96, 122, 58],  # maize
        [204, 190, 92],  # rapeseed past bloom
        [140, 150, 96],  # fallow
    ],
    np.float32,
)
_ROOF_COLOURS = np.array([[168, 84, 62], [150, 70, 56], [120, 120, 124], [200, 196, 188], [96, 80, 72]], np.float32)
_SURFACES = {  # colours of the non-parcel materials
    "track": (168, 150, 120),
    "bank": (70, 90, 52),
    "water": (38, 64, 72),
    "road": (92, 92, 96),
    "centre": (210, 210, 200),
    "bridge": (124, 122, 116),
    "tree": (52, 80, 42),
}


def _parcels(rng: np.random.Generator, w_m: float, h_m: float) -> list[Polygon]:
    """Elongated field parcels: Voronoi cells of a jittered grid in a stretched frame (so they come out
    long and roughly parallel, as after land consolidation), many split into side-by-side strips."""
    angle, stretch, spacing = rng.uniform(15, 35), 2.2, 120.0
    frame = box(0.0, 0.0, w_m, h_m)
    reach = math.hypot(w_m, h_m)  # the stretched/rotated frame must still cover the scene
    nx, ny = math.ceil(reach / (spacing * stretch)) + 3, math.ceil(reach / spacing) + 3
    gx, gy = np.meshgrid(np.arange(nx) * spacing, np.arange(ny) * spacing)
    seeds = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.35, 0.35, (nx * ny, 2)) * spacing
    seeds -= seeds.mean(axis=0)
    cells = shapely.get_parts(shapely.voronoi_polygons(MultiPoint(seeds)))
    centre = (w_m / 2, h_m / 2)
    parcels: list[Polygon] = []
    for cell in sorted(cells, key=lambda c: (round(c.centroid.y, 3), round(c.centroid.x, 3))):
        # Strips are cut in the stretched frame, where the long axis is x.
        minx, miny, maxx, maxy = cell.bounds
        k = int(rng.choice([1, 1, 2, 3, 4]))
        cuts = np.sort(rng.uniform(miny, maxy, k - 1))
        edges = [miny, *cuts, maxy]
        for y0, y1 in itertools.pairwise(edges):
            strip = cell.intersection(box(minx, y0, maxx, y1))
            placed = affinity.rotate(affinity.scale(strip, stretch, 1.0, origin=(0, 0)), angle, origin=(0, 0))
            placed = affinity.translate(placed, *centre).intersection(frame)
            if isinstance(placed, Polygon) and not placed.is_empty and placed.area > 50.0:
                parcels.append(placed)
    return parcels


def _street_grid(centre: np.ndarray, radius: float, angle: float) -> list[LineString]:
    """Three parallel village streets and two cross streets, rotated by ``angle`` degrees."""
    cx, cy = float(centre[0]), float(centre[1])
    half = radius * 1.1
    lines = [LineString([(cx + d * radius, cy - half), (cx + d * radius, cy + half)]) for d in (-0.55, 0.0, 0.55)]
    lines += [LineString([(cx - half, cy + d * radius), (cx + half, cy + d * radius)]) for d in (-0.5, 0.45)]
    return [affinity.rotate(line, angle, origin=(cx, cy)) for line in lines]


def _render_scene(width: int, height: int, gsd: float, rng: np.random.Generator) -> np.ndarray:
    """(3, H, W) uint8 RGB of a rural scene with a village; values 1..255 (0 is nodata).

    Built as a material map (parcel ids, then surfaces burned over them) and a shade map; the colour is
    ``lut[material] * shade`` once at the end, which keeps every step a cheap 2-D operation."""
    w_m, h_m = width * gsd, height * gsd
    frame = box(0.0, 0.0, w_m, h_m)

    # Parcels and their land use: the village around a centre, forest where coarse noise is highest.
    parcels = _parcels(rng, w_m, h_m)
    n = len(parcels)
    centroids = np.array([[p.centroid.x, p.centroid.y] for p in parcels])
    village_centre = np.array([w_m * rng.uniform(0.3, 0.45), h_m * rng.uniform(0.45, 0.6)])
    village_radius = 0.08 * min(w_m, h_m) + 60.0
    forest_noise = np.asarray(
        Image.fromarray(rng.uniform(-1, 1, (8, 8)).astype(np.float32), mode="F").resize(
            (64, 64), Image.Resampling.BICUBIC
        )
    )
    fi = np.clip((centroids / [w_m, h_m] * 63.99).astype(int), 0, 63)
    forestness = forest_noise[fi[:, 1], fi[:, 0]]
    land = np.full(n, _FIELD)
    land[forestness > np.quantile(forestness, 0.8)] = _FOREST
    land[(land == _FIELD) & (rng.random(n) < 0.15)] = _MEADOW
    in_village = np.hypot(*(centroids - village_centre).T) < village_radius
    land[in_village] = _VILLAGE

    # Material LUT: 0 unused, 1..n parcels, then the surfaces.
    lut = np.zeros((n + 1 + len(_SURFACES), 3), np.float32)
    fields = land == _FIELD
    lut[1 : n + 1][fields] = _FIELD_COLOURS[rng.integers(0, len(_FIELD_COLOURS), int(fields.sum()))]
    lut[1 : n + 1][land == _MEADOW] = (104, 140, 70)
    lut[1 : n + 1][land == _FOREST] = (46, 72, 40)
    lut[1 : n + 1][land == _VILLAGE] = (118, 134, 96)
    lut[1 : n + 1] *= rng.uniform(0.88, 1.1, (n, 1)).astype(np.float32)
    surface = {name: n + 1 + i for i, name in enumerate(_SURFACES)}
    for name, value in surface.items():
        lut[value] = _SURFACES[name]

    material = _burn([(p, i) for i, p in enumerate(parcels, start=1)], height, width, gsd, "int32")
    material[material == 0] = 1  # slivers between parcels

    # Shade: stripes (tramlines, drill rows) per field parcel, plus soil moisture at ~60 m.
    angle = rng.uniform(0, math.pi, n + 1).astype(np.float32)
    period = rng.uniform(3.0, 12.0, n + 1).astype(np.float32) / gsd
    amp = np.zeros(n + 1, np.float32)
    amp[1:][fields] = rng.uniform(0.03, 0.12, int(fields.sum()))
    kx, ky = (2 * math.pi * np.cos(angle) / period), (2 * math.pi * np.sin(angle) / period)
    cols = np.arange(width, dtype=np.float32)[None, :]
    rows = np.arange(height, dtype=np.float32)[:, None]
    shade = np.sin(cols * kx[material] + rows * ky[material])
    shade *= amp[material]
    shade += 1.0
    shade += 0.08 * _smooth_noise(rng, width, height, 60.0 / gsd)

    # Water: a river across the scene and a lake, with reed banks.
    river = _wavy_line(rng, (-50.0, h_m * rng.uniform(0.7, 0.85)), (w_m + 50.0, h_m * rng.uniform(0.8, 0.95)), 150.0)
    cx, cy = w_m * rng.uniform(0.62, 0.8), h_m * rng.uniform(0.15, 0.35)
    theta = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    radius = min(w_m, h_m) * 0.07 * (1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6)) + 0.1 * np.sin(7 * theta))
    lake = Polygon(np.column_stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)]))
    water_geoms = [river.buffer(12.0 + 4.0 * rng.random()), lake]
    banks = _mask([g.buffer(4.0) for g in water_geoms], height, width, gsd)
    water = _mask(water_geoms, height, width, gsd)

    # Roads: two country roads across the scene, a village street grid, farm tracks on parcel edges.
    roads = [
        _wavy_line(rng, (-50.0, h_m * rng.uniform(0.15, 0.35)), (w_m + 50.0, h_m * rng.uniform(0.3, 0.5)), 120.0),
        _wavy_line(rng, (w_m * rng.uniform(0.2, 0.4), -50.0), (w_m * rng.uniform(0.5, 0.7), h_m + 50.0), 150.0),
        LineString([(-50.0, village_centre[1] + 20.0), (w_m + 50.0, village_centre[1] - 60.0)]),
    ]
    streets = _street_grid(village_centre, village_radius, rng.uniform(-20, 20))
    edges = [p.exterior for p, use in zip(parcels, land, strict=True) if use == _FIELD and rng.random() < 0.3]
    tracks = _mask([e.buffer(1.5) for e in edges], height, width, gsd)
    road_mask = _mask([r.buffer(3.5) for r in roads] + [s.buffer(2.75) for s in streets], height, width, gsd)
    verges = _mask([r.buffer(5.5) for r in roads], height, width, gsd)
    centre_lines = _mask([r.buffer(0.2) for r in roads[:2]], height, width, gsd)

    material[tracks & ~banks] = surface["track"]
    material[banks] = surface["bank"]
    material[water] = surface["water"]
    shade[verges & ~road_mask & ~water] *= 0.85
    material[road_mask] = surface["road"]
    material[road_mask & water] = surface["bridge"]
    material[centre_lines] = surface["centre"]
    del tracks, verges, centre_lines

    # Buildings along the village streets (gable roofs: two halves lit differently), all in lots.
    occupied = shapely.unary_union([r.buffer(5.0) for r in roads] + [s.buffer(4.0) for s in streets] + water_geoms)
    shadows: list[Any] = []
    roofs: list[tuple[Any, int]] = []
    roof_lut: list[np.ndarray] = []
    for street in streets:
        (sx0, sy0), (sx1, sy1) = street.coords
        ux, uy = (sx1 - sx0) / street.length, (sy1 - sy0) / street.length
        rot = math.degrees(math.atan2(uy, ux))
        for along in np.arange(10.0, street.length - 10.0, 24.0):
            for side in (-1.0, 1.0):
                if rng.random() < 0.2:
                    continue  # empty lot
                setback = side * rng.uniform(11.0, 15.0)
                bx = sx0 + ux * along - uy * setback
                by = sy0 + uy * along + ux * setback
                if math.hypot(bx - village_centre[0], by - village_centre[1]) > village_radius * 1.05:
                    continue
                bw, bd = rng.uniform(9.0, 17.0), rng.uniform(8.0, 12.0)
                lot = box(bx - bw / 2, by - bd / 2, bx + bw / 2, by + bd / 2)
                footprint = affinity.rotate(lot, rot, origin=(bx, by))
                if footprint.intersects(occupied) or not frame.contains(footprint):
                    continue
                occupied = occupied.union(footprint.buffer(1.5))
                shadows.append(affinity.translate(footprint, -2.5, -2.5))  # sun in the south-east
                base = _ROOF_COLOURS[rng.integers(0, len(_ROOF_COLOURS))] * rng.uniform(0.9, 1.1)
                for y0, y1, light in ((by - bd / 2, by, 1.12), (by, by + bd / 2, 0.86)):
                    roof_half = affinity.rotate(box(bx - bw / 2, y0, bx + bw / 2, y1), rot, origin=(bx, by))
                    roofs.append((roof_half, len(roof_lut)))
                    roof_lut.append(base * light)

    # Trees: hedgerows along some parcel edges and roads, and garden trees in the village.
    tree_points: list[Any] = []
    for line in [e for e in edges if rng.random() < 0.5] + roads[:2]:
        step = rng.uniform(7.0, 12.0)
        for d in np.arange(rng.uniform(0, step), line.length, step):
            if rng.random() < 0.7:
                point = line.interpolate(d)
                tree_points.append(affinity.translate(point, *rng.normal(0, 1.0, 2)) if line not in roads else point)
    garden = rng.uniform(-1, 1, (int(village_radius**2 / 250) + 1, 2)) * village_radius + village_centre
    tree_points += [Point(x, y) for x, y in garden]
    crowns = [pt.buffer(rng.uniform(2.0, 4.5), quad_segs=4) for pt in tree_points]
    crowns = [c for c in crowns if not c.intersects(occupied)] if crowns else []
    if roads:  # roadside trees stand beside the road, not on it
        road_union = shapely.unary_union([r.buffer(4.0) for r in roads])
        crowns = [c for c in crowns if not c.intersects(road_union)]
    tree_mask = _mask(crowns, height, width, gsd)
    shadow_mask = _mask([affinity.translate(c, -2.0, -2.0) for c in crowns] + shadows, height, width, gsd)
    material[tree_mask] = surface["tree"]
    shade[shadow_mask & ~tree_mask] *= 0.55

    roof_base = len(lut)
    roof_id = _burn([(g, roof_base + i) for g, i in roofs], height, width, gsd, "int32")
    has_roof = roof_id > 0
    material[has_roof] = roof_id[has_roof]
    lut = np.concatenate([lut, np.asarray(roof_lut, np.float32).reshape(-1, 3)])
    del roof_id, has_roof, shadow_mask

    # Canopy texture (forest and trees): crowns about 4 m across, lit from the south-east.
    is_canopy = np.zeros(len(lut), bool)
    is_canopy[1 : n + 1] = land == _FOREST
    is_canopy[surface["tree"]] = True
    canopy = is_canopy[material]
    crown_noise = _smooth_noise(rng, width, height, 4.0 / gsd) + 0.5 * _smooth_noise(rng, width, height, 1.6 / gsd)
    shade[canopy] *= 0.75 + 0.45 * crown_noise[canopy]
    del crown_noise, canopy
    ripple = _smooth_noise(rng, width, height, 8.0 / gsd)
    shade[water] *= 1.0 + 0.06 * ripple[water]
    del ripple

    # Colour, sensor grain, quantise; 0 is reserved for nodata.
    grain = rng.integers(-2, 3, (height, width), dtype=np.int8).astype(np.float32)
    out = np.empty((3, height, width), np.uint8)
    for band in range(3):
        value = lut[:, band][material]
        value *= shade
        value += grain
        np.clip(value, 1, 255, out=value)
        out[band] = value
    return out
