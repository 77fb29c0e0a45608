"""The onboard inference boundary (C7). Every strategy satisfies it; callers depend on nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .types import BuildConfig, EngineCacheEntry, EngineHandle, RuntimeLabel, ThermalState


@runtime_checkable
class InferenceRuntime(Protocol):
    def compile_engine(self, onnx_path: Path, build_config: BuildConfig) -> EngineCacheEntry:
        """Compile the source model into a hardware-tied artifact, written atomically with its sidecar."""
        ...

    def deserialize_engine(self, entry: EngineCacheEntry) -> EngineHandle:
        """Pass the engine gate, then load the artifact without re-optimising it."""
        ...

    def infer(self, handle: EngineHandle, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine on named inputs and return named outputs."""
        ...

    def release_engine(self, handle: EngineHandle) -> None:
        """Free the engine's resources; the handle cannot be used afterwards. Idempotent."""
        ...

    def thermal_state(self) -> ThermalState:
        """Latest temperatures and throttling flags; raises TelemetryUnavailableError without a source."""
        ...

    def current_runtime_label(self) -> RuntimeLabel:
        """The configured label: "tensorrt", "onnx_trt_ep" or "pytorch_fp16"."""
        ...
