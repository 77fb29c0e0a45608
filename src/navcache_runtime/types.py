"""Values that cross the runtime boundary: frozen dataclasses, hashable, validated on construction."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Precision = Literal["fp32", "fp16", "int8"]
RuntimeLabel = Literal["tensorrt", "onnx_trt_ep", "pytorch_fp16"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
RUNTIME_LABELS: tuple[str, ...] = get_args(RuntimeLabel)

Shape = tuple[int, ...]
OptionValue = str | int | float | bool


def _as_shape(value: Iterable[int], what: str) -> Shape:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of integers, got {value!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"{what} must be a non-empty sequence of positive integers, got {value!r}")
    return shape


@dataclass(frozen=True)
class InputProfile:
    """The shape range one input accepts: TensorRT's optimization profile (min <= opt <= max per axis)."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("input profile needs a non-empty input name")
        lo = _as_shape(self.min, f"input {self.name!r} min shape")
        mid = _as_shape(self.opt, f"input {self.name!r} opt shape")
        hi = _as_shape(self.max, f"input {self.name!r} max shape")
        if not len(lo) == len(mid) == len(hi):
            raise ValueError(f"input {self.name!r}: min/opt/max shapes must have the same rank: {lo}, {mid}, {hi}")
        if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
            raise ValueError(f"input {self.name!r}: need min <= opt <= max on every axis: {lo}, {mid}, {hi}")
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "opt", mid)
        object.__setattr__(self, "max", hi)

    @classmethod
    def fixed(cls, name: str, shape: Iterable[int]) -> InputProfile:
        shape = tuple(shape)
        return cls(name, shape, shape, shape)

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, (a, c) in enumerate(zip(self.min, self.max, strict=True)) if a != c)


ProfileSpec = InputProfile | Shape | tuple[Shape, Shape, Shape] | Mapping[str, Iterable[int]]


def _as_profile(name: str, given: Any) -> InputProfile:
    if isinstance(given, InputProfile):
        if given.name != name:
            raise ValueError(f"input profile named {given.name!r} given for input {name!r}")
        return given
    if isinstance(given, Mapping):
        missing = {"min", "opt", "max"} - set(given)
        if missing:
            raise ValueError(f"input {name!r} profile lacks {sorted(missing)}; give min, opt and max shapes")
        return InputProfile(name, given["min"], given["opt"], given["max"])
    seq = tuple(given)
    if len(seq) == 3 and all(isinstance(s, (tuple, list)) for s in seq):
        return InputProfile(name, *seq)
    return InputProfile.fixed(name, seq)


def _calibration_identity(path: Path | None) -> str | None:
    """A regenerated INT8 table under the same name must change the engine's identity: hash its bytes."""
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return f"unreadable:{path.name}"  # the strategy reports the missing table when it builds


@dataclass(frozen=True)
class BuildConfig:
    """How to compile one model. ``input_shapes`` keeps the caller's input order (it is the call order)."""

    precision: Precision = "fp32"
    input_shapes: tuple[InputProfile, ...] = ()
    workspace_mib: int = 4096
    builder_options: tuple[tuple[str, OptionValue], ...] = ()
    model_name: str | None = None
    calibration_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        shapes: Any = self.input_shapes
        if isinstance(shapes, Mapping):
            profiles = tuple(_as_profile(str(k), v) for k, v in shapes.items())
        else:
            profiles = tuple(p if isinstance(p, InputProfile) else _as_profile(p[0], p[1]) for p in shapes)
        names = [p.name for p in profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate input names in the shape profile: {names}")
        object.__setattr__(self, "input_shapes", profiles)
        workspace = self.workspace_mib
        if isinstance(workspace, bool) or not isinstance(workspace, int) or workspace < 1:
            raise ValueError(f"workspace_mib must be a positive integer, got {self.workspace_mib!r}")
        options: Any = self.builder_options
        items = options.items() if isinstance(options, Mapping) else options
        normalized = tuple(sorted((str(k), v) for k, v in items))
        for key, value in normalized:
            if not isinstance(value, (str, int, float, bool)) or (
                isinstance(value, float) and not math.isfinite(value)
            ):
                raise ValueError(f"builder option {key!r} must be a string, integer, finite float or bool")
        object.__setattr__(self, "builder_options", normalized)
        if self.calibration_cache is not None:
            object.__setattr__(self, "calibration_cache", Path(self.calibration_cache))

    @property
    def profile(self) -> dict[str, InputProfile]:
        return {p.name: p for p in self.input_shapes}

    @property
    def options(self) -> dict[str, OptionValue]:
        return dict(self.builder_options)

    def digest(self) -> str:
        """sha256 over everything that changes the compiled artifact (not the model name)."""
        doc = {
            "precision": self.precision,
            "inputs": [[p.name, list(p.min), list(p.opt), list(p.max)] for p in self.input_shapes],
            "workspace_mib": self.workspace_mib,
            "options": [[k, v] for k, v in self.builder_options],
            "calibration": _calibration_identity(self.calibration_cache),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class HostFields:
    """The hardware/software fields an artifact is tied to. ``None`` means "not pinned"."""

    sm: str | None = None  # CUDA compute capability without the dot, e.g. "87"
    jetpack: str | None = None  # JetPack release on Jetson, e.g. "6.2"
    trt: str | None = None  # TensorRT version
    ort: str | None = None  # ONNX Runtime version
    torch: str | None = None  # PyTorch version (no local "+cpu" part)
    cpu_isa: str | None = None  # widest SIMD ISA of the CPU, e.g. "avx2", "avx512", "neon"
    device: str | None = None  # device model slug, e.g. "nvidia-h100-80gb-hbm3"

    def pinned(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class EngineCacheEntry:
    """A compiled artifact on disk and what it is tied to.

    ``compile_duration_s`` is ``None`` when the entry describes an existing artifact (reused, not built).
    ``source_digest`` is the short content hash of the source model that is embedded in the filename.
    """

    path: Path
    sha256: str
    model_name: str
    precision: Precision
    runtime_label: RuntimeLabel
    host: HostFields
    source_digest: str | None = None
    config_digest: str | None = None
    compile_duration_s: float | None = None
    prewarm_duration_s: float | None = None
    eager_fallback: bool = False
    providers: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class ZoneReading:
    """One thermal sensor: ``name`` is the zone type (sysfs) or the GPU name (NVML)."""

    name: str
    temp_c: float
    throttle_at_c: float | None = None


@dataclass(frozen=True)
class ThermalState:
    """A snapshot of the host's temperatures and throttling, as last polled."""

    zones: tuple[ZoneReading, ...]
    throttled: bool
    throttle_reasons: tuple[str, ...] = ()
    source: str = ""
    timestamp: float = 0.0  # time.time() of the reading
    age_s: float = 0.0  # how old the reading was when handed out

    @property
    def max_temp_c(self) -> float | None:
        return max((z.temp_c for z in self.zones), default=None)


@dataclass(eq=False)
class EngineHandle:
    """Opaque token for a loaded engine. Strategies subclass it; callers only pass it back."""

    entry: EngineCacheEntry
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    released: bool = field(default=False, init=False)
