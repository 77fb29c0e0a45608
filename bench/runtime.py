"""Runtime benchmarks: factory call latency, and engine load (deserialize) vs. compile time per strategy,
each next to the bare library doing the same job in the same run. ``--quick`` (CI) leaves out the PyTorch
strategy's engines: AOTInductor compiles for about a minute on 2 cores, half of the quick run of every
benchmark; the full run measures them."""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import navcache_runtime as nr

from .common import Stats, machine, print_table, timed, write_result

MODELS = {  # name -> (TinyVPR width, depth, input size, descriptor dim)
    "tiny-cnn": (16, 3, 64, 64),
    "medium-cnn": (64, 5, 224, 256),
}


def bench_factory(labels: list[str], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for label in labels:
        if not nr.runtime_available(label):
            continue
        config = nr.load_runtime_config({"runtime": label, "engine_dir": "/tmp/navcache-bench"})
        started = time.perf_counter()
        nr.build_inference_runtime(config)  # first call: imports the strategy's library
        first_ms = (time.perf_counter() - started) * 1000
        stats, _ = timed(functools.partial(nr.build_inference_runtime, config), repeat)
        rows.append({"label": label, "first_call_ms": first_ms, **stats.__dict__})
    return rows


def _export(name: str, directory: Path) -> tuple[Path, Path, int]:
    from navcache.demo.backbones import export_models, make_model

    width, depth, size, dim = MODELS[name]
    onnx_path, pt2_path = export_models(make_model(0, dim, width, depth), directory, name.replace("-", "_"), size=size)
    return onnx_path, pt2_path, size


def bench_onnxruntime(name: str, directory: Path, repeat: int) -> dict[str, Any]:
    import onnxruntime as ort

    onnx_path, _, size = _export(name, directory)
    profile = nr.InputProfile("image", (1, 3, size, size), (8, 3, size, size), (16, 3, size, size))
    runtime: Any = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": str(directory / "engines")})
    started = time.perf_counter()
    entry = runtime.compile_engine(onnx_path, nr.BuildConfig(input_shapes=(profile,)))
    compile_s = time.perf_counter() - started
    load, handle = timed(lambda: runtime.deserialize_engine(entry), repeat)
    gate, _ = timed(lambda: runtime.gate.admit(entry), repeat)  # sha256 of the artifact: the cost of trust
    # Bare baseline: what a user would do without navcache — open the source ONNX (ORT optimises it).
    bare_load, session = timed(lambda: ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]), repeat)
    x = {"image": np.random.default_rng(0).standard_normal((8, 3, size, size), dtype=np.float32)}
    infer, _ = timed(lambda: runtime.infer(handle, x), repeat)
    bare_infer, _ = timed(lambda: session.run(None, x), repeat)
    return {
        "strategy": "onnx_trt_ep (CPU EP)",
        "model": name,
        "compile_s": compile_s,
        "load": load.__dict__,
        "gate": gate.__dict__,
        "bare_session_load": bare_load.__dict__,
        "infer_b8": infer.__dict__,
        "bare_infer_b8": bare_infer.__dict__,
        "artifact_bytes": entry.path.stat().st_size,
    }


def bench_pytorch(name: str, directory: Path, repeat: int) -> dict[str, Any]:
    import torch

    _, pt2_path, size = _export(name, directory)
    profile = nr.InputProfile("image", (1, 3, size, size), (8, 3, size, size), (16, 3, size, size))
    runtime: Any = nr.build_inference_runtime(
        {
            "runtime": "pytorch_fp16",
            "engine_dir": str(directory / "engines"),
            "inductor_cache_dir": str(directory / "inductor"),
        }
    )
    started = time.perf_counter()
    entry = runtime.compile_engine(
        pt2_path, nr.BuildConfig(input_shapes=(profile,), builder_options=(("output_names", "descriptor"),))
    )
    compile_s = time.perf_counter() - started
    load, handle = timed(lambda: runtime.deserialize_engine(entry), repeat)
    gate, _ = timed(lambda: runtime.gate.admit(entry), repeat)
    eager = torch.export.load(str(pt2_path)).module()
    bare_load, _ = timed(lambda: torch.export.load(str(pt2_path)).module(), repeat)
    x_np = np.random.default_rng(0).standard_normal((8, 3, size, size), dtype=np.float32)
    infer, _ = timed(lambda: runtime.infer(handle, {"image": x_np}), repeat)
    x = torch.from_numpy(x_np)

    def run_eager() -> Any:
        with torch.inference_mode():
            return eager(x)

    bare_infer, _ = timed(run_eager, repeat)
    return {
        "strategy": f"pytorch_fp16 ({'eager fallback' if entry.eager_fallback else 'AOTInductor'}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'})",
        "model": name,
        "compile_s": compile_s,
        "prewarm_s": entry.prewarm_duration_s,
        "load": load.__dict__,
        "gate": gate.__dict__,
        "bare_session_load": bare_load.__dict__,
        "infer_b8": infer.__dict__,
        "bare_infer_b8": bare_infer.__dict__,
        "artifact_bytes": entry.path.stat().st_size,
    }


def run(quick: bool) -> Path:
    repeat = 20 if quick else 100
    factory = bench_factory(list(nr.RUNTIME_LABELS), 200 if quick else 2000)
    print_table(
        "runtime factory (build_inference_runtime)",
        ["label", "first call ms", "p50 ms", "p99 ms"],
        [[r["label"], r["first_call_ms"], r["p50_ms"], r["p99_ms"]] for r in factory],
    )
    models = ["tiny-cnn"] if quick else ["tiny-cnn", "medium-cnn"]
    engines = []
    with tempfile.TemporaryDirectory(prefix="navcache-bench-") as tmp:
        for model in models:
            engines.append(bench_onnxruntime(model, Path(tmp) / f"ort-{model}", repeat))
            if not quick and nr.runtime_available("pytorch_fp16"):
                engines.append(bench_pytorch(model, Path(tmp) / f"torch-{model}", max(5, repeat // 4)))
    rows = []
    for e in engines:
        load, bare, gate = Stats(**e["load"]), Stats(**e["bare_session_load"]), Stats(**e["gate"])
        infer, bare_infer = Stats(**e["infer_b8"]), Stats(**e["bare_infer_b8"])
        rows.append(
            [
                e["strategy"],
                e["model"],
                e["compile_s"],
                load.p50_ms,
                gate.p50_ms,
                bare.p50_ms,
                e["compile_s"] * 1000 / load.p50_ms,
                bare_infer.p50_ms / infer.p50_ms,
            ]
        )
    print_table(
        "engine load vs compile (p50; bare = the library opening the source model)",
        [
            "strategy",
            "model",
            "compile s",
            "load ms",
            "of which gate ms",
            "bare load ms",
            "compile/load",
            "infer speed vs bare",
        ],
        rows,
    )
    print(f"machine: {machine()}")
    return write_result("runtime", {"quick": quick, "factory": factory, "engines": engines})
