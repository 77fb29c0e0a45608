"""Descriptor batching: ``navcache.descriptors.describe_shard`` (decode + classify + hash + resize on decode
threads, normalise into the batch, engine, content-addressed shard files; as for every shipped source kind, the
in-memory source digests its bytes, so a cold shard is decoded once; a second row shows a source without raw
digests, scanned first and re-read for the engine) vs. bare ONNX Runtime loops with the same model, session
defaults and batch size, in the same run:

* **baseline**: the bare loop doing the same unavoidable work inline: each 256 px tile resized and normalised
  by the same :class:`~navcache_runtime.preprocessing.Preprocess` into a preallocated batch (its fastest plain
  form), then ``session.run``. Goal: navcache ≥ 0.8x its images/s (issue 17).
* **inference only**: the bare loop over batches preprocessed before the clock starts. It does less work than
  any pipeline can (the resize alone is ~half a tiny-CNN inference); its ratio is printed beside the goal's.

A last row runs navcache with ``[runtime] intra_op_threads = 1``: ORT then computes on the calling thread
and leaves the other cores to decoding, instead of two ORT threads spin-waiting between batches while the
decode threads want the same two cores. The bare loops keep ORT's defaults.

Two models: the demo VPR backbone (tiny CNN, 128², batch 16) and a ViT-S/14-sized encoder (384-d, 12
layers, 6 heads, 224², batch 8) written in plain torch and exported by this module (kept in a temp folder,
never in git; --quick skips it: export + inference take minutes on 2 cores)."""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from navcache.imagery import content_digest

from .common import interleaved, print_machine, print_table, ratio, write_result

GOAL = 0.8
BASELINE = "bare ORT loop + same preprocessing (baseline)"
INFERENCE_ONLY = "bare ORT loop, preprocessed in advance (inference only)"
ONE_THREAD = "navcache describe_shard, engine intra_op_threads = 1"
MODEL_CACHE = Path(tempfile.gettempdir()) / "navcache-bench-models"


def vit_small_onnx(directory: Path) -> Path:
    """A ViT-S/14-shaped encoder (patch 14, 224², 384-d, 12 blocks, 6 heads, MLP 1536) → L2-normalised CLS."""
    import torch
    from torch import nn

    path = directory / "vit_s14.onnx"
    if path.exists():
        return path

    class ViTS14(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 384, 14, stride=14)
            self.cls = nn.Parameter(torch.zeros(1, 1, 384))
            self.pos = nn.Parameter(torch.randn(1, 257, 384) * 0.02)
            layer = nn.TransformerEncoderLayer(
                384, 6, 1536, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            self.blocks = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(384)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.patch(image).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            x = self.norm(self.blocks(x))[:, 0]
            return nn.functional.normalize(x, dim=1)

    torch.manual_seed(0)
    model = ViTS14().eval()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "vit_s14.tmp.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 224, 224),),
        str(tmp),
        input_names=["image"],
        output_names=["descriptor"],
        dynamic_axes={"image": {0: "batch"}},
        dynamo=False,
    )
    tmp.replace(path)
    return path


@dataclass
class MemorySource:
    """An in-memory TileSource: no decode cost, so the comparison isolates batching overhead."""

    tiles: dict[Any, Any]
    tile_size: int = 256
    digests: bool = False  # True: digest the tile bytes like an encoded source (the memo / single-pass path)

    def read_tile(self, tile: Any) -> Any:
        return self.tiles.get(tile)

    def bounds_lonlat(self) -> tuple[float, float, float, float]:
        return (-180.0, -85.0, 180.0, 85.0)

    def describe(self) -> str:
        return "memory"

    def fingerprint(self) -> str:
        return "memory"

    def raw_identity(self) -> str:
        return "memory"

    def raw_digest(self, tile: Any) -> str | None:
        if not self.digests:
            return None  # a source that cannot digest its bytes: scanned first, re-read for the engine
        found = self.tiles.get(tile)
        # The digest an encoded source takes of its bytes, over the raw pixels (an upper bound on their size).
        return "none" if found is None else content_digest(np.ascontiguousarray(found.rgb).data)

    def raw_digests(self, tiles: Any) -> list[str] | None:
        digests = [self.raw_digest(t) for t in tiles]
        return None if None in digests else digests  # type: ignore[return-value]

    def reading(self) -> AbstractContextManager[None]:
        return nullcontext()

    def close(self) -> None:
        pass

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bench_model(
    name: str, onnx_path: Path, size: int, batch: int, n_images: int, repeat: int, tmp: Path
) -> dict[str, Any]:
    import onnxruntime as ort

    import navcache_runtime as nr
    from navcache.descriptors import DescriptorEngine, describe_shard, describing_config
    from navcache.tiles import ChunkGrid, plan_shards
    from navcache.types import Tile, TileId
    from navcache_runtime.preprocessing import Preprocess

    rng = np.random.default_rng(0)
    grid = ChunkGrid(18, 256)
    side = int(np.ceil(np.sqrt(n_images)))
    chunks = [TileId(18, 140000 + i % side, 90000 + i // side) for i in range(n_images)]
    source = MemorySource(
        {c: Tile(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), np.ones((256, 256), bool)) for c in chunks}
    )
    plans = plan_shards(chunks, 64)
    prep = Preprocess(size, size)

    profile = nr.InputProfile("image", (1, 3, size, size), (batch, 3, size, size), (max(16, batch), 3, size, size))

    def load_engine(**config: Any) -> DescriptorEngine:
        engine_dir = tmp / f"engines-{name}-{len(config)}"
        # As provisioning loads it (navcache.descriptor_job): ORT's threads sleep between batches.
        settings = nr.RuntimeConfig.from_mapping({"runtime": "onnx_trt_ep", "engine_dir": str(engine_dir), **config})
        runtime = nr.build_inference_runtime(describing_config(settings))
        entry = runtime.compile_engine(onnx_path, nr.BuildConfig(input_shapes=(profile,)))
        return DescriptorEngine(runtime, runtime.deserialize_engine(entry), "image", "descriptor", entry.sha256, batch)

    engine = load_engine()
    # [runtime] intra_op_threads = 1: ORT computes on the calling thread (no worker pool spin-waiting between
    # batches), which leaves the other cores to the decode threads.
    one_thread = load_engine(intra_op_threads=1)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    # The same in-memory batches the pipeline builds, preprocessed up front for the bare loop.
    images = np.stack([prep(source.tiles[c].rgb) for c in chunks])
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]

    def bare() -> None:
        for b in batches:
            session.run(None, {"image": b})

    def bare_with_prep() -> None:  # the bare loop doing the same preprocessing inline, into a reused batch
        buffer = np.empty(prep.input_shape(batch), np.float32)
        for i in range(0, len(chunks), batch):
            part = chunks[i : i + batch]
            for row, c in enumerate(part):
                prep(source.tiles[c].rgb, out=buffer[row])
            session.run(None, {"image": buffer[: len(part)]})

    runs = [0]

    digesting = MemorySource(source.tiles, digests=True)

    def pipeline(src: MemorySource, engine: DescriptorEngine = engine) -> None:
        runs[0] += 1
        out = tmp / f"shards-{name}-{runs[0]}"  # a fresh folder: every run computes, none reuses
        for plan in plans:
            result = describe_shard(plan, source=src, grid=grid, engine=engine, preprocessing=prep, out_dir=out)
            assert result.computed

    fns = {
        BASELINE: bare_with_prep,
        INFERENCE_ONLY: bare,
        "navcache describe_shard": lambda: pipeline(digesting),
        "navcache describe_shard, source without raw digests": lambda: pipeline(source),
        ONE_THREAD: lambda: pipeline(digesting, one_thread),
    }
    bare()  # warm-up: ORT allocates its arenas on the first runs
    pipeline(source)
    stats = interleaved(fns, repeat)
    for loaded in (engine, one_thread):
        loaded.runtime.release_engine(loaded.handle)
    rates = {k: n_images / (s.p50_ms / 1000) for k, s in stats.items()}
    base, inference_only = rates[BASELINE], rates[INFERENCE_ONLY]
    return {
        "model": name,
        "input": size,
        "batch": batch,
        "images": n_images,
        "repeat": repeat,
        "images_per_s": rates,
        "ratio_vs_bare": {k: ratio(v, base) for k, v in rates.items()},
        "ratio_vs_inference_only": {k: ratio(v, inference_only) for k, v in rates.items()},
    }


def run(quick: bool) -> Path:
    from navcache.demo import generate_demo_models

    info = print_machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="navcache-bench-desc-") as tmp_name:
        tmp = Path(tmp_name)
        demo = generate_demo_models(MODEL_CACHE / "demo")["tiny_vpr.onnx"]
        results.append(bench_model("demo tiny_vpr", demo, 128, 16, 128 if quick else 512, 2 if quick else 3, tmp))
        if not quick:
            results.append(bench_model("ViT-S/14-sized", vit_small_onnx(MODEL_CACHE), 224, 8, 32, 3, tmp))
    rows = []
    for r in results:
        for key, rate in r["images_per_s"].items():
            rows.append(
                [
                    r["model"],
                    r["batch"],
                    r["images"],
                    key,
                    rate,
                    r["ratio_vs_bare"][key],
                    r["ratio_vs_inference_only"][key],
                ]
            )
    print_table(
        "descriptor batching (images/s, median of interleaved runs)",
        ["model", "batch", "images", "path", "images/s", "ratio vs baseline", "vs inference only"],
        rows,
    )
    for r in results:
        got = r["ratio_vs_bare"]["navcache describe_shard"]
        only = r["ratio_vs_inference_only"]["navcache describe_shard"]
        verdict = "met" if got >= GOAL else "MISSED"
        print(
            f"{r['model']}: goal ≥ {GOAL}x the bare loop with the same preprocessing: {verdict} ({got:.2f}x; "
            f"{only:.2f}x the bare loop over batches preprocessed in advance)"
        )
    return write_result("descriptors", {"quick": quick, "results": results, "cores": info["cores"]})
