"""Prefect artifacts the ground crew read in the UI. Keys: lowercase letters, digits and dashes."""

from __future__ import annotations

import base64
import re
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


def artifact_key(kind: str, sortie_id: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", sortie_id.lower()).strip("-") or "sortie"
    return f"{kind}-{slug}"[:100]


def engine_table(sortie_id: str, rows: list[dict[str, Any]]) -> None:
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
        description=f"Engines for sortie {sortie_id}: BUILT or REUSED, and why",
    )


def index_report(sortie_id: str, report: dict[str, Any]) -> None:
    lines = [f"# FAISS index for {sortie_id}", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.items()]
    create_markdown_artifact(
        key=artifact_key("index", sortie_id),
        markdown="\n".join(lines),
        description="Index type, size and measured recall",
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


def manifest_link(sortie_id: str, path: str, version: int) -> None:
    create_link_artifact(
        key=artifact_key("manifest", sortie_id),
        link=f"file://{path}",
        link_text=f"manifest v{version}",
        description="The signed cache manifest (DSSE)",
    )
