"""Composition root: pick the strategy named by the config, importing it (and its library) lazily."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import RuntimeConfig, load_runtime_config
from .errors import RuntimeNotAvailableError
from .protocol import InferenceRuntime
from .thermal import ThermalMonitor
from .types import HostFields

# label -> (strategy module, class, required top-level module, pip extra that installs it)
STRATEGIES: dict[str, tuple[str, str, str, str]] = {
    "tensorrt": ("navcache_runtime.strategies.tensorrt", "TensorRTRuntime", "tensorrt", "tensorrt"),
    "onnx_trt_ep": ("navcache_runtime.strategies.onnxruntime", "OnnxRuntime", "onnxruntime", "ort"),
    "pytorch_fp16": ("navcache_runtime.strategies.pytorch", "PyTorchRuntime", "torch", "torch"),
}


def runtime_available(label: str) -> bool:
    """Whether the library behind ``label`` is installed (without importing it)."""
    return importlib.util.find_spec(STRATEGIES[label][2]) is not None


def build_inference_runtime(
    config: RuntimeConfig | Mapping[str, Any] | Path | str,
    *,
    host: HostFields | None = None,
    thermal: ThermalMonitor | None = None,
) -> InferenceRuntime:
    """Return the configured strategy. Raises RuntimeConfigError for a bad config and
    RuntimeNotAvailableError when the strategy's library is not installed on this host."""
    cfg = load_runtime_config(config)
    module_name, class_name, library, extra = STRATEGIES[cfg.runtime]
    if not runtime_available(cfg.runtime):
        raise RuntimeNotAvailableError(
            f"runtime {cfg.runtime!r} needs the {library!r} Python package, which is not installed here",
            hint=f"install it (pip install 'navcache[{extra}]') or configure another runtime",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # installed but broken (missing shared library, ABI mismatch)
        raise RuntimeNotAvailableError(
            f"runtime {cfg.runtime!r}: importing {library!r} failed: {exc}",
            hint="check the installation of that package and its native libraries",
        ) from exc
    runtime: InferenceRuntime = getattr(module, class_name)(cfg, host=host, thermal=thermal)
    return runtime
