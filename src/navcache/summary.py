"""What one provision run produced: its result objects, the artifacts the manifest lists, and the summary.

:class:`RunResults` holds the steps' results (engines, shards, index, self-test, coverage, the preflight's
imagery survey). From it come the artifacts to sign (:meth:`RunResults.artifacts`), the manifest's claims
about the run (:meth:`RunResults.manifest_claims`) and, once signed and verified, the
:class:`ProvisionSummary` (:meth:`RunResults.summary`).

:class:`ProvisionSummary` is typed; its JSON document (:meth:`ProvisionSummary.as_dict`) is what the flow
returns (what a deployment's run records and a direct caller reads), what ``navcache provision --json``
prints, and what :meth:`ProvisionSummary.from_dict` reads back::

    {"sortie_id", "cache_dir", "manifest", "manifest_version", "trusted_keys", "runtime",
     "engines": [{"backbone", "outcome", "seconds", "reason", "artifact", "max_abs_error", "eager_fallback"}],
     "tiles": {"storage_tiles", "chunks"},
     "shards": {"total", "computed", "reused", "inference_batches", "inferred_chunks"},
     "index": {"type", "vectors", "recall_at_1", "recall_at_10", "path"},
     "coverage": {"percent", "threshold", "covered", "blank", "missing", "total", "passed"},
     "self_test": {...SelfTestResult.summary()}, "imagery": {...ImagerySurvey.summary()}, "verified"}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .coverage_artifacts import CoverageArtifacts
from .descriptors import ShardResult
from .engines import EngineResult
from .index_build import IndexResult
from .preflight import ImagerySurvey
from .selftest import SelfTestResult
from .sortie import Sortie


@dataclass(frozen=True)
class EngineLine:
    backbone: str
    outcome: str  # BUILT | REUSED
    seconds: float
    reason: str
    artifact: str  # the engine's file name in engines/
    max_abs_error: float | None
    eager_fallback: bool


@dataclass(frozen=True)
class TileCounts:
    storage_tiles: int
    chunks: int


@dataclass(frozen=True)
class ShardCounts:
    total: int
    computed: int
    reused: int
    inference_batches: int
    inferred_chunks: int


@dataclass(frozen=True)
class IndexLine:
    type: str
    vectors: int
    recall_at_1: float
    recall_at_10: float
    path: str


@dataclass(frozen=True)
class CoverageLine:
    percent: float
    threshold: float
    covered: int
    blank: int
    missing: int
    total: int
    passed: bool


@dataclass(frozen=True)
class SelfTestLine:
    samples: int
    recall_at_1: float
    recall_at_5: float
    near_recall_at_1: float
    near_recall_at_5: float
    random_pair_cosine: float
    neighbour_cosine: float
    self_cosine: float
    collapsed: bool
    finding: str
    min_recall_at_5: float | None
    passed: bool
    onboard_queries: int
    onboard_min_hits_at_5: int
    seconds: float


@dataclass(frozen=True)
class ImageryLine:
    """The preflight's survey: estimated coverage of the area and the upsampling factor."""

    source: str
    bounds: list[float]
    samples: int
    estimated_coverage_percent: float
    imagery_m_per_px: float | None
    tile_m_per_px: float
    upsampling: float | None
    zoom_levels: list[int] | None


@dataclass(frozen=True)
class ProvisionSummary:
    sortie_id: str
    cache_dir: str
    manifest: str
    manifest_version: int
    trusted_keys: str
    runtime: str
    engines: list[EngineLine]
    tiles: TileCounts
    shards: ShardCounts
    index: IndexLine
    coverage: CoverageLine
    self_test: SelfTestLine
    imagery: ImageryLine
    verified: bool

    def as_dict(self) -> dict[str, Any]:
        """The JSON document (the key order above)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> ProvisionSummary:
        return cls(
            **{
                **document,
                "engines": [EngineLine(**engine) for engine in document["engines"]],
                "tiles": TileCounts(**document["tiles"]),
                "shards": ShardCounts(**document["shards"]),
                "index": IndexLine(**document["index"]),
                "coverage": CoverageLine(**document["coverage"]),
                "self_test": SelfTestLine(**document["self_test"]),
                "imagery": ImageryLine(**document["imagery"]),
            }
        )


@dataclass(frozen=True)
class RunResults:
    """The results of one run's steps, before signing."""

    sortie: Sortie
    engines: list[EngineResult]
    storage_tiles: int
    chunks: int
    shards: list[ShardResult]
    index: IndexResult
    self_test: SelfTestResult
    coverage: CoverageArtifacts
    imagery: ImagerySurvey

    def artifacts(self) -> list[Path]:
        """Every file the manifest lists (their sidecars are added when it is signed)."""
        listed = [engine.entry.path for engine in self.engines]
        listed += [path for shard in self.shards for path in (shard.descriptors_path, shard.table_path)]
        listed += [self.index.index_path, self.index.table_path, self.index.report_path]
        listed += [self.coverage.table_path, self.coverage.map_path]
        if self.self_test.onboard_path is not None:
            listed.append(self.self_test.onboard_path)
        return listed

    def manifest_claims(self, host: dict[str, str]) -> dict[str, Any]:
        """What the manifest states about the run besides its artifacts: the sortie's area, takeoff and
        route, the host, the preprocessing, the coverage and self-test records, expiry and keys."""
        sortie, root = self.sortie, self.sortie.cache_dir
        onboard = self.self_test.onboard_path
        return {
            "sortie_id": sortie.sortie_id,
            "takeoff": sortie.takeoff,
            "area_geojson": sortie.signed_area_geojson,
            "route_geojson": sortie.area_geojson if sortie.corridor_m is not None else None,
            "corridor_m": sortie.corridor_m,
            "host": host,
            "preprocess": {sortie.vpr.name: sortie.vpr.preprocess},
            "coverage": self.coverage.report.manifest_fields(self.coverage.table_path.relative_to(root).as_posix()),
            "self_test": self.self_test.manifest_fields(
                onboard.relative_to(root).as_posix() if onboard is not None else None
            ),
            "expires_hours": sortie.expires_hours,
            "signing_key": sortie.signing_key,
            "trusted_keys": trusted_keys(sortie),
        }

    def summary(self, manifest: Path, manifest_version: int, verified: bool) -> ProvisionSummary:
        report, index = self.coverage.report, self.index
        computed = sum(s.computed for s in self.shards)
        return ProvisionSummary(
            sortie_id=self.sortie.sortie_id,
            cache_dir=str(self.sortie.cache_dir),
            manifest=str(manifest),
            manifest_version=manifest_version,
            trusted_keys=str(trusted_keys(self.sortie)),
            runtime=self.sortie.runtime,
            engines=[EngineLine(**engine.summary()) for engine in self.engines],
            tiles=TileCounts(self.storage_tiles, self.chunks),
            shards=ShardCounts(
                total=len(self.shards),
                computed=computed,
                reused=len(self.shards) - computed,
                inference_batches=sum(s.batches for s in self.shards),
                inferred_chunks=sum(s.inferred for s in self.shards),
            ),
            index=IndexLine(index.index_type, index.n, index.recall_at_1, index.recall_at_10, str(index.index_path)),
            coverage=CoverageLine(
                report.percent,
                report.threshold,
                report.covered,
                report.blank,
                report.missing,
                report.total,
                report.passed,
            ),
            self_test=SelfTestLine(**self.self_test.summary()),
            imagery=ImageryLine(**self.imagery.summary()),
            verified=verified,
        )


def trusted_keys(sortie: Sortie) -> Path:
    """The trusted-keys file the new cache is verified against: the sortie's, else the one beside the
    signing key file (a sortie naming an sslib: signer always gives trusted_keys)."""
    return sortie.trusted_keys or Path(sortie.signing_key).with_name("trusted_keys.json")
