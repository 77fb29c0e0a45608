"""Onboard side of the retrieval index: open it read-only and query it, optionally around a position.

The provisioning side (``navcache.index``) builds the index and re-exports these functions. ``faiss`` is
imported inside the functions that need it, never at module import, so ``navcache_runtime`` still imports
on a host without it (verification does not need it). Every failure is a :class:`CacheIndexError` (or
:class:`RuntimeNotAvailableError` when faiss is missing): the runtime's error family, with where and fix.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InferenceRuntimeError, RuntimeNotAvailableError
from .integrity import open_regular

logger = logging.getLogger(__name__)

FaissIndex = Any  # faiss ships no type stubs

# Row r of the tile table is id r in the index.
TABLE_DTYPE = np.dtype(
    [
        ("id", np.int64),
        ("z", np.int32),
        ("x", np.int32),
        ("y", np.int32),
        ("west", np.float64),
        ("south", np.float64),
        ("east", np.float64),
        ("north", np.float64),
    ]
)
EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius, as used by most haversine implementations


class CacheIndexError(InferenceRuntimeError):
    """The index or its tile table cannot be opened, or a query is invalid. ``where`` names the step/file."""

    def __init__(
        self, message: str, *, where: str | None = None, hint: str | None = None, path: Path | str | None = None
    ) -> None:
        super().__init__(message, hint=hint, path=path)
        self.where = where

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.where}: {text}" if self.where else text


def faiss_module() -> Any:
    """Import faiss on first use (it is an optional extra of the runtime)."""
    try:
        import faiss
    except ImportError as exc:
        raise RuntimeNotAvailableError(
            f"querying the index needs the 'faiss' Python package, which cannot be imported here: {exc}",
            hint="pip install 'navcache[faiss]' (or faiss-gpu on a CUDA host)",
        ) from exc
    return faiss


# ---------------------------------------------------------------------------------------------- load


def load_index(index_path: Path | str, *, mmap: bool = True) -> FaissIndex:
    """Open an index read-only; with ``mmap`` its vectors/codes stay in the file's pages (zero-copy).

    faiss ≥ 1.11's ``IO_FLAG_MMAP_IFC`` maps flat codes and IVF list codes alike; the older
    ``IO_FLAG_MMAP`` maps only IVF lists and silently copies a Flat index into memory.
    """
    faiss = faiss_module()
    path = Path(index_path)
    if not path.is_file():
        raise CacheIndexError(
            f"index file {path} does not exist", where="load_index", hint="build the index first", path=path
        )
    if mmap:
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            logger.warning("%s cannot be memory-mapped (%s); reading it into memory", path.name, _faiss_message(exc))
        else:
            if not _mappable(faiss, index):
                logger.info(
                    "%s: %s cannot be memory-mapped; it was read into memory", path.name, _core_name(faiss, index)
                )
            return index
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise CacheIndexError(
            f"cannot read index {path.name}: {_faiss_message(exc)}",
            where=str(path),
            hint="verify the cache (navcache verify) and re-provision if it is corrupt",
            path=path,
        ) from exc


def load_verified_index(index_path: Path | str, sha256: str, *, mmap: bool = True) -> FaissIndex:
    """Open an index from exactly the bytes whose sha256 is ``sha256`` (the signed digest): the file is
    opened once and never reopened by name, so an index swapped in after verification is not the one
    loaded.

    ``mmap=True``: the open file is mapped read-only, the *mapping* is hashed, and faiss reads the index
    from that mapping without copying (``ZeroCopyIOReader`` with ``IO_FLAG_MMAP_IFC``: flat and IVF codes
    stay in the mapped pages; other types are copied out of it). ``mmap=False``: the file is read into
    memory once, hashed, and deserialised from that buffer. Either way a rename over the path after the
    open changes nothing; an in-place write to the same file (which needs write permission on the file
    itself) could still reach mapped pages later: mount the cache read-only on the airframe.
    """
    import mmap as mmap_module

    faiss = faiss_module()
    path = Path(index_path)
    where = str(path)
    raw: bytes | mmap_module.mmap
    try:
        with open_regular(path) as handle:
            if not mmap:
                raw = handle.readall()
            else:
                size = os.fstat(handle.fileno()).st_size
                if size == 0:
                    raise OSError(errno.EINVAL, "the file is empty")
                raw = mmap_module.mmap(handle.fileno(), size, access=mmap_module.ACCESS_READ)
    except OSError as exc:
        raise CacheIndexError(
            f"cannot open index {path.name}: {exc.strerror or exc}",
            where=where,
            hint="verify the cache (navcache verify) and re-provision it",
            path=path,
        ) from exc
    actual = hashlib.sha256(raw).hexdigest()  # the mapping (or buffer) faiss reads below, byte for byte
    buffer = np.frombuffer(raw, dtype=np.uint8)
    if actual != sha256:
        raise CacheIndexError(
            f"{path.name} changed after the cache verified (sha256 {actual[:12]}… != signed {sha256[:12]}…)",
            where=where,
            hint="mount the cache read-only and open it again",
            path=path,
        )
    try:
        if not mmap:
            return faiss.deserialize_index(buffer)
        reader = faiss.ZeroCopyIOReader(faiss.swig_ptr(buffer), buffer.nbytes)
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_READ_ONLY
        try:
            index = faiss.read_index(reader, flags)
        except RuntimeError as exc:
            logger.warning("%s cannot be read in place (%s); copying it into memory", path.name, _faiss_message(exc))
            return faiss.deserialize_index(buffer)
    except RuntimeError as exc:
        raise CacheIndexError(
            f"cannot read index {path.name}: {_faiss_message(exc)}",
            where=where,
            hint="verify the cache (navcache verify) and re-provision if it is corrupt",
            path=path,
        ) from exc
    # Codes (of the core, or of a wrapped storage index) may point into the mapping: it lives as long as
    # the index does, whatever the type.
    index.referenced_objects = [raw, buffer, reader]
    if not _mappable(faiss, index):
        logger.info("%s: %s cannot be memory-mapped; it was read into memory", path.name, _core_name(faiss, index))
    return index


def _core(faiss: Any, index: FaissIndex) -> Any:
    core = faiss.downcast_index(index)
    while isinstance(core, faiss.IndexPreTransform):
        core = faiss.downcast_index(core.index)
    return core


def _core_name(faiss: Any, index: FaissIndex) -> str:
    return type(_core(faiss, index)).__name__


def _mappable(faiss: Any, index: FaissIndex) -> bool:
    core = _core(faiss, index)
    return isinstance(core, faiss.IndexFlatCodes | faiss.IndexIVF)


def _faiss_message(exc: BaseException) -> str:
    """faiss errors end with the useful line, after the C++ location."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def load_tile_table(path: Path | str) -> np.ndarray:
    """The tile table written by ``build_index`` (row r = index id r)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CacheIndexError(f"cannot read tile table {path.name}: {exc}", where=str(path), path=path) from exc
    return tile_table_from_bytes(data, str(path))


def tile_table_from_bytes(data: bytes, name: str = "tile table") -> np.ndarray:
    """Parse tile-table bytes (``.npy``, no pickles). Lets a caller parse exactly the bytes it hashed."""
    label = Path(name).name
    try:
        table = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CacheIndexError(f"cannot read tile table {label}: {exc}", where=name) from exc
    if table.dtype != TABLE_DTYPE or table.ndim != 1:
        raise CacheIndexError(
            f"{label} is not a navcache tile table (dtype {table.dtype}, shape {table.shape})",
            where=name,
            hint="pass the tiles-*.npy written next to the index",
        )
    return np.asarray(table)


# -------------------------------------------------------------------------------------------- search


def search(
    index: FaissIndex,
    table: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    allowed_ids: np.ndarray | Sequence[int] | None = None,
    nprobe: int | None = None,
) -> list[list[tuple[int, float]]]:
    """Top-``k`` (row id, cosine score) per query, best first; fewer than ``k`` when fewer rows are allowed.

    ``query`` is (D,) or (Q, D) and is L2-normalised here. ``nprobe`` overrides the value stored in an
    IVF index (the one the build chose for its recall target); the index itself is not modified, so
    concurrent searches with different settings are safe. ``allowed_ids`` (row ids) restricts the search,
    e.g. to ``ids_near(...)`` around a dead-reckoned position; without an explicit ``nprobe`` a restricted
    IVF search probes the stored nprobe scaled by ``ntotal / len(allowed)`` (at most every list), so it
    scans about as many allowed vectors as an unrestricted search scans vectors (the stored value alone
    would reach few of a small window's tiles: most of the lists it probes hold none of them).
    """
    faiss = faiss_module()
    if len(table) != index.ntotal:
        raise CacheIndexError(
            f"the tile table has {len(table)} rows but the index holds {index.ntotal} vectors",
            where="search",
            hint="load the tiles-*.npy with the same sha16 as the index",
        )
    if k < 1:
        raise CacheIndexError(f"k must be >= 1 (got {k})", where="search")
    q = np.asarray(query, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != index.d:
        raise CacheIndexError(
            f"query must have shape ({index.d},) or (Q, {index.d}); got {np.shape(query)}",
            where="search",
            hint="query with descriptors from the engine that built this index",
        )
    norms = np.linalg.norm(q, axis=1)
    if not np.isfinite(q).all() or (norms == 0).any():
        raise CacheIndexError("query contains NaN/inf or an all-zero row", where="search")
    q = q / norms[:, None]

    ivf = _find_ivf(faiss, index)
    if nprobe is not None and nprobe < 1:
        raise CacheIndexError(f"nprobe must be >= 1 (got {nprobe})", where="search")

    sel = None
    if allowed_ids is not None:
        allowed = np.unique(np.asarray(allowed_ids, dtype=np.int64).ravel())
        if allowed.size == 0:
            return [[] for _ in range(len(q))]
        if allowed[0] < 0 or allowed[-1] >= index.ntotal:
            raise CacheIndexError(
                f"allowed_ids must be row ids in [0, {index.ntotal}); got values from {allowed[0]} to {allowed[-1]}",
                where="search",
            )
        sel = faiss.IDSelectorBatch(allowed)  # copies the ids, so `allowed` may be freed

    params = None
    if ivf is not None and (sel is not None or nprobe is not None):
        # SearchParametersIVF defaults to nprobe 1, not the index's value, so always pass it.
        if nprobe is None:  # here only for a restricted search without an override
            nprobe = _restricted_nprobe(ivf.nprobe, ivf.nlist, index.ntotal, allowed.size)
        params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        if sel is not None:
            params.sel = sel
    elif sel is not None:
        params = faiss.SearchParameters(sel=sel)
    if params is not None and isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform(index_params=params)
    scores, ids = index.search(q, k, params=params)
    return [
        [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
        for row_ids, row_scores in zip(ids, scores, strict=True)
    ]


def _restricted_nprobe(nprobe: int, nlist: int, ntotal: int, n_allowed: int) -> int:
    """Lists to probe when only ``n_allowed`` of ``ntotal`` vectors may be returned: ``nprobe`` scaled by
    ``ntotal / n_allowed``, so as many allowed vectors are scanned as an unrestricted search scans, capped
    at every list (an exhaustive scan of the allowed vectors)."""
    return max(1, min(nlist, math.ceil(nprobe * ntotal / max(1, n_allowed))))


def _find_ivf(faiss: Any, index: FaissIndex) -> Any | None:
    core = _core(faiss, index)
    return core if isinstance(core, faiss.IndexIVF) else None


def ids_near(table: np.ndarray, lat: float, lon: float, radius_m: float) -> np.ndarray:
    """Row ids whose tile centre lies within ``radius_m`` metres (great-circle, haversine) of lat/lon.

    The centre is the midpoint of the tile's bounds in degrees; tiles crossing the antimeridian
    (west > east) are handled.
    """
    if not (math.isfinite(lat) and -90 <= lat <= 90 and math.isfinite(lon)):
        raise CacheIndexError(f"bad position lat={lat} lon={lon}", where="ids_near", hint="degrees, WGS84")
    if not (math.isfinite(radius_m) and radius_m >= 0):
        raise CacheIndexError(f"radius_m must be a finite distance >= 0 (got {radius_m})", where="ids_near")
    c_lat = np.radians((table["south"] + table["north"]) / 2)
    c_lon = np.radians(table["west"] + np.mod(table["east"] - table["west"], 360.0) / 2)
    p_lat, p_lon = math.radians(lat), math.radians(lon)
    a = np.sin((c_lat - p_lat) / 2) ** 2 + np.cos(c_lat) * math.cos(p_lat) * np.sin((c_lon - p_lon) / 2) ** 2
    dist = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    return np.asarray(table["id"][dist <= radius_m], dtype=np.int64)
