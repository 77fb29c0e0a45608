"""The onboard consumer: a cache provisioned by the real flow is verified, opened and queried like a drone
would, and a refused or padded cache opens nothing it should not."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

pytest.importorskip("faiss")

import navcache_runtime as nr
from navcache.descriptors import Preprocessing
from navcache.imagery import open_tile_source
from navcache.tiles import tile_bounds
from navcache.types import TileId
from navcache_runtime import cache as cache_module
from navcache_runtime.cache import IMAGENET_STD, Candidate, open_cache, preprocess
from navcache_runtime.errors import FailureCode
from navcache_runtime.verify import CacheVerificationError
from tests.support.isolation import run_json
from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie

BLOCKED = ("prefect", "onnx", "navcache", "rasterio", "shapely", "rfc8785", "torch", "PIL")
MODEL_SIZE = 128  # the demo VPR backbone's input (tests/support/sorties.py); tiles are 256 px


@dataclass(frozen=True)
class Provisioned:
    cache: Path
    tiles: list[TileId]
    pixels: dict[TileId, np.ndarray]  # RGB uint8 as the orthophoto gives them


@pytest.fixture(scope="module")
def provisioned(assets: Assets, prefect_harness: Path, tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    from navcache_flows.provision_sortie import provision_sortie

    root = tmp_path_factory.mktemp("onboard")
    first, second = block_tiles()
    tiles = first + second
    sortie = write_sortie(root / "s.toml", assets, area=tiles_polygon(tiles), cache_dir=root / "cache")
    summary = provision_sortie(str(sortie))
    assert summary["verified"] and summary["index"]["vectors"] == len(tiles)
    with open_tile_source("geotiff", assets.ortho) as source:
        pixels = {}
        for tile in tiles:
            read = source.read_tile(tile)
            assert read is not None
            pixels[tile] = read.rgb
    return Provisioned(root / "cache", tiles, pixels)


def single(hits: list[Candidate] | list[list[Candidate]]) -> list[Candidate]:
    """query() of one (D,) descriptor returns a flat list."""
    assert all(isinstance(hit, Candidate) for hit in hits)
    return cast(list[Candidate], hits)


def zxy(tile: TileId) -> tuple[int, int, int]:
    return tile.z, tile.x, tile.y


def centre(tile: TileId) -> tuple[float, float]:
    west, south, east, north = tile_bounds(tile)
    return (south + north) / 2, (west + east) / 2


def test_every_tile_is_found_first_and_a_geo_prior_restricts_the_search(
    provisioned: Provisioned, assets: Assets
) -> None:
    assert nr.open_cache is open_cache and nr.Candidate is Candidate  # the package's lazy exports
    with open_cache(provisioned.cache, assets.trusted_keys) as cache:
        assert cache.vpr_model == "tiny_vpr" and set(cache.engine_models) == {"tiny_vpr", "local_features"}
        assert cache.input_shape == (3, MODEL_SIZE, MODEL_SIZE) and cache.tile_count == len(provisioned.tiles)
        frames = np.stack([cache.preprocess(provisioned.pixels[t]) for t in provisioned.tiles])
        descriptors = cache.describe(frames)
        assert descriptors.shape == (len(provisioned.tiles), cache.dim)
        np.testing.assert_allclose(cache.describe(frames[2]), descriptors[2:3], rtol=1e-5, atol=1e-6)

        # ~100 m tiles at z18 and 48° N: 60 m around a tile centre holds that tile only.
        for tile, descriptor in zip(provisioned.tiles, descriptors, strict=True):
            hits = single(cache.query(descriptor, k=5))
            assert hits[0].tile == zxy(tile) and hits[0].score > 0.99, hits
            assert hits[0].bounds == pytest.approx(tile_bounds(tile))
            assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

            near = single(cache.query(descriptor, k=5, near=(*centre(tile), 60.0)))
            assert [h.tile for h in near] == [zxy(tile)]
            elsewhere = max(provisioned.tiles, key=lambda t: abs(t.x - tile.x) + abs(t.y - tile.y))
            away = single(cache.query(descriptor, k=5, near=(*centre(elsewhere), 60.0)))
            assert away and zxy(tile) not in [h.tile for h in away]
            assert cache.query(descriptor, k=5, near=(0.0, 0.0, 1000.0)) == []

        batched = cache.query_batch(descriptors, k=1)
        assert cache.query(descriptors, k=1) == batched
        assert [hits[0].tile for hits in batched] == [zxy(t) for t in provisioned.tiles]

        samples = []
        for _ in range(5):
            for descriptor in descriptors:
                started = time.perf_counter()
                cache.query(descriptor, k=10, near=(*centre(provisioned.tiles[0]), 500.0))
                samples.append(time.perf_counter() - started)
        assert statistics.median(samples) < 0.05  # a Flat index of 8 tiles: well under a millisecond here

    assert cache.closed
    with pytest.raises(nr.InferenceError, match="was closed"):
        cache.query(descriptors[0])


def test_preprocess_matches_the_provisioning_side(provisioned: Provisioned) -> None:
    """With Pillow (what provisioning uses) the tensors are identical. The numpy port of Pillow's 8-bit
    bilinear filter (for a drone without Pillow) is identical for the tiles' 256 → 128 px resize; for other
    sizes Pillow 13 sometimes runs its vertical pass first, and rounding then differs by one grey level."""
    rng = np.random.default_rng(3)
    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-6
    images = [*provisioned.pixels.values(), rng.integers(0, 256, (300, 211, 3), dtype=np.uint8)]
    for number, rgb in enumerate(images):
        for height, width in ((MODEL_SIZE, MODEL_SIZE), (96, 160), (rgb.shape[0], rgb.shape[1]), (320, 320)):
            expected = Preprocessing(height, width)(rgb)
            pil = preprocess(rgb, height, width, use_pil=True)
            assert pil.dtype == np.float32 and pil.flags.c_contiguous
            np.testing.assert_allclose(pil, expected, rtol=0, atol=1e-6)
            port = preprocess(rgb, height, width, use_pil=False)
            exact = number < len(provisioned.pixels) and (height, width) in ((MODEL_SIZE, MODEL_SIZE), rgb.shape[:2])
            np.testing.assert_allclose(port, expected, rtol=0, atol=1e-6 if exact else one_level)
    with pytest.raises(nr.InferenceError, match="RGB uint8"):
        preprocess(images[0].astype(np.float32), MODEL_SIZE, MODEL_SIZE)


class _Spy:
    """Records the calls of the function it wraps."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)
        return self.real(*args, **kwargs)


def test_a_tampered_index_is_refused_and_nothing_is_opened(
    provisioned: Provisioned, assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Path(shutil.copytree(provisioned.cache, tmp_path / "cache", symlinks=True))
    index = next((cache / "index").glob("index-*.faiss"))
    data = bytearray(index.read_bytes())
    data[-5] ^= 0xFF
    index.write_bytes(bytes(data))
    opened = {name: _Spy(getattr(cache_module, name)) for name in ("load_verified_index", "build_inference_runtime")}
    for name, spy in opened.items():
        monkeypatch.setattr(cache_module, name, spy)
    with pytest.raises(CacheVerificationError) as refused:
        open_cache(cache, assets.trusted_keys)
    assert FailureCode.ARTIFACT_DIGEST_MISMATCH in refused.value.report.codes
    assert isinstance(refused.value, nr.InferenceRuntimeError)
    assert not any(spy.calls for spy in opened.values()), {name: spy.calls for name, spy in opened.items()}


def test_an_unlisted_index_dropped_into_the_cache_is_never_opened(
    provisioned: Provisioned, assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import faiss

    cache = Path(shutil.copytree(provisioned.cache, tmp_path / "cache", symlinks=True))
    listed = next((cache / "index").glob("index-*.faiss"))
    # A valid index of the same dimension, sorting before the real one, with a matching tile table.
    rogue = faiss.IndexFlatIP(faiss.read_index(str(listed)).d)
    rogue.add(np.ones((1, rogue.d), np.float32))
    faiss.write_index(rogue, str(cache / "index" / "index-0000000000000000.faiss"))
    shutil.copy(next((cache / "index").glob("tiles-*.npy")), cache / "index" / "tiles-0000000000000000.npy")
    opened = _Spy(cache_module.load_verified_index)
    read = _Spy(faiss.read_index)
    monkeypatch.setattr(cache_module, "load_verified_index", opened)
    monkeypatch.setattr(faiss, "read_index", read)
    with open_cache(cache, assets.trusted_keys) as onboard:
        assert onboard.tile_count == len(provisioned.tiles)
        assert "index/index-0000000000000000.faiss" in onboard.report.extra_files
    assert [Path(call[0]) for call in opened.calls] == [listed]
    assert not [call for call in read.calls if isinstance(call[0], str)]  # faiss never opens a file by name


def test_open_query_and_describe_without_the_provisioning_stack(
    provisioned: Provisioned, assets: Assets, tmp_path: Path
) -> None:
    tile = provisioned.tiles[5]
    np.save(tmp_path / "rgb.npy", provisioned.pixels[tile])
    lat, lon = centre(tile)
    result = run_json(
        f"""
        import json, sys, time
        import numpy as np
        import navcache_runtime as nr
        import navcache_runtime.cache, navcache_runtime.index
        faiss_at_import = "faiss" in sys.modules  # imported on first use only
        started = time.perf_counter()
        with nr.open_cache({str(provisioned.cache)!r}, {str(assets.trusted_keys)!r}) as cache:
            opened_s = time.perf_counter() - started
            frame = cache.preprocess(np.load({str(tmp_path / "rgb.npy")!r}))  # Pillow blocked: numpy port
            descriptor = cache.describe(frame)[0]
            hits = cache.query(descriptor, k=3)
            near = cache.query(descriptor, k=3, near=({lat}, {lon}, 60.0))
        blocked_loaded = sorted(m for m in {list(BLOCKED)!r} if m in sys.modules)
        print(json.dumps({{"first": list(hits[0].tile), "near": [list(h.tile) for h in near],
                           "blocked_loaded": blocked_loaded, "faiss": "faiss" in sys.modules,
                           "faiss_at_import": faiss_at_import,
                           "opened_s": opened_s}}))
        """,
        blocked=BLOCKED,
    )
    assert result["first"] == list(zxy(tile)) and result["near"] == [list(zxy(tile))]
    assert result["blocked_loaded"] == [] and result["faiss"] and not result["faiss_at_import"]
    assert math.isfinite(result["opened_s"]) and json.dumps(result)


# --------------------------------------------------------------------------------------------------------
# Load what was verified: files swapped between verification and loading


def _reversed_index(listed: Path) -> bytes:
    """The attacker's index: the same vectors in reverse row order, so every top-1 names another tile."""
    import faiss

    real = faiss.read_index(str(listed))
    rogue = faiss.IndexFlatIP(real.d)
    rogue.add(real.reconstruct_n(0, real.ntotal)[::-1].copy())
    return bytes(faiss.serialize_index(rogue))


def _top1(cache: nr.OnboardCache, provisioned: Provisioned) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    frames = np.stack([cache.preprocess(provisioned.pixels[t]) for t in provisioned.tiles])
    descriptors = cache.describe(frames)
    return descriptors, [hits[0].tile for hits in cache.query_batch(descriptors, k=1)]


@pytest.mark.parametrize("mmap", [True, False])
def test_an_index_swapped_right_after_it_was_hashed_is_not_the_one_loaded(
    provisioned: Provisioned, assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mmap: bool
) -> None:
    from navcache_runtime import index as index_module

    cache = Path(shutil.copytree(provisioned.cache, tmp_path / "cache", symlinks=True))
    listed = next((cache / "index").glob("index-*.faiss"))
    attacker = _reversed_index(listed)
    real_sha256 = hashlib.sha256

    class SwapAfterHash:  # index.py's hashlib: hash what faiss will read, then the attacker renames
        @staticmethod
        def sha256(data: Any) -> Any:
            digest = real_sha256(data)
            staged = listed.with_name(".attack")
            staged.write_bytes(attacker)
            os.replace(staged, listed)
            return digest

    monkeypatch.setattr(index_module, "hashlib", SwapAfterHash)
    with open_cache(cache, assets.trusted_keys, mmap=mmap) as onboard:
        assert listed.read_bytes() == attacker  # the swap happened while the cache was opening
        _, top1 = _top1(onboard, provisioned)
    assert top1 == [zxy(t) for t in provisioned.tiles]  # the verified index answered, not the attacker's


def test_an_index_swapped_between_verification_and_loading_is_refused(
    provisioned: Provisioned, assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Path(shutil.copytree(provisioned.cache, tmp_path / "cache", symlinks=True))
    listed = next((cache / "index").glob("index-*.faiss"))
    attacker = _reversed_index(listed)
    real_verify = cache_module.verify_cache

    def verify_then_swap(*args: Any, **kwargs: Any) -> Any:
        report = real_verify(*args, **kwargs)
        listed.write_bytes(attacker)
        return report

    monkeypatch.setattr(cache_module, "verify_cache", verify_then_swap)
    with pytest.raises(nr.InferenceRuntimeError, match="changed after the cache verified"):
        open_cache(cache, assets.trusted_keys)


def test_an_engine_swapped_right_after_the_gate_hashed_it_is_not_the_one_loaded(
    provisioned: Provisioned, assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_load_verified import swap_after_gate_hash

    with open_cache(provisioned.cache, assets.trusted_keys) as pristine:
        expected, expected_top1 = _top1(pristine, provisioned)
        vpr = pristine._vpr.path.relative_to(provisioned.cache)
        other = next(e.path for m, e in pristine._engines.items() if m != pristine.vpr_model)
    cache = Path(shutil.copytree(provisioned.cache, tmp_path / "cache", symlinks=True))
    attacker = (cache / other.relative_to(provisioned.cache)).read_bytes()  # a valid engine, another model
    swapped = swap_after_gate_hash(monkeypatch, cache / vpr, attacker)
    with open_cache(cache, assets.trusted_keys, vpr_model=pristine.vpr_model) as onboard:
        assert swapped == [cache / vpr] and (cache / vpr).read_bytes() == attacker
        descriptors, top1 = _top1(onboard, provisioned)
    np.testing.assert_array_equal(descriptors, expected)
    assert top1 == expected_top1


@pytest.mark.parametrize("victim", ["engine", "sidecar"])
def test_an_engine_replaced_by_a_directory_after_verification_is_a_typed_error(
    provisioned: Provisioned, assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str
) -> None:
    cache = Path(shutil.copytree(provisioned.cache, tmp_path / "cache", symlinks=True))
    engine = next(p for p in (cache / "engines").iterdir() if p.suffix in (".onnx", ".pt2", ".engine"))
    path = engine if victim == "engine" else engine.with_name(engine.name + ".sha256")
    real_verify = cache_module.verify_cache

    def verify_then_swap(*args: Any, **kwargs: Any) -> Any:
        report = real_verify(*args, **kwargs)
        path.unlink()
        path.mkdir()
        return report

    monkeypatch.setattr(cache_module, "verify_cache", verify_then_swap)
    with pytest.raises(nr.InferenceRuntimeError, match="not a regular file") as refused:
        open_cache(cache, assets.trusted_keys)
    assert not isinstance(refused.value, OSError)
