"""`navcache plan`: what provision would do, without doing it; it must agree with what provision then does,
or a crew plans on numbers the run does not keep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from navcache.plan import plan_sortie
from navcache.sortie import load_sortie
from tests.support.cli import navcache
from tests.support.realistic import bending_route, coarse_orthophoto, route_sortie
from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie


@pytest.fixture
def two_shard_sortie(assets: Assets, tmp_path: Path) -> Path:
    first, second = block_tiles()  # 8 tiles at zoom 18 in two shard blocks
    return write_sortie(tmp_path / "s.toml", assets, area=tiles_polygon(first + second), cache_dir=tmp_path / "cache")


@pytest.mark.usefixtures("prefect_harness")
def test_plan_agrees_with_provision_and_then_sees_its_engines_reused(two_shard_sortie: Path, tmp_path: Path) -> None:
    from navcache_flows.provision_sortie import provision_sortie

    before = plan_sortie(two_shard_sortie)
    assert not (tmp_path / "cache").exists()  # a plan writes nothing
    assert (before.storage_tiles, before.chunks, before.shards) == (8, 8, 2)
    assert [(e.backbone, e.action) for e in before.engines] == [("tiny_vpr", "build"), ("local_features", "build")]
    assert before.estimated_coverage_percent == pytest.approx(100.0)
    assert before.descriptor_dim == 128 and before.refusal is None

    summary = provision_sortie(str(two_shard_sortie))
    assert summary["tiles"] == {"storage_tiles": before.storage_tiles, "chunks": before.chunks}
    assert summary["shards"]["total"] == before.shards
    assert [(e["backbone"], e["outcome"]) for e in summary["engines"]] == [
        ("tiny_vpr", "BUILT"),
        ("local_features", "BUILT"),
    ]
    assert [e["artifact"] for e in summary["engines"]] == [e.artifact for e in before.engines]
    assert summary["coverage"]["percent"] == pytest.approx(before.estimated_coverage_percent)
    assert summary["imagery"]["upsampling"] == pytest.approx(before.upsampling, rel=1e-3)

    after = plan_sortie(two_shard_sortie)
    assert [(e.backbone, e.action, e.reason) for e in after.engines] == [
        ("tiny_vpr", "reuse", "verified"),
        ("local_features", "reuse", "verified"),
    ]
    cache = tmp_path / "cache"
    actual = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert actual / 3 < after.size.total < actual * 3, (after.size, actual)


def test_plan_counts_agree_with_the_flows_tile_plan_on_a_route_with_overlapping_chunks(
    assets: Assets, tmp_path: Path
) -> None:
    from navcache_flows.provision_sortie import plan_tiles

    ortho = coarse_orthophoto(tmp_path / "ortho.tif", west=11.0, south=47.6, east=11.3, north=47.8, m_per_px=20)
    sortie = route_sortie(
        tmp_path / "s.toml",
        assets,
        route=bending_route(11.05, 47.70, 12, heading_deg=70),
        corridor_m=300,
        orthophoto=ortho,
        cache_dir=tmp_path / "cache",
        zoom=16,
        threshold=50.0,
        tiles_extra="chunk_span = 2\noverlap = 0.5\nshard_block = 8",
    )
    plan = plan_sortie(sortie)
    _, storage, shards = plan_tiles.fn(load_sortie(sortie))
    assert plan.storage_tiles == len(storage) and plan.shards == len(shards) > 1
    assert plan.chunks == sum(len(s.chunks) for s in shards) > plan.storage_tiles  # overlapping 2x2 chunks
    assert plan.upsampling == pytest.approx(20.0 / 1.61, rel=0.05)  # 20 m/px under 1.6 m/px tiles
    assert not (tmp_path / "cache").exists()


def test_plan_json_on_the_command_line_writes_nothing_and_starts_no_prefect(
    two_shard_sortie: Path, tmp_path: Path
) -> None:
    proc = navcache("plan", str(two_shard_sortie), "--json", home=tmp_path / "prefect-home")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert {"tiles", "shards", "estimated_coverage_percent", "upsampling", "engines"} <= set(plan)
    assert (plan["tiles"], plan["chunks"], plan["shards"]) == (8, 8, 2)
    assert plan["engines"][0]["backbone"] == "tiny_vpr" and {e["action"] for e in plan["engines"]} == {"build"}
    assert plan["estimated_coverage_percent"] == 100.0 and plan["refused"] is None
    assert 1.0 < plan["upsampling"] < 2.0  # 0.6 m/px imagery under 0.4 m/px zoom-18 tiles
    assert plan["estimated_bytes"]["total"] > plan["estimated_bytes"]["engines"] > 0
    assert not (tmp_path / "cache").exists() and not (tmp_path / "prefect-home").exists()

    table = navcache("plan", str(two_shard_sortie), "--cache-dir", str(tmp_path / "other"), home=tmp_path / "h")
    assert table.returncode == 0, table.stderr
    assert "8 storage tiles at zoom 18, 8 chunks" in table.stdout and "BUILD (cold cache" in table.stdout
    assert str(tmp_path / "other") in table.stdout and not (tmp_path / "other").exists()


def test_plan_of_a_sortie_provision_would_refuse_shows_it_and_exits_2(assets: Assets, tmp_path: Path) -> None:
    ortho = coarse_orthophoto(tmp_path / "ortho.tif", west=11.0, south=47.6, east=11.3, north=47.8)
    sortie = route_sortie(
        tmp_path / "s.toml",
        assets,
        route=bending_route(11.05, 47.70, 300, heading_deg=90),
        corridor_m=300,
        orthophoto=ortho,
        cache_dir=tmp_path / "cache",
        zoom=16,
    )
    proc = navcache("plan", str(sortie), "--json", home=tmp_path / "prefect-home")
    assert proc.returncode == 2, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["estimated_coverage_percent"] < 10 and plan["upsampling"] > 50
    assert "valid pixels cover only about" in plan["refused"]
    assert "error: provision would refuse this sortie:" in proc.stderr and "upsampled" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "cache").exists()


def test_plan_of_a_broken_sortie_is_one_clear_error(two_shard_sortie: Path, tmp_path: Path) -> None:
    two_shard_sortie.write_text(two_shard_sortie.read_text().replace("zoom = 18", "zom = 18"))
    proc = navcache("plan", str(two_shard_sortie), "--json", home=tmp_path / "prefect-home")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown field 'zom'" in proc.stderr and "Traceback" not in proc.stderr
