"""What provisioning a sortie would do, without doing it: ``navcache plan SORTIE.toml``.

:func:`plan_sortie` runs the same preflight as ``navcache provision`` (the sortie file, models, keys, cache
directory and the imagery survey of :mod:`navcache.preflight`), then counts what the flow would make from
the same library calls the flow makes: the area's storage tiles and retrieval chunks (:class:`ChunkGrid`),
the descriptor shards (chunks grouped by ``shard_block`` as :func:`navcache.tiles.plan_shards` groups them),
and per backbone whether its engine would be reused or built (:func:`navcache.engines.find_reusable` on the
:func:`navcache.engines.backbone_build` the flow compiles). It writes nothing and starts no Prefect.

The cache size is an estimate: engines about their ONNX size (an existing engine that would be reused:
its size), descriptors ``described chunks x dim x 2`` bytes (float16; described chunks = chunks x the
estimated coverage) plus the shard tables, the index ``vectors x dim x 4`` bytes (exact search; larger
indexes are compressed to fit :class:`navcache.index_build.IndexBudget`) plus its tile table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from navcache_runtime import InferenceRuntimeError, RuntimeConfig

from .engines import backbone_build, find_reusable, for_runtime, provisioning_runtime
from .errors import SortieError
from .preflight import ImagerySurvey, run_preflight
from .sortie import BackboneSpec, Sortie

logger = logging.getLogger(__name__)

_NPY_HEADER = 128  # bytes np.save writes before the data


@dataclass(frozen=True)
class EnginePlan:
    backbone: str
    action: Literal["reuse", "build"]
    reason: str  # "verified", or why a build is needed ("cold cache: ...", "tampered ...")
    artifact: str  # the engine file name a build produces (or the one reused)
    estimated_bytes: int


@dataclass(frozen=True)
class CacheSizeEstimate:
    engines: int
    descriptors: int
    index: int

    @property
    def total(self) -> int:
        return self.engines + self.descriptors + self.index


@dataclass(frozen=True)
class SortiePlan:
    sortie_id: str
    cache_dir: Path
    zoom: int
    storage_tiles: int
    chunks: int
    shards: int
    imagery: ImagerySurvey
    engines: tuple[EnginePlan, ...]
    descriptor_dim: int | None
    size: CacheSizeEstimate
    warnings: tuple[str, ...]
    refusal: str | None  # why `navcache provision` would refuse this sortie; None when it would run

    @property
    def estimated_coverage_percent(self) -> float:
        return self.imagery.estimated_coverage_percent

    @property
    def upsampling(self) -> float | None:
        return self.imagery.upsampling

    def as_dict(self) -> dict[str, Any]:
        return {
            "sortie_id": self.sortie_id,
            "cache_dir": str(self.cache_dir),
            "zoom": self.zoom,
            "tiles": self.storage_tiles,
            "chunks": self.chunks,
            "shards": self.shards,
            "estimated_coverage_percent": round(self.estimated_coverage_percent, 2),
            "upsampling": None if self.upsampling is None else round(self.upsampling, 3),
            "imagery": self.imagery.summary(),
            "engines": [
                {"backbone": e.backbone, "action": e.action, "reason": e.reason, "artifact": e.artifact}
                for e in self.engines
            ],
            "descriptor_dim": self.descriptor_dim,
            "estimated_bytes": {
                "engines": self.size.engines,
                "descriptors": self.size.descriptors,
                "index": self.size.index,
                "total": self.size.total,
            },
            "warnings": list(self.warnings),
            "refused": self.refusal,
        }


def plan_sortie(sortie_path: Path, cache_dir: Path | None = None) -> SortiePlan:
    """The plan of ``sortie_path`` (see the module docstring). Raises :class:`NavcacheError` for input
    preflight refuses before it can survey (bad file, models, keys, cache dir, unreadable imagery); a
    coverage refusal is returned in :attr:`SortiePlan.refusal`."""
    report = run_preflight(sortie_path, cache_dir, refuse=False)
    sortie = report.sortie
    grid, spec = sortie.grid, sortie.tiles
    chunks = grid.chunk_array_for_area(sortie.area, spec.budget)
    storage = len(chunks) if spec.chunk_span == 1 and spec.overlap == 0 else grid.storage_grid.count_chunks(sortie.area)
    shards = len(np.unique(chunks // spec.shard_block, axis=0)) if len(chunks) else 0
    engines = tuple(_engine_plans(sortie))
    dim = descriptor_dim(sortie.vpr)
    described = round(len(chunks) * report.imagery.estimated_coverage_percent / 100.0)
    size = _size_estimate(engines, len(chunks), shards, described, dim)
    return SortiePlan(
        sortie_id=sortie.sortie_id,
        cache_dir=sortie.cache_dir,
        zoom=spec.zoom,
        storage_tiles=storage,
        chunks=len(chunks),
        shards=shards,
        imagery=report.imagery,
        engines=engines,
        descriptor_dim=dim,
        size=size,
        warnings=report.warnings,
        refusal=None if report.refusal is None else str(report.refusal),
    )


def _engine_plans(sortie: Sortie) -> list[EnginePlan]:
    config = RuntimeConfig(runtime=sortie.runtime, engine_dir=sortie.cache_dir / "engines")
    plans = []
    try:
        runtime = provisioning_runtime(config)
        for spec in sortie.backbones:
            build = for_runtime(runtime, backbone_build(spec))
            entry, reason = find_reusable(runtime, build)
            if entry is not None:
                plans.append(EnginePlan(spec.name, "reuse", reason, entry.path.name, entry.path.stat().st_size))
            else:
                expected = runtime.expected_artifacts(build.onnx, build.build_config)[0]
                plans.append(EnginePlan(spec.name, "build", reason, expected.name, spec.onnx.stat().st_size))
    except InferenceRuntimeError as exc:
        raise SortieError(
            f"runtime {sortie.runtime!r} cannot plan the engines here: {exc}",
            where=f"{sortie.path.name} runtime",
            hint=getattr(exc, "hint", None) or "choose a runtime this host has",
        ) from None
    return plans


def descriptor_dim(spec: BackboneSpec) -> int | None:
    """The VPR backbone's descriptor length: the descriptor output's last axis when the ONNX graph fixes
    it, else from one ONNX Runtime run at the profile's smallest shape. None when neither tells."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(spec.onnx), load_external_data=False).graph
    except (OSError, ValueError, DecodeError):  # preflight validated it; a race with an edit is all that is left
        return None
    outputs = list(graph.output)
    chosen = next((o for o in outputs if o.name == spec.output_name), outputs[0] if outputs else None)
    if chosen is None:
        return None
    dims = chosen.type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
        return int(dims[-1].dim_value)
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(spec.onnx), providers=["CPUExecutionProvider"])
        sample = np.zeros(spec.profile.min, np.float32)
        (out,) = session.run([chosen.name], {spec.input_name: sample})
        return int(np.asarray(out).reshape(spec.profile.min[0], -1).shape[1])
    except Exception as exc:  # a plan still helps without the size of one file
        logger.info("could not run %s to learn its descriptor size: %s", spec.onnx.name, exc)
        return None


def _size_estimate(
    engines: tuple[EnginePlan, ...], chunks: int, shards: int, described: int, dim: int | None
) -> CacheSizeEstimate:
    from .descriptors import TABLE_DTYPE as SHARD_TABLE
    from .index_build import TABLE_DTYPE as INDEX_TABLE
    from .index_build import IndexBudget

    width = dim or 0
    descriptors = described * width * 2 + chunks * SHARD_TABLE.itemsize + shards * 2 * _NPY_HEADER
    index = min(described * width * 4, IndexBudget().max_bytes) + described * INDEX_TABLE.itemsize + 2 * _NPY_HEADER
    return CacheSizeEstimate(sum(e.estimated_bytes for e in engines), descriptors, index)


__all__ = ["CacheSizeEstimate", "EnginePlan", "SortiePlan", "descriptor_dim", "plan_sortie"]
