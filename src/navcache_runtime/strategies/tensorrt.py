"""Native TensorRT strategy (``tensorrt``): ONNX -> serialized TensorRT engine (``.engine``) -> inference.

Written against the TensorRT 10 Python API (``import tensorrt``). It could NOT be run against real TensorRT on
the development machines: only the lean runtime and the Python bindings install there, the builder libraries
do not, and there is no GPU. Everything above the ``tensorrt`` module (naming, gate, option handling, error
rewrapping, buffer handling) is tested with a fake of that module only (``tests/fakes/tensorrt.py``); check it
on a Jetson or a dGPU with TensorRT before relying on it.

What it does:
- ``compile_engine``: parse the ONNX with ``trt.OnnxParser``, configure workspace, precision (fp16 flag,
  int8 with a calibrator that only replays a provisioned calibration cache), one optimization profile from
  ``BuildConfig.input_shapes`` and a few builder options; reuse and update a timing cache kept next to the
  engines (``timing__sm{SM}_trt{TRT}.cache``); write the plan atomically with its ``.sha256`` sidecar under a
  name pinned to the GPU SM, JetPack, TensorRT version and device model.
- ``deserialize_engine``: the engine gate first, then ``trt.Runtime.deserialize_cuda_engine`` of the very
  bytes the gate read and hashed (the file is not read again).
- ``infer``: ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``. Device buffers come from a
  small :class:`DeviceMemory` seam; the default implementation uses torch CUDA tensors (imported lazily).

Exceptions raised by the bindings (pybind11 turns C++ errors into RuntimeError/TypeError/ValueError/...)
are rewrapped into the navcache_runtime error family; anything else (KeyboardInterrupt, bugs) propagates.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tensorrt as trt

from ..config import RuntimeConfig
from ..errors import (
    CalibrationCacheError,
    EngineBuildError,
    EngineDeserializeError,
    InferenceError,
    InferenceRuntimeError,
    OutOfMemoryError,
    RuntimeNotAvailableError,
)
from ..integrity import atomic_write_bytes, write_artifact
from ..thermal import ThermalMonitor
from ..types import BuildConfig, EngineCacheEntry, EngineHandle, HostFields, OptionValue, Shape
from ._base import RuntimeBase

log = logging.getLogger(__name__)

#: Exception types the TensorRT bindings raise (pybind11 maps C++ exceptions onto these).
TRT_ERRORS: tuple[type[Exception], ...] = (RuntimeError, TypeError, ValueError, IndexError, MemoryError)
_CACHE_SAVE_ERRORS: tuple[type[Exception], ...] = (OSError, *TRT_ERRORS)

#: Builder options accepted in ``BuildConfig.builder_options``: name -> (type, what it does).
SUPPORTED_OPTIONS: dict[str, tuple[type, str]] = {
    "builder_optimization_level": (int, "0-5, TensorRT's default is 3; higher searches longer for faster kernels"),
    "tf32": (bool, "allow TF32 for fp32 layers (TensorRT's default: on)"),
    "dla_core": (int, "run on this DLA core (Jetson), falling back to the GPU for unsupported layers"),
    "sparse_weights": (bool, "allow structured-sparsity kernels"),
    "max_aux_streams": (int, "auxiliary CUDA streams the engine may use (0 disables multi-stream)"),
}

_ERROR_SEVERITIES = frozenset({trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR})
_LOG_LEVELS: dict[Any, int] = {
    trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
    trt.ILogger.Severity.ERROR: logging.ERROR,
    trt.ILogger.Severity.WARNING: logging.WARNING,
    trt.ILogger.Severity.INFO: logging.DEBUG,  # TensorRT's INFO is a build diary: too chatty for INFO
    trt.ILogger.Severity.VERBOSE: logging.DEBUG - 5,
}
_MAX_REPORTED = 8  # TensorRT messages quoted in one exception


# -- logging -----------------------------------------------------------------------------------------------


class _TrtLogger(trt.ILogger):
    """Forwards TensorRT's messages to ``logging`` and collects its errors for the exception text.

    TensorRT keeps the first logger it is given for process-wide messages, so one instance is shared by
    every builder and runtime; a :meth:`capture` block receives every error logged while it is open.
    """

    def __init__(self) -> None:
        trt.ILogger.__init__(self)
        self._lock = threading.Lock()
        self._captures: list[list[str]] = []

    def log(self, severity: Any, msg: str) -> None:
        try:
            if severity in _ERROR_SEVERITIES:
                with self._lock:
                    for sink in self._captures:
                        sink.append(str(msg))
            level = _LOG_LEVELS.get(severity, logging.DEBUG)
            if log.isEnabledFor(level):
                log.log(level, "TensorRT: %s", msg)
        except Exception:  # called from C++: an exception here must never unwind into TensorRT
            pass

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        sink: list[str] = []
        with self._lock:
            self._captures.append(sink)
        try:
            yield sink
        finally:
            with self._lock:
                self._captures.remove(sink)


_LOGGER: _TrtLogger | None = None
_LOGGER_LOCK = threading.Lock()


def trt_logger() -> _TrtLogger:
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = _TrtLogger()
        return _LOGGER


# -- error rewrapping --------------------------------------------------------------------------------------


def _is_oom(text: str) -> bool:
    text = text.lower()
    return any(m in text for m in ("out of memory", "outofmemory", "bad_alloc", "cudaerrormemoryallocation"))


def _reported(errors: Sequence[str]) -> str:
    unique = list(dict.fromkeys(e.strip() for e in errors if e.strip()))
    text = "; ".join(unique[-_MAX_REPORTED:])
    if len(unique) > _MAX_REPORTED:
        text = f"({len(unique) - _MAX_REPORTED} earlier messages omitted) " + text
    return text


def _failure(
    error: type[InferenceRuntimeError],
    message: str,
    errors: Sequence[str],
    *,
    hint: str | None = None,
    path: Path | None = None,
) -> InferenceRuntimeError:
    """An error of type ``error`` quoting TensorRT's logged errors; OutOfMemoryError when they say so."""
    reported = _reported(errors)
    if reported:
        message = f"{message}; TensorRT reported: {reported}"
    if any(_is_oom(e) for e in errors):
        return OutOfMemoryError(
            message, path=path, hint="free GPU memory (other engines or processes), or lower workspace_mib / the batch"
        )
    return error(message, hint=hint, path=path)


@contextlib.contextmanager
def _trt_call(
    error: type[InferenceRuntimeError],
    what: str,
    *,
    hint: str | None = None,
    path: Path | None = None,
) -> Iterator[list[str]]:
    """Run TensorRT calls: yields the list its logged errors go to; rewraps the bindings' exceptions."""
    with trt_logger().capture() as errors:
        try:
            yield errors
        except InferenceRuntimeError:
            raise
        except TRT_ERRORS as exc:
            message = f"{what} failed: {type(exc).__name__}: {exc}"
            if isinstance(exc, MemoryError) or _is_oom(str(exc)):
                reported = _reported(errors)
                raise OutOfMemoryError(
                    message + (f"; TensorRT reported: {reported}" if reported else ""),
                    path=path,
                    hint="free GPU memory (other engines or processes), or lower workspace_mib / the batch",
                ) from exc
            raise _failure(error, message, errors, hint=hint, path=path) from exc


def _trt_major() -> int:
    match = re.match(r"(\d+)", str(getattr(trt, "__version__", "10")))
    return int(match.group(1)) if match else 10


def _network_flags() -> int:
    if _trt_major() < 10:
        # TensorRT 8 defaults to implicit batch, which its ONNX parser refuses; 10 is explicit-batch only.
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join("?" if d < 0 else str(d) for d in shape)


def _version_prefix(pinned: str, actual: str) -> bool:
    return actual.split(".")[: len(pinned.split("."))] == pinned.split(".")


# -- device memory seam ------------------------------------------------------------------------------------


@runtime_checkable
class DeviceBuffer(Protocol):
    """A device allocation; ``ptr`` is the address handed to ``set_tensor_address``."""

    @property
    def ptr(self) -> int: ...


@runtime_checkable
class DeviceMemory(Protocol):
    """Where an engine's input/output buffers live. Tests pass a host-memory implementation."""

    def activate(self) -> None:
        """Make this memory's device current (TensorRT builds and loads on the current CUDA device)."""
        ...

    def to_device(self, array: np.ndarray) -> DeviceBuffer: ...

    def empty(self, shape: Shape, dtype: np.dtype[Any]) -> DeviceBuffer: ...

    def to_host(self, buffer: DeviceBuffer) -> np.ndarray: ...

    def stream(self) -> int:
        """The CUDA stream handle ``execute_async_v3`` enqueues on (copies use the same stream)."""
        ...

    def synchronize(self) -> None: ...


@dataclass(frozen=True)
class _TorchBuffer:
    tensor: Any

    @property
    def ptr(self) -> int:
        return int(self.tensor.data_ptr())


class TorchCudaMemory:
    """Device buffers as torch CUDA tensors on one dedicated stream (torch is imported here, lazily)."""

    def __init__(self, device_id: int = 0) -> None:
        try:
            import torch
        except ImportError as exc:
            raise RuntimeNotAvailableError(
                f"the tensorrt runtime needs torch with CUDA for device buffers, and torch is not importable: {exc}",
                hint="install a CUDA build of torch (pip install 'navcache[torch]') next to tensorrt",
            ) from exc
        if not torch.cuda.is_available():
            raise RuntimeNotAvailableError(
                f"the tensorrt runtime needs torch with CUDA for device buffers, but torch {torch.__version__} "
                "sees no CUDA device",
                hint="install a CUDA build of torch and check that the GPU is visible (nvidia-smi / tegrastats)",
            )
        if device_id >= torch.cuda.device_count():
            raise RuntimeNotAvailableError(
                f"device_id {device_id} is configured but torch sees {torch.cuda.device_count()} CUDA device(s)",
                hint="set device_id in the runtime config to an existing GPU",
            )
        self._torch = torch
        self._device = torch.device("cuda", device_id)
        self._stream = torch.cuda.Stream(device=self._device)

    def activate(self) -> None:
        self._torch.cuda.set_device(self._device)

    def _dtype(self, dtype: np.dtype[Any]) -> Any:
        return self._torch.from_numpy(np.empty(0, dtype=dtype)).dtype

    def to_device(self, array: np.ndarray) -> DeviceBuffer:
        with self._torch.cuda.stream(self._stream):
            tensor = self._torch.from_numpy(np.ascontiguousarray(array)).to(self._device)
        return _TorchBuffer(tensor)

    def empty(self, shape: Shape, dtype: np.dtype[Any]) -> DeviceBuffer:
        with self._torch.cuda.stream(self._stream):  # allocate on the stream that will use the block
            tensor = self._torch.empty(tuple(shape), dtype=self._dtype(dtype), device=self._device)
        return _TorchBuffer(tensor)

    def to_host(self, buffer: DeviceBuffer) -> np.ndarray:
        self._stream.synchronize()
        tensor = buffer.tensor if isinstance(buffer, _TorchBuffer) else None
        if tensor is None:
            raise InferenceError(f"{buffer!r} was not allocated by TorchCudaMemory")
        with self._torch.cuda.stream(self._stream):
            host: np.ndarray = tensor.cpu().numpy()
        return host

    def stream(self) -> int:
        return int(self._stream.cuda_stream)

    def synchronize(self) -> None:
        self._stream.synchronize()


# -- int8 calibration --------------------------------------------------------------------------------------


class _CacheOnlyCalibrator(trt.IInt8EntropyCalibrator2):
    """Replays a provisioned calibration cache; never calibrates (no data onboard) and never overwrites it."""

    def __init__(self, cache: bytes) -> None:
        trt.IInt8EntropyCalibrator2.__init__(self)
        self._cache = cache

    def get_batch_size(self) -> int:
        return 1

    def get_batch(self, names: list[str]) -> None:
        return None  # "no more batches": TensorRT must take every scale from the cache

    def read_calibration_cache(self) -> bytes:
        return self._cache

    def write_calibration_cache(self, cache: Any) -> None:
        return None


# -- handle ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TensorRTEngineHandle(EngineHandle):
    engine: Any = field(default=None, repr=False)
    context: Any = field(default=None, repr=False)
    runtime: Any = field(default=None, repr=False)  # kept alive: a TensorRT runtime must outlive its engines
    input_dtypes: dict[str, np.dtype[Any]] = field(default_factory=dict)
    output_dtypes: dict[str, np.dtype[Any]] = field(default_factory=dict)
    input_shapes: dict[str, Shape] = field(default_factory=dict)  # engine shapes, -1 for dynamic axes
    profile: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)  # profile 0, dynamic inputs
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # a context runs one call at a time


# -- the strategy ------------------------------------------------------------------------------------------


class TensorRTRuntime(RuntimeBase):
    label = "tensorrt"

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        host: HostFields | None = None,
        thermal: ThermalMonitor | None = None,
        memory: DeviceMemory | None = None,
    ) -> None:
        super().__init__(config, host=host, thermal=thermal)
        self._memory = memory  # None: TorchCudaMemory, created on first use (construction touches no CUDA)
        self._runtime: Any = None
        self._lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------------------------------
    def device_memory(self) -> DeviceMemory:
        with self._lock:
            if self._memory is None:
                self._memory = TorchCudaMemory(self.config.device_id)
            return self._memory

    def _select_device(self) -> None:
        # Device 0 is CUDA's default; selecting another needs a CUDA API, which the memory seam provides.
        if self.config.device_id != 0:
            self.device_memory().activate()

    def planned_host_fields(self) -> HostFields:
        return self.pinned_host()

    def pinned_host(self) -> HostFields:
        host = self.host
        if host.sm is None or host.trt is None:
            missing = [what for what, value in (("a CUDA GPU", host.sm), ("TensorRT", host.trt)) if value is None]
            raise RuntimeNotAvailableError(
                f"the tensorrt runtime needs a CUDA GPU and TensorRT; this host has no {' and no '.join(missing)}",
                hint="compile TensorRT engines on the airframe's GPU (Jetson) or configure runtime onnx_trt_ep",
            )
        return HostFields(sm=host.sm, jetpack=host.jetpack, trt=host.trt, device=host.device)

    def timing_cache_path(self) -> Path:
        pinned = self.pinned_host()
        return self.config.engine_dir / f"timing__sm{pinned.sm}_trt{pinned.trt}.cache"

    @staticmethod
    def _check_options(build_config: BuildConfig, model: str) -> dict[str, OptionValue]:
        options = build_config.options
        unknown = sorted(set(options) - set(SUPPORTED_OPTIONS))
        if unknown:
            supported = "; ".join(f"{k} ({t.__name__}: {doc})" for k, (t, doc) in SUPPORTED_OPTIONS.items())
            raise EngineBuildError(
                f"{model}: unknown TensorRT builder option(s) {', '.join(map(repr, unknown))}; supported: {supported}",
                hint="remove or rename them in builder_options",
            )
        for key, value in options.items():
            kind = SUPPORTED_OPTIONS[key][0]
            # bool is an int in Python; an int option given True/False is a config mistake.
            ok = isinstance(value, bool) if kind is bool else isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                raise EngineBuildError(
                    f"{model}: builder option {key!r} must be {kind.__name__}, got {value!r}",
                    hint=SUPPORTED_OPTIONS[key][1],
                )
        level = options.get("builder_optimization_level")
        if level is not None and not 0 <= int(level) <= 5:
            raise EngineBuildError(
                f"{model}: builder_optimization_level must be 0-5, got {level}",
                hint="3 is TensorRT's default; 5 builds longest",
            )
        for key in ("dla_core", "max_aux_streams"):
            if key in options and int(options[key]) < 0:
                raise EngineBuildError(f"{model}: builder option {key!r} must be >= 0, got {options[key]}")
        if "dla_core" in options and build_config.precision == "fp32":
            raise EngineBuildError(
                f"{model}: dla_core needs precision fp16 or int8 (DLA has no fp32)",
                hint="set precision to fp16, or remove dla_core",
            )
        return options

    @staticmethod
    def _read_calibration(build_config: BuildConfig, model: str) -> bytes:
        path = build_config.calibration_cache
        hint = (
            "point calibration_cache at the INT8 calibration table made for this model on the ground "
            "(onboard builds replay it; they cannot calibrate), or build fp16"
        )
        if path is None:
            raise CalibrationCacheError(f"{model}: int8 needs a calibration cache, none is configured", hint=hint)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CalibrationCacheError(
                f"{model}: calibration cache {path} does not exist", hint=hint, path=path
            ) from None
        except OSError as exc:
            raise CalibrationCacheError(
                f"{model}: calibration cache {path} is unreadable: {exc}", hint=hint, path=path
            ) from exc
        if not data.strip():
            raise CalibrationCacheError(f"{model}: calibration cache {path} is empty", hint=hint, path=path)
        return data

    @staticmethod
    def _read_model(onnx_path: Path, digest: str, model: str) -> bytes:
        try:
            data = onnx_path.read_bytes()
        except OSError as exc:
            raise EngineBuildError(f"{model}: cannot read {onnx_path}: {exc}", path=onnx_path) from exc
        if hashlib.sha256(data).hexdigest() != digest:  # the name must describe the bytes that were built
            raise EngineBuildError(
                f"{model}: {onnx_path} changed while it was being read",
                path=onnx_path,
                hint="do not modify models while engines are being compiled; retry",
            )
        return data

    @staticmethod
    def _parser_errors(parser: Any) -> list[str]:
        out: list[str] = []
        for i in range(int(parser.num_errors)):
            err = parser.get_error(i)
            text = str(err.desc())
            where = [
                str(call())
                for attr in ("node_name", "node_operator")
                if callable(call := getattr(err, attr, None)) and str(call())
            ]
            out.append(f"{text} (node {' '.join(where)})" if where else text)
        return out

    def _apply_precision(
        self,
        builder: Any,
        config: Any,
        build_config: BuildConfig,
        calibration: bytes | None,
        model: str,
        notes: list[str],
    ) -> Any:
        """Returns the calibrator (it must stay alive until the build is done)."""
        if build_config.precision == "fp16":
            if not getattr(builder, "platform_has_fast_fp16", True):
                notes.append("fp16 requested but this GPU has no fast fp16: expect fp32-like speed")
                log.warning("%s: %s", model, notes[-1])
            config.set_flag(trt.BuilderFlag.FP16)
        elif build_config.precision == "int8":
            if not getattr(builder, "platform_has_fast_int8", True):
                notes.append("int8 requested but this GPU has no fast int8: expect no speed-up")
                log.warning("%s: %s", model, notes[-1])
            config.set_flag(trt.BuilderFlag.INT8)
            calibrator = _CacheOnlyCalibrator(calibration or b"")
            config.int8_calibrator = calibrator  # deprecated since TensorRT 10.1 (explicit Q/DQ), still honoured
            return calibrator
        return None

    def _apply_profile(self, builder: Any, network: Any, config: Any, build_config: BuildConfig, model: str) -> Any:
        inputs = {
            t.name: tuple(int(d) for d in t.shape)
            for t in (network.get_input(i) for i in range(int(network.num_inputs)))
        }
        wanted = build_config.profile
        unknown = [name for name in wanted if name not in inputs]
        if unknown:
            raise EngineBuildError(
                f"{model}: input_shapes names {unknown}, which the model does not have; its inputs are "
                + ", ".join(f"{n} [{_shape_text(s)}]" for n, s in inputs.items()),
                hint="name the model's inputs in input_shapes",
            )
        uncovered = [n for n, s in inputs.items() if any(d < 0 for d in s) and n not in wanted]
        if uncovered:
            raise EngineBuildError(
                f"{model}: input(s) {', '.join(f'{n} [{_shape_text(inputs[n])}]' for n in uncovered)} have dynamic "
                "dimensions but no shape range in input_shapes",
                hint="add min/opt/max shapes for them to input_shapes (TensorRT's optimization profile)",
            )
        for name, spec in wanted.items():
            shape = inputs[name]
            if len(spec.min) != len(shape):
                raise EngineBuildError(
                    f"{model}: input {name} has rank {len(shape)} [{_shape_text(shape)}] but input_shapes gives "
                    f"rank {len(spec.min)} {list(spec.min)}",
                    hint="fix input_shapes",
                )
            fixed_clash = [i for i, d in enumerate(shape) if d >= 0 and not spec.min[i] == spec.max[i] == d]
            if fixed_clash:
                raise EngineBuildError(
                    f"{model}: input {name} is [{_shape_text(shape)}] but input_shapes gives min {list(spec.min)} "
                    f"max {list(spec.max)} (fixed axes {fixed_clash} differ)",
                    hint="fix input_shapes",
                )
        if not wanted:
            return None  # a static network needs no profile
        profile = builder.create_optimization_profile()
        for spec in build_config.input_shapes:
            profile.set_shape(spec.name, spec.min, spec.opt, spec.max)
        if int(config.add_optimization_profile(profile)) < 0:
            raise EngineBuildError(
                f"{model}: TensorRT rejected the optimization profile {wanted}",
                hint="check input_shapes against the model's inputs",
            )
        return profile

    def _apply_options(self, builder: Any, config: Any, options: Mapping[str, OptionValue], model: str) -> None:
        if "builder_optimization_level" in options:
            config.builder_optimization_level = int(options["builder_optimization_level"])
        if "tf32" in options:
            (config.set_flag if options["tf32"] else config.clear_flag)(trt.BuilderFlag.TF32)
        if options.get("sparse_weights"):
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        if "max_aux_streams" in options:
            config.max_aux_streams = int(options["max_aux_streams"])
        if "dla_core" in options:
            core, available = int(options["dla_core"]), int(getattr(builder, "num_DLA_cores", 0))
            if core >= available:
                raise EngineBuildError(
                    f"{model}: dla_core {core} requested but this device has {available} DLA core(s)",
                    hint="use a DLA core that exists (Jetson AGX Orin has 2) or remove dla_core",
                )
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU

    def _attach_timing_cache(self, config: Any, path: Path) -> None:
        data = b""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot read TensorRT timing cache %s (%s); building without it", path, exc)
        cache = None
        if data:
            try:
                cache = config.create_timing_cache(data)
            except TRT_ERRORS as exc:
                log.debug("timing cache %s: %s", path, exc)
            if cache is None:
                log.warning("TensorRT timing cache %s is corrupt; starting a fresh one (it will be replaced)", path)
            elif not config.set_timing_cache(cache, False):  # ignore_mismatch=False: never reuse another GPU's
                log.warning("TensorRT timing cache %s was made for another GPU or TensorRT; starting a fresh one", path)
                cache = None
            else:
                log.debug("reusing TensorRT timing cache %s (%d bytes)", path, len(data))
        if cache is None:
            config.set_timing_cache(config.create_timing_cache(b""), False)

    @staticmethod
    def _save_timing_cache(config: Any, path: Path) -> None:
        try:
            cache = config.get_timing_cache()
            if cache is None:
                return
            atomic_write_bytes(path, bytes(cache.serialize()))
        except _CACHE_SAVE_ERRORS as exc:  # the engine is fine; only the next build gets slower
            log.warning("could not save TensorRT timing cache %s: %s", path, exc)

    # -- Protocol ----------------------------------------------------------------------------------------
    def compile_engine(self, onnx_path: Path, build_config: BuildConfig) -> EngineCacheEntry:
        started = time.perf_counter()
        onnx_path = Path(onnx_path)
        model = self.model_name(onnx_path, build_config)
        pinned = self.pinned_host()
        trt_version = str(getattr(trt, "__version__", ""))
        if pinned.trt and trt_version and not _version_prefix(pinned.trt, trt_version):
            log.warning(
                "host fields say TensorRT %s but the imported tensorrt is %s; the engine is named for %s",
                pinned.trt,
                trt_version,
                pinned.trt,
            )
        # Cheap checks first: nothing touches the GPU until the inputs are known to be usable.
        options = self._check_options(build_config, model)
        calibration = self._read_calibration(build_config, model) if build_config.precision == "int8" else None
        digest = self.source_digest(onnx_path)
        name = self.artifact_name(onnx_path, build_config, pinned=pinned, source_digest=digest)
        final = self.artifact_path(name)
        onnx_bytes = self._read_model(onnx_path, digest, model)
        timing_path = self.timing_cache_path()
        notes: list[str] = []
        self._select_device()

        what = f"building the TensorRT engine for {model} ({onnx_path})"
        hint = "check the model's operators against TensorRT's ONNX support, or configure runtime onnx_trt_ep"
        with _trt_call(EngineBuildError, what, hint=hint, path=onnx_path) as errors:
            try:
                builder = trt.Builder(trt_logger())
            except TypeError as exc:  # the binding's factory returns nullptr without a usable GPU
                raise EngineBuildError(
                    f"{model}: cannot create a TensorRT builder ({exc})",
                    hint="check that a CUDA GPU is visible and the driver matches TensorRT",
                ) from exc
            network = builder.create_network(_network_flags())
            parser = trt.OnnxParser(network, trt_logger())
            if not parser.parse(onnx_bytes, path=str(onnx_path)):
                problems = self._parser_errors(parser) or list(errors) or ["no detail given"]
                raise EngineBuildError(
                    f"TensorRT could not parse {model} ({onnx_path}): " + "; ".join(problems[:_MAX_REPORTED]),
                    hint="re-export the ONNX (opset 17+, static ranks), or use runtime onnx_trt_ep for this model",
                    path=onnx_path,
                )
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build_config.workspace_mib << 20)
            calibrator = self._apply_precision(builder, config, build_config, calibration, model, notes)
            profile = self._apply_profile(builder, network, config, build_config, model)
            if calibrator is not None and profile is not None and hasattr(config, "set_calibration_profile"):
                config.set_calibration_profile(profile)  # shapes the calibration cache was made with
            self._apply_options(builder, config, options, model)
            self._attach_timing_cache(config, timing_path)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                if calibrator is not None and any("calibrat" in e.lower() for e in errors):
                    raise _failure(
                        CalibrationCacheError,
                        f"{model}: the int8 build rejected calibration cache {build_config.calibration_cache}",
                        errors,
                        path=build_config.calibration_cache,
                        hint="regenerate the calibration cache for this model and TensorRT version",
                    )
                raise _failure(
                    EngineBuildError,
                    f"TensorRT could not build an engine for {model} ({onnx_path})",
                    errors,
                    hint=hint,
                    path=onnx_path,
                )
            plan = bytes(serialized)
            del serialized
        self._save_timing_cache(config, timing_path)
        try:
            sha256 = write_artifact(final, plan)
        except OSError as exc:
            raise EngineBuildError(
                f"{model}: cannot write engine {final}: {exc}",
                path=final,
                hint="check free space and permissions of engine_dir",
            ) from exc
        duration = time.perf_counter() - started
        log.info("built TensorRT engine %s in %.1f s (%d bytes)", final.name, duration, len(plan))
        return self.built_entry(final, sha256, name, duration, notes=tuple(notes))

    def _trt_runtime(self) -> Any:
        with self._lock:
            if self._runtime is None:
                try:
                    self._runtime = trt.Runtime(trt_logger())
                except TypeError as exc:  # nullptr from the factory: no usable GPU
                    raise EngineDeserializeError(
                        f"cannot create a TensorRT runtime ({exc})",
                        hint="check that a CUDA GPU is visible and the driver matches TensorRT",
                    ) from exc
            return self._runtime

    def deserialize_engine(self, entry: EngineCacheEntry) -> TensorRTEngineHandle:
        # The gate reads the plan once and returns the bytes it hashed: those, not the file, are deserialised.
        verified = self.gate.admit_verified(entry)
        entry, path, data = verified.entry, verified.entry.path, verified.data
        verified.discard()
        self._select_device()
        hint = "rebuild it on this host with compile_engine (engines are tied to the GPU and TensorRT version)"
        with _trt_call(EngineDeserializeError, f"loading {path.name}", hint=hint, path=path) as errors:
            runtime = self._trt_runtime()
            engine = runtime.deserialize_cuda_engine(data)
            del data
            if engine is None:
                raise _failure(
                    EngineDeserializeError, f"TensorRT could not deserialize {path.name}", errors, hint=hint, path=path
                )
            context = engine.create_execution_context()
            if context is None:  # TensorRT returns null when it cannot allocate the activation memory
                raise _failure(
                    EngineDeserializeError,
                    f"TensorRT could not create an execution context for {path.name}",
                    errors,
                    path=path,
                    hint="free GPU memory and retry",
                )
            handle = TensorRTEngineHandle(entry=entry, engine=engine, context=context, runtime=runtime)
            inputs: list[str] = []
            outputs: list[str] = []
            for i in range(int(engine.num_io_tensors)):
                name = str(engine.get_tensor_name(i))
                trt_dtype = engine.get_tensor_dtype(name)
                try:
                    dtype = np.dtype(trt.nptype(trt_dtype))
                except TypeError as exc:
                    raise EngineDeserializeError(
                        f"{path.name}: tensor {name} has type {trt_dtype}, which numpy cannot hold",
                        path=path,
                        hint="export the model with float32/float16/int I/O",
                    ) from exc
                if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    inputs.append(name)
                    handle.input_dtypes[name] = dtype
                    shape = tuple(int(d) for d in engine.get_tensor_shape(name))
                    handle.input_shapes[name] = shape
                    if any(d < 0 for d in shape):
                        lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
                        handle.profile[name] = (tuple(lo), tuple(opt), tuple(hi))
                else:
                    outputs.append(name)
                    handle.output_dtypes[name] = dtype
            handle.input_names, handle.output_names = tuple(inputs), tuple(outputs)
        log.debug("loaded TensorRT engine %s: inputs %s, outputs %s", path.name, inputs, outputs)
        return handle

    def _prepare_inputs(self, handle: TensorRTEngineHandle, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine_name = handle.entry.path.name
        expected = list(handle.input_names)
        missing = [n for n in expected if n not in inputs]
        unknown = [n for n in inputs if n not in handle.input_dtypes]
        if missing or unknown:
            parts = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
            raise InferenceError(
                f"{engine_name}: inputs {', '.join(parts)}; the engine takes exactly {expected}",
                hint="pass one array per engine input, by name",
            )
        arrays: dict[str, np.ndarray] = {}
        for name in expected:
            array = np.asarray(inputs[name])
            want = handle.input_dtypes[name]
            if array.dtype != want:
                same_float = array.dtype.kind == want.kind == "f"
                safe_int = array.dtype.kind in "iu" and want.kind in "iu" and np.can_cast(array.dtype, want, "safe")
                if not (same_float or safe_int):  # e.g. uint8 pixels into a float engine: normalisation missing
                    raise InferenceError(
                        f"{engine_name}: input {name} is {array.dtype}, the engine takes {want}",
                        hint=f"convert it to {want} (with the model's preprocessing) first",
                    )
                array = array.astype(want)
            rank = len(handle.input_shapes[name])
            if array.ndim != rank:
                raise InferenceError(
                    f"{engine_name}: input {name} has shape {list(array.shape)}, the engine takes rank {rank} "
                    f"[{_shape_text(handle.input_shapes[name])}]"
                )
            arrays[name] = np.ascontiguousarray(array)
        return arrays

    def _profile_text(self, handle: TensorRTEngineHandle, name: str) -> str:
        if name in handle.profile:
            lo, _, hi = handle.profile[name]
            return f"min {list(lo)}, max {list(hi)}"
        return f"fixed [{_shape_text(handle.input_shapes[name])}]"

    def infer(self, handle: EngineHandle, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        h = self.checked_handle(handle, TensorRTEngineHandle)
        arrays = self._prepare_inputs(h, inputs)
        memory = self.device_memory()
        engine_name = h.entry.path.name
        with h.lock, _trt_call(InferenceError, f"running {engine_name}", path=h.entry.path) as errors:
            if h.released:  # released by another thread while this one waited for the lock
                raise InferenceError(f"engine {engine_name} was released; deserialize it again")
            context = h.context
            for name, array in arrays.items():
                try:
                    accepted = context.set_input_shape(name, tuple(array.shape))
                except TRT_ERRORS as exc:
                    log.debug("set_input_shape(%s, %s) raised %s", name, array.shape, exc)
                    accepted = False
                if not accepted:
                    raise InferenceError(
                        f"{engine_name}: input {name} shape {list(array.shape)} is outside the optimization profile "
                        f"({self._profile_text(h, name)})",
                        hint="split the batch to fit, or rebuild the engine with a wider input_shapes range",
                    )
            out_shapes = {name: tuple(int(d) for d in context.get_tensor_shape(name)) for name in h.output_names}
            unresolved = {n: s for n, s in out_shapes.items() if any(d < 0 for d in s)}
            if unresolved:
                raise InferenceError(
                    f"{engine_name}: output shapes {unresolved} depend on the data; "
                    "data-dependent outputs are not supported by this runtime"
                )
            buffers: dict[str, DeviceBuffer] = {}  # held until the outputs are copied back
            for name, array in arrays.items():
                buffers[name] = memory.to_device(array)
            for name, shape in out_shapes.items():
                buffers[name] = memory.empty(shape, h.output_dtypes[name])
            for name, buffer in buffers.items():
                if not context.set_tensor_address(name, buffer.ptr):
                    raise _failure(InferenceError, f"{engine_name}: TensorRT refused the address of {name}", errors)
            if not context.execute_async_v3(memory.stream()):
                raise _failure(
                    InferenceError,
                    f"{engine_name}: execution failed",
                    errors,
                    hint="see the TensorRT messages; rebuild the engine if it persists",
                )
            memory.synchronize()
            return {name: memory.to_host(buffers[name]) for name in h.output_names}

    def release_engine(self, handle: EngineHandle) -> None:
        if not isinstance(handle, TensorRTEngineHandle):
            raise InferenceError(f"handle {handle!r} was not created by this runtime (TensorRTEngineHandle expected)")
        with handle.lock:
            if handle.released:
                return
            # The context must go before its engine, and the engine before its runtime.
            handle.context = None
            handle.engine = None
            handle.runtime = None
            handle.released = True
        log.debug("released TensorRT engine %s", handle.entry.path.name)
