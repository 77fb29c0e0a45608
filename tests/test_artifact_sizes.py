"""Every artifact a provision run writes fits in its Prefect event with room to spare.

Prefect puts an artifact's whole data in its ``prefect.artifact-collection.created/updated`` event, and the
server refuses to publish an event above ``PREFECT_EVENTS_MAXIMUM_SIZE_BYTES`` (1.5 MB by default): the event
never reaches the UI's event feed or automations. The sizes here are of the very event Prefect builds
(:func:`prefect.server.events.schemas.lifecycle.artifact_collection_created_event`), for a real run's
artifacts read back through the API, and for a coverage map as large and noisy as a map can be.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from PIL import Image

from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie

#: Half the server's default limit: the margin left for a larger sortie, longer ids and paths.
EVENT_BOUND = 750_000


def _latest_artifacts(flow_run_id: UUID) -> dict[str, Any]:
    """The run's artifacts, by key (the latest of each key, which this run wrote)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterFlowRunId

    with get_client(sync_client=True) as client:
        collections = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(flow_run_id=ArtifactCollectionFilterFlowRunId(any_=[flow_run_id]))
        )
    return {collection.key: collection for collection in collections}


def _event_sizes(artifacts: dict[str, Any]) -> dict[str, int]:
    """The JSON size of each artifact collection's lifecycle event, by key."""
    from prefect.server.events.schemas.lifecycle import artifact_collection_created_event
    from prefect.types._datetime import now

    return {
        key: len(artifact_collection_created_event(collection, now("UTC")).model_dump_json().encode())
        for key, collection in artifacts.items()
    }


def _embedded_pictures(markdown: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown)]


@pytest.mark.usefixtures("prefect_harness")
def test_every_artifact_of_a_provision_run_fits_its_event(assets: Assets, tmp_path: Path) -> None:
    from navcache.coverage_map import MAX_EMBEDDED_PNG_BYTES
    from navcache_flows.provision_sortie import provision_sortie
    from navcache_tasks.reporting import artifact_key

    first, second = block_tiles()
    sortie = write_sortie(
        tmp_path / "sizes.toml", assets, area=tiles_polygon(first + second), cache_dir=tmp_path / "cache"
    )
    state = provision_sortie(str(sortie), return_state=True)
    assert state.is_completed(), state
    artifacts = _latest_artifacts(state.state_details.flow_run_id)
    sizes = _event_sizes(artifacts)
    for kind in ("coverage", "self-test", "index", "manifest", "engines"):
        assert artifact_key(kind, "test-sizes") in sizes, sorted(sizes)
    assert max(sizes.values()) < EVENT_BOUND, sizes
    # The map is still there to look at: a compact picture of the map's full size, and the full-size map's path.
    coverage = artifacts[artifact_key("coverage", "test-sizes")].data
    (picture,) = _embedded_pictures(coverage)
    full_size = next((tmp_path / "cache" / "coverage").glob("coverage-*.png"))
    assert str(full_size) in coverage
    assert Image.open(io.BytesIO(picture)).size == Image.open(full_size).size
    assert len(picture) <= MAX_EMBEDDED_PNG_BYTES < full_size.stat().st_size


@pytest.mark.usefixtures("prefect_harness")
def test_the_coverage_artifact_of_the_largest_noisiest_map_fits_its_event(tmp_path: Path) -> None:
    """A 1024 px map of pure noise (no PNG compresses it) and thousands of missing tiles."""
    from prefect import flow

    from navcache.coverage_artifacts import CoverageArtifacts
    from navcache.coverage_walk import coverage_walk
    from navcache.tiles import ChunkGrid, tiles_to_array
    from navcache.types import TileId
    from navcache_tasks.reporting import coverage_report

    grid = ChunkGrid(18)
    tiles = [TileId(18, 140_000 + x, 90_000 + y) for x in range(64) for y in range(64)]
    covered = tiles[: len(tiles) // 2]
    described = np.column_stack([np.full(len(covered), 18), tiles_to_array(covered)]).astype(np.int64)
    report = coverage_walk(grid, tiles, described, np.zeros((0, 3), np.int64), 99.0)
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1024, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert len(buffer.getvalue()) * 4 / 3 > 1_500_000  # embedded as it is, the event would be refused

    @flow(name="artifact-size-check")
    def report_only() -> None:
        coverage_report("size-check", CoverageArtifacts(report, tmp_path / "coverage-0.json", buffer.getvalue()))

    state: Any = report_only(return_state=True)
    assert state.is_completed(), state
    sizes = _event_sizes(_latest_artifacts(state.state_details.flow_run_id))
    assert set(sizes) == {"coverage-size-check"} and sizes["coverage-size-check"] < EVENT_BOUND, sizes
