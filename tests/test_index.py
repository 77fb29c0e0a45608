from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from navcache.errors import ProvisionError  # noqa: E402
from navcache.index_build import TABLE_DTYPE, IndexBudget, IndexResult, build_index, load_report  # noqa: E402
from navcache_runtime import verify_artifact  # noqa: E402
from navcache_runtime.index import (  # noqa: E402
    CacheIndexError,
    ids_near,
    load_index,
    load_tile_table,
    load_verified_index,
    search,
)
from navcache_runtime.integrity import TEMP_PREFIX  # noqa: E402

REPORT_FIELDS = {
    "index_type",
    "reason",
    "n",
    "dim",
    "pca_dim",
    "nprobe",
    "recall_at_1",
    "recall_at_10",
    "build_s",
    "size_bytes",
    "gpu",
    "faiss_version",
    "train_sample",
    "seed",
}


@dataclass(frozen=True)
class Corpus:
    x: np.ndarray
    ids: np.ndarray
    bounds: np.ndarray


def clustered(n: int, d: int, *, clusters: int = 200, seed: int = 0, dtype: type = np.float32) -> Corpus:
    """Descriptors in Gaussian clusters (like tiles of similar terrain) over a block of z15 tiles."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    z, tx, ty = 15, 17_000 + np.arange(n) % 500, 11_000 + np.arange(n) // 500
    ids = np.stack([np.full(n, z), tx, ty], axis=1)
    west, east = tx / 2**z * 360 - 180, (tx + 1) / 2**z * 360 - 180
    north = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * ty / 2**z))))
    south = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (ty + 1) / 2**z))))
    return Corpus(x.astype(dtype), ids, np.stack([west, south, east, north], axis=1))


def terrain(n: int, d: int, *, latent: int = 16, seed: int = 0) -> Corpus:
    """Descriptors on a smooth low-dimensional manifold, like views of continuous terrain: neighbours
    straddle IVF cells, so (unlike tight clusters) IVF needs several probes to reach the target."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent)).astype(np.float32)
    w1 = rng.standard_normal((latent, 128)).astype(np.float32)
    w2 = rng.standard_normal((128, d)).astype(np.float32) / np.sqrt(128)
    x = np.tanh(z @ w1) @ w2 + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    grid = clustered(n, 1)
    return Corpus(x, grid.ids, grid.bounds)


def build(corpus: Corpus, out: Path, **budget: object) -> IndexResult:
    return build_index(corpus.x, corpus.ids, corpus.bounds, out, IndexBudget(**budget))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def big() -> Corpus:
    return clustered(20_000, 64)


@pytest.fixture(scope="module")
def ivf(big: Corpus, tmp_path_factory: pytest.TempPathFactory) -> IndexResult:
    return build(big, tmp_path_factory.mktemp("ivf"), exact_max_n=2000)


@pytest.fixture(scope="module")
def small() -> Corpus:
    return clustered(1000, 64, seed=3, dtype=np.float16)  # fp16, as the engines emit


@pytest.fixture(scope="module")
def flat(small: Corpus, tmp_path_factory: pytest.TempPathFactory) -> IndexResult:
    return build(small, tmp_path_factory.mktemp("flat"))


@pytest.fixture(params=["flat", "ivf"])
def built(request: pytest.FixtureRequest) -> tuple[IndexResult, Corpus]:
    corpus = request.getfixturevalue("small" if request.param == "flat" else "big")
    return request.getfixturevalue(request.param), corpus


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------ choosing the type


def test_small_n_builds_an_exact_flat_index_with_measured_full_recall(flat: IndexResult) -> None:
    report = load_report(flat.report_path)
    assert flat.index_type == "Flat" and report["index_type"] == "Flat"
    assert (flat.recall_at_1, flat.recall_at_10) == (1.0, 1.0)
    assert report["recall_queries"] == 1000 and report["nprobe"] is None
    assert "exact_max_n" in flat.reason
    assert (flat.n, flat.dim, flat.pca_dim, flat.gpu) == (1000, 64, None, False)
    index = load_index(flat.index_path)
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == 1000


def test_large_n_builds_ivf_meeting_the_recall_target(ivf: IndexResult) -> None:
    assert re.fullmatch(r"IVF\d+,Flat", ivf.index_type)
    assert ivf.recall_at_10 >= 0.95 and ivf.recall_at_1 >= 0.9
    report = load_report(ivf.report_path)
    assert report.keys() >= REPORT_FIELDS
    assert report["recall_target_met"] is True and report["recall_k"] == 10
    assert report["recall_at_10_lower_95"] >= 0.95 == report["budget"]["min_recall_at_10"]
    assert report["recall_query_cosine"] == [0.7, 0.995], "queries as far from their tiles as camera frames"
    sweep = report["trials"][-1]["nprobe_sweep"]
    assert sweep[-1]["nprobe"] == report["nprobe"] > 1 and sweep[-2]["recall_at_10_lower_95"] < 0.95, "the smallest"
    assert report["recall_at_10"] == ivf.recall_at_10 and report["size_bytes"] == ivf.size_bytes
    assert report["n"] == 20_000 and report["train_sample"] > 0 and report["seed"] == 0
    assert report["trials"][-1]["nprobe_sweep"], "the nprobe sweep is recorded"
    index = load_index(ivf.index_path)
    assert index.ntotal == 20_000
    assert faiss.extract_index_ivf(index).nprobe == report["nprobe"] >= 1  # tuned nprobe travels in the file
    assert "exact_max_n=2000" in ivf.reason and f"nprobe {report['nprobe']}" in ivf.reason


def test_tiny_memory_budget_chooses_pq_smaller_than_flat(tmp_path: Path) -> None:
    corpus = clustered(5000, 64, seed=5)
    result = build(corpus, tmp_path, max_memory_mb=0.2)
    flat_bytes = 5000 * 64 * 4
    assert ",PQ" in result.index_type, result.index_type
    assert result.size_bytes < flat_bytes and result.size_bytes <= 0.2 * 2**20
    report = load_report(result.report_path)
    assert "exceed the 0.2 MB budget" in result.reason
    if not report["recall_target_met"]:  # PQ codes rarely keep the exact top-10 order; it must say so
        assert "below the target" in result.reason
    assert load_index(result.index_path).ntotal == 5000


def test_ivf_tunes_nprobe_and_falls_back_to_flat_when_the_target_needs_too_many_probes(tmp_path: Path) -> None:
    corpus = terrain(5000, 64)
    result = build(corpus, tmp_path, exact_max_n=1000, min_recall_at_10=0.999)
    report = load_report(result.report_path)
    ivf_trial, flat_trial = report["trials"]
    sweep = [step["nprobe"] for step in ivf_trial["nprobe_sweep"]]
    assert ivf_trial["type"] == "IVF128,Flat" and sweep == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]  # capped at nlist / 4
    assert ivf_trial["recall_at_10"] < 0.999 and ivf_trial["nprobe_sweep"][0]["recall_at_10"] < 0.9
    assert flat_trial["type"] == result.index_type == "Flat" and result.recall_at_10 == 1.0
    assert "so fell back to the more accurate Flat" in result.reason
    assert report["nprobe"] is None and report["recall_target_met"] is True


def test_no_index_fitting_the_budget_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match=r"no index type fits the 0\.01 MB budget") as err:
        build(clustered(5000, 64), tmp_path / "out", max_memory_mb=0.01)
    assert "raise max_memory_mb" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_target_dim_applies_pca_and_records_it(tmp_path: Path) -> None:
    corpus = clustered(3000, 128, seed=7)
    result = build(corpus, tmp_path, target_dim=32)
    assert result.pca_dim == 32 and result.dim == 128
    assert result.index_type == "PCA32,L2norm,Flat"
    report = load_report(result.report_path)
    assert report["pca_dim"] == 32 and 0 < report["recall_at_10_full_dim"] <= 1
    index = load_index(result.index_path)
    wrapper = faiss.downcast_index(index)
    assert isinstance(wrapper, faiss.IndexPreTransform)
    assert index.d == 128 and wrapper.index.d == 32
    assert faiss.downcast_VectorTransform(wrapper.chain.at(0)).d_out == 32
    table = load_tile_table(result.table_path)
    hits = search(index, table, corpus.x[17], 3)
    assert hits[0][0][0] == 17  # queries stay in the descriptor space; the index projects them
    others = np.setdiff1d(np.arange(3000), [17])
    assert 17 not in {row for row, _ in search(index, table, corpus.x[17], 3, allowed_ids=others)[0]}


def test_pca_over_ivf_restricts_and_probes_through_the_transform(tmp_path: Path) -> None:
    corpus = terrain(5000, 64, seed=2)
    result = build(corpus, tmp_path, exact_max_n=1000, target_dim=32)
    assert result.index_type == "PCA32,L2norm,IVF128,Flat"
    index, table = load_index(result.index_path), load_tile_table(result.table_path)
    odd = np.arange(1, 5000, 2)
    hits = search(index, table, corpus.x[[10, 11]], 5, allowed_ids=odd, nprobe=128)
    assert all(row % 2 == 1 for h in hits for row, _ in h) and hits[1][0][0] == 11


def test_target_dim_above_the_descriptor_dim_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="target_dim 96 is larger than the descriptor dimension 64"):
        build(clustered(100, 64), tmp_path, target_dim=96)


# ------------------------------------------------------------------------------------- files on disk


def test_same_inputs_and_seed_give_byte_identical_files(tmp_path: Path) -> None:
    corpus = clustered(5000, 64, seed=11)
    first = build(corpus, tmp_path / "a", exact_max_n=1000)
    second = build(corpus, tmp_path / "b", exact_max_n=1000, recall_sample=300)  # recall sampling is separate
    assert first.index_type.startswith("IVF")
    assert first.index_path.name == second.index_path.name
    assert first.index_path.read_bytes() == second.index_path.read_bytes()
    assert first.table_path.read_bytes() == second.table_path.read_bytes()
    reseeded = build(corpus, tmp_path / "c", exact_max_n=1000, seed=1)
    assert reseeded.index_path.read_bytes() != first.index_path.read_bytes()


def test_a_build_from_the_same_inputs_reuses_the_verified_index_and_anything_else_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import navcache.index_build as index_build

    corpus = clustered(5000, 64, seed=11)
    first = build(corpus, tmp_path, exact_max_n=1000)
    assert first.index_type.startswith("IVF")
    assert load_report(first.report_path)["inputs_sha256"]
    trained = []
    real = index_build._build_and_measure
    monkeypatch.setattr(index_build, "_build_and_measure", lambda *a, **k: trained.append(1) or real(*a, **k))

    reused = build(corpus, tmp_path, exact_max_n=1000)
    assert replace(reused, build_s=first.build_s) == first and trained == []  # same inputs: no training
    build(corpus, tmp_path, exact_max_n=1000, recall_sample=300)  # another budget: built
    assert len(trained) == 1
    changed = Corpus(corpus.x.copy(), corpus.ids, corpus.bounds)
    changed.x[7] = changed.x[8]
    assert build(changed, tmp_path, exact_max_n=1000).index_path != first.index_path and len(trained) == 2
    first.index_path.write_bytes(first.index_path.read_bytes()[:-8])  # damaged: rebuilt, never reused
    again = build(corpus, tmp_path, exact_max_n=1000)
    assert len(trained) == 3 and again.index_path == first.index_path
    verify_artifact(again.index_path)


def test_every_artifact_is_written_atomically_with_a_verifying_sidecar(ivf: IndexResult) -> None:
    files = (ivf.index_path, ivf.table_path, ivf.report_path)
    for path in files:
        assert verify_artifact(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    pair = f"{hashlib.sha256(ivf.index_path.read_bytes()).hexdigest()}\n"
    pair += hashlib.sha256(ivf.table_path.read_bytes()).hexdigest()
    sha16 = hashlib.sha256(pair.encode()).hexdigest()[:16]
    assert [p.name for p in files] == [f"index-{sha16}.faiss", f"tiles-{sha16}.npy", f"index-{sha16}.json"]
    names = sorted(p.name for p in ivf.index_path.parent.iterdir())
    assert not [n for n in names if n.startswith(TEMP_PREFIX)]
    assert names == sorted([p.name for p in files] + [p.name + ".sha256" for p in files])
    report = json.loads(ivf.report_path.read_text())
    assert report["table_sha256"] == hashlib.sha256(ivf.table_path.read_bytes()).hexdigest()


def test_tile_table_maps_rows_back_to_tiles_and_bounds(ivf: IndexResult, big: Corpus) -> None:
    table = load_tile_table(ivf.table_path)
    assert table.dtype == TABLE_DTYPE and len(table) == 20_000
    np.testing.assert_array_equal(table["id"], np.arange(20_000))
    np.testing.assert_array_equal(np.stack([table["z"], table["x"], table["y"]], axis=1), big.ids)
    np.testing.assert_array_equal(
        np.stack([table["west"], table["south"], table["east"], table["north"]], axis=1), big.bounds
    )


def test_a_file_that_is_not_a_tile_table_is_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "other.npy", np.zeros(3))
    with pytest.raises(CacheIndexError, match="not a navcache tile table"):
        load_tile_table(tmp_path / "other.npy")


def codes_in_file_pages(index: object) -> bool:
    """True when the vectors/codes are mapped from the file rather than owned by the process."""
    if isinstance(index, faiss.IndexIVF):
        lists = faiss.downcast_InvertedLists(index.invlists)
        return not any(lists.codes.at(i).is_owned for i in range(index.nlist) if lists.list_size(i))
    return not index.codes.is_owned


def test_mmap_load_maps_the_file_and_returns_the_same_results(built: tuple[IndexResult, Corpus]) -> None:
    result, corpus = built
    table = load_tile_table(result.table_path)
    mapped, read = load_index(result.index_path), load_index(result.index_path, mmap=False)
    assert codes_in_file_pages(mapped) and not codes_in_file_pages(read)
    queries = corpus.x[::97][:50]
    assert search(mapped, table, queries, 10) == search(read, table, queries, 10)
    assert mapped.ntotal == read.ntotal == len(table)


# ------------------------------------------------------------------------------------------- search


def test_search_finds_the_tile_whose_descriptor_is_queried(built: tuple[IndexResult, Corpus]) -> None:
    result, corpus = built
    index, table = load_index(result.index_path), load_tile_table(result.table_path)
    hits = search(index, table, corpus.x[[5, 321]], 5)
    assert [h[0][0] for h in hits] == [5, 321]
    assert hits[0][0][1] == pytest.approx(1.0, abs=1e-3)  # cosine of a unit vector with itself
    assert all(len(h) == 5 for h in hits)
    assert [s for _, s in hits[0]] == sorted((s for _, s in hits[0]), reverse=True)


def test_allowed_ids_exclude_every_other_tile(built: tuple[IndexResult, Corpus]) -> None:
    result, corpus = built
    index, table = load_index(result.index_path), load_tile_table(result.table_path)
    allowed = np.arange(0, len(table), 2)  # even rows only
    excluded_query, allowed_query = corpus.x[321], corpus.x[320]
    assert search(index, table, excluded_query, 1)[0][0][0] == 321  # without a prior it is the best match
    hits = search(index, table, np.stack([excluded_query, allowed_query]), 10, allowed_ids=allowed)
    assert all(row % 2 == 0 for h in hits for row, _ in h)
    assert 321 not in {row for row, _ in hits[0]} and hits[1][0][0] == 320
    few = search(index, table, excluded_query, 10, allowed_ids=[7, 321, 4000 % len(table)])
    assert {row for row, _ in few[0]} <= {7, 321, 4000 % len(table)}
    assert search(index, table, excluded_query, 5, allowed_ids=np.array([], dtype=np.int64)) == [[]]


def test_allowed_ids_out_of_range_are_rejected(flat: IndexResult) -> None:
    index, table = load_index(flat.index_path), load_tile_table(flat.table_path)
    with pytest.raises(CacheIndexError, match=r"allowed_ids must be row ids in \[0, 1000\)"):
        search(index, table, np.ones(64), 3, allowed_ids=[0, 1000])


def test_nprobe_override_applies_to_one_search_only(ivf: IndexResult, big: Corpus) -> None:
    index, table = load_index(ivf.index_path), load_tile_table(ivf.table_path)
    stored = faiss.extract_index_ivf(index).nprobe
    everything = search(index, table, big.x[:20], 10, nprobe=faiss.extract_index_ivf(index).nlist)
    exact = faiss.IndexFlatIP(64)
    exact.add(unit(big.x))
    _, truth = exact.search(unit(big.x[:20]), 10)
    assert [[row for row, _ in h] for h in everything] == truth.tolist()  # probing every list is exact
    assert faiss.extract_index_ivf(index).nprobe == stored


def camera_queries(x: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fresh queries the build never saw: random tiles' descriptors turned to cosines 0.7-0.995 from
    themselves by noise (a camera frame vs its orthophoto tile), and the exact top-10 for them."""
    rng = np.random.default_rng(seed)
    source = unit(x[rng.choice(len(x), count, replace=False)])
    noise = rng.standard_normal(source.shape).astype(np.float32)
    noise -= np.sum(noise * source, axis=1, keepdims=True) * source
    cosine = rng.uniform(0.7, 0.995, count)
    noise *= (np.sqrt(1 / cosine**2 - 1) / np.linalg.norm(noise, axis=1))[:, None]
    queries = unit(source + noise)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(unit(x))
    return queries, exact.search(queries, 10)[1]


def test_the_onboard_search_meets_the_recall_target_on_fresh_camera_like_queries(ivf: IndexResult, big: Corpus) -> None:
    report = load_report(ivf.report_path)
    index = load_verified_index(ivf.index_path, report["index_sha256"])  # as open_cache opens it
    assert faiss.extract_index_ivf(index).nprobe == report["nprobe"], "the drone probes what the build chose"
    queries, truth = camera_queries(big.x, 1000, seed=42)
    hits = search(index, load_tile_table(ivf.table_path), queries, 10)
    recall = np.mean([len({row for row, _ in h} & set(t)) / 10 for h, t in zip(hits, truth.tolist(), strict=True)])
    assert recall >= report["budget"]["min_recall_at_10"] == 0.95


def test_a_restricted_search_probes_enough_lists_to_find_the_allowed_tiles(ivf: IndexResult, big: Corpus) -> None:
    index, table = load_index(ivf.index_path), load_tile_table(ivf.table_path)
    stored = faiss.extract_index_ivf(index).nprobe
    window = np.sort(np.random.default_rng(5).choice(len(big.x), len(big.x) // 100, replace=False))  # 1 % of tiles
    queries, _ = camera_queries(big.x, 200, seed=6)
    exact = faiss.IndexFlatIP(64)
    exact.add(unit(big.x[window]))
    truth = window[exact.search(queries, 10)[1]]
    hits = search(index, table, queries, 10, allowed_ids=window)  # no nprobe: what OnboardCache.query(near=...) does
    recall = np.mean([len({row for row, _ in h} & set(t)) / 10 for h, t in zip(hits, truth.tolist(), strict=True)])
    assert recall >= 0.95, "the stored nprobe alone probes lists that hold few of the window's tiles"
    assert faiss.extract_index_ivf(index).nprobe == stored


def test_search_rejects_a_query_of_the_wrong_shape(flat: IndexResult) -> None:
    index, table = load_index(flat.index_path), load_tile_table(flat.table_path)
    with pytest.raises(CacheIndexError, match=r"query must have shape \(64,\)"):
        search(index, table, np.ones(32), 3)
    with pytest.raises(CacheIndexError, match="tile table has 999 rows"):
        search(index, table[:-1], np.ones(64), 3)


def test_ids_near_matches_a_hand_computed_haversine() -> None:
    r = 6_371_008.8

    def tile(row: int, lat: float, lon: float, half: float = 0.005) -> tuple[object, ...]:
        return (row, 0, 0, 0, lon - half, lat - half, lon + half, lat + half)

    table = np.array(
        [
            tile(0, 0.0, 0.0),
            tile(1, 0.0, 0.01),
            tile(2, 0.0, 0.02),
            tile(3, 60.0, 0.01),
            (4, 0, 0, 0, 179.995, -0.005, -179.995, 0.005),  # crosses the antimeridian: centre lon 180
        ],
        dtype=TABLE_DTYPE,
    )
    # On the equator a longitude step is an arc of the great circle: r * radians(step).
    step = r * math.radians(0.01)  # 1111.95 m
    assert ids_near(table, 0.0, 0.0, step + 0.5).tolist() == [0, 1]
    assert ids_near(table, 0.0, 0.0, step - 0.5).tolist() == [0]
    assert ids_near(table, 0.0, 0.0, 2 * step + 0.5).tolist() == [0, 1, 2]
    # At 60° N the same step: 2r·asin(cos 60° · sin(0.005°)) = 555.97 m.
    at60 = 2 * r * math.asin(math.cos(math.radians(60)) * math.sin(math.radians(0.005)))
    assert at60 == pytest.approx(555.97, abs=0.01)
    assert ids_near(table, 60.0, 0.0, at60 + 0.5).tolist() == [3]
    assert ids_near(table, 60.0, 0.0, at60 - 0.5).tolist() == []
    assert ids_near(table, 0.0, -179.99, step + 0.5).tolist() == [4]
    assert ids_near(table, 0.0, 179.99, step + 0.5).tolist() == [4]
    with pytest.raises(CacheIndexError, match="radius_m"):
        ids_near(table, 0.0, 0.0, -1.0)


def test_ids_near_feeds_a_geo_prior_into_search(ivf: IndexResult, big: Corpus) -> None:
    index, table = load_index(ivf.index_path), load_tile_table(ivf.table_path)
    lat = float((table["south"][1234] + table["north"][1234]) / 2)
    lon = float((table["west"][1234] + table["east"][1234]) / 2)
    nearby = ids_near(table, lat, lon, 3000.0)
    assert 1234 in nearby and 1 < len(nearby) < len(table) // 10
    hits = search(index, table, big.x[1234], 5, allowed_ids=nearby)
    assert hits[0][0][0] == 1234 and {row for row, _ in hits[0]} <= set(nearby.tolist())


# -------------------------------------------------------------------------------------- validation


def _case(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = clustered(50, 16)
    x, ids, bounds = c.x.copy(), c.ids.copy(), c.bounds.copy()
    if name == "nan":
        x[[3, 9], 2] = np.nan
    elif name == "inf":
        x[4, 0] = np.inf
    elif name == "empty":
        x, ids, bounds = x[:0], ids[:0], bounds[:0]
    elif name == "lengths":
        ids = ids[:-1]
    elif name == "duplicates":
        ids[7] = ids[3]
    elif name == "zero":
        x[8] = 0
    elif name == "integers":
        x = np.ones((50, 16), dtype=np.int64)
    elif name == "bounds":
        bounds[2, 1] = np.nan
    return x, ids, bounds


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nan", r"2 of 50 descriptor rows contain NaN or inf \(first tiles: row 3 = 15/17003/11000"),
        ("inf", r"1 of 50 descriptor rows contain NaN or inf"),
        ("empty", r"no descriptors to index"),
        ("lengths", r"lengths differ: 50 descriptors, 49 tile ids, 50 bounds"),
        ("duplicates", r"1 duplicate tile ids \(2 rows involved; first: row 3 = 15/17003/11000, row 7"),
        ("zero", r"1 of 50 descriptor rows are all zero"),
        ("integers", r"descriptors must be a 2-D float16/float32 array"),
        ("bounds", r"1 tiles have non-finite bounds"),
    ],
)
def test_invalid_inputs_raise_a_provision_error_saying_what_and_how_many(
    tmp_path: Path, name: str, message: str
) -> None:
    x, ids, bounds = _case(name)
    out = tmp_path / "out"
    with pytest.raises(ProvisionError, match=message) as err:
        build_index(x, ids, bounds, out)
    assert err.value.hint, "every input error says how to fix it"
    assert not out.exists(), "nothing is written for rejected inputs"


def test_budget_values_are_validated() -> None:
    with pytest.raises(ProvisionError, match="max_memory_mb must be > 0"):
        IndexBudget(max_memory_mb=0)
    with pytest.raises(ProvisionError, match=r"min_recall_at_10 must lie in \[0, 1\]"):
        IndexBudget(min_recall_at_10=1.5)
    for cosine in (0.0, 1.0):
        with pytest.raises(ProvisionError, match=r"recall_query_min_cosine must lie in \(0, 0\.995\]"):
            IndexBudget(recall_query_min_cosine=cosine)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="this host has a faiss GPU")
def test_forcing_the_gpu_without_one_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="use_gpu=True but faiss sees no GPU"):
        build(clustered(100, 16), tmp_path, use_gpu=True)


# ----------------------------------------------------------------------------------------- GPU, slow


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss has no GPU support here (faiss-cpu)")
def test_gpu_build_matches_the_cpu_build_in_type_and_recall(big: Corpus, tmp_path: Path) -> None:
    gpu = build(big, tmp_path / "gpu", exact_max_n=2000, use_gpu=True)
    cpu = build(big, tmp_path / "cpu", exact_max_n=2000, use_gpu=False)
    assert gpu.gpu and not cpu.gpu and gpu.index_type == cpu.index_type
    assert gpu.recall_at_10 >= 0.95
    assert load_index(gpu.index_path).ntotal == big.x.shape[0]


@pytest.mark.slow
def test_hundred_thousand_tiles_at_256_dims(tmp_path: Path) -> None:
    corpus = terrain(100_000, 256, seed=1)
    started = time.perf_counter()
    result = build(corpus, tmp_path)
    wall = time.perf_counter() - started
    print(
        f"\nN=100000 D=256: {result.index_type}, recall@1 {result.recall_at_1:.3f}, recall@10 "
        f"{result.recall_at_10:.3f}, build {result.build_s:.1f} s (wall {wall:.1f} s), "
        f"{result.size_bytes / 2**20:.1f} MB, reason: {result.reason}"
    )
    assert result.index_type.startswith("IVF") and result.recall_at_10 >= 0.95
    index, table = load_index(result.index_path), load_tile_table(result.table_path)
    started = time.perf_counter()
    hits = search(index, table, corpus.x[:1000], 10)
    per_query_ms = (time.perf_counter() - started) * 1000 / 1000
    print(f"search: {per_query_ms:.3f} ms/query (batch of 1000, k=10)")
    assert [h[0][0] for h in hits[:100]] == list(range(100))


def test_a_rebuild_never_rewrites_files_an_older_manifest_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    ids = np.stack([np.full(50, 18), np.arange(50), np.zeros(50)], axis=1).astype(np.int64)
    bounds = np.tile(np.array([[11.0, 48.0, 11.001, 48.001]]), (50, 1))
    first = build_index(vectors, ids, bounds, tmp_path)
    stamps = {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (first.index_path, first.table_path, first.report_path)
    }
    second = build_index(vectors, ids, bounds, tmp_path)  # same content: same names, files untouched
    assert (second.index_path, second.report_path) == (first.index_path, first.report_path)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stamps} == stamps
    moved = bounds + 1.0  # same vectors, other tiles: a new table must not take the old name
    third = build_index(vectors, ids, moved, tmp_path)
    assert third.table_path != first.table_path and third.report_path != first.report_path


def test_sweep_steps_screened_on_a_few_queries_choose_what_measuring_every_query_chooses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import navcache.index_build as index_build

    corpus = terrain(20_000, 64)  # needs several probes: the steps below the chosen one are screened out
    screened = build(corpus, tmp_path / "screened", exact_max_n=2000)
    screen = index_build._SCREEN_QUERIES
    monkeypatch.setattr(index_build, "_SCREEN_QUERIES", 10**9)
    every = build(corpus, tmp_path / "every", exact_max_n=2000)
    sweeps = [load_report(r.report_path)["trials"][-1]["nprobe_sweep"] for r in (screened, every)]
    assert [s["nprobe"] for s in sweeps[0]] == [s["nprobe"] for s in sweeps[1]]
    assert sweeps[0][-1] == sweeps[1][-1] and sweeps[0][-1]["queries"] == 1000  # the chosen step, on every query
    passed_over = [s for s in sweeps[0] if s["queries"] == screen]
    assert passed_over and all(s["recall_at_10_lower_95"] < 0.95 for s in passed_over)
    assert all(s["queries"] == 1000 for s in sweeps[1])
    assert (
        hashlib.sha256(screened.index_path.read_bytes()).digest()
        == hashlib.sha256(every.index_path.read_bytes()).digest()
    )
