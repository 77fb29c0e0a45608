"""The onboard package works where the provisioning stack cannot even be imported."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import navcache_runtime as nr
from tests.conftest import TinyModel
from tests.support.isolation import run_json

BLOCKED = ("prefect", "faiss", "onnx", "navcache", "rasterio", "filelock", "torch")


def test_runtime_compiles_loads_and_refuses_tampering_without_the_provisioning_stack(
    tiny_model: TinyModel, tmp_path: Path
) -> None:
    engines = tmp_path / "engines"
    np.save(tmp_path / "x.npy", tiny_model.inputs(3)["image"])
    result = run_json(
        f"""
        import json, sys
        from pathlib import Path
        import numpy as np
        import navcache_runtime as nr
        rt = nr.build_inference_runtime({{"runtime": "onnx_trt_ep", "engine_dir": {str(engines)!r}}})
        entry = rt.compile_engine(Path({str(tiny_model.onnx)!r}), nr.BuildConfig(model_name="vpr"))
        handle = rt.deserialize_engine(nr.entry_from_artifact(entry.path))
        out = rt.infer(handle, {{"image": np.load({str(tmp_path / "x.npy")!r})}})["descriptor"]
        np.save({str(tmp_path / "y.npy")!r}, out)
        entry.path.write_bytes(entry.path.read_bytes()[:-1] + b"!")
        try:
            rt.deserialize_engine(entry)
            refused = None
        except nr.EngineHashMismatchError as exc:
            refused = type(exc).__name__
        blocked_loaded = sorted(m for m in {list(BLOCKED)!r} if m in sys.modules)
        print(json.dumps({{"refused": refused, "blocked_loaded": blocked_loaded}}))
    """,
        blocked=BLOCKED,
    )
    assert result == {"refused": "EngineHashMismatchError", "blocked_loaded": []}
    out = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(out, tiny_model.reference({"image": np.load(tmp_path / "x.npy")}), atol=1e-5)


def test_blocking_really_blocks() -> None:
    result = run_json(
        """
        import json
        try:
            import onnx
            ok = True
        except ModuleNotFoundError:
            ok = False
        print(json.dumps({"onnx_importable": ok}))
    """,
        blocked=("onnx",),
    )
    assert result == {"onnx_importable": False}
    assert nr.RUNTIME_LABELS  # the parent process is unaffected
