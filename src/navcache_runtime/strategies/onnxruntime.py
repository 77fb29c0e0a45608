"""ONNX Runtime strategy (``onnx_trt_ep``): TensorRT EP, then CUDA EP, then CPU EP.

``compile_engine`` persists a hardware-tied artifact so that ``deserialize_engine`` does no optimisation:
- TensorRT EP: an EP-context model (the TensorRT engine embedded in an ONNX wrapper), made with ORT's
  ``ModelCompiler``;
- CUDA / CPU EP: the model after ORT's graph optimisations (``optimized_model_filepath`` at level ALL,
  which ties it to the ORT version and, on CPU, the instruction set), loaded later with optimisations off.

ORT silently falls back to a lesser provider when one cannot be initialised (missing CUDA libraries,
for example). Every session's ``get_providers()`` is compared with what was asked for; a fallback is
logged as a warning and recorded on the entry/handle, or raised when ``strict_providers`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from ..errors import (
    CalibrationCacheError,
    EngineBuildError,
    EngineDeserializeError,
    InferenceError,
    InferenceRuntimeError,
    OutOfMemoryError,
)
from ..integrity import commit_artifact, temp_path_for
from ..naming import RUNTIME_EXTENSION
from ..types import BuildConfig, EngineCacheEntry, EngineHandle, HostFields
from ._base import RuntimeBase

log = logging.getLogger(__name__)

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PREFERENCE = (TRT_EP, CUDA_EP, CPU_EP)
_ALIASES = {"tensorrt": TRT_EP, "trt": TRT_EP, "cuda": CUDA_EP, "cpu": CPU_EP}

# Every exception type ORT's Python binding raises (they derive from Exception, not RuntimeError).
ORT_ERRORS: tuple[type[BaseException], ...] = (
    *(
        cls
        for name in dir(ort_state)
        if isinstance(cls := getattr(ort_state, name), type)
        and issubclass(cls, Exception)
        and cls.__module__ == ort_state.__name__
    ),
    RuntimeError,
)

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(eq=False)
class OrtEngineHandle(EngineHandle):
    session: Any = None
    input_types: tuple[Any, ...] = ()
    input_ranks: tuple[int, ...] = ()
    providers: tuple[str, ...] = ()


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "failed to allocate memory" in text or "bad_alloc" in text


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


class OnnxRuntime(RuntimeBase):
    label = "onnx_trt_ep"

    # -- provider planning -----------------------------------------------------------------------
    def provider_plan(self) -> list[str]:
        """Providers to ask for, best first; CPU is always the last resort."""
        available = set(ort.get_available_providers())
        if self.config.providers:
            wanted = [_ALIASES.get(p.lower(), p) for p in self.config.providers]
            unknown = [p for p in wanted if p not in PREFERENCE]
            if unknown:
                raise EngineBuildError(
                    f"unsupported ONNX Runtime provider(s) {unknown}",
                    hint=f"use some of {', '.join(PREFERENCE)} (or tensorrt, cuda, cpu)",
                )
        else:
            wanted = list(PREFERENCE)
        plan = [p for p in wanted if p in available]
        if not plan:
            raise EngineBuildError(
                f"none of the configured providers {wanted} is available in this ONNX Runtime build "
                f"(available: {sorted(available)})",
                hint="install onnxruntime-gpu for CUDA/TensorRT, or configure providers = ['cpu']",
            )
        if CPU_EP not in plan and CPU_EP in available:
            plan.append(CPU_EP)
        return plan

    def _provider_options(self, provider: str, build_config: BuildConfig | None) -> dict[str, str]:
        device = str(self.config.device_id)
        if provider == CUDA_EP:
            return {"device_id": device}
        if provider != TRT_EP:
            return {}
        options = {
            "device_id": device,
            # Engines and timing data persist next to our artifacts so rebuilds are cheap.
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(self.config.engine_dir / "ort-trt-cache"),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(self.config.engine_dir / "ort-trt-cache"),
        }
        if build_config is not None:
            options["trt_max_workspace_size"] = str(build_config.workspace_mib << 20)
            options["trt_fp16_enable"] = str(build_config.precision == "fp16")
            if build_config.precision == "int8":
                cache = build_config.calibration_cache
                if cache is None or not cache.is_file():
                    raise CalibrationCacheError(
                        f"int8 needs a TensorRT calibration table; {cache or 'none'} was given",
                        hint="set calibration_cache to the table produced by calibrating this model",
                        path=cache,
                    )
                options["trt_int8_enable"] = "True"
                options["trt_int8_calibration_table_name"] = str(cache)
            if build_config.input_shapes:
                for key, attr in (("min", "min"), ("opt", "opt"), ("max", "max")):
                    options[f"trt_profile_{key}_shapes"] = ",".join(
                        f"{p.name}:{_shape_text(getattr(p, attr))}" for p in build_config.input_shapes
                    )
        return options

    def planned_host_fields(self) -> HostFields:
        return self._pinned_for(self.provider_plan()[0])

    def _pinned_for(self, provider: str) -> HostFields:
        host = self.host
        if provider == TRT_EP:
            return HostFields(sm=host.sm, jetpack=host.jetpack, trt=host.trt, ort=host.ort, device=host.device)
        if provider == CUDA_EP:
            return HostFields(sm=host.sm, jetpack=host.jetpack, ort=host.ort, device=host.device)
        return HostFields(ort=host.ort, cpu_isa=host.cpu_isa)

    def _check_fallback(
        self, asked: list[str], got: list[str], what: str, error: type[InferenceRuntimeError]
    ) -> str | None:
        """Compare the providers a session really uses with the ones asked for."""
        if asked and asked[0] in got:
            return None
        message = (
            f"{what}: ONNX Runtime fell back from {asked[0]} to {got[0] if got else 'nothing'} "
            f"(session providers {got})"
        )
        if self.config.strict_providers:
            raise error(message, hint="install the provider's libraries (CUDA, cuDNN, TensorRT) or allow CPU")
        log.warning("%s", message)
        return message

    def _session_options(self, optimization: Any) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = optimization
        if self.config.intra_op_threads:
            options.intra_op_num_threads = self.config.intra_op_threads
        if not self.config.intra_op_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only; our own log says what matters
        return options

    # -- Protocol --------------------------------------------------------------------------------
    def compile_engine(self, onnx_path: Path, build_config: BuildConfig) -> EngineCacheEntry:
        onnx_path = Path(onnx_path)
        digest = self.source_digest(onnx_path)
        plan = self.provider_plan()
        primary = plan[0]
        if build_config.precision == "int8" and primary != TRT_EP:
            raise EngineBuildError(
                f"{onnx_path.name}: int8 needs the TensorRT execution provider; this host offers {plan}",
                hint="use precision fp16/fp32, or run on a host with TensorRT",
            )
        if build_config.precision == "fp16" and primary == CPU_EP:
            raise EngineBuildError(
                f"{onnx_path.name}: fp16 needs the CUDA or TensorRT execution provider; this host offers only CPU",
                hint="use precision = 'fp32' on CPU hosts",
            )
        self.config.engine_dir.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(self.config.engine_dir / f"staging.{RUNTIME_EXTENSION[self.label]}")
        started = time.perf_counter()
        try:
            if primary == TRT_EP:
                used = self._compile_ep_context(onnx_path, build_config, plan, tmp)
            else:
                used = self._compile_optimized(onnx_path, build_config, plan, tmp)
            note = self._check_fallback(plan, used, f"compiling {onnx_path.name}", EngineBuildError)
            name = self.artifact_name(onnx_path, build_config, pinned=self._pinned_for(used[0]), source_digest=digest)
            final = self.artifact_path(name)
            sha = commit_artifact(tmp, final)
        except InferenceRuntimeError:
            raise
        except ORT_ERRORS as exc:
            cls = OutOfMemoryError if _is_oom(exc) else EngineBuildError
            raise cls(
                f"ONNX Runtime could not compile {onnx_path.name}: {exc}",
                path=onnx_path,
                hint="check that the file is a valid ONNX model for this opset",
            ) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        duration = time.perf_counter() - started
        log.info("compiled %s with %s in %.2fs -> %s", onnx_path.name, used[0], duration, final.name)
        return self.built_entry(final, sha, name, duration, providers=tuple(used), notes=(note,) if note else ())

    def _load_source(self, onnx_path: Path, build_config: BuildConfig, primary: str) -> str | bytes:
        if build_config.precision != "fp16" or primary != CUDA_EP:
            return str(onnx_path)
        # CUDA EP runs what the graph says: convert weights/ops to fp16 first (ground side: needs onnx).
        try:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError as exc:
            raise EngineBuildError(
                "fp16 with the CUDA provider needs the 'onnx' package to convert the model",
                hint="pip install onnx (provisioning hosts have it)",
            ) from exc
        model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
        return bytes(model.SerializeToString())

    def _compile_optimized(self, onnx_path: Path, build_config: BuildConfig, plan: list[str], tmp: Path) -> list[str]:
        options = self._session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        options.optimized_model_filepath = str(tmp)
        session = ort.InferenceSession(
            self._load_source(onnx_path, build_config, plan[0]),
            options,
            providers=plan,
            provider_options=[self._provider_options(p, build_config) for p in plan],
        )
        used = list(session.get_providers())
        del session
        return used

    def _compile_ep_context(self, onnx_path: Path, build_config: BuildConfig, plan: list[str], tmp: Path) -> list[str]:
        options = self._session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        for provider in plan:
            if provider != CPU_EP:
                options.add_provider(provider, self._provider_options(provider, build_config))
        # Embedded mode: the TensorRT engine lives inside the artifact, so one sidecar covers it.
        ort.ModelCompiler(options, str(onnx_path), embed_compiled_data_into_model=True).compile_to_file(str(tmp))
        # Open the compiled model once to learn which providers really took it.
        check = ort.InferenceSession(
            str(tmp),
            self._session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
            providers=plan,
            provider_options=[self._provider_options(p, None) for p in plan],
        )
        used = list(check.get_providers())
        del check
        return used

    def deserialize_engine(self, entry: EngineCacheEntry) -> OrtEngineHandle:
        # The gate reads the artifact once; the session is built from those hashed bytes, never reopened by
        # path, so a file swapped after the check is not what runs (EP-context engines are embedded).
        verified = self.gate.admit_verified(entry)
        entry = verified.entry
        if entry.host.trt:
            asked = [TRT_EP, CUDA_EP, CPU_EP]
        elif entry.host.sm:
            asked = [CUDA_EP, CPU_EP]
        else:
            asked = [CPU_EP]
        available = set(ort.get_available_providers())
        missing = [p for p in asked[:-1] if p not in available]
        if asked[0] in missing:
            raise EngineDeserializeError(
                f"{entry.path.name} was compiled for {asked[0]}, which this ONNX Runtime build does not have",
                hint="install onnxruntime-gpu (with TensorRT for EP-context models)",
                path=entry.path,
            )
        # The artifact is already optimised (or is an EP-context model): loading must not redo that work.
        options = self._session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        try:
            session = ort.InferenceSession(
                verified.data,
                options,
                providers=asked,
                provider_options=[self._provider_options(p, None) for p in asked],
            )
        except ORT_ERRORS as exc:
            cls = OutOfMemoryError if _is_oom(exc) else EngineDeserializeError
            raise cls(
                f"ONNX Runtime could not load {entry.path.name}: {exc}",
                path=entry.path,
                hint="rebuild the engine on this host",
            ) from exc
        finally:
            verified.discard()  # ORT keeps its own copy of the model
        used = list(session.get_providers())
        note = self._check_fallback(asked, used, f"loading {entry.path.name}", EngineDeserializeError)
        inputs = session.get_inputs()
        return OrtEngineHandle(
            entry=entry,
            input_names=tuple(i.name for i in inputs),
            output_names=tuple(o.name for o in session.get_outputs()),
            session=session,
            input_types=tuple(_NP_TYPES.get(i.type) for i in inputs),
            input_ranks=tuple(len(i.shape) for i in inputs),
            providers=tuple(used) + ((f"fallback: {note}",) if note else ()),
        )

    def infer(self, handle: EngineHandle, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        h = self.checked_handle(handle, OrtEngineHandle)
        feeds = _validated_feeds(h, inputs)
        try:
            outputs = h.session.run(list(h.output_names), feeds)
        except ORT_ERRORS as exc:
            cls = OutOfMemoryError if _is_oom(exc) else InferenceError
            raise cls(f"inference with {h.entry.path.name} failed: {exc}", path=h.entry.path) from exc
        return dict(zip(h.output_names, outputs, strict=True))

    def release_engine(self, handle: EngineHandle) -> None:
        if not isinstance(handle, OrtEngineHandle):
            raise InferenceError(f"handle {handle!r} was not created by this runtime")
        handle.session = None
        handle.released = True


def _validated_feeds(h: OrtEngineHandle, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    expected = set(h.input_names)
    missing, unknown = sorted(expected - set(inputs)), sorted(set(inputs) - expected)
    if missing or unknown:
        raise InferenceError(
            f"inputs do not match {h.entry.model_name}: missing {missing}, unknown {unknown}; "
            f"expected {list(h.input_names)}"
        )
    feeds = {}
    for name, dtype, rank in zip(h.input_names, h.input_types, h.input_ranks, strict=True):
        array = np.asarray(inputs[name])
        if array.dtype.kind not in "fiub":
            raise InferenceError(f"input {name!r} has non-numeric dtype {array.dtype}")
        if array.ndim != rank:
            raise InferenceError(f"input {name!r} has rank {array.ndim}, the model expects rank {rank}")
        if dtype is not None and array.dtype != dtype:
            if array.dtype.kind == "f" and np.dtype(dtype).kind == "f":
                array = array.astype(dtype)  # float64 -> float32 is what every caller means
            else:
                raise InferenceError(f"input {name!r} has dtype {array.dtype}, the model expects {np.dtype(dtype)}")
        feeds[name] = np.ascontiguousarray(array)
    return feeds
