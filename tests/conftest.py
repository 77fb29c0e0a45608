from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from navcache_runtime import BuildConfig, HostFields, InputProfile, detect_host_fields

# Keep compiled-kernel caches inside the test session, never in the user's home.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "navcache-test-inductor"))


@pytest.fixture(autouse=True)
def _device_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rollback protection is on by default onboard (state in /var/lib/navcache): each test gets its own
    device state instead, so tests never share (or need root for) a real device's state."""
    monkeypatch.setenv("NAVCACHE_STATE", str(tmp_path_factory.mktemp("device") / "state.json"))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class TinyModel:
    onnx: Path
    pt2: Path
    size: int
    descriptor_dim: int

    def inputs(self, batch: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"image": rng.standard_normal((batch, 3, self.size, self.size), dtype=np.float32)}

    def build_config(self, precision: str = "fp32", **kwargs: object) -> BuildConfig:
        profile = InputProfile(
            "image", (1, 3, self.size, self.size), (4, 3, self.size, self.size), (16, 3, self.size, self.size)
        )
        return BuildConfig(precision=precision, input_shapes=(profile,), **kwargs)  # type: ignore[arg-type]

    def reference(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.onnx), providers=["CPUExecutionProvider"])
        return session.run(None, inputs)[0]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A real CNN descriptor backbone, exported once per test session to ONNX and .pt2."""
    from tests.support.models import export_models, make_model

    directory = tmp_path_factory.mktemp("models")
    onnx_path, pt2_path = export_models(make_model(seed=0), directory, "tiny_vpr")
    return TinyModel(onnx=onnx_path, pt2=pt2_path, size=64, descriptor_dim=64)


@pytest.fixture
def model_copy(tiny_model: TinyModel, tmp_path: Path) -> TinyModel:
    """A private copy of the model files, safe to modify in a test."""
    src = tmp_path / "src"
    src.mkdir()
    return TinyModel(
        onnx=Path(shutil.copy(tiny_model.onnx, src)),
        pt2=Path(shutil.copy(tiny_model.pt2, src)),
        size=tiny_model.size,
        descriptor_dim=tiny_model.descriptor_dim,
    )


@pytest.fixture(scope="session")
def this_host() -> HostFields:
    return detect_host_fields()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect API for the session; results and cache keys in a temp dir, not ~/.prefect."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=120):
        yield storage


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory):
    """The demo's synthetic orthophoto (UTM, reprojected by provisioning), both backbones and a key pair."""
    from tests.support.sorties import make_assets

    return make_assets(tmp_path_factory.mktemp("assets"))
