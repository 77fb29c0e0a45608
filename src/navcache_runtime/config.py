"""Runtime configuration: which strategy, where engines live, telemetry rate. Validated when loaded."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import RuntimeConfigError
from .types import RUNTIME_LABELS, RuntimeLabel


@dataclass(frozen=True)
class RuntimeConfig:
    runtime: RuntimeLabel
    engine_dir: Path = Path("engines")
    device_id: int = 0
    thermal_poll_hz: float = 1.0  # background telemetry polling; 0 polls on demand only
    thermal_zones: tuple[str, ...] = ()  # sysfs zone types to watch ("CPU-therm", "gpu-thermal"); () = all
    thermal_sysfs_root: Path = Path("/sys/class/thermal")
    providers: tuple[str, ...] = ()  # ONNX Runtime EPs to try, in order; () = best available
    strict_providers: bool = False  # a silent ORT provider fallback becomes an error instead of a warning
    intra_op_threads: int = 0  # 0 = the library's default
    # ONNX Runtime's workers spin-wait between runs: the lowest latency when the engine has the cores to itself.
    # False lets them sleep, for a process whose other threads need those cores (the ground's decode threads).
    intra_op_spinning: bool = True
    prewarm_iterations: int = 2
    inductor_cache_dir: Path | None = None  # None = $TORCHINDUCTOR_CACHE_DIR or <engine_dir>/inductor-cache
    compile_failure_threshold: int = 3  # circuit breaker: failed compiles of one source before eager only

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIME_LABELS:
            raise RuntimeConfigError(
                f"unknown runtime {self.runtime!r}; valid values: {', '.join(RUNTIME_LABELS)}",
                hint="set runtime to one of the valid values",
            )
        object.__setattr__(self, "engine_dir", Path(self.engine_dir))
        object.__setattr__(self, "thermal_sysfs_root", Path(self.thermal_sysfs_root))
        if self.inductor_cache_dir is not None:
            object.__setattr__(self, "inductor_cache_dir", Path(self.inductor_cache_dir))
        object.__setattr__(self, "thermal_zones", tuple(self.thermal_zones))
        object.__setattr__(self, "providers", tuple(self.providers))
        if not isinstance(self.thermal_poll_hz, (int, float)) or not 0 <= self.thermal_poll_hz <= 100:
            raise RuntimeConfigError(f"thermal_poll_hz must be between 0 and 100, got {self.thermal_poll_hz!r}")
        for name in ("strict_providers", "intra_op_spinning"):
            if not isinstance(getattr(self, name), bool):
                raise RuntimeConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("device_id", "intra_op_threads", "prewarm_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RuntimeConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if (
            isinstance(self.compile_failure_threshold, bool)
            or not isinstance(self.compile_failure_threshold, int)
            or self.compile_failure_threshold < 1
        ):
            raise RuntimeConfigError(
                f"compile_failure_threshold must be a positive integer, got {self.compile_failure_threshold!r}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RuntimeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RuntimeConfigError(
                f"unknown runtime config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(known))}"
            )
        if "runtime" not in data:
            raise RuntimeConfigError(
                f"runtime config lacks 'runtime'; valid values: {', '.join(RUNTIME_LABELS)}",
                hint='add e.g. runtime = "onnx_trt_ep"',
            )
        try:
            return cls(**dict(data))
        except TypeError as exc:  # a list where a number belongs, etc.
            raise RuntimeConfigError(f"invalid runtime config: {exc}") from None


def load_runtime_config(source: Path | str | Mapping[str, Any] | RuntimeConfig) -> RuntimeConfig:
    """Load from a RuntimeConfig, a mapping, or a TOML file (top level or a ``[runtime]`` table)."""
    if isinstance(source, RuntimeConfig):
        return source
    if isinstance(source, Mapping):
        return RuntimeConfig.from_mapping(source)
    path = Path(source)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeConfigError(f"runtime config file {path} does not exist", path=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RuntimeConfigError(f"{path} is not valid TOML: {exc}", path=path) from None
    table = data.get("runtime")
    if isinstance(table, Mapping):
        data = dict(table)
        data["runtime"] = data.pop("label", data.get("runtime"))
    return RuntimeConfig.from_mapping(data)
