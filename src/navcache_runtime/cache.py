"""The onboard consumer of a provisioned cache: verify first, then open exactly what the manifest names.

:func:`open_cache` runs :func:`navcache_runtime.verify.verify_cache` before anything else; a refusal raises
:class:`~navcache_runtime.verify.CacheVerificationError` (carrying the report) and nothing is opened. Only
then does it open, by the names in the verified manifest (the directory is never listed, so a file an
attacker drops into ``index/`` or ``engines/`` is never looked at):

* the engines: subjects directly under ``engines/`` whose filename parses as an engine name, loaded through
  the configured :class:`InferenceRuntime` (``deserialize_engine``, i.e. the engine gate, with the entry's
  digest set to the *signed* one, so the gate ties sidecar, bytes and manifest together). Without a
  ``runtime_config`` the runtime label comes from the engines' filename extension (``.onnx`` →
  ``onnx_trt_ep``, ``.pt2`` → ``pytorch_fp16``, ``.engine`` → ``tensorrt``) and ``engine_dir`` is
  ``<cache>/engines``. Engines for another runtime are skipped (logged).
* the FAISS index ``index/index-{h}.faiss`` (exactly one listed), memory-mapped read-only where the type
  allows, with its tile table ``index/tiles-{h}.npy`` and report ``index/index-{h}.json``. The table and
  report are small: they are read once, checked against their signed sha256 and parsed from those bytes.

**Which engine is the VPR engine.** Neither the manifest nor the index report records backbone roles, so:
``vpr_model=`` names it when given; otherwise each loaded engine is run once on a zero input at its
smallest shape (this doubles as the warm-up the first real frame would pay) and the VPR engine is the one
engine with an output of shape ``(N, D)`` where ``D`` is the index's dimension. None or several → a
:class:`CacheOpenError` asking for ``vpr_model``.

**Load what was verified.** Nothing is reopened by name after its hash was checked: the index is opened
once, mapped (or read), and the mapping itself is hashed against the signed digest before faiss reads the
index from it; each engine is read once by the engine gate, hashed against its sidecar and the signed
digest, and deserialised from those bytes (an AOTInductor package from a private copy written while
hashing); the tile table and index report are hashed as read and parsed from those bytes. A file swapped
under the cache root after verification is therefore refused or never seen, and every failure is an
:class:`~navcache_runtime.errors.InferenceRuntimeError`. Residual: an in-place write to the mapped index
file (write permission on the file itself) can still reach its pages later; mount the cache read-only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np

from .config import RuntimeConfig, load_runtime_config
from .errors import InferenceError, InferenceRuntimeError
from .factory import build_inference_runtime
from .gate import entry_from_artifact
from .index import FaissIndex, ids_near, load_verified_index, search, tile_table_from_bytes
from .integrity import read_hashed
from .layout import ENGINES_DIR, INDEX_FILE, MANIFEST_NAME, index_report_file, index_table_file
from .naming import EXTENSIONS, parse_engine_name
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .protocol import InferenceRuntime
from .selftest import OnboardSelfTest, SelfTestFailedError, load_queries, onboard_block, run_self_test
from .trust import TrustedKeys
from .trustroot import DEFAULT_STATE, DefaultState, TrustRoot, state_path_from
from .types import EngineHandle
from .verify import CacheVerificationError, Mode, VerificationReport, verify_cache

logger = logging.getLogger(__name__)

_MAX_MANIFEST_BYTES = 16 << 20  # the verifier's default bound


class CacheOpenError(InferenceRuntimeError):
    """A verified cache cannot be opened (no index or VPR engine, ambiguous choice, changed manifest)."""


@dataclass(frozen=True)
class Candidate:
    """One retrieval hit: the tile, its bounds in degrees (west, south, east, north), cosine score, row id."""

    tile: tuple[int, int, int]
    bounds: tuple[float, float, float, float]
    score: float
    row: int


@dataclass(frozen=True)
class _Engine:
    model: str
    path: Path
    handle: EngineHandle
    input_name: str
    probe_shape: tuple[int, ...] | None  # smallest full input shape, None when the handle does not say
    max_batch: int | None


# --------------------------------------------------------------------------------------------------------
# Preprocessing: navcache_runtime.preprocessing is the one definition, shared with provisioning


def preprocess(
    rgb: np.ndarray,
    height: int,
    width: int,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    use_pil: bool | None = None,
) -> np.ndarray:
    """RGB uint8 (H, W, 3) → normalised float32 (3, height, width) with the default preprocessing (squash,
    unit scale, RGB, NCHW); :class:`~navcache_runtime.preprocessing.Preprocess` takes every declared option.

    Resizing is Pillow's bilinear filter, or without Pillow a numpy port of it
    (:func:`~navcache_runtime.preprocessing.resize_bilinear`)."""
    return Preprocess(height, width, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))(rgb, use_pil=use_pil)


# --------------------------------------------------------------------------------------------------------
# The opened cache


class OnboardCache:
    """A verified cache, open for localisation. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        root: Path,
        report: VerificationReport,
        runtime: InferenceRuntime,
        engines: Mapping[str, _Engine],
        vpr: _Engine,
        vpr_output: str,
        index: FaissIndex,
        table: np.ndarray,
        index_report: Mapping[str, Any],
        preprocessing: Preprocess | None = None,
        self_test_set: tuple[bytes, str, int, int] | None = None,
    ) -> None:
        self.root = root
        self._self_test_set = self_test_set  # (verified bytes, name, queries, min_hits_at_5) of the signed views
        self._preprocessing = preprocessing  # as signed in the manifest; None when the manifest has none
        self.report = report
        self.runtime = runtime
        self.index_report = dict(index_report)
        self._engines = dict(engines)
        self._vpr = vpr
        self._vpr_output = vpr_output
        self._index: FaissIndex | None = index
        self._table = table
        self.closed = False

    # -- what is open -----------------------------------------------------------------------------------

    @property
    def engine_models(self) -> tuple[str, ...]:
        return tuple(self._engines)

    @property
    def vpr_model(self) -> str:
        return self._vpr.model

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The input of one image the VPR engine takes ((C, H, W), or (H, W, C) for a channels-last model),
        when its runtime says; :meth:`preprocess` makes exactly this."""
        return None if self._vpr.probe_shape is None else tuple(self._vpr.probe_shape[1:])

    @property
    def dim(self) -> int:
        return int(self._live_index().d)

    @property
    def tile_count(self) -> int:
        return len(self._table)

    def engine(self, model: str) -> EngineHandle:
        """The loaded handle of another backbone (e.g. local features), for ``runtime.infer``."""
        self._check_open()
        try:
            return self._engines[model].handle
        except KeyError:
            raise InferenceError(
                f"no engine for model {model!r} in this cache; loaded: {sorted(self._engines)}"
            ) from None

    # -- use --------------------------------------------------------------------------------------------

    @property
    def preprocessing(self) -> Preprocess:
        """What :meth:`preprocess` applies: the preprocessing signed in the manifest, exactly as the tiles'
        descriptors were made (resize mode, mean/std, scale, channel order, layout, size). A manifest without a
        preprocessing block gets the defaults at the engine's input size."""
        if self._preprocessing is not None:
            return self._preprocessing
        shape = self.input_shape
        if shape is None:
            raise InferenceError(
                f"the runtime does not report the input size of {self._vpr.path.name}",
                hint="call navcache_runtime.cache.preprocess(rgb, height, width) with the model's size",
            )
        return Preprocess(shape[1], shape[2])

    def preprocess(self, rgb: np.ndarray, *, use_pil: bool | None = None) -> np.ndarray:
        """A camera frame (RGB uint8) → the VPR engine's float32 input for one image ((3, H, W), or (H, W, 3)
        for a channels-last model), by :attr:`preprocessing`."""
        return self.preprocessing(rgb, use_pil=use_pil)

    def describe(self, image_batch: np.ndarray) -> np.ndarray:
        """L2-normalised global descriptors (N, D) float32 (as the tiles' descriptors were stored) of a
        preprocessed float32 batch (or one image) in the engine's layout."""
        self._check_open()
        batch = np.asarray(image_batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        expected = self.input_shape
        if batch.ndim != 4 or (expected is not None and batch.shape[1:] != expected):
            raise InferenceError(
                f"describe expects (N, {', '.join(map(str, expected or ('C', 'H', 'W')))}) float32, "
                f"got shape {np.shape(image_batch)}",
                hint="preprocess frames with OnboardCache.preprocess",
                path=self._vpr.path,
            )
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self._vpr.max_batch or len(batch)
        parts = [self._run(self._vpr, batch[i : i + step]) for i in range(0, len(batch), step)]
        out = np.concatenate([p[self._vpr_output] for p in parts])[: len(batch)]
        if out.ndim != 2:
            raise InferenceError(
                f"the VPR output {self._vpr_output!r} has shape {list(out.shape)}; a descriptor must be [N, D]",
                path=self._vpr.path,
            )
        values = out.astype(np.float32)
        norms = np.linalg.norm(values.astype(np.float64), axis=1, keepdims=True)
        usable = np.isfinite(norms) & (norms > 0)
        return np.ascontiguousarray(np.where(usable, values / np.where(usable, norms, 1.0), values), np.float32)

    def query(
        self,
        descriptor: np.ndarray,
        k: int = 10,
        near: tuple[float, float, float] | None = None,
        *,
        nprobe: int | None = None,
    ) -> list[Candidate] | list[list[Candidate]]:
        """Best ``k`` tiles for a (D,) descriptor (a list) or (Q, D) descriptors (a list per query, as
        :meth:`query_batch`, which is the typed form for batches).

        ``near=(lat, lon, radius_m)`` is a geo-prior: only tiles whose centre lies within ``radius_m`` of
        the position are searched (fewer than ``k`` hits, or none, when fewer tiles are that close)."""
        rows = self.query_batch(np.atleast_2d(descriptor), k, near, nprobe=nprobe)
        return rows[0] if np.ndim(descriptor) == 1 else rows

    def query_batch(
        self,
        descriptors: np.ndarray,
        k: int = 10,
        near: tuple[float, float, float] | None = None,
        *,
        nprobe: int | None = None,
    ) -> list[list[Candidate]]:
        """:meth:`query` for (Q, D) descriptors: one best-first list per row."""
        index = self._live_index()
        allowed = None if near is None else ids_near(self._table, float(near[0]), float(near[1]), float(near[2]))
        hits = search(index, self._table, descriptors, k, allowed_ids=allowed, nprobe=nprobe)
        return [[self._candidate(row, score) for row, score in hit] for hit in hits]

    def _candidate(self, row: int, score: float) -> Candidate:
        t = self._table[row]
        return Candidate(
            tile=(int(t["z"]), int(t["x"]), int(t["y"])),
            bounds=(float(t["west"]), float(t["south"]), float(t["east"]), float(t["north"])),
            score=score,
            row=row,
        )

    def _run(self, engine: _Engine, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = len(batch)
        min_batch = engine.probe_shape[0] if engine.probe_shape else 1
        if n < min_batch:  # fixed-batch engines: pad, then drop the padding rows
            batch = np.concatenate([batch, np.zeros((min_batch - n, *batch.shape[1:]), batch.dtype)])
        outputs = self.runtime.infer(engine.handle, {engine.input_name: batch})
        return {name: np.asarray(value)[:n] for name, value in outputs.items()}

    # -- self-test ---------------------------------------------------------------------------------------

    def self_test(self) -> OnboardSelfTest:
        """Run the signed query views through this cache's engine and index (:mod:`navcache_runtime.selftest`);
        the result's ``passed`` says whether the signed floor is met. Raises :class:`SelfTestFailedError` when
        the manifest carries no query set or it cannot be read."""
        self._check_open()
        if self._self_test_set is None:
            raise SelfTestFailedError(
                "this cache carries no self-test query set",
                hint="re-provision with [self_test] onboard_samples > 0",
                path=self.root / MANIFEST_NAME,
            )
        data, name, queries, floor = self._self_test_set
        views, expected = load_queries(data, queries, name)
        return run_self_test(self, views, expected, floor)

    # -- lifetime ---------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise InferenceError(f"the cache {self.root} was closed", hint="open it again with open_cache")

    def _live_index(self) -> FaissIndex:
        self._check_open()
        return self._index

    def close(self) -> None:
        """Release every engine and drop the index mapping. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _release(self.runtime, [e.handle for e in self._engines.values()])
        self._index = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<OnboardCache {self.root} {state} vpr={self._vpr.model} tiles={len(self._table)}>"


def _release(runtime: InferenceRuntime, handles: Sequence[EngineHandle]) -> None:
    for handle in handles:
        try:
            runtime.release_engine(handle)
        except InferenceRuntimeError as exc:  # keep releasing the others
            logger.warning("releasing %s failed: %s", handle.entry.path.name, exc)
    close = getattr(runtime, "close", None)  # stops a background thermal poller, where there is one
    if callable(close):
        close()


# --------------------------------------------------------------------------------------------------------
# open_cache


def open_cache(
    path: Path | str,
    trusted_keys: TrustedKeys | TrustRoot | Path | str,
    *,
    runtime_config: RuntimeConfig | Mapping[str, Any] | Path | str | None = None,
    mode: Mode = "airborne",
    now: datetime | None = None,
    state_path: Path | str | Literal[DefaultState.DEFAULT] | None = DEFAULT_STATE,
    vpr_model: str | None = None,
    mmap: bool = True,
    self_test: bool = False,
) -> OnboardCache:
    """Verify the cache at ``path`` against ``trusted_keys``, then open its engines and index (see the
    module docstring). Raises CacheVerificationError (nothing opened) or another InferenceRuntimeError.

    ``trusted_keys`` is a signed trust root or a plain allowlist (see :func:`verify_cache`). Rollback
    protection is on by default: ``state_path`` defaults to ``$NAVCACHE_STATE`` or
    ``/var/lib/navcache/state.json``; ``state_path=None`` switches it off explicitly.

    ``self_test=True`` also runs the signed query views through the opened engine and index
    (:meth:`OnboardCache.self_test`) and raises :class:`~navcache_runtime.selftest.SelfTestFailedError`, with
    nothing left open, when fewer than the signed floor find their tile."""
    started = time.perf_counter()
    root = Path(path)
    report = verify_cache(root, trusted_keys, mode=mode, now=now, state_path=state_path_from(state_path))
    if not report.ok:
        raise CacheVerificationError(report)
    subjects = report.signed_subjects()  # what was verified, kept by the verifier (never decoded again)

    index_name, table_name, report_name = _index_names(root, subjects)
    table = tile_table_from_bytes(_read_signed(root, table_name, subjects), str(root / table_name))
    index_report: dict[str, Any] = {}
    if report_name is not None:
        loaded = json.loads(_read_signed(root, report_name, subjects))
        index_report = loaded if isinstance(loaded, dict) else {}
    index = load_verified_index(root / index_name, subjects[index_name], mmap=mmap)  # the signed bytes only
    if index.ntotal != len(table):
        raise CacheOpenError(
            f"{index_name} holds {index.ntotal} vectors but {table_name} has {len(table)} rows",
            hint="re-provision the cache",
            path=root / index_name,
        )

    engine_files = _engine_subjects(subjects)
    config = _runtime_config(root, runtime_config, engine_files, vpr_model)
    runtime = build_inference_runtime(config)
    engines: dict[str, _Engine] = {}
    try:
        for name, sha in engine_files.items():
            parsed = parse_engine_name(Path(name).name)
            if parsed.runtime_label != config.runtime:
                logger.info("skipping %s: a %s artifact, the runtime is %s", name, parsed.runtime_label, config.runtime)
                continue
            if parsed.model in engines:
                raise CacheOpenError(
                    f"the manifest lists two {config.runtime} engines for model {parsed.model!r}",
                    hint="re-provision the cache (one engine per backbone and runtime)",
                    path=root / name,
                )
            entry = dataclasses.replace(entry_from_artifact(root / name), sha256=sha)  # gate checks the signed digest
            handle = runtime.deserialize_engine(entry)
            engines[parsed.model] = _engine(parsed.model, root / name, handle)
        vpr, output = _pick_vpr(runtime, engines, int(index.d), vpr_model, root)
        preprocessing = _signed_preprocessing(report, vpr, root)
    except BaseException:
        _release(runtime, [e.handle for e in engines.values()])
        raise
    onboard = onboard_block(report.self_test)
    self_test_set = None
    if onboard is not None:
        name, queries, floor = onboard
        self_test_set = (_read_signed(root, name, subjects), name, queries, floor)
    cache = OnboardCache(
        root, report, runtime, engines, vpr, output, index, table, index_report, preprocessing, self_test_set
    )
    if self_test:
        try:
            result = cache.self_test()
        except BaseException:
            cache.close()
            raise
        logger.info("%s", result.summary())
        if not result.passed:
            cache.close()
            raise SelfTestFailedError(
                f"{root}: {result.summary()}",
                hint="the engine on this airframe disagrees with the one the descriptors were made with "
                "(precision, a bad build, a driver change, other weights): rebuild it, or re-provision",
                path=root,
            )
    logger.info(
        "opened %s: %d tiles (%s), engines %s, vpr=%s, in %.2f s (verification %.2f s)",
        root,
        len(table),
        index_report.get("index_type", "index"),
        sorted(engines),
        vpr.model,
        time.perf_counter() - started,
        report.elapsed_s,
    )
    return cache


def _read_signed(root: Path, name: str, subjects: Mapping[str, str]) -> bytes:
    """Read a small listed artifact once and check it against its signed digest before use."""
    path = root / name
    try:
        data, digest = read_hashed(path)  # a directory or FIFO swapped in is an error, not a hang
    except OSError as exc:
        raise CacheOpenError(f"cannot read {name}: {exc.strerror or exc}", path=path) from exc
    if digest != subjects[name]:
        raise CacheOpenError(
            f"{name} changed after the cache verified", hint="mount the cache read-only and open it again", path=path
        )
    return data


def _index_names(root: Path, subjects: Mapping[str, str]) -> tuple[str, str, str | None]:
    indexes = sorted(name for name in subjects if INDEX_FILE.fullmatch(name))
    if len(indexes) != 1:
        raise CacheOpenError(
            f"the manifest must list exactly one index/index-*.faiss, it lists {len(indexes)}: {indexes}",
            hint="re-provision the cache",
            path=root / MANIFEST_NAME,
        )
    match = INDEX_FILE.fullmatch(indexes[0])
    assert match is not None
    table = index_table_file(match.group(1))
    if table not in subjects:
        raise CacheOpenError(
            f"the manifest lists {indexes[0]} but not its tile table {table}",
            hint="re-provision the cache",
            path=root / MANIFEST_NAME,
        )
    report = index_report_file(match.group(1))
    return indexes[0], table, report if report in subjects else None


def _engine_subjects(subjects: Mapping[str, str]) -> dict[str, str]:
    engines = {}
    for name, sha in subjects.items():
        parts = name.split("/")
        if len(parts) != 2 or parts[0] != ENGINES_DIR:
            continue
        try:
            parse_engine_name(parts[1])
        except InferenceRuntimeError:
            continue  # not an engine artifact (a timing cache, say)
        engines[name] = sha
    return dict(sorted(engines.items()))


def _runtime_config(
    root: Path,
    given: RuntimeConfig | Mapping[str, Any] | Path | str | None,
    engine_files: Mapping[str, str],
    vpr_model: str | None,
) -> RuntimeConfig:
    if given is not None:
        return load_runtime_config(given)
    parsed = [parse_engine_name(Path(name).name) for name in engine_files]
    if vpr_model is not None:
        parsed = [p for p in parsed if p.model == vpr_model] or parsed
    labels = sorted({p.runtime_label for p in parsed})
    if len(labels) != 1:
        raise CacheOpenError(
            f"cannot tell the runtime from the listed engines ({labels or 'none'}; extensions "
            f"{', '.join(f'.{ext}' for ext in EXTENSIONS)})",
            hint="pass runtime_config={'runtime': ...}" if labels else "re-provision the cache with its engines",
            path=root / ENGINES_DIR,
        )
    return load_runtime_config({"runtime": labels[0], "engine_dir": root / ENGINES_DIR})


def _engine(model: str, path: Path, handle: EngineHandle) -> _Engine:
    if len(handle.input_names) != 1:
        return _Engine(model, path, handle, handle.input_names[0] if handle.input_names else "", None, None)
    name = handle.input_names[0]
    shape, max_batch = _input_shape(handle, name)
    return _Engine(model, path, handle, name, shape, max_batch)


def _input_shape(handle: EngineHandle, name: str) -> tuple[tuple[int, ...] | None, int | None]:
    """(smallest full input shape, largest batch) from whatever the strategy's handle exposes."""
    session = getattr(handle, "session", None)  # ONNX Runtime
    if session is not None:
        dims = list(session.get_inputs()[0].shape)
        batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
        dims[:1] = [batch or 1]
        if all(isinstance(d, int) and d > 0 for d in dims):
            return tuple(dims), batch
        return None, batch
    min_shapes = getattr(handle, "min_shapes", ())  # PyTorch
    if min_shapes:
        max_shapes = getattr(handle, "max_shapes", ())
        return tuple(min_shapes[0]), (max_shapes[0][0] if max_shapes else None)
    profile = getattr(handle, "profile", {}).get(name)  # TensorRT, dynamic inputs
    if profile:
        return tuple(profile[0]), profile[2][0]
    fixed = getattr(handle, "input_shapes", {}).get(name)
    if fixed and all(d > 0 for d in fixed):
        return tuple(fixed), fixed[0]
    return None, None


def _pick_vpr(
    runtime: InferenceRuntime, engines: Mapping[str, _Engine], dim: int, vpr_model: str | None, root: Path
) -> tuple[_Engine, str]:
    """The engine that produces the index's descriptors, and the name of that output."""
    if not engines:
        raise CacheOpenError(
            "the manifest lists no engine this runtime can load", hint="re-provision the cache", path=root / ENGINES_DIR
        )
    if vpr_model is not None and vpr_model not in engines:
        raise CacheOpenError(
            f"vpr_model {vpr_model!r} is not among the cache's engines {sorted(engines)}",
            hint="pass one of those names",
            path=root / ENGINES_DIR,
        )
    found: list[tuple[_Engine, str]] = []
    for model, engine in engines.items():
        if vpr_model is not None and model != vpr_model:
            continue
        if engine.probe_shape is None:
            if vpr_model is not None:  # named but not probeable: trust the name, use its first output
                return engine, engine.handle.output_names[0]
            continue
        probe = np.zeros(engine.probe_shape, np.float32)
        outputs = runtime.infer(engine.handle, {engine.input_name: probe})
        for output, value in outputs.items():
            shape = np.shape(value)
            if len(shape) == 2 and shape[1] == dim and shape[0] == probe.shape[0]:
                found.append((engine, output))
                break
    if len(found) != 1:
        which = sorted(e.model for e, _ in found)
        raise CacheOpenError(
            f"cannot tell the VPR engine: {len(found)} engines ({which}) produce {dim}-dimensional descriptors "
            f"like the index",
            hint="pass vpr_model='<model name>' to open_cache",
            path=root / ENGINES_DIR,
        )
    return found[0]


def _signed_preprocessing(report: VerificationReport, vpr: _Engine, root: Path) -> Preprocess | None:
    """The VPR backbone's preprocessing as the verified manifest records it (None when the manifest has no
    preprocessing block), checked against the engine's input shape where the runtime reports it."""
    signed = report.preprocess.get(vpr.model)
    if signed is None:
        return None
    prep = Preprocess.from_signed(signed)  # the verifier already parsed this block
    if vpr.probe_shape is not None and tuple(vpr.probe_shape[1:]) != prep.input_shape(1)[1:]:
        raise CacheOpenError(
            f"the manifest's preprocessing for {vpr.model!r} makes {list(prep.input_shape(1)[1:])} inputs but the "
            f"engine takes {list(vpr.probe_shape[1:])}",
            hint="re-provision the cache",
            path=vpr.path,
        )
    return prep
