"""The ``pytorch_fp16`` strategy: the compilation forge (AOTInductor) with an eager fallback.

Source model: a ``torch.export`` ExportedProgram saved with ``torch.export.save`` (``<stem>.pt2``). Given
an ONNX path, the sibling ``<stem>.pt2`` is compiled: ONNX→torch converters are not used (onnx2torch
hard-imports torchvision, which has no build for torch 2.13 CPU).

Compile: load the program, move ``ep.module()`` to the device (``cuda:<device_id>`` when CUDA is available,
else CPU) and dtype (fp32 or fp16), re-export it with the BuildConfig's shape profile (one
``torch.export.Dim`` per axis whose min != max), AOTInductor-compile it into a ``.pt2`` package, pre-warm
the package on the profile's min/opt/max shapes, and commit it atomically with its sidecar. When export or
AOTInductor fails, the exported program itself is saved instead (``__eager`` in the filename,
``eager_fallback=True``); a per-process circuit breaker stops retrying AOTInductor for a source that keeps
failing.

Deserialize: engine gate first, then ``aoti_load_package`` (milliseconds, no recompilation) of the private
copy the gate wrote while hashing (its loader takes only a path; the copy is removed once loaded) or, for an
eager artifact, ``torch.export.load(...).module()`` of the bytes the gate hashed. The engine's call
signature (input/output names, input dtypes, shape profile) travels inside the artifact: AOTInductor
metadata or a ``torch.export`` extra file.

Outputs are returned in the engine's dtype: float32 for fp32 engines, float16 for fp16 engines.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..config import RuntimeConfig
from ..errors import (
    EngineBuildError,
    EngineDeserializeError,
    InferenceError,
    InferenceRuntimeError,
    OutOfMemoryError,
    RuntimeConfigError,
)
from ..gate import EngineGate
from ..integrity import read_sidecar, staged_artifact
from ..naming import EngineName, parse_engine_name
from ..thermal import ThermalMonitor
from ..types import BuildConfig, EngineCacheEntry, EngineHandle, HostFields, Precision, RuntimeLabel, Shape
from ._base import RuntimeBase

log = logging.getLogger(__name__)

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
#: Key prefix of navcache's entries in the AOTInductor package metadata (AOTI adds its own ``AOTI_*`` keys).
META_PREFIX = "navcache."
#: Name of the extra file that carries the same metadata inside an eager (``torch.export.save``) artifact.
EAGER_META_FILE = "navcache_meta.json"

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
_NUMERIC_KINDS = "biuf"  # numpy dtype kinds a model input may have: bool, signed/unsigned int, float


@dataclass(frozen=True)
class EngineSignature:
    """How to call a compiled engine; stored inside the artifact so that loading needs nothing else."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_dtypes: tuple[str, ...]  # torch dtype names, e.g. "float16"
    min_shapes: tuple[Shape, ...]
    max_shapes: tuple[Shape, ...]
    precision: Precision
    device: str  # "cpu" or "cuda:0"

    def to_metadata(self) -> dict[str, str]:
        """String-valued entries for ``aot_inductor.metadata`` (lists as JSON, which survives escaping)."""
        return {
            f"{META_PREFIX}input_names": json.dumps(list(self.input_names)),
            f"{META_PREFIX}output_names": json.dumps(list(self.output_names)),
            f"{META_PREFIX}input_dtypes": json.dumps(list(self.input_dtypes)),
            f"{META_PREFIX}min_shapes": json.dumps([list(s) for s in self.min_shapes]),
            f"{META_PREFIX}max_shapes": json.dumps([list(s) for s in self.max_shapes]),
            f"{META_PREFIX}precision": self.precision,
            f"{META_PREFIX}device": self.device,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> EngineSignature:
        """Inverse of :meth:`to_metadata`; raises ValueError when the entries are absent or bad."""

        def get(key: str) -> str:
            if META_PREFIX + key not in metadata:
                raise ValueError(f"no {META_PREFIX}{key} entry in its metadata (not built by navcache?)")
            return metadata[META_PREFIX + key]

        def shapes(key: str) -> tuple[Shape, ...]:
            return tuple(tuple(int(d) for d in s) for s in json.loads(get(key)))

        signature = cls(
            input_names=tuple(str(n) for n in json.loads(get("input_names"))),
            output_names=tuple(str(n) for n in json.loads(get("output_names"))),
            input_dtypes=tuple(str(d) for d in json.loads(get("input_dtypes"))),
            min_shapes=shapes("min_shapes"),
            max_shapes=shapes("max_shapes"),
            precision=get("precision"),  # type: ignore[arg-type]
            device=get("device"),
        )
        n = len(signature.input_names)
        if not len(signature.input_dtypes) == len(signature.min_shapes) == len(signature.max_shapes) == n:
            raise ValueError("navcache metadata lists differ in length")
        for dtype in signature.input_dtypes:
            _torch_dtype(dtype)
        return signature


@dataclass(eq=False)
class TorchEngineHandle(EngineHandle):
    """A loaded AOTInductor package (or eager module) and how to feed it."""

    module: Callable[..., Any] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    input_dtypes: tuple[torch.dtype, ...] = ()
    min_shapes: tuple[Shape, ...] = ()
    max_shapes: tuple[Shape, ...] = ()
    eager: bool = False


class _AotAttemptFailed(Exception):
    """Internal: export or AOTInductor failed; carries the cause to the eager fallback."""


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _flatten_outputs(result: Any) -> list[torch.Tensor]:
    """Leaves of a model's output (a tensor, or nested tuples/lists/dicts of tensors), in pytree order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, Mapping):
        return [t for value in result.values() for t in _flatten_outputs(value)]
    if isinstance(result, Sequence) and not isinstance(result, (str, bytes)):
        return [t for value in result for t in _flatten_outputs(value)]
    raise TypeError(f"model returned {type(result).__name__}, expected tensors")


class PyTorchRuntime(RuntimeBase):
    label: ClassVar[RuntimeLabel] = "pytorch_fp16"

    # Circuit breaker, per process: failed AOT attempts per source digest (reset by a success).
    _aot_failures: ClassVar[dict[str, int]] = {}
    _aot_failures_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        host: HostFields | None = None,
        thermal: ThermalMonitor | None = None,
    ) -> None:
        super().__init__(config, host=host, thermal=thermal)
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if config.device_id >= count:
                raise RuntimeConfigError(
                    f"device_id {config.device_id} is configured but this host has {count} CUDA device(s)",
                    hint=f"set device_id to a value in 0..{count - 1}",
                )
            self.device = torch.device("cuda", config.device_id)
            if self.host.sm is None:
                # No NVML here: take the GPU identity from torch so CUDA artifacts still pin their GPU
                # (and the gate compares against the same fields).
                major, minor = torch.cuda.get_device_capability(self.device)
                self.host = dataclasses.replace(
                    self.host, sm=f"{major}{minor}", device=self.device_slug(torch.cuda.get_device_name(self.device))
                )
                self.gate = EngineGate(self.host, self.label)
        else:
            self.device = torch.device("cpu")
        if config.intra_op_threads > 0:
            torch.set_num_threads(config.intra_op_threads)  # process-wide: torch has no per-model setting

    # -- circuit breaker -------------------------------------------------------------------------------
    @classmethod
    def reset_circuit_breaker(cls, source_digest: str | None = None) -> None:
        """Forget failed compiles (of one source, or all): e.g. after the toolchain was fixed."""
        with cls._aot_failures_lock:
            if source_digest is None:
                cls._aot_failures.clear()
            else:
                cls._aot_failures.pop(source_digest, None)

    @classmethod
    def aot_failure_count(cls, source_digest: str) -> int:
        with cls._aot_failures_lock:
            return cls._aot_failures.get(source_digest, 0)

    @classmethod
    def _record_aot_failure(cls, source_digest: str) -> int:
        with cls._aot_failures_lock:
            cls._aot_failures[source_digest] = cls._aot_failures.get(source_digest, 0) + 1
            return cls._aot_failures[source_digest]

    # -- compile ---------------------------------------------------------------------------------------
    def compile_engine(self, onnx_path: Path, build_config: BuildConfig) -> EngineCacheEntry:
        started = time.perf_counter()
        if build_config.precision not in _DTYPES:
            raise EngineBuildError(
                f"the PyTorch runtime cannot build {build_config.precision} engines (model {Path(onnx_path).name})",
                hint="use fp16/fp32 with PyTorch, or the tensorrt runtime for int8",
                path=onnx_path,
            )
        source = self._resolve_source(Path(onnx_path))
        if not build_config.input_shapes:
            raise EngineBuildError(
                f"BuildConfig for {source.name} has no input_shapes; the PyTorch runtime needs the shape profile "
                "to export and compile the model",
                hint="give input_shapes with min/opt/max shapes for every model input, in call order",
                path=source,
            )
        digest = self.source_digest(source)
        program = self._load_program(source)
        dtype = _DTYPES[build_config.precision]
        signature = self._signature(program, source, build_config, dtype)
        pinned = self._pinned_host()
        cache_dir = self._use_inductor_cache()
        log.info(
            "compiling %s (%s, %s) with AOTInductor; Inductor cache %s",
            source.name,
            build_config.precision,
            self.device,
            cache_dir,
        )

        threshold = self.config.compile_failure_threshold
        failures = self.aot_failure_count(digest)
        if failures >= threshold:
            reason = (
                f"circuit breaker open: AOTInductor failed {failures} time(s) on this source in this "
                f"process (threshold {threshold})"
            )
            log.warning("%s: %s; building the eager fallback without trying AOTInductor", source.name, reason)
            return self._build_eager(program, source, build_config, signature, pinned, digest, started, reason)

        name = self.artifact_name(source, build_config, pinned=pinned, source_digest=digest)
        final = self.artifact_path(name)
        exported: torch.export.ExportedProgram | None = None
        prewarm_s: float | None = None
        try:
            with staged_artifact(final) as tmp:
                try:
                    exported = self._reexport(program, build_config, signature)
                    self._aot_compile(exported, tmp, signature)
                    compile_s = time.perf_counter() - started
                    # Pre-warm the package before committing it: an artifact that does not run is never cached.
                    prewarm_s = self._prewarm(self._load_package(tmp), signature, build_config)
                except (InferenceRuntimeError, _AotAttemptFailed):
                    raise
                except (torch.OutOfMemoryError, MemoryError) as exc:
                    raise OutOfMemoryError(
                        f"out of memory while compiling {source.name} on {self.device}: {_describe(exc)}",
                        hint="free device memory, lower the profile's max shapes, or compile on a larger host",
                        path=source,
                    ) from exc
                except Exception as exc:  # export/Inductor raise many types; all mean "AOT did not work"
                    raise _AotAttemptFailed(_describe(exc)) from exc
        except _AotAttemptFailed as failed:
            count = self._record_aot_failure(digest)
            reason = f"AOTInductor compile failed: {failed}"
            log.warning(
                "%s: %s (failure %d of %d before the circuit breaker opens); falling back to eager",
                source.name,
                reason,
                count,
                threshold,
            )
            log.debug("AOTInductor failure on %s", source.name, exc_info=failed.__cause__)
            return self._build_eager(
                exported if exported is not None else program,
                source,
                build_config,
                signature,
                pinned,
                digest,
                started,
                reason,
            )
        self.reset_circuit_breaker(digest)
        log.info("compiled %s in %.1f s (pre-warm %.3f s)", final.name, compile_s, prewarm_s or 0.0)
        return self._entry(
            name, final, compile_s, prewarm_s, notes=(f"device: {self.device}", f"inductor cache: {cache_dir}")
        )

    def _build_eager(
        self,
        program: torch.export.ExportedProgram,
        source: Path,
        build_config: BuildConfig,
        signature: EngineSignature,
        pinned: HostFields,
        digest: str,
        started: float,
        reason: str,
    ) -> EngineCacheEntry:
        name = self.artifact_name(source, build_config, pinned=pinned, source_digest=digest, eager=True)
        final = self.artifact_path(name)
        with staged_artifact(final) as tmp:
            try:
                torch.export.save(program, tmp, extra_files={EAGER_META_FILE: json.dumps(signature.to_metadata())})
                compile_s = time.perf_counter() - started
                module = self._load_eager(tmp)[0]
                prewarm_s = self._prewarm(module, signature, build_config)
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise OutOfMemoryError(
                    f"out of memory while pre-warming the eager fallback of {source.name}: {_describe(exc)}",
                    path=source,
                    hint="free device memory or lower the profile's max shapes",
                ) from exc
            except InferenceRuntimeError:
                raise
            except Exception as exc:
                raise EngineBuildError(
                    f"the eager fallback of {source.name} failed too ({_describe(exc)}) after: {reason}",
                    hint="check that the model runs on the profile's min/opt/max shapes with this precision",
                    path=source,
                ) from exc
        log.warning("built eager fallback %s (%s)", final.name, reason)
        return self._entry(
            name, final, compile_s, prewarm_s, notes=(f"eager fallback: {reason}", f"device: {self.device}")
        )

    def _entry(
        self, name: EngineName, final: Path, compile_s: float, prewarm_s: float | None, *, notes: tuple[str, ...]
    ) -> EngineCacheEntry:
        # read_sidecar: the digest the commit just wrote; no need to hash again
        return self.built_entry(final, read_sidecar(final), name, compile_s, prewarm_duration_s=prewarm_s, notes=notes)

    @staticmethod
    def _resolve_source(path: Path) -> Path:
        if path.suffix.lower() != ".onnx":
            return path
        pt2 = path.with_suffix(".pt2")
        if not pt2.is_file():
            raise EngineBuildError(
                f"the PyTorch runtime cannot compile {path.name}: there is no torch.export program {pt2.name} "
                f"next to it in {path.parent}",
                hint="the PyTorch runtime compiles the model owner's torch.export program, saved next to the ONNX "
                "as <stem>.pt2 (torch.export.save(torch.export.export(model, args, dynamic_shapes=...), "
                "'<stem>.pt2')); ONNX→torch converters are not used: onnx2torch hard-imports torchvision, "
                "which has no build for torch 2.13 CPU",
                path=pt2,
            )
        return pt2

    @staticmethod
    def _load_program(source: Path) -> torch.export.ExportedProgram:
        try:
            program = torch.export.load(source)
        except Exception as exc:  # a zip/pickle/schema error: the file is not what we need
            raise EngineBuildError(
                f"{source} is not a loadable torch.export program: {_describe(exc)}",
                hint="save the model with torch.export.save(torch.export.export(model, args), path) using the "
                "installed torch version",
                path=source,
            ) from exc
        if not isinstance(program, torch.export.ExportedProgram):
            raise EngineBuildError(
                f"{source} does not contain a torch.export ExportedProgram",
                path=source,
                hint="save the model with torch.export.save",
            )
        return program

    def _signature(
        self, program: torch.export.ExportedProgram, source: Path, build_config: BuildConfig, dtype: torch.dtype
    ) -> EngineSignature:
        """Check the profile against the program and derive the engine's call signature."""
        user_inputs = list(program.graph_signature.user_inputs)
        profiles = build_config.input_shapes
        names = tuple(p.name for p in profiles)
        if len(user_inputs) != len(profiles):
            raise EngineBuildError(
                f"{source.name} takes {len(user_inputs)} input(s) {user_inputs} but the shape profile lists "
                f"{len(profiles)}: {list(names)}",
                hint="give one input_shapes entry per model input, in call order",
                path=source,
            )
        placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        input_dtypes = []
        for spec_name, profile in zip(user_inputs, profiles, strict=True):
            value = placeholders[spec_name].meta.get("val") if spec_name in placeholders else None
            if not isinstance(value, torch.Tensor):
                raise EngineBuildError(
                    f"{source.name}: input {spec_name!r} is not a tensor input",
                    path=source,
                    hint="export the model with tensor inputs only",
                )
            if value.dim() != len(profile.opt):
                raise EngineBuildError(
                    f"{source.name}: input {spec_name!r} has rank {value.dim()} but the profile for "
                    f"{profile.name!r} has rank {len(profile.opt)} ({profile.opt})",
                    hint="fix the shape profile (inputs are matched by position)",
                    path=source,
                )
            # Floating inputs follow the engine precision; integer/bool inputs (ids, masks) keep their dtype.
            input_dtypes.append(_dtype_name(dtype if value.dtype.is_floating_point else value.dtype))
        if [str(n) for n in user_inputs] != list(names):
            log.info(
                "%s: program inputs %s are fed from profile inputs %s (by position)",
                source.name,
                user_inputs,
                list(names),
            )
        return EngineSignature(
            input_names=names,
            output_names=self._output_names(program, source, build_config),
            input_dtypes=tuple(input_dtypes),
            min_shapes=tuple(p.min for p in profiles),
            max_shapes=tuple(p.max for p in profiles),
            precision=build_config.precision,
            device=str(self.device),
        )

    @staticmethod
    def _output_names(
        program: torch.export.ExportedProgram, source: Path, build_config: BuildConfig
    ) -> tuple[str, ...]:
        count = len(program.graph_signature.user_outputs)
        given = build_config.options.get("output_names")
        if given is not None:
            names = tuple(n.strip() for n in str(given).split(",") if n.strip())
            if len(names) != count or len(set(names)) != len(names):
                raise EngineBuildError(
                    f"builder option output_names={given!r} names {len(names)} distinct output(s) but "
                    f"{source.name} returns {count}",
                    hint="list one unique name per model output, comma-separated, in return order",
                    path=source,
                )
            return names
        # Graph node names ("div", "add_3") mean nothing to a caller; dict keys of a dict output do.
        spec = program.call_spec.out_spec
        if (
            spec is not None
            and spec.type is dict
            and spec.num_children == count
            and all(child.is_leaf() for child in spec.children())
        ):
            return tuple(str(key) for key in spec.context)
        return tuple(f"output_{i}" for i in range(count))

    def resolve_source(self, source: Path) -> Path:
        return self._resolve_source(source)

    def build_config_for(self, source: Path, build_config: BuildConfig) -> BuildConfig:
        """Names the outputs after the ONNX graph's (builder option ``output_names``): the ``.pt2``
        program's own names ("output_0", a dict's keys) would not match the ONNX reference that checks the
        engine, nor the names the sortie's ``output`` refers to."""
        import onnx  # provisioning only: the ONNX file is the sortie's source model

        graph = onnx.load(str(source), load_external_data=False).graph
        options = dict(build_config.builder_options) | {"output_names": ",".join(o.name for o in graph.output)}
        return dataclasses.replace(build_config, builder_options=tuple(options.items()))

    def planned_host_fields(self) -> HostFields:
        return self._pinned_host()

    def expected_artifacts(self, source: Path, build_config: BuildConfig) -> list[Path]:
        compiled = super().expected_artifacts(source, build_config)
        # A previous build may have fallen back to eager; that artifact is valid too (flagged).
        eager = parse_engine_name(compiled[0].name)
        return [*compiled, self.artifact_path(dataclasses.replace(eager, eager=True))]

    def _pinned_host(self) -> HostFields:
        if self.device.type == "cuda":
            return HostFields(sm=self.host.sm, torch=self.host.torch, device=self.host.device)
        return HostFields(torch=self.host.torch, cpu_isa=self.host.cpu_isa)

    def _use_inductor_cache(self) -> Path:
        """Point Inductor at the persistent kernel cache: config, else $TORCHINDUCTOR_CACHE_DIR, else
        <engine_dir>/inductor-cache."""
        configured = self.config.inductor_cache_dir
        env = os.environ.get(INDUCTOR_CACHE_ENV)
        directory = (configured or (Path(env) if env else self.config.engine_dir / "inductor-cache")).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        if env != str(directory):
            # Inductor has no API for this: it reads the env var whenever it resolves its cache dir, but
            # memoizes some derived paths, so clear those (as torch's own temporary_cache_dir does).
            os.environ[INDUCTOR_CACHE_ENV] = str(directory)
            from torch._inductor.utils import clear_caches

            clear_caches()
        return directory

    def _example_inputs(self, signature: EngineSignature, shapes: Sequence[Shape]) -> tuple[torch.Tensor, ...]:
        tensors = []
        for dtype_name, shape in zip(signature.input_dtypes, shapes, strict=True):
            dtype = _torch_dtype(dtype_name)
            if dtype.is_floating_point:
                tensors.append(torch.randn(shape, dtype=dtype, device=self.device))
            else:
                tensors.append(torch.zeros(shape, dtype=dtype, device=self.device))
        return tuple(tensors)

    def _reexport(
        self, program: torch.export.ExportedProgram, build_config: BuildConfig, signature: EngineSignature
    ) -> torch.export.ExportedProgram:
        module = program.module().to(device=self.device, dtype=_DTYPES[build_config.precision])
        dynamic: list[dict[int, Any] | None] = []
        for index, profile in enumerate(build_config.input_shapes):
            stem = re.sub(r"\W", "_", profile.name) or f"input{index}"
            axes = {
                axis: torch.export.Dim(f"{stem}_{index}_d{axis}", min=profile.min[axis], max=profile.max[axis])
                for axis in profile.dynamic_axes
            }
            dynamic.append(axes or None)
        example = self._example_inputs(signature, [p.opt for p in build_config.input_shapes])
        return torch.export.export(module, example, dynamic_shapes=tuple(dynamic))

    @staticmethod
    def _aot_compile(exported: torch.export.ExportedProgram, package: Path, signature: EngineSignature) -> None:
        import torch._inductor  # heavy; only compiling and loading need it

        torch._inductor.aoti_compile_and_package(
            exported,
            package_path=str(package),
            inductor_configs={"aot_inductor.metadata": signature.to_metadata()},
        )

    def _load_package(self, path: Path) -> Any:
        import torch._inductor

        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        return torch._inductor.aoti_load_package(str(path), device_index=index)

    def _load_eager(self, source: Path | io.BytesIO) -> tuple[Callable[..., Any], EngineSignature]:
        extra: dict[str, Any] = {EAGER_META_FILE: ""}
        program = torch.export.load(source, extra_files=extra)
        signature = EngineSignature.from_metadata(json.loads(extra[EAGER_META_FILE]))
        dtype = _DTYPES[signature.precision]
        # A program saved before re-export (fallback from a failed export) is still fp32 on CPU: cast here.
        module = program.module().to(device=self.device, dtype=dtype)
        return module, signature

    def _prewarm(
        self, module: Callable[..., Any], signature: EngineSignature, build_config: BuildConfig
    ) -> float | None:
        """Run the engine on the profile's min, opt and max shapes; return the seconds it took."""
        if self.config.prewarm_iterations == 0:
            return None
        shape_sets: list[tuple[Shape, ...]] = []
        for pick in ("min", "opt", "max"):
            shapes = tuple(getattr(p, pick) for p in build_config.input_shapes)
            if shapes not in shape_sets:
                shape_sets.append(shapes)
        started = time.perf_counter()
        with torch.inference_mode():
            for _ in range(self.config.prewarm_iterations):
                for shapes in shape_sets:
                    module(*self._example_inputs(signature, shapes))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    # -- deserialize / infer / release ---------------------------------------------------------------
    def deserialize_engine(self, entry: EngineCacheEntry) -> EngineHandle:
        # Load exactly what the gate hashed: an eager program from the bytes it read, an AOTInductor package
        # (its loader takes only a path) from the private copy it wrote while hashing, removed once loaded.
        verified = self.gate.admit_verified(entry, private_copy=not entry.eager_fallback)
        entry = verified.entry
        path = entry.path
        started = time.perf_counter()
        try:
            if entry.eager_fallback:
                assert verified.data is not None
                module, signature = self._load_eager(io.BytesIO(verified.data))
            else:
                assert verified.private_copy is not None
                module = self._load_package(verified.private_copy)
                signature = EngineSignature.from_metadata(module.get_metadata())
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise OutOfMemoryError(
                f"out of memory while loading {path.name} on {self.device}: {_describe(exc)}",
                hint="release other engines first",
                path=path,
            ) from exc
        except Exception as exc:  # torch's loaders raise RuntimeError, KeyError, zip and JSON errors
            raise EngineDeserializeError(
                f"cannot load {path.name} with torch {torch.__version__}: {_describe(exc)}",
                hint="rebuild the artifact with compile_engine on this host",
                path=path,
            ) from exc
        finally:
            verified.discard()
        if signature.precision != entry.precision:
            raise EngineDeserializeError(
                f"{path.name} is named {entry.precision} but contains a {signature.precision} engine",
                hint="rebuild the artifact",
                path=path,
            )
        if torch.device(signature.device).type != self.device.type:
            raise EngineDeserializeError(
                f"{path.name} was compiled for {signature.device} but this runtime runs on {self.device}",
                hint="rebuild the artifact on this host",
                path=path,
            )
        log.debug("loaded %s in %.1f ms", path.name, (time.perf_counter() - started) * 1e3)
        return TorchEngineHandle(
            entry=entry,
            input_names=signature.input_names,
            output_names=signature.output_names,
            module=module,
            device=self.device,
            dtype=_DTYPES[signature.precision],
            input_dtypes=tuple(_torch_dtype(d) for d in signature.input_dtypes),
            min_shapes=signature.min_shapes,
            max_shapes=signature.max_shapes,
            eager=entry.eager_fallback,
        )

    def infer(self, handle: EngineHandle, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        handle = self.checked_handle(handle, TorchEngineHandle)
        engine = handle.entry.path.name
        if not isinstance(inputs, Mapping):
            raise InferenceError(f"inputs must be a mapping of input name to array, got {type(inputs).__name__}")
        expected = list(handle.input_names)
        missing = [n for n in expected if n not in inputs]
        unknown = sorted(str(n) for n in inputs if n not in handle.input_names)
        if missing or unknown:
            raise InferenceError(
                f"engine {engine} expects inputs {expected}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else ""),
                hint="pass exactly the engine's input names",
            )
        tensors = []
        for name, dtype, lo, hi in zip(
            expected, handle.input_dtypes, handle.min_shapes, handle.max_shapes, strict=True
        ):
            array = np.asarray(inputs[name])
            if array.dtype.kind not in _NUMERIC_KINDS:
                raise InferenceError(
                    f"input {name!r} of engine {engine} has non-numeric dtype {array.dtype}",
                    hint="pass a numeric numpy array",
                )
            # AOTInductor does not check shapes: an input outside the profile would read out of bounds.
            if array.ndim != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, array.shape, hi, strict=True)):
                raise InferenceError(
                    f"input {name!r} of engine {engine} has shape {tuple(array.shape)}, outside the profile {lo}..{hi}",
                    hint="split the batch or rebuild the engine with a wider shape profile",
                )
            tensors.append(torch.from_numpy(np.ascontiguousarray(array)).to(device=handle.device, dtype=dtype))
        if handle.module is None:  # released concurrently
            raise InferenceError(f"engine {engine} was released; deserialize it again")
        try:
            with torch.inference_mode():
                result = handle.module(*tensors)
                outputs = _flatten_outputs(result)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise OutOfMemoryError(
                f"out of memory running {engine} on {handle.device}: {_describe(exc)}",
                hint="use a smaller batch or release other engines",
            ) from exc
        except Exception as exc:  # only the model runs in this block: whatever it raises is an inference failure
            raise InferenceError(f"engine {engine} failed: {_describe(exc)}") from exc
        if len(outputs) != len(handle.output_names):
            raise InferenceError(
                f"engine {engine} returned {len(outputs)} output(s), its metadata names {len(handle.output_names)}",
                hint="rebuild the artifact",
            )
        return {name: t.detach().cpu().numpy() for name, t in zip(handle.output_names, outputs, strict=True)}

    def release_engine(self, handle: EngineHandle) -> None:
        if not isinstance(handle, TorchEngineHandle):
            raise InferenceError(f"handle {handle!r} was not created by this runtime (TorchEngineHandle expected)")
        if handle.released:
            return
        handle.module = None
        handle.released = True
        if handle.device.type == "cuda":
            torch.cuda.empty_cache()
