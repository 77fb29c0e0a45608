"""Prefect artifacts the ground crew read in the UI. Keys: lowercase letters, digits and dashes."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


def artifact_key(kind: str, sortie_id: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", sortie_id.lower()).strip("-") or "sortie"
    return f"{kind}-{slug}"[:100]


def failed_engine_row(backbone: str, outcome: str, reason: str) -> dict[str, Any]:
    """A row of the engine table for a backbone whose compile failed (``FAILED``, with the error) or was not
    attempted because an earlier one failed (``SKIPPED``)."""
    return {
        "backbone": backbone,
        "outcome": outcome,
        "seconds": None,
        "reason": reason,
        "artifact": None,
        "max_abs_error": None,
    }


def engine_table(sortie_id: str, rows: list[dict[str, Any]]) -> None:
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
            for r in rows
        ],
        description=f"Engines for sortie {sortie_id}: BUILT, REUSED or FAILED, and why",
    )


def index_report(sortie_id: str, report: dict[str, Any]) -> None:
    lines = [f"# FAISS index for {sortie_id}", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.items()]
    create_markdown_artifact(
        key=artifact_key("index", sortie_id),
        markdown="\n".join(lines),
        description="Index type, size and measured recall",
    )


def self_test_report(sortie_id: str, figures: dict[str, Any], png: bytes) -> None:
    """The self-test's figures, its finding and a few query views beside their top-1 chunks (green: own chunk)."""
    gate = "report only" if figures["min_recall_at_5"] is None else f"min_recall_at_5 {figures['min_recall_at_5']}"
    picture = base64.b64encode(png).decode("ascii")
    markdown = "\n".join(
        [
            f"# Self-test for {sortie_id}: recall@5 {figures['recall_at_5']:.3f} ({gate}) — "
            f"{'PASSED' if figures['passed'] else 'FAILED'}",
            "",
            f"{figures['samples']} drone-like views rendered from the orthophoto, described by the VPR engine through "
            "the drone's preprocessing and queried against the built index.",
            "",
            "| figure | exact chunk | within one chunk |",
            "|---|---|---|",
            f"| recall@1 | {figures['recall_at_1']:.3f} | {figures['near_recall_at_1']:.3f} |",
            f"| recall@5 | {figures['recall_at_5']:.3f} | {figures['near_recall_at_5']:.3f} |",
            "",
            f"**Descriptor space:** {figures['finding']}",
            "",
            f"Onboard: {figures['onboard_queries']} signed views, at least {figures['onboard_min_hits_at_5']} must "
            "find their chunk in the top 5 (`python -m navcache_runtime selftest`).",
            "",
            f"![query views (left) and their top-1 chunks (right)](data:image/png;base64,{picture})",
        ]
    )
    create_markdown_artifact(
        key=artifact_key("self-test", sortie_id),
        markdown=markdown,
        description="Does the cache localise? Recall of drone-like views, and the descriptor space's health",
    )


def coverage_report(sortie_id: str, summary: dict[str, Any], png: bytes, missing: list[str]) -> None:
    picture = base64.b64encode(png).decode("ascii")
    shown = ", ".join(missing[:50]) + (f" … ({len(missing)} in all)" if len(missing) > 50 else "")
    markdown = "\n".join(
        [
            f"# Coverage for {sortie_id}: {summary['percent']:.2f} % (threshold {summary['threshold']} %)",
            "",
            f"covered {summary['covered']} · blank {summary['blank']} · missing {summary['missing']} "
            f"of {summary['total']} tiles — {'PASSED' if summary['passed'] else 'FAILED'}",
            "",
            f"![coverage map](data:image/png;base64,{picture})",
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


def manifest_link(sortie_id: str, path: str, version: int) -> None:
    create_link_artifact(
        key=artifact_key("manifest", sortie_id),
        link=f"file://{path}",
        link_text=f"manifest v{version}",
        description="The signed cache manifest (DSSE)",
    )
