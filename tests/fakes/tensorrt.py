"""A fake of the ``tensorrt`` Python module (the TensorRT 10.x API subset navcache's strategy uses).

Install it as ``sys.modules["tensorrt"]`` (or put ``tests/fakes`` first on ``sys.path``) and the real
strategy code runs against it on a machine without a GPU:

- ``OnnxParser`` validates the model with ``onnx`` (corrupt bytes and invalid graphs become parser errors)
  and records the network's inputs/outputs, with -1 for dynamic dimensions;
- ``Builder.build_serialized_network`` checks what TensorRT checks (profiles cover the dynamic inputs and fit
  them, INT8 has calibration scales, the DLA core exists) and returns a "plan": ``PLAN_MAGIC`` + a JSON header
  (profile, flags, workspace, SM/TensorRT it was built for...) + the ONNX bytes;
- timing caches serialise to ``TIMING_MAGIC`` + JSON whose entries grow with builds of new configurations;
- ``Runtime.deserialize_cuda_engine`` returns None for bytes without the magic or for another SM/TensorRT;
- ``IExecutionContext`` runs the embedded ONNX with ONNX Runtime on the CPU, honours ``set_input_shape``
  against the profile (False outside min/max) and reads/writes the memory at the addresses given to
  ``set_tensor_address`` (so tests hand it host buffers: numpy arrays and ``array.ctypes.data``).

This module must stay self-contained (numpy, onnx, onnxruntime only): it is also imported as top-level
``tensorrt``. Tests steer it through :data:`controls` and read what happened from :data:`builds`,
:data:`timing_cache_loads` and :data:`executions`; :func:`reset` clears all of it.

Not modelled: precision (the fake always computes in fp32), the GPU, tactics, real plan compatibility rules.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

__version__ = "10.3.0"

PLAN_MAGIC = b"FAKETRT-PLAN\x00"
TIMING_MAGIC = b"FAKETRT-TIMING\x00"


# -- test controls and records -----------------------------------------------------------------------------


@dataclass
class Controls:
    device_sm: str = "87"  # the "GPU" this fake runs on
    fast_fp16: bool = True
    fast_int8: bool = True
    dla_cores: int = 0
    parse_fail_ops: set[str] = field(default_factory=set)  # ONNX op types the parser reports as unsupported
    builder_init_error: BaseException | None = None  # raised by Builder() (TypeError: no GPU, as the real one)
    build_error: BaseException | None = None  # raised by build_serialized_network
    build_fail_message: str | None = None  # logged as ERROR by build_serialized_network, which returns None
    deserialize_returns_none: bool = False
    execute_error: BaseException | None = None  # raised by execute_async_v3
    execute_fail: bool = False  # execute_async_v3 logs an error and returns False


@dataclass
class BuildRecord:
    """What one ``build_serialized_network`` call was asked for."""

    network_flags: int
    flags: tuple[str, ...]
    workspace: int
    profiles: list[dict[str, tuple[tuple[int, ...], ...]]]
    optimization_level: int
    device_type: str
    dla_core: int
    max_aux_streams: int
    calibration_cache: bytes | None
    calibration_profile_set: bool
    timing_cache_hits: int = 0
    timing_cache_attached: bool = False
    succeeded: bool = False


controls = Controls()
builds: list[BuildRecord] = []
timing_cache_loads: list[bytes] = []  # the bytes given to every create_timing_cache call
executions: list[dict[str, Any]] = []  # one per execute_async_v3: input shapes and the stream handle


def reset() -> None:
    global _global_logger
    controls.__dict__.update(Controls().__dict__)  # in place: tests may hold a reference to it
    builds.clear()
    timing_cache_loads.clear()
    executions.clear()
    _global_logger = None


# -- enums and small types ---------------------------------------------------------------------------------


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = _Severity
    INTERNAL_ERROR = _Severity.INTERNAL_ERROR
    ERROR = _Severity.ERROR
    WARNING = _Severity.WARNING
    INFO = _Severity.INFO
    VERBOSE = _Severity.VERBOSE

    def __init__(self) -> None:
        pass

    def log(self, severity: _Severity, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: _Severity, msg: str) -> None:
        if severity <= self.min_severity:
            sys.stderr.write(f"[TRT] [{severity.name[0]}] {msg}\n")


# TensorRT keeps the first logger it is given for messages that belong to no builder/runtime.
_global_logger: ILogger | None = None


def _register_logger(logger: ILogger) -> ILogger:
    global _global_logger
    if not isinstance(logger, ILogger):
        raise TypeError(f"__init__(): incompatible constructor arguments: logger must be an ILogger, got {logger!r}")
    if _global_logger is None:
        _global_logger = logger
    return logger


def _log(logger: ILogger | None, severity: _Severity, msg: str) -> None:
    target = logger or _global_logger
    if target is not None:
        target.log(severity, msg)


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 5


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    DEBUG = 2
    GPU_FALLBACK = 3
    REFIT = 5
    DISABLE_TIMING_CACHE = 6
    TF32 = 7
    SPARSE_WEIGHTS = 8


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


float32, float16, int8, int32, int64, uint8 = (
    DataType.FLOAT,
    DataType.HALF,
    DataType.INT8,
    DataType.INT32,
    DataType.INT64,
    DataType.UINT8,
)

_NUMPY = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.INT64: np.int64,
}
_FROM_ONNX = {
    onnx.TensorProto.FLOAT: DataType.FLOAT,
    onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.INT8: DataType.INT8,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.BOOL: DataType.BOOL,
    onnx.TensorProto.UINT8: DataType.UINT8,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.BFLOAT16: DataType.BF16,
}


def nptype(trt_type: DataType) -> type:
    try:
        return _NUMPY[DataType(trt_type)]
    except (KeyError, ValueError):
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.") from None


class Dims(tuple):  # type: ignore[type-arg]
    """Like ``trt.Dims``: iterable, indexable, -1 for a dynamic dimension."""


class IHostMemory(bytes):
    """Serialized data; supports the buffer protocol like the real one (``bytes(host_memory)``)."""

    @property
    def nbytes(self) -> int:
        return len(self)


@dataclass
class ITensor:
    name: str
    shape: Dims
    dtype: DataType


# -- network and parser ------------------------------------------------------------------------------------


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._model: bytes | None = None
        self._onnx: onnx.ModelProto | None = None

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return len(self._onnx.graph.node) if self._onnx is not None else 0

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


class ErrorCode(enum.IntEnum):
    SUCCESS = 0
    INTERNAL_ERROR = 1
    MEM_ALLOC_FAILED = 2
    MODEL_DESERIALIZE_FAILED = 3
    INVALID_VALUE = 4
    INVALID_GRAPH = 5
    INVALID_NODE = 6
    UNSUPPORTED_GRAPH = 7
    UNSUPPORTED_NODE = 8


class ParserError:
    def __init__(self, code: ErrorCode, desc: str, node: int = -1, node_name: str = "", node_operator: str = ""):
        self._code, self._desc, self._node = code, desc, node
        self._node_name, self._node_operator = node_name, node_operator

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name

    def node_operator(self) -> str:
        return self._node_operator

    def file(self) -> str:
        return "ModelImporter.cpp"

    def line(self) -> int:
        return 0

    def func(self) -> str:
        return "parse"

    def __str__(self) -> str:
        return f"In node {self._node} ({self._node_name}): {self._code.name}: {self._desc}"


def _dims(value_info: onnx.ValueInfoProto) -> Dims:
    shape = value_info.type.tensor_type.shape
    return Dims(d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim)


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self.network = network
        self.logger = _register_logger(logger)
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def _error(self, error: ParserError) -> None:
        self._errors.append(error)
        _log(self.logger, _Severity.ERROR, str(error))

    def parse_from_file(self, model: str, verbosity: int = 0) -> bool:
        with open(model, "rb") as handle:
            return self.parse(handle.read(), path=model)

    def parse(self, model: bytes, path: str | None = None) -> bool:
        data = bytes(model)
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as exc:  # DecodeError and friends
            self._error(
                ParserError(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model from buffer: {exc}")
            )
            return False
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
            self._error(ParserError(ErrorCode.INVALID_GRAPH, f"Invalid ONNX graph: {first}"))
            return False
        if not proto.graph.node:
            self._error(ParserError(ErrorCode.INVALID_GRAPH, "Failed to parse ONNX model from buffer: empty graph"))
            return False
        for index, node in enumerate(proto.graph.node):
            if node.op_type in controls.parse_fail_ops:
                self._error(
                    ParserError(
                        ErrorCode.UNSUPPORTED_NODE,
                        f"No importer registered for op: {node.op_type}",
                        index,
                        node.name,
                        node.op_type,
                    )
                )
        initializers = {t.name for t in proto.graph.initializer}
        inputs, outputs = [], []
        for kind, values in (
            (inputs, [v for v in proto.graph.input if v.name not in initializers]),
            (outputs, list(proto.graph.output)),
        ):
            for value in values:
                elem = value.type.tensor_type.elem_type
                if elem not in _FROM_ONNX:
                    self._error(
                        ParserError(
                            ErrorCode.UNSUPPORTED_GRAPH, f"tensor {value.name} has unsupported ONNX data type {elem}"
                        )
                    )
                    continue
                kind.append(ITensor(value.name, _dims(value), _FROM_ONNX[elem]))
        if self._errors:
            return False
        self.network._inputs, self.network._outputs = inputs, outputs
        self.network._model, self.network._onnx = data, proto
        return True


# -- builder -----------------------------------------------------------------------------------------------


class IOptimizationProfile:
    def __init__(self) -> None:
        self._shapes: dict[str, tuple[Dims, Dims, Dims]] = {}
        self._valid = True

    def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
        lo, mid, hi = Dims(min), Dims(opt), Dims(max)
        if not len(lo) == len(mid) == len(hi) or not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
            self._valid = False
        self._shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list[Dims]:
        return list(self._shapes[input])

    def __bool__(self) -> bool:
        return self._valid


class ITimingCache:
    def __init__(self, sm: str, trt_version: str, entries: dict[str, float] | None = None) -> None:
        self.sm, self.trt, self.entries = sm, trt_version, dict(entries or {})

    def serialize(self) -> IHostMemory:
        body = json.dumps({"sm": self.sm, "trt": self.trt, "entries": self.entries}, sort_keys=True).encode()
        return IHostMemory(TIMING_MAGIC + body)

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not ignore_mismatch and (input_cache.sm, input_cache.trt) != (self.sm, self.trt):
            return False
        for key, value in input_cache.entries.items():
            self.entries.setdefault(key, value)
        return True

    def reset(self) -> bool:
        self.entries.clear()
        return True


class IInt8Calibrator:
    def __init__(self) -> None:
        pass

    def get_batch_size(self) -> int:
        return 1

    def get_batch(self, names: list[str]) -> list[int] | None:
        return None

    def read_calibration_cache(self) -> bytes | None:
        return None

    def write_calibration_cache(self, cache: Any) -> None:
        return None


class IInt8EntropyCalibrator2(IInt8Calibrator):
    pass


class IBuilderConfig:
    def __init__(self) -> None:
        self._flags: set[BuilderFlag] = {BuilderFlag.TF32}  # TensorRT enables TF32 by default
        self._pools: dict[MemoryPoolType, int] = {MemoryPoolType.WORKSPACE: 1 << 40}
        self.builder_optimization_level = 3
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self.max_aux_streams = -1
        self.int8_calibrator: IInt8Calibrator | None = None
        self._profiles: list[IOptimizationProfile] = []
        self._calibration_profile: IOptimizationProfile | None = None
        self._timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        if not isinstance(pool_size, int) or pool_size < 0:
            raise TypeError(f"set_memory_pool_limit(): incompatible function arguments: {pool_size!r}")
        self._pools[MemoryPoolType(pool)] = pool_size

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self._pools.get(MemoryPoolType(pool), 0)

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags.add(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags.discard(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return BuilderFlag(flag) in self._flags

    @property
    def flags(self) -> int:
        return sum(1 << int(f) for f in self._flags)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile:
            _log(None, _Severity.ERROR, "addOptimizationProfile: Error Code 3: API Usage Error (profile is invalid)")
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        self._calibration_profile = profile
        return True

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        timing_cache_loads.append(data)
        if not data:
            return ITimingCache(controls.device_sm, __version__)
        if not data.startswith(TIMING_MAGIC):
            _log(None, _Severity.ERROR, "createTimingCache: Error Code 1: Serialization (timing cache magic mismatch)")
            return None
        try:
            doc = json.loads(data[len(TIMING_MAGIC) :])
            return ITimingCache(str(doc["sm"]), str(doc["trt"]), {str(k): float(v) for k, v in doc["entries"].items()})
        except (ValueError, KeyError, TypeError):
            _log(None, _Severity.ERROR, "createTimingCache: Error Code 1: Serialization (corrupt timing cache)")
            return None

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError(f"set_timing_cache(): incompatible function arguments: {cache!r}")
        if not ignore_mismatch and (cache.sm, cache.trt) != (controls.device_sm, __version__):
            _log(None, _Severity.WARNING, "Timing cache was created on a different device or TensorRT; not used")
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache


def _plan(header: dict[str, Any], model: bytes) -> IHostMemory:
    text = json.dumps(header, sort_keys=True).encode()
    return IHostMemory(PLAN_MAGIC + struct.pack("<I", len(text)) + text + model)


def _unplan(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    if not data.startswith(PLAN_MAGIC) or len(data) < len(PLAN_MAGIC) + 4:
        return None
    (size,) = struct.unpack_from("<I", data, len(PLAN_MAGIC))
    start = len(PLAN_MAGIC) + 4
    try:
        header = json.loads(data[start : start + size])
    except ValueError:
        return None
    return header, data[start + size :]


class Builder:
    def __init__(self, logger: ILogger) -> None:
        if controls.builder_init_error is not None:
            raise controls.builder_init_error
        self.logger = _register_logger(logger)

    @property
    def platform_has_fast_fp16(self) -> bool:
        return controls.fast_fp16

    @property
    def platform_has_fast_int8(self) -> bool:
        return controls.fast_int8

    @property
    def num_DLA_cores(self) -> int:  # the real attribute's spelling
        return controls.dla_cores

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        if flags & (1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)):
            _log(self.logger, _Severity.WARNING, "EXPLICIT_BATCH is deprecated and has no effect in TensorRT 10")
        return INetworkDefinition(int(flags))

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def _fail(self, record: BuildRecord, message: str) -> None:
        _log(self.logger, _Severity.ERROR, message)
        builds.append(record)

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        if controls.build_error is not None:
            raise controls.build_error
        calibrator = config.int8_calibrator if config.get_flag(BuilderFlag.INT8) else None
        cache = calibrator.read_calibration_cache() if calibrator is not None else None
        record = BuildRecord(
            network_flags=network.flags,
            flags=tuple(sorted(f.name for f in config._flags)),
            workspace=config.get_memory_pool_limit(MemoryPoolType.WORKSPACE),
            profiles=[
                {n: tuple(tuple(s) for s in shapes) for n, shapes in p._shapes.items()} for p in config._profiles
            ],
            optimization_level=config.builder_optimization_level,
            device_type=DeviceType(config.default_device_type).name,
            dla_core=config.DLA_core,
            max_aux_streams=config.max_aux_streams,
            calibration_cache=bytes(cache) if cache is not None else None,
            calibration_profile_set=config._calibration_profile is not None,
            timing_cache_attached=config._timing_cache is not None,
        )
        if network._model is None or not network._outputs:
            self._fail(record, "Error Code 4: Internal Error (Network must have at least one output)")
            return None
        inputs = {t.name: t for t in network._inputs}
        dynamic = [n for n, t in inputs.items() if any(d < 0 for d in t.shape)]
        if dynamic and not config._profiles:
            self._fail(
                record,
                "Error Code 4: API Usage Error (Network has dynamic or shape inputs, but no "
                "optimization profile has been defined.)",
            )
            return None
        for index, profile in enumerate(config._profiles):
            for name in dynamic:
                if name not in profile._shapes:
                    self._fail(
                        record,
                        f"Error Code 4: API Usage Error (Optimization profile {index} is missing "
                        f"values for input {name})",
                    )
                    return None
            for name, (lo, _, hi) in profile._shapes.items():
                if name not in inputs:
                    self._fail(record, f"Error Code 4: API Usage Error (profile names unknown input {name})")
                    return None
                shape = inputs[name].shape
                if len(lo) != len(shape) or any(d >= 0 and not lo[i] == hi[i] == d for i, d in enumerate(shape)):
                    self._fail(record, f"Error Code 4: API Usage Error (profile for {name} does not fit {shape})")
                    return None
        if calibrator is not None:
            if not cache:
                if calibrator.get_batch([t.name for t in network._inputs]) is None:
                    self._fail(
                        record,
                        "Error Code 2: Internal Error (Calibration failure occurred with no scaling factors detected.)",
                    )
                    return None
            elif not (bytes(cache).startswith(b"TRT-") and b"Calibration" in bytes(cache).split(b"\n")[0]):
                self._fail(
                    record, "Error Code 1: Serialization (calibration cache is invalid or for another calibrator)"
                )
                return None
        elif config.get_flag(BuilderFlag.INT8):
            self._fail(
                record, "Error Code 2: Internal Error (Calibration failure: INT8 requested without a calibrator)"
            )
            return None
        if config.default_device_type == DeviceType.DLA and not 0 <= config.DLA_core < controls.dla_cores:
            self._fail(record, f"Error Code 3: API Usage Error (DLA core {config.DLA_core} does not exist)")
            return None
        if controls.build_fail_message is not None:
            self._fail(record, controls.build_fail_message)
            return None
        timing = config._timing_cache
        if timing is not None:
            for node in network._onnx.graph.node if network._onnx is not None else ():
                key = hashlib.sha256(
                    f"{node.op_type}|{node.name}|{record.flags}|{record.profiles}".encode()
                ).hexdigest()[:16]
                if key in timing.entries:
                    record.timing_cache_hits += 1
                else:
                    timing.entries[key] = 0.001 * (1 + len(timing.entries))
        header = {
            "sm": controls.device_sm,
            "trt": __version__,
            "flags": list(record.flags),
            "workspace": record.workspace,
            "profile": {n: [list(s) for s in shapes] for n, shapes in record.profiles[0].items()}
            if record.profiles
            else {},
            "inputs": {t.name: [list(t.shape), int(t.dtype)] for t in network._inputs},
            "outputs": {t.name: [list(t.shape), int(t.dtype)] for t in network._outputs},
            "optimization_level": record.optimization_level,
            "device_type": record.device_type,
            "dla_core": record.dla_core,
        }
        record.succeeded = True
        builds.append(record)
        return _plan(header, network._model)


# -- runtime -----------------------------------------------------------------------------------------------


class ICudaEngine:
    def __init__(self, header: dict[str, Any], model: bytes, logger: ILogger) -> None:
        self.header = header
        self.model = model
        self.logger = logger
        self._inputs = {n: (Dims(s), DataType(t)) for n, (s, t) in header["inputs"].items()}
        self._outputs = {n: (Dims(s), DataType(t)) for n, (s, t) in header["outputs"].items()}
        self._names = [*self._inputs, *self._outputs]
        self._profile = {n: tuple(Dims(s) for s in shapes) for n, shapes in header["profile"].items()}
        self._session: ort.InferenceSession | None = None
        self._proto: onnx.ModelProto | None = None

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return 1 if self._profile else 0

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        if name in self._inputs:
            return TensorIOMode.INPUT
        return TensorIOMode.OUTPUT if name in self._outputs else TensorIOMode.NONE

    def _tensor(self, name: str) -> tuple[Dims, DataType]:
        if name in self._inputs:
            return self._inputs[name]
        if name in self._outputs:
            return self._outputs[name]
        raise RuntimeError(f"no tensor named {name}")

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensor(name)[1]

    def get_tensor_shape(self, name: str) -> Dims:
        return self._tensor(name)[0]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if profile_index != 0 or name not in self._profile:
            shape = self._tensor(name)[0]
            return [shape, shape, shape]
        return list(self._profile[name])

    def session(self) -> ort.InferenceSession:
        if self._session is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])
        return self._session

    def proto(self) -> onnx.ModelProto:
        if self._proto is None:
            self._proto = onnx.load_model_from_string(self.model)
        return self._proto

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)


def _view(address: int, shape: Sequence[int], dtype: np.dtype[Any]) -> np.ndarray:
    """The memory at ``address`` as an array (no copy)."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(shape))


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._shapes: dict[str, Dims] = {}
        self._addresses: dict[str, int] = {}
        self._output_shapes: dict[tuple[tuple[str, Dims], ...], dict[str, Dims]] = {}

    def _error(self, message: str) -> None:
        _log(self.engine.logger, _Severity.ERROR, message)

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            self._error(f"IExecutionContext::setInputShape: Error Code 3: API Usage Error ({name} is not an input)")
            return False
        dims = Dims(int(d) for d in shape)
        static = self.engine.get_tensor_shape(name)
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if (
            len(dims) != len(static)
            or any(s >= 0 and s != d for s, d in zip(static, dims, strict=True))
            or any(not a <= d <= b for a, d, b in zip(lo, dims, hi, strict=True))
        ):
            self._error(
                f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Parameter check failed, "
                f"condition: shape {tuple(dims)} within profile min {tuple(lo)} max {tuple(hi)} for {name})"
            )
            return False
        self._shapes[name] = dims
        return True

    def infer_shapes(self) -> list[str]:
        """Names of inputs whose shapes are still unknown."""
        return [n for n, (s, _) in self.engine._inputs.items() if any(d < 0 for d in s) and n not in self._shapes]

    @property
    def all_binding_shapes_specified(self) -> bool:
        return not self.infer_shapes()

    def _resolved_outputs(self) -> dict[str, Dims]:
        key = tuple(sorted(self._shapes.items()))
        if key not in self._output_shapes:
            symbols: dict[str, int] = {}
            graph_inputs = {v.name: v for v in self.engine.proto().graph.input}
            for name, dims in self._shapes.items():
                for axis, dim in enumerate(graph_inputs[name].type.tensor_type.shape.dim):
                    if dim.HasField("dim_param"):
                        symbols[dim.dim_param] = dims[axis]
            shapes: dict[str, Dims] = {}
            for value in self.engine.proto().graph.output:
                dims_out = [
                    d.dim_value if d.HasField("dim_value") else symbols.get(d.dim_param, -1)
                    for d in value.type.tensor_type.shape.dim
                ]
                shapes[value.name] = Dims(dims_out)
            if any(d < 0 for s in shapes.values() for d in s):  # not derivable from the symbols: dry run
                feeds = {n: np.zeros(tuple(s), nptype(self.engine._inputs[n][1])) for n, s in self._shapes.items()}
                names = list(self.engine._outputs)
                results = self.engine.session().run(names, feeds)
                shapes = {n: Dims(r.shape) for n, r in zip(names, results, strict=True)}
            self._output_shapes[key] = shapes
        return self._output_shapes[key]

    def get_tensor_shape(self, name: str) -> Dims:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self._shapes.get(name, self.engine.get_tensor_shape(name))
        if self.infer_shapes():
            return self.engine.get_tensor_shape(name)
        return self._resolved_outputs()[name]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self.engine.get_tensor_mode(name) == TensorIOMode.NONE:
            self._error(f"IExecutionContext::setTensorAddress: Error Code 3: API Usage Error (no tensor {name})")
            return False
        if not isinstance(memory, int) or isinstance(memory, bool):
            raise TypeError(f"set_tensor_address(): incompatible function arguments: {memory!r}")
        self._addresses[name] = memory
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        if controls.execute_error is not None:
            raise controls.execute_error
        if controls.execute_fail:
            self._error("IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime (an illegal memory access)")
            return False
        if not isinstance(stream_handle, int):
            raise TypeError(f"execute_async_v3(): incompatible function arguments: {stream_handle!r}")
        missing = self.infer_shapes()
        if missing:
            self._error(
                f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error (input shapes not set: {missing})"
            )
            return False
        unset = [n for n in self.engine._names if not self._addresses.get(n)]
        if unset:
            self._error(f"IExecutionContext::enqueueV3: Error Code 3: API Usage Error (addresses not set: {unset})")
            return False
        feeds = {}
        for name, (static, dtype) in self.engine._inputs.items():
            shape = self._shapes.get(name, static)
            feeds[name] = _view(self._addresses[name], shape, np.dtype(nptype(dtype))).copy()
        names = list(self.engine._outputs)
        results = self.engine.session().run(names, feeds)
        expected = self._resolved_outputs()
        for name, result in zip(names, results, strict=True):
            dtype = np.dtype(nptype(self.engine._outputs[name][1]))
            out = np.ascontiguousarray(result, dtype=dtype)
            if tuple(out.shape) != tuple(expected[name]):
                self._error(f"enqueueV3: output {name} is {out.shape}, expected {tuple(expected[name])}")
                return False
            ctypes.memmove(self._addresses[name], out.ctypes.data, out.nbytes)
        executions.append({"inputs": {n: tuple(a.shape) for n, a in feeds.items()}, "stream": stream_handle})
        return True


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = _register_logger(logger)

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        if controls.deserialize_returns_none:
            _log(self.logger, _Severity.ERROR, "Error Code 1: Serialization (deserialization forced to fail by test)")
            return None
        unpacked = _unplan(bytes(serialized_engine))
        if unpacked is None:
            _log(
                self.logger,
                _Severity.ERROR,
                "Error Code 1: Serialization (Serialization assertion "
                "magicTagRead == kMAGIC_TAG failed.Magic tag does not match)",
            )
            return None
        header, model = unpacked
        if header.get("sm") != controls.device_sm:
            _log(
                self.logger,
                _Severity.ERROR,
                f"Error Code 1: Serialization (The engine plan file is generated on an "
                f"incompatible device, expecting compute {controls.device_sm} got "
                f"compute {header.get('sm')}, please rebuild.)",
            )
            return None
        if header.get("trt") != __version__:
            _log(
                self.logger,
                _Severity.ERROR,
                "Error Code 1: Serialization (The engine plan file is not compatible with this version of TensorRT)",
            )
            return None
        return ICudaEngine(header, model, self.logger)
