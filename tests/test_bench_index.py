"""`python -m bench index` on a small corpus: the navcache row is searched with the nprobe stored in the
index file (as onboard), meets the recall target on the bench's own queries, and every row has its latency
against the exact index measured in the same run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("faiss")

from bench import index as bench_index


def test_bench_index_rows_compare_against_exact_search_in_the_same_run(tmp_path: Path) -> None:
    rows = bench_index.bench_one(60_000, 32, tmp_path)  # above exact_max_n, so the build chooses an IVF index
    exact, navcache, plain = rows[0], rows[1], rows[-1]
    assert exact["method"].startswith("exact") and exact["recall_at_10"] == 1.0
    assert navcache["method"].startswith("navcache build_index (IVF") and navcache["nprobe"] >= 1
    assert navcache["build_recall_at_10_lower_95"] >= 0.95 and navcache["build_recall_query_cosine"] == [0.7, 0.995]
    assert navcache["recall_at_10"] >= 0.95, "the build's nprobe holds on queries it never saw"
    assert navcache["nprobe_sweep"][-1]["nprobe"] == navcache["nprobe"]
    assert plain["method"].startswith("plain IVF")
    if len(rows) == 4:  # the same index one sweep step lower: below the target, as the build measured
        below = rows[2]
        assert below["nprobe"] == navcache["nprobe_sweep"][-2]["nprobe"] < navcache["nprobe"]
        assert navcache["nprobe_sweep"][-2]["recall_at_10_lower_95"] < 0.95
    for row in rows:
        assert row["latency_ms"] > 0 and row["batch_ms_per_query"] > 0
    assert exact["build_s"] > 0 and navcache["build_s"] > 0 and plain["build_s"] > 0
