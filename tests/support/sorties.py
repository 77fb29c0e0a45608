"""Build real sortie files over the demo's synthetic orthophoto and models, for flow and CLI tests."""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from navcache.tiles import tile_bounds, tile_for_lonlat
from navcache.types import TileId
from tests.support.sortie_files import write_document

CENTER_LAT, CENTER_LON = 48.137, 11.575


@dataclass(frozen=True)
class Assets:
    root: Path
    ortho: Path
    vpr_onnx: Path
    local_onnx: Path
    signing_key: Path
    trusted_keys: Path


def make_assets(root: Path) -> Assets:
    from navcache.demo import generate_demo_models, generate_orthophoto
    from navcache.keys import generate_keypair

    root.mkdir(parents=True, exist_ok=True)
    ortho = generate_orthophoto(root / "ortho.tif", center_lat=CENTER_LAT, center_lon=CENTER_LON, size_m=2500)
    models = generate_demo_models(root / "models")
    keys = generate_keypair(root / "keys")
    return Assets(
        root, ortho, models["tiny_vpr.onnx"], models["local_features.onnx"], keys.private_key, keys.trusted_keys
    )


def private_models(assets: Assets, directory: Path) -> tuple[Path, Path]:
    """Copies of both models (with their .pt2) that a test may replace."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in (assets.vpr_onnx, assets.local_onnx):
        for suffix in (".onnx", ".pt2"):
            shutil.copy(source.with_suffix(suffix), directory)
    return directory / assets.vpr_onnx.name, directory / assets.local_onnx.name


def tiles_polygon(tiles: list[TileId], inset: float = 1e-6) -> dict[str, Any]:
    """A MultiPolygon of the given tiles, each inset slightly so it touches no neighbour."""
    polygons = []
    for tile in tiles:
        w, s, e, n = tile_bounds(tile)
        w, s, e, n = w + inset, s + inset, e - inset, n - inset
        polygons.append([[[w, s], [e, s], [e, n], [w, n], [w, s]]])
    return {"type": "MultiPolygon", "coordinates": polygons}


def block_tiles(zoom: int = 18, block: int = 8) -> tuple[list[TileId], list[TileId]]:
    """Two 2x2 groups of tiles near the centre in neighbouring shard blocks (same block row)."""
    centre = tile_for_lonlat(CENTER_LON, CENTER_LAT, zoom)
    edge = (centre.x // block) * block + (block if centre.x % block >= block // 2 else 0)
    y0 = (centre.y // block) * block + 3
    first = [TileId(zoom, x, y) for x in (edge - 2, edge - 1) for y in (y0, y0 + 1)]
    second = [TileId(zoom, x, y) for x in (edge, edge + 1) for y in (y0, y0 + 1)]
    return first, second


def demo_backbones(vpr_onnx: Path, local_onnx: Path, **fields: Any) -> list[dict[str, Any]]:
    """The demo's two ``[[backbones]]`` in fp32: tiny_vpr over a batch-1-to-16 profile of 128 px images,
    local_features at batch 1; ``fields`` (e.g. ``input``) go into both."""
    return [
        {
            "name": "tiny_vpr",
            "onnx": str(vpr_onnx),
            "role": "vpr",
            "precision": "fp32",
            **fields,
            "profile": {"min": [1, 3, 128, 128], "opt": [8, 3, 128, 128], "max": [16, 3, 128, 128]},
        },
        {
            "name": "local_features",
            "onnx": str(local_onnx),
            "role": "local",
            "precision": "fp32",
            **fields,
            "shape": [1, 3, 128, 128],
        },
    ]


def write_sortie(
    path: Path,
    assets: Assets,
    *,
    area: dict[str, Any],
    cache_dir: Path,
    zoom: int = 18,
    vpr_onnx: Path | None = None,
    local_onnx: Path | None = None,
    threshold: float = 99.0,
    takeoff: tuple[float, float] | None = None,
    extra: str = "",
) -> Path:
    """A sortie file over ``area`` with the demo's two backbones and keys; ``extra`` is TOML text whose keys
    and tables are added to the document."""
    if takeoff is None:
        first = area["coordinates"][0][0][0] if area["type"] == "MultiPolygon" else area["coordinates"][0][0]
        takeoff = (first[1] + 2e-4, first[0] + 2e-4)
    doc: dict[str, Any] = {
        "sortie_id": f"test-{path.stem}",
        "runtime": "onnx_trt_ep",
        "cache_dir": str(cache_dir),
        "signing_key": str(assets.signing_key),
        "trusted_keys": str(assets.trusted_keys),
        "coverage_threshold": threshold,
        "expires_hours": 24,
        "takeoff": {"lat": takeoff[0], "lon": takeoff[1]},
        "area": {"geojson": json.dumps(area)},
        "tiles": {"zoom": zoom, "size": 256, "shard_block": 8, "budget": 5000},
        "orthophoto": {"geotiff": str(assets.ortho)},
        "descriptors": {"batch_size": 8},
        "backbones": demo_backbones(vpr_onnx or assets.vpr_onnx, local_onnx or assets.local_onnx, input="image"),
    }
    return write_document(path, doc | tomllib.loads(extra))
