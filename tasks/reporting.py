"""Prefect artifacts the ground crew read in the UI. Keys: lowercase letters, digits and dashes.

Every picture is embedded through :func:`navcache.coverage_map.compact_png`: Prefect puts an artifact's whole
markdown into its ``prefect.artifact-collection.*`` event, and the server drops events above
``PREFECT_EVENTS_MAXIMUM_SIZE_BYTES`` (1.5 MB by default), so an artifact stays a fraction of that whatever
the sortie's size. The full-size coverage map stays in the cache, named in the artifact.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from navcache.coverage_artifacts import CoverageArtifacts
from navcache.coverage_map import compact_png
from navcache.engines import EngineRow
from navcache.index_build import IndexResult
from navcache.selftest import SelfTestResult


def artifact_key(kind: str, sortie_id: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", sortie_id.lower()).strip("-") or "sortie"
    return f"{kind}-{slug}"[:100]


def engine_table(sortie_id: str, rows: list[EngineRow]) -> None:
    """Written on every run, failed or not: FAILED and SKIPPED rows carry their reason."""
    create_table_artifact(
        key=artifact_key("engines", sortie_id),
        table=[
            {
                "model": r["backbone"],
                "outcome": r["outcome"],
                "seconds": r["seconds"],
                "why": r["reason"],
                "artifact": r["artifact"],
                "max abs error": r["max_abs_error"],
            }
            for r in (row.as_dict() for row in rows)
        ],
        description=f"Engines for sortie {sortie_id}: BUILT, REUSED or FAILED, and why",
    )


def index_report(sortie_id: str, index: IndexResult, self_test: SelfTestResult) -> None:
    """The index's type, size and measured recall, with the self-test's figures beside them."""
    report = {
        "type": index.index_type,
        "reason": index.reason,
        "vectors": index.n,
        "dim": index.dim,
        "recall@1": round(index.recall_at_1, 4),
        "recall@10": round(index.recall_at_10, 4),
        "size (bytes)": index.size_bytes,
        "build (s)": round(index.build_s, 2),
        "gpu": index.gpu,
        "self-test recall@1 / @5": f"{self_test.recall_at_1:.3f} / {self_test.recall_at_5:.3f}",
        "self-test descriptor space": self_test.finding,
    }
    lines = [f"# FAISS index for {sortie_id}", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.items()]
    create_markdown_artifact(
        key=artifact_key("index", sortie_id),
        markdown="\n".join(lines),
        description="Index type, size and measured recall",
    )


def self_test_report(sortie_id: str, result: SelfTestResult) -> None:
    """The self-test's figures, its finding and a few query views beside their top-1 chunks (green: own chunk)."""
    figures = result.summary()  # the figures as rounded for every report
    gate = "report only" if result.min_recall_at_5 is None else f"min_recall_at_5 {result.min_recall_at_5}"
    markdown = "\n".join(
        [
            f"# Self-test for {sortie_id}: recall@5 {figures['recall_at_5']:.3f} ({gate}) — "
            f"{'PASSED' if result.passed else 'FAILED'}",
            "",
            f"{result.samples} drone-like views rendered from the orthophoto, described by the VPR engine through "
            "the drone's preprocessing and queried against the built index.",
            "",
            "| figure | exact chunk | within one chunk |",
            "|---|---|---|",
            f"| recall@1 | {figures['recall_at_1']:.3f} | {figures['near_recall_at_1']:.3f} |",
            f"| recall@5 | {figures['recall_at_5']:.3f} | {figures['near_recall_at_5']:.3f} |",
            "",
            f"**Descriptor space:** {result.finding}",
            "",
            f"Onboard: {result.onboard_queries} signed views, at least {result.onboard_min_hits_at_5} must "
            "find their chunk in the top 5 (`python -m navcache_runtime selftest`).",
        ]
    )
    if result.preview_png:
        picture = base64.b64encode(compact_png(result.preview_png)).decode("ascii")
        markdown += f"\n\n![query views (left) and their top-1 chunks (right)](data:image/png;base64,{picture})"
    create_markdown_artifact(
        key=artifact_key("self-test", sortie_id),
        markdown=markdown,
        description="Does the cache localise? Recall of drone-like views, and the descriptor space's health",
    )


def coverage_report(sortie_id: str, coverage: CoverageArtifacts) -> None:
    """The coverage figures, the map the manifest names (a compact copy; the path of the full-size one), and
    the missing tiles (the first 50)."""
    report = coverage.report
    missing = [str(tile) for tile in report.missing_tiles]
    picture = base64.b64encode(compact_png(coverage.png)).decode("ascii")
    shown = ", ".join(missing[:50]) + (f" … ({len(missing)} in all)" if len(missing) > 50 else "")
    markdown = "\n".join(
        [
            f"# Coverage for {sortie_id}: {report.percent:.2f} % (threshold {report.threshold} %)",
            "",
            f"covered {report.covered} · blank {report.blank} · missing {report.missing} "
            f"of {report.total} tiles — {'PASSED' if report.passed else 'FAILED'}",
            "",
            f"![coverage map](data:image/png;base64,{picture})",
            "",
            f"Full-size map: `{coverage.map_path}`",
            "",
            f"Missing tiles: {shown or 'none'}",
        ]
    )
    create_markdown_artifact(
        key=artifact_key("coverage", sortie_id),
        markdown=markdown,
        description="Coverage of the area by descriptors, with a map",
    )


def manifest_facts(path: Path) -> dict[str, Any]:
    """What the crew checks on a signed manifest, read back from the envelope on disk: payload sha256, the
    signing keyids, and the statement's version, host and validity."""
    envelope = json.loads(path.read_text())
    payload = base64.b64decode(envelope["payload"])
    statement = json.loads(payload)
    predicate = statement.get("predicate", statement)
    return {
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "keyids": [signature.get("keyid", "?") for signature in envelope.get("signatures", [])],
        "version": predicate.get("version"),
        "issued_at": predicate.get("issued_at"),
        "expires": predicate.get("expires"),
        "host": predicate.get("host"),
    }


def manifest_report(sortie_id: str, path: Path, version: int, trusted_keys: Path, host_name: str) -> None:
    """The manifest as text (a ``file://`` link opens nothing on another machine): path, host, version,
    expiry, payload digest and signing keys."""
    facts = manifest_facts(path)
    host = facts["host"] or {}
    host_text = ", ".join(f"{k}={v}" for k, v in host.items()) if isinstance(host, dict) else str(host)
    lines = [
        f"# Manifest v{version} for {sortie_id}",
        "",
        "| field | value |",
        "|---|---|",
        f"| path | `{path}` on `{host_name}` |",
        f"| version | {facts['version'] if facts['version'] is not None else version} |",
        f"| issued | {facts['issued_at']} |",
        f"| expires | {facts['expires']} |",
        f"| payload sha256 | `{facts['payload_sha256']}` |",
        f"| signing keyids | {', '.join(f'`{k}`' for k in facts['keyids']) or 'none'} |",
        f"| trusted keys | `{trusted_keys}` |",
        f"| built for host | {host_text} |",
        "",
        f"Check it onboard: `navcache-onboard verify {path.parent} --trusted-keys {trusted_keys}`",
    ]
    create_markdown_artifact(
        key=artifact_key("manifest", sortie_id),
        markdown="\n".join(lines),
        description=f"The signed cache manifest (DSSE) v{version}: digest, keys, validity",
    )
