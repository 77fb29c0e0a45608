"""Engine cache hit: compile-or-reuse of a backbone whose 200 MB engine is already in the cache (the engine
gate: name check + sidecar + streamed sha256) vs. raw hashlib sha256 of the same file, in the same run.

Goals (issue 7 / original design): p99 ≤ 1.5 s and ≤ 1.3x raw hashing."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import navcache_runtime as nr

from .common import interleaved, print_machine, print_table, ratio, sha256_files, write_random_file, write_result

GOAL_P99_MS = 1500.0
GOAL_RATIO = 1.3


def setup(directory: Path, size: int) -> tuple[Any, Any, Path]:
    """A real engine entry for a tiny model, whose artifact is then replaced by ``size`` random bytes (with a
    fresh sidecar): the hit path only hashes it, so the bytes need not be a real engine."""
    from navcache.demo.backbones import export_models, make_model
    from navcache.engines import BackboneBuild, compile_or_reuse

    onnx_path, _ = export_models(make_model(0), directory / "models", "tiny_vpr", size=64)
    profile = nr.InputProfile("image", (1, 3, 64, 64), (8, 3, 64, 64), (16, 3, 64, 64))
    backbone = BackboneBuild("tiny_vpr", onnx_path, nr.BuildConfig(input_shapes=(profile,)))
    runtime = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(directory / "engines")})
    built = compile_or_reuse(runtime, backbone, check=False)
    engine = built.entry.path
    write_random_file(engine, size)
    nr.sidecar_path(engine).write_text(nr.sha256_file(engine), encoding="ascii")
    return runtime, backbone, engine


def run(quick: bool) -> Path:
    from navcache.engines import Outcome, compile_or_reuse

    info = print_machine()
    size = 200 * 10**6
    repeat = 5 if quick else 30
    with tempfile.TemporaryDirectory(prefix="navcache-bench-engine-") as tmp:
        runtime, backbone, engine = setup(Path(tmp), size)

        def hit() -> None:
            result = compile_or_reuse(runtime, backbone)
            if result.outcome is not Outcome.REUSED:
                raise RuntimeError(f"expected a cache hit, got {result.outcome}: {result.reason}")

        stats = interleaved({"compile_or_reuse hit": hit, "raw hashlib sha256": lambda: sha256_files([engine])}, repeat)
    hit_s, raw_s = stats["compile_or_reuse hit"], stats["raw hashlib sha256"]
    rows = [
        ["raw hashlib sha256 (baseline)", raw_s.p50_ms, raw_s.p99_ms, 1.0, "", size / raw_s.p50_ms / 1e6],
        [
            "compile_or_reuse hit (engine gate)",
            hit_s.p50_ms,
            hit_s.p99_ms,
            ratio(hit_s.p50_ms, raw_s.p50_ms),
            f"p99 ≤ {GOAL_P99_MS:.0f} ms, ≤ {GOAL_RATIO}x raw",
            size / hit_s.p50_ms / 1e6,
        ],
    ]
    print_table(
        f"engine cache hit, {size / 1e6:.0f} MB engine, {repeat} runs interleaved",
        ["path", "p50 ms", "p99 ms", "ratio (p50) vs raw", "goal", "GB/s"],
        rows,
    )
    ok = hit_s.p99_ms <= GOAL_P99_MS and ratio(hit_s.p50_ms, raw_s.p50_ms) <= GOAL_RATIO
    print(f"goal {'met' if ok else 'MISSED'}")
    return write_result(
        "engine-hit",
        {
            "quick": quick,
            "bytes": size,
            "repeat": repeat,
            "hit": hit_s.__dict__,
            "raw_sha256": raw_s.__dict__,
            "ratio_p50": ratio(hit_s.p50_ms, raw_s.p50_ms),
            "ratio_p99": ratio(hit_s.p99_ms, raw_s.p99_ms),
            "goal_met": ok,
            "cores": info["cores"],
        },
    )
