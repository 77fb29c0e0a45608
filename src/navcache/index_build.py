"""Step 4 of the provisioning DAG: the FAISS retrieval index over the tile descriptors.

``build_index`` normalises the descriptors (they are compared by cosine, i.e. inner product on unit
vectors), picks an index type from N, the dimension and a memory budget (autofaiss-style rules, our own
code), measures recall against exact search, and writes three content-addressed artifacts atomically,
each with a ``.sha256`` sidecar::

    index-{sha16}.faiss   the serialized index; row r of the table is id r in the index
    tiles-{sha16}.npy     the tile table: id, z, x, y, west, south, east, north
    index-{sha16}.json    what was chosen and why, and what was measured (written last)

The choice: exact ``Flat`` when N <= ``exact_max_n`` and it fits the budget; otherwise the most accurate
of ``IVF{nlist},Flat`` > ``SQ8`` > ``SQ6`` > ``SQ4`` > ``PQ{m}`` that fits (nlist ~ 4·sqrt(N)), with
``nprobe`` the smallest of 1, 2, 3, 4, 6, 8, 12, 16, … (at most nlist/4) that meets the recall target.
An index that misses the target falls back to the next more accurate type that fits; when none does, the
best one is kept, a warning is logged and the report says ``recall_target_met: false``.

Recall is measured as a drone will query: ``recall_sample`` held-out tiles (outside the k-means training
sample when N allows) whose descriptors are moved by Gaussian noise, orthogonal to each descriptor, to
cosines spread evenly from 0.995 down to ``recall_query_min_cosine`` from their source (a camera frame is
never its orthophoto tile: other light, season, attitude), and searched against exact inner-product search
over the same vectors. A setting *meets* the target when the one-sided 95 % lower confidence bound of its
recall@10 over those queries does, so a lucky sample does not pick a setting that falls short on the next
set of queries. The chosen nprobe is stored in the index file itself (faiss serialises it): the onboard
search uses it unless a caller overrides it, and the report records the same value with the whole sweep.

HNSW is not offered: its graph costs ~256 B/vector on top of the vectors, its parallel build is not
reproducible and its graph cannot be memory-mapped; IVF covers the same range with files that can.

``sha16`` is the first 16 hex digits of the sha256 over the index bytes and the table bytes, so the three
files pair up and a different table never reuses a name. Existing files are never rewritten: a report
already present for the same index and table is kept (an older manifest may name it). The report records
``inputs_sha256`` (the rows, the budget and the build's setting): a later build from the same inputs reuses
the verified files instead of training again.
Same inputs + seed give a byte-identical index and table on the same faiss build, CPU instruction set
and thread count. Across thread counts the bytes can differ: BLAS splits the k-means and PCA sums by
thread (seen at D=256 with 1 vs 2 threads), so the report records ``omp_threads``. A GPU build is not
byte-identical to a CPU one.

Loading and querying the index (``load_index`` memory-maps it read-only, ``search`` queries it, optionally
restricted to ``allowed_ids`` from ``ids_near`` around a dead-reckoned position) live in
:mod:`navcache_runtime.index`, which the drone imports without this package, and raise its
``CacheIndexError``. This module builds the index; :func:`load_report` reads what the build chose.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from navcache_runtime.errors import InferenceRuntimeError
from navcache_runtime.index import TABLE_DTYPE, FaissIndex
from navcache_runtime.integrity import verify_artifact, write_artifact_once

from .errors import ProvisionError

log = logging.getLogger(__name__)

REPORT_VERSION = 2
RECALL_K = 10
# The easiest recall query is ~0.995 cosine to its source tile (noise of L2 norm 0.1 on a unit vector);
# the hardest is at IndexBudget.recall_query_min_cosine.
_RECALL_QUERY_MAX_COSINE = 0.995
# One-sided 95 % normal quantile: the recall target must hold at this confidence over the query sample.
_RECALL_CONFIDENCE_Z = 1.645
# Queries a sweep step is first measured on: a step whose upper confidence bound there is below the target is
# passed over without the rest. The tiny demo backbone's near-collinear descriptors need nprobe 256 of 1,204
# lists at 1e5 tiles; measuring every step below it on all queries took half of a 5.6 s build.
_SCREEN_QUERIES = 200
# k-means wants >= 39 points per centroid (faiss warns below). Training on 40 per list instead of 64 took a
# 1e5-row build from 4.0-4.5 s to 2.8-3.5 s (dim 128, 2 threads) and 11.0 to 7.3 s (dim 256, 1 thread) at the
# same chosen nprobe and recall@10 (0.979/0.978, 0.959/0.966 on bench/index.py's queries); every re-provision
# whose descriptors changed pays it.
_MIN_POINTS_PER_CENTROID = 39
_TRAIN_POINTS_PER_LIST = 40
_MIN_TRAIN = 40 * 256  # enough for 256-centroid PQ codebooks
_MAX_NLIST = 65_536
_PQ_POINTS_PER_CENTROID = 64
# Probing more than a quarter of the lists costs about as much as the exact scan it approximates, so
# an IVF index that needs more than this to reach the target falls back to the next more accurate type.
_MAX_NPROBE_FRACTION = 0.25
_HEADER_BYTES = 1024  # serialization headers, rounded up


@dataclass(frozen=True)
class IndexBudget:
    """What the caller allows; ``build_index`` chooses within it and records why."""

    max_memory_mb: float = 2048
    exact_max_n: int = 50_000  # at or below this N use exact search (IndexFlatIP) when it fits
    target_dim: int | None = None  # optional PCA to this many dims (followed by L2 renormalisation)
    recall_sample: int = 1000  # recall@k queries
    min_recall_at_10: float = 0.95
    # The hardest recall query's cosine to its source tile's descriptor; queries spread evenly from ~0.995
    # down to this. 0.7 is a camera frame in other light or season than the orthophoto; a crew with
    # flight logs can set the cosine it measured between frames and their true tiles.
    recall_query_min_cosine: float = 0.7
    seed: int = 0
    use_gpu: bool | None = None  # None: use a GPU when faiss sees one

    def __post_init__(self) -> None:
        problems = []
        if not self.max_memory_mb > 0:
            problems.append(f"max_memory_mb must be > 0 (got {self.max_memory_mb})")
        if self.exact_max_n < 0:
            problems.append(f"exact_max_n must be >= 0 (got {self.exact_max_n})")
        if self.target_dim is not None and self.target_dim < 1:
            problems.append(f"target_dim must be >= 1 or None (got {self.target_dim})")
        if self.recall_sample < 1:
            problems.append(f"recall_sample must be >= 1 (got {self.recall_sample})")
        if not 0.0 <= self.min_recall_at_10 <= 1.0:
            problems.append(f"min_recall_at_10 must lie in [0, 1] (got {self.min_recall_at_10})")
        if not 0.0 < self.recall_query_min_cosine <= _RECALL_QUERY_MAX_COSINE:
            problems.append(
                f"recall_query_min_cosine must lie in (0, {_RECALL_QUERY_MAX_COSINE}] "
                f"(got {self.recall_query_min_cosine})"
            )
        if problems:
            raise ProvisionError("; ".join(problems), where="IndexBudget", hint="fix the index budget values")

    @property
    def max_bytes(self) -> int:
        return int(self.max_memory_mb * 2**20)


@dataclass(frozen=True)
class IndexResult:
    index_path: Path
    table_path: Path
    report_path: Path
    index_type: str  # faiss factory string, e.g. "IVF512,Flat" or "PCA64,L2norm,IVF512,PQ16"
    n: int
    dim: int  # input descriptor dimension (queries have this many dims)
    pca_dim: int | None
    recall_at_1: float
    recall_at_10: float
    build_s: float
    size_bytes: int
    gpu: bool
    reason: str


@dataclass(frozen=True)
class _Candidate:
    """One rung of the accuracy ladder (least to most accurate)."""

    core: str  # factory string of the index after the optional PCA
    nlist: int  # 0 for Flat
    est_bytes: int
    fits: bool

    @property
    def is_ivf(self) -> bool:
        return self.nlist > 0


@dataclass(frozen=True)
class _Recall:
    at_1: float  # share of queries whose top-1 agrees with exact search
    at_10: float  # share of the exact top-k found in the top-k, over all queries
    at_10_lower: float  # one-sided 95 % lower confidence bound of at_10 over the query sample
    at_10_upper: float = 1.0  # one-sided 95 % upper confidence bound
    queries: int = 0  # how many queries it was measured on

    def meets(self, target: float) -> bool:
        return self.at_10_lower >= target


@dataclass
class _Trial:
    candidate: _Candidate
    index: FaissIndex = field(repr=False)
    nprobe: int | None
    recall: _Recall
    gpu: bool
    why: str
    sweep: list[tuple[int, _Recall]] = field(default_factory=list)

    @property
    def recall_at_10(self) -> float:
        return self.recall.at_10

    def summary(self) -> dict[str, Any]:
        return {
            "type": self.candidate.core,
            "nprobe": self.nprobe,
            **_recall_fields(self.recall),
            "estimated_bytes": self.candidate.est_bytes,
            "note": self.why,
            "nprobe_sweep": [_sweep_fields(p, r) for p, r in self.sweep],
        }


def _recall_fields(recall: _Recall) -> dict[str, float]:
    return {"recall_at_1": recall.at_1, "recall_at_10": recall.at_10, "recall_at_10_lower_95": recall.at_10_lower}


def _sweep_fields(nprobe: int, recall: _Recall) -> dict[str, float]:
    return {"nprobe": nprobe, **_recall_fields(recall), "queries": recall.queries}


# --------------------------------------------------------------------------------------------- build


def build_index(
    descriptors: np.ndarray,
    tile_ids: np.ndarray,
    bounds: np.ndarray,
    out_dir: Path,
    budget: IndexBudget = IndexBudget(),  # frozen, so a shared default is safe
) -> IndexResult:
    """Build, measure and write the retrieval index for ``descriptors`` (N, D) whose rows are the tiles
    ``tile_ids`` (N, 3: z, x, y) with ``bounds`` (N, 4: west, south, east, north in degrees)."""
    faiss = _faiss()
    started = time.perf_counter()
    x, ids, bnds = _validate_inputs(descriptors, tile_ids, bounds)
    n, dim = x.shape
    gpu = _resolve_gpu(faiss, budget.use_gpu)
    inputs_sha256 = _inputs_digest(faiss, descriptors, tile_ids, bounds, budget, gpu)
    built = _built_from(Path(out_dir), inputs_sha256)
    if built is not None:
        return built
    pca_dim = _resolve_pca_dim(budget.target_dim, dim)
    d = pca_dim or dim

    nlist = _nlist(n)
    n_train = min(n, max(_TRAIN_POINTS_PER_LIST * nlist, _MIN_TRAIN))
    # Separate seeded streams, so changing recall_sample never changes the index bytes.
    train_rows = np.sort(np.random.default_rng([budget.seed, 1]).choice(n, n_train, replace=False))

    pca = None
    x_t = x
    if pca_dim is not None:
        pca = faiss.PCAMatrix(dim, pca_dim)
        pca.train(np.ascontiguousarray(x[train_rows]))
        x_t = _l2_normalise(pca.apply(x))
    ladder = _ladder(n, d, dim, pca_dim, nlist, n_train, budget.max_bytes)
    start, reason = _choose(ladder, n, budget)
    prefix = f"PCA{pca_dim},L2norm," if pca_dim is not None else ""

    queries, q_t, query_cosines = _recall_queries(x, pca, train_rows, budget)
    k = min(RECALL_K, n)
    truth = _exact_topk(faiss, x_t, q_t, k)

    trials: list[_Trial] = []
    rung = start
    while True:
        cand = ladder[rung]
        trial = _build_and_measure(faiss, cand, x_t, train_rows, pca, queries, truth, k, budget, gpu)
        trials.append(trial)
        log.info("index trial %s%s: recall@10 %.3f nprobe %s", prefix, cand.core, trial.recall_at_10, trial.nprobe)
        if trial.recall.meets(budget.min_recall_at_10):
            break
        higher = next((i for i in range(rung + 1, len(ladder)) if ladder[i].fits), None)
        if higher is None:
            break
        reason += (
            f"; {prefix}{cand.core} reached only recall@10 {trial.recall_at_10:.3f} (95 % lower bound "
            f"{trial.recall.at_10_lower:.3f}) < {budget.min_recall_at_10} ({trial.why}), so fell back to the more "
            f"accurate {prefix}{ladder[higher].core}"
        )
        rung = higher
    best = max(trials, key=lambda t: t.recall_at_10)  # max keeps the first of equals
    met = best.recall.meets(budget.min_recall_at_10)
    if not met:
        reason += (
            f"; recall@10 {best.recall_at_10:.3f} (95 % lower bound {best.recall.at_10_lower:.3f}) is below the "
            f"target {budget.min_recall_at_10} and no more accurate index fits the budget"
        )
        log.warning(
            "index recall@10 %.3f is below the target %.2f: raise max_memory_mb, drop target_dim or lower "
            "min_recall_at_10",
            best.recall_at_10,
            budget.min_recall_at_10,
        )
    elif best.nprobe is not None:
        reason += (
            f"; nprobe {best.nprobe} of {best.candidate.nlist} lists is the smallest that reaches recall@10 "
            f"{best.recall_at_10:.3f} (95 % lower bound {best.recall.at_10_lower:.3f} >= {budget.min_recall_at_10})"
        )

    index = best.index
    if pca is not None:
        index = _wrap_pca(faiss, pca, index)
    if index.ntotal != n:  # explicit check, not assert: must hold under python -O too
        raise ProvisionError(f"the index holds {index.ntotal} vectors but {n} were added", where="build_index")
    index_type = prefix + best.candidate.core

    full_dim: dict[str, float] = {}
    if pca is not None:
        # What the drone actually gets: PCA + ANN against exact full-dimension cosine search.
        full = _recall(_search_ids(index, queries, k), _exact_topk(faiss, x, queries, k))
        full_dim = {"recall_at_1_full_dim": full.at_1, "recall_at_10_full_dim": full.at_10}

    # Past the measurement only the index and the table are needed: the vectors go before the index is
    # serialized, and the serialized index is hashed and written from faiss's own buffer (a bytes copy
    # would be one more index-sized block at the step's peak).
    del x, x_t
    index_bytes = faiss.serialize_index(index)  # uint8 array: hashlib and file writes take its buffer
    table = _tile_table(ids, bnds)
    table_buf = io.BytesIO()
    np.save(table_buf, table, allow_pickle=False)
    table_bytes = table_buf.getvalue()
    index_sha = hashlib.sha256(index_bytes).hexdigest()
    table_sha = hashlib.sha256(table_bytes).hexdigest()
    sha16 = hashlib.sha256(f"{index_sha}\n{table_sha}".encode()).hexdigest()[:16]
    out_dir = Path(out_dir)
    index_path = out_dir / f"index-{sha16}.faiss"
    table_path = out_dir / f"tiles-{sha16}.npy"
    report_path = out_dir / f"index-{sha16}.json"
    build_s = time.perf_counter() - started
    size_bytes = int(index_bytes.nbytes)
    if size_bytes > budget.max_bytes:
        log.warning("index is %d bytes, over the %.1f MB budget (estimate was off)", size_bytes, budget.max_memory_mb)

    report = {
        "report_version": REPORT_VERSION,
        "index_type": index_type,
        "reason": reason,
        "metric": "inner_product",
        "normalised": True,
        "n": n,
        "dim": dim,
        "pca_dim": pca_dim,
        "nlist": best.candidate.nlist or None,
        "nprobe": best.nprobe,
        **_recall_fields(best.recall),
        **full_dim,
        "recall_k": k,
        "recall_queries": len(queries),
        "recall_query_cosine": [round(float(query_cosines.min()), 3), round(float(query_cosines.max()), 3)],
        "recall_target_met": met,
        "trials": [t.summary() for t in trials],
        "build_s": round(build_s, 3),
        "size_bytes": size_bytes,
        "estimated_bytes": best.candidate.est_bytes,
        "gpu": best.gpu,
        "faiss_version": faiss.__version__,
        "numpy_version": np.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
        "train_sample": n_train if (best.candidate.is_ivf or pca is not None) else 0,
        "seed": budget.seed,
        "budget": asdict(budget),
        "index_file": index_path.name,
        "index_sha256": index_sha,
        "table_file": table_path.name,
        "table_sha256": table_sha,
        "inputs_sha256": inputs_sha256,
    }
    # The report goes last: its presence means the index and table beside it are complete.
    digest = write_artifact_once(index_path, index_bytes)
    if digest != index_sha:
        raise ProvisionError(f"{index_path.name} changed while being written", where=str(index_path))
    write_artifact_once(table_path, table_bytes)
    write_artifact_once(report_path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    log.info(
        "index built: %s n=%d dim=%d recall@1=%.3f recall@10=%.3f size=%.1f MB gpu=%s in %.1f s -> %s",
        index_type,
        n,
        dim,
        best.recall.at_1,
        best.recall.at_10,
        size_bytes / 2**20,
        best.gpu,
        build_s,
        index_path.name,
    )
    return IndexResult(
        index_path=index_path,
        table_path=table_path,
        report_path=report_path,
        index_type=index_type,
        n=n,
        dim=dim,
        pca_dim=pca_dim,
        recall_at_1=best.recall.at_1,
        recall_at_10=best.recall.at_10,
        build_s=build_s,
        size_bytes=size_bytes,
        gpu=best.gpu,
        reason=reason,
    )


def _inputs_digest(
    faiss: Any, descriptors: np.ndarray, tile_ids: np.ndarray, bounds: np.ndarray, budget: IndexBudget, gpu: bool
) -> str:
    """sha256 of everything a build's bytes depend on: the rows, the budget, where it trains (a GPU build
    differs from a CPU one) and the faiss, numpy and thread-count it runs with (see the module docstring)."""
    setting = {
        "report_version": REPORT_VERSION,
        "budget": asdict(budget),
        "gpu": gpu,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
    }
    digest = hashlib.sha256(f"navcache-index-inputs-v1\n{json.dumps(setting, sort_keys=True)}\n".encode())
    for array in (descriptors, tile_ids, bounds):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}\n".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _built_from(out_dir: Path, inputs_sha256: str) -> IndexResult | None:
    """The index an earlier run built from the very same inputs (its report records their digest), when its
    three files still verify: a build is deterministic for those inputs, so building again would only write
    the same bytes (a warm re-provision of 1e5 tiles spent 5.5 s doing that). None otherwise."""
    for report_path in sorted(out_dir.glob("index-*.json")):
        try:
            report = json.loads(report_path.read_bytes())
            if not isinstance(report, dict) or report.get("inputs_sha256") != inputs_sha256:
                continue
            index_path, table_path = out_dir / report["index_file"], out_dir / report["table_file"]
            for path in (index_path, table_path, report_path):
                verify_artifact(path)
            result = IndexResult(
                index_path=index_path,
                table_path=table_path,
                report_path=report_path,
                index_type=report["index_type"],
                n=report["n"],
                dim=report["dim"],
                pca_dim=report["pca_dim"],
                recall_at_1=report["recall_at_1"],
                recall_at_10=report["recall_at_10"],
                build_s=report["build_s"],
                size_bytes=report["size_bytes"],
                gpu=report["gpu"],
                reason=report["reason"],
            )
        except (OSError, ValueError, KeyError, TypeError, InferenceRuntimeError) as exc:
            log.info("index %s not reused: %s", report_path.name, exc)
            continue
        log.info("index reused: %s was built from the same descriptors and budget", index_path.name)
        return result
    return None


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss is a provisioning extra
        raise ProvisionError(
            "faiss is not installed", where="navcache.index_build", hint="pip install 'navcache[provision]'"
        ) from exc
    return faiss


def _resolve_gpu(faiss: Any, use_gpu: bool | None) -> bool:
    available = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is None:
        return available > 0
    if use_gpu and available == 0:
        raise ProvisionError(
            "use_gpu=True but faiss sees no GPU",
            where="IndexBudget.use_gpu",
            hint="install faiss-gpu on a CUDA host, or set use_gpu=None (auto) or False",
        )
    return use_gpu


def _resolve_pca_dim(target_dim: int | None, dim: int) -> int | None:
    if target_dim is None:
        return None
    if target_dim > dim:
        raise ProvisionError(
            f"target_dim {target_dim} is larger than the descriptor dimension {dim}",
            where="IndexBudget.target_dim",
            hint=f"use a target_dim below {dim}, or None for no PCA",
        )
    if target_dim == dim:
        log.info("target_dim equals the descriptor dimension %d: no PCA", dim)
        return None
    return target_dim


def _validate_inputs(
    descriptors: np.ndarray, tile_ids: np.ndarray, bounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes and values; return unit-norm float32 descriptors, int64 ids, float64 bounds."""
    desc = np.asarray(descriptors)
    ids = np.asarray(tile_ids)
    bnds = np.asarray(bounds)
    if desc.ndim != 2 or not np.issubdtype(desc.dtype, np.floating):
        raise ProvisionError(
            f"descriptors must be a 2-D float16/float32 array (N, D); got {desc.dtype} with shape {desc.shape}",
            where="build_index: descriptors",
            hint="stack the descriptor shards into one (N, D) array",
        )
    n, dim = desc.shape
    if n == 0 or dim == 0:
        raise ProvisionError(
            f"no descriptors to index (shape {desc.shape})",
            where="build_index: descriptors",
            hint="check that the descriptor step produced shards for the area",
        )
    if ids.shape != (len(ids), 3) or not np.issubdtype(ids.dtype, np.integer):
        raise ProvisionError(
            f"tile_ids must be an integer (N, 3) array of z, x, y; got {ids.dtype} with shape {ids.shape}",
            where="build_index: tile_ids",
        )
    if bnds.shape != (len(bnds), 4) or not np.issubdtype(bnds.dtype, np.number):
        raise ProvisionError(
            f"bounds must be a numeric (N, 4) array of west, south, east, north; got shape {bnds.shape}",
            where="build_index: bounds",
        )
    if not len(ids) == len(bnds) == n:
        raise ProvisionError(
            f"lengths differ: {n} descriptors, {len(ids)} tile ids, {len(bnds)} bounds",
            where="build_index",
            hint="pass descriptors, tile_ids and bounds row-aligned (row i of each is the same tile)",
        )
    info = np.iinfo(np.int32)
    if ids.min() < info.min or ids.max() > info.max:
        raise ProvisionError("tile ids do not fit int32", where="build_index: tile_ids")
    ids = ids.astype(np.int64)

    x = desc.astype(np.float32)  # always a copy: the caller's array is never modified
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ProvisionError(
            f"{bad.size} of {n} descriptor rows contain NaN or inf (first tiles: {_tiles_text(ids, bad)})",
            where="build_index: descriptors",
            hint="recompute those tiles' descriptors (fp16 overflow or a broken engine is the usual cause) "
            "or drop them before indexing",
        )
    norms = np.linalg.norm(x, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ProvisionError(
            f"{zero.size} of {n} descriptor rows are all zero and cannot be normalised "
            f"(first tiles: {_tiles_text(ids, zero)})",
            where="build_index: descriptors",
            hint="drop blank tiles before indexing or recompute their descriptors",
        )
    x /= norms[:, None]

    uniq, inverse, counts = np.unique(ids, axis=0, return_inverse=True, return_counts=True)
    if len(uniq) != n:
        dup_rows = np.flatnonzero(counts[inverse.ravel()] > 1)
        raise ProvisionError(
            f"{n - len(uniq)} duplicate tile ids ({len(dup_rows)} rows involved; first: {_tiles_text(ids, dup_rows)})",
            where="build_index: tile_ids",
            hint="each tile must appear once; de-duplicate the descriptor shards",
        )

    bnds = bnds.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(bnds).all(axis=1) | (bnds[:, 1] > bnds[:, 3]))
    if bad.size:
        raise ProvisionError(
            f"{bad.size} tiles have non-finite bounds or south > north (first tiles: {_tiles_text(ids, bad)})",
            where="build_index: bounds",
            hint="bounds are (west, south, east, north) in degrees",
        )
    return x, ids, bnds


def _tiles_text(ids: np.ndarray, rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(f"row {r} = {z}/{x}/{y}" for r, (z, x, y) in zip(rows[:limit], ids[rows[:limit]], strict=True))
    return shown + (", ..." if len(rows) > limit else "")


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def _nlist(n: int) -> int:
    """~4·sqrt(N) lists, but never fewer than 39 training points per list."""
    return max(1, min(round(4 * math.sqrt(n)), _MAX_NLIST, n // _MIN_POINTS_PER_CENTROID))


def _ladder(
    n: int, d: int, dim: int, pca_dim: int | None, nlist: int, n_train: int, max_bytes: int
) -> list[_Candidate]:
    """Candidate index types from least to most accurate, with their estimated serialized sizes."""
    fixed = _HEADER_BYTES
    if pca_dim is not None:  # PCAMatrix keeps the full eigenvector matrix plus the projection
        fixed += 4 * (dim * dim + pca_dim * dim + 2 * dim + 2 * pca_dim)
    ivf = fixed + 4 * nlist * d + 16 * nlist + 8 * n  # coarse centroids, list headers, ids
    # 2**nbits centroids per sub-quantizer need 39 points each; fewer bits for small training sets.
    nbits = max(4, min(8, int(math.log2(max(1, n_train // _MIN_POINTS_PER_CENTROID)))))
    rungs: list[tuple[str, int, int]] = []
    # PQ sub-vectors of >= 4 dims: at 2-3 dims a code costs as much as SQ4, which trains in a second
    # where PQ takes minutes (1e5 x 256 on 2 cores: PQ128 163 s, SQ4 1 s, similar recall).
    for m in sorted(m for m in range(max(4, d // 32), d // 4 + 1) if d % m == 0):
        pq = f"PQ{m}" if nbits == 8 else f"PQ{m}x{nbits}"
        rungs.append((f"IVF{nlist},{pq}", nlist, ivf + n * math.ceil(m * nbits / 8) + 4 * d * 2**nbits))
    for bits in (4, 6, 8):
        rungs.append((f"IVF{nlist},SQ{bits}", nlist, ivf + n * math.ceil(d * bits / 8) + 8 * d))
    rungs.append((f"IVF{nlist},Flat", nlist, ivf + 4 * n * d))
    rungs.append(("Flat", 0, fixed + 4 * n * d))
    return [_Candidate(core, nl, est, est <= max_bytes) for core, nl, est in rungs]


def _choose(ladder: list[_Candidate], n: int, budget: IndexBudget) -> tuple[int, str]:
    """The rung to try first, and why in plain words."""
    flat = len(ladder) - 1
    mb = budget.max_memory_mb
    if n <= budget.exact_max_n and ladder[flat].fits:
        return flat, (
            f"N={n} <= exact_max_n={budget.exact_max_n} and the exact flat index "
            f"({_mb(ladder[flat].est_bytes)}) fits the {mb:g} MB budget: exact inner-product search"
        )
    fitting = [i for i in range(flat) if ladder[i].fits]
    if not fitting:
        if ladder[flat].fits:
            return flat, f"only the exact flat index ({_mb(ladder[flat].est_bytes)}) fits the {mb:g} MB budget"
        raise ProvisionError(
            f"no index type fits the {mb:g} MB budget for N={n}: the smallest ({ladder[0].core}) needs "
            f"about {_mb(ladder[0].est_bytes)}",
            where="IndexBudget.max_memory_mb",
            hint="raise max_memory_mb, set a smaller target_dim, or index a smaller area",
        )
    best = fitting[-1]
    size = f"{ladder[best].core} ({_mb(ladder[best].est_bytes)})"
    if n <= budget.exact_max_n:
        why = f"the exact flat index needs {_mb(ladder[flat].est_bytes)} > the {mb:g} MB budget"
    else:
        why = f"N={n} > exact_max_n={budget.exact_max_n}"
    if ladder[best].core.endswith(",Flat"):
        return best, f"{why}; full vectors fit the budget, so {size}: inverted lists with exact distances"
    full = ladder[flat - 1]
    return best, (
        f"{why}; full vectors ({full.core}, {_mb(full.est_bytes)}) exceed the {mb:g} MB budget, so the most "
        f"accurate compressed index that fits: {size}"
    )


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MB"


def _noise_norm(cosine: float) -> float:
    """L2 norm of noise orthogonal to a unit vector that leaves it at ``cosine`` to itself once
    re-normalised: cos = 1 / sqrt(1 + norm²)."""
    return math.sqrt(1.0 / cosine**2 - 1.0)


def _recall_queries(
    x: np.ndarray, pca: Any, train_rows: np.ndarray, budget: IndexBudget
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Realistic queries: held-out database vectors (not in the training sample when possible) moved to
    cosines spread evenly from ~0.995 down to ``recall_query_min_cosine`` from their source, re-normalised.
    Returns the queries, the queries in the index's space (after PCA), and each one's cosine to its source."""
    n, dim = x.shape
    rng = np.random.default_rng([budget.seed, 2])
    held_out = np.setdiff1d(np.arange(n), train_rows, assume_unique=True)
    pool = held_out if len(held_out) >= min(budget.recall_sample, n) else np.arange(n)
    rows = np.sort(rng.choice(pool, min(budget.recall_sample, len(pool)), replace=False))
    norms = np.linspace(_noise_norm(_RECALL_QUERY_MAX_COSINE), _noise_norm(budget.recall_query_min_cosine), len(rows))
    norms = rng.permutation(norms).astype(np.float32)  # difficulty independent of the row order
    source = x[rows]
    noise = rng.standard_normal((len(rows), dim)).astype(np.float32)
    # Orthogonal to the source, so each query's cosine is exactly the one drawn, in any dimension.
    noise -= np.einsum("ij,ij->i", noise, source)[:, None] * source
    noise *= norms[:, None] / np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    queries = _l2_normalise(source + noise)
    cosines = np.einsum("ij,ij->i", queries, source)
    q_t = queries if pca is None else _l2_normalise(pca.apply(queries))
    return queries, q_t, cosines


def _exact_topk(faiss: Any, x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, ids = exact.search(q, k)
    return np.asarray(ids)


def _search_ids(index: FaissIndex, q: np.ndarray, k: int) -> np.ndarray:
    _, ids = index.search(q, k)
    return np.asarray(ids)


def _recall(found: np.ndarray, truth: np.ndarray) -> _Recall:
    """recall@1: top-1 agrees with exact search; recall@k: share of the exact top-k found in the top-k,
    with its one-sided 95 % lower bound from the spread of the per-query recalls."""
    k = truth.shape[1]
    at1 = float(np.mean(found[:, 0] == truth[:, 0]))
    # Ids are unique within a row and the -1 padding of a short result is never a true neighbour.
    per_query = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1) / k
    mean = float(per_query.mean())
    spread = float(per_query.std(ddof=1)) / math.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
    margin = _RECALL_CONFIDENCE_Z * spread
    return _Recall(at1, mean, max(0.0, mean - margin), min(1.0, mean + margin), len(per_query))


def _build_and_measure(
    faiss: Any,
    cand: _Candidate,
    x_t: np.ndarray,
    train_rows: np.ndarray,
    pca: Any,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    budget: IndexBudget,
    gpu: bool,
) -> _Trial:
    d = x_t.shape[1]
    core = faiss.index_factory(d, cand.core, faiss.METRIC_INNER_PRODUCT)
    used_gpu = False
    if cand.is_ivf:
        ivf = faiss.extract_index_ivf(core)
        ivf.cp.seed = budget.seed
        ivf.cp.spherical = True  # centroids on the unit sphere suit inner product on unit vectors
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "pq"):
            ivf.pq.cp.seed = budget.seed
            # ~16k points train a 256-centroid codebook well; more only costs minutes on 2 cores.
            ivf.pq.cp.max_points_per_centroid = _PQ_POINTS_PER_CENTROID
            ivf.pq.cp.niter = 10  # measured: the same recall as faiss's default 25 in half the time
            ivf.do_polysemous_training = False  # we never search with polysemous codes; it triples training
        core, used_gpu = _train_and_add(faiss, core, np.ascontiguousarray(x_t[train_rows]), x_t, gpu)
    else:
        core.add(x_t)
    # Measure on the index as shipped (PCA included), against exact search in the same space.
    measured = _wrap_pca(faiss, pca, core) if pca is not None else core
    if not cand.is_ivf:
        return _Trial(cand, core, None, _recall(_search_ids(measured, queries, k), truth), used_gpu, "exact scan")
    ivf = faiss.extract_index_ivf(core)
    measured_at: list[tuple[int, _Recall]] = []
    sweep = _nprobe_sweep(cand.nlist)
    screen = min(len(queries), _SCREEN_QUERIES)
    for step, nprobe in enumerate(sweep):
        ivf.nprobe = nprobe
        # A step whose recall on the first queries is surely below the target is passed over on them alone;
        # the others (and the last step) are measured on every query.
        if step < len(sweep) - 1 and screen < len(queries):
            head = _recall(_search_ids(measured, queries[:screen], k), truth[:screen])
            if head.at_10_upper < budget.min_recall_at_10:
                measured_at.append((nprobe, head))
                continue
        recall = _recall(_search_ids(measured, queries, k), truth)
        measured_at.append((nprobe, recall))
        if recall.meets(budget.min_recall_at_10):
            return _Trial(cand, core, nprobe, recall, used_gpu, f"nprobe {nprobe}", measured_at)
    # Target not reached: keep the smallest nprobe within 0.005 of the best recall measured on every query.
    full = [m for m in measured_at if m[1].queries == len(queries)]
    top = max(r.at_10 for _, r in full)
    nprobe, recall = next(m for m in full if m[1].at_10 >= top - 0.005)
    ivf.nprobe = nprobe
    why = f"best at nprobe {nprobe}, probing up to {measured_at[-1][0]} lists"
    return _Trial(cand, core, nprobe, recall, used_gpu, why, measured_at)


def _nprobe_sweep(nlist: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, … up to a quarter of the lists. Steps of 1.5x rather than 2x: the step
    that crosses the target is what a query pays for, and at N = 1e5 nprobe 3 reaches what 2 does not."""
    cap = max(1, int(nlist * _MAX_NPROBE_FRACTION))
    steps = sorted({p for i in range(17) for p in (2**i, 3 * 2**i) if p < cap})
    return [*steps, cap]


def _train_and_add(faiss: Any, core: FaissIndex, train: np.ndarray, x: np.ndarray, gpu: bool) -> tuple[Any, bool]:
    if gpu:
        try:
            on_gpu = faiss.index_cpu_to_all_gpus(core)
            on_gpu.train(train)
            on_gpu.add(x)
            return faiss.index_gpu_to_cpu(on_gpu), True
        except (RuntimeError, AttributeError) as exc:  # e.g. a PQ layout the GPU kernels do not support
            log.warning("GPU build of %s failed (%s); building on the CPU", type(core).__name__, exc)
    core.train(train)
    core.add(x)
    return core, False


def _wrap_pca(faiss: Any, pca: Any, core: FaissIndex) -> FaissIndex:
    """``PCA{d},L2norm,<core>``: the same structure index_factory builds, with our trained parts."""
    wrapped = faiss.IndexPreTransform(faiss.NormalizationTransform(pca.d_out, 2.0), core)
    wrapped.prepend_transform(pca)
    return wrapped


def _tile_table(ids: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    table = np.zeros(len(ids), dtype=TABLE_DTYPE)
    table["id"] = np.arange(len(ids))
    table["z"], table["x"], table["y"] = ids[:, 0], ids[:, 1], ids[:, 2]
    for col, name in enumerate(("west", "south", "east", "north")):
        table[name] = bounds[:, col]
    return table


# ---------------------------------------------------------------------------------------------- report


def load_report(path: Path) -> dict[str, Any]:
    """The JSON report written next to an index (``index-{sha16}.json``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ProvisionError(f"{Path(path).name} is not an index report", where=str(path))
    return data
