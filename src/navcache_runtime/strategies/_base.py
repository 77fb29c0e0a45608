"""What every strategy shares: host identity, the engine gate, artifact naming, handle checks, telemetry."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..config import RuntimeConfig
from ..errors import EngineBuildError, InferenceError
from ..gate import EngineGate, entry_for
from ..host import detect_host_fields
from ..integrity import sha256_file
from ..naming import RUNTIME_EXTENSION, EngineName, slugify
from ..thermal import ThermalMonitor
from ..types import BuildConfig, EngineCacheEntry, EngineHandle, HostFields, RuntimeLabel, ThermalState

log = logging.getLogger(__name__)

H = TypeVar("H", bound=EngineHandle)


class RuntimeBase:
    label: ClassVar[RuntimeLabel]

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        host: HostFields | None = None,
        thermal: ThermalMonitor | None = None,
    ) -> None:
        self.config = config
        self.host = host if host is not None else detect_host_fields(config.device_id)
        self.gate = EngineGate(self.host, self.label)
        self._thermal = thermal

    # -- Protocol members shared by all strategies -------------------------------------------------
    def current_runtime_label(self) -> RuntimeLabel:
        return self.label

    def thermal_state(self) -> ThermalState:
        if self._thermal is None:
            self._thermal = ThermalMonitor.from_config(self.config)
        return self._thermal.state()

    def close(self) -> None:
        """Stop background telemetry. Engines are released by their own handles."""
        if self._thermal is not None:
            self._thermal.close()

    def __enter__(self) -> RuntimeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for subclasses ------------------------------------------------------------------
    @staticmethod
    def source_digest(source: Path) -> str:
        if not source.is_file():
            raise EngineBuildError(
                f"source model {source} does not exist", path=source, hint="check the model path in the configuration"
            )
        return sha256_file(source)

    @staticmethod
    def model_name(source: Path, build_config: BuildConfig) -> str:
        name = build_config.model_name or source.name.split(".")[0]
        # Filenames cannot carry arbitrary names; keep it readable and schema-safe.
        safe = re.sub(r"_{2,}", "_", re.sub(r"[^A-Za-z0-9._\-]", "-", name)).strip("._-")
        return safe or "model"

    def artifact_name(
        self,
        source: Path,
        build_config: BuildConfig,
        *,
        pinned: HostFields,
        source_digest: str,
        eager: bool = False,
    ) -> EngineName:
        return EngineName(
            model=self.model_name(source, build_config),
            precision=build_config.precision,
            ext=RUNTIME_EXTENSION[self.label],
            host=pinned,
            source=source_digest,
            config=build_config.digest(),
            eager=eager,
        )

    def artifact_path(self, name: EngineName) -> Path:
        return self.config.engine_dir / name.filename

    def built_entry(
        self, path: Path, sha256: str, name: EngineName, compile_s: float, **extra: Any
    ) -> EngineCacheEntry:
        """The entry for an artifact this runtime just built and committed as ``name``."""
        return entry_for(name, path, sha256, compile_duration_s=compile_s, **extra)

    # -- predicting the artifact without compiling (compile-or-reuse) ----------------------------
    def resolve_source(self, source: Path) -> Path:
        """The file this strategy really compiles for ``source`` (PyTorch: the sibling ``.pt2``)."""
        return source

    def planned_host_fields(self) -> HostFields:
        """The host fields a fresh build on this host would pin in its filename."""
        raise NotImplementedError

    def build_config_for(self, source: Path, build_config: BuildConfig) -> BuildConfig:
        """The build config provisioning compiles ``source`` with (and names the artifact after); the
        strategies that need more from the source model than the sortie gives override it."""
        return build_config

    def expected_artifacts(self, source: Path, build_config: BuildConfig) -> list[Path]:
        """Where a build of ``source`` with ``build_config`` on this host lands, best candidate first.
        Reusing an existing file there is safe once :attr:`gate` admits it."""
        resolved = self.resolve_source(Path(source))
        digest = self.source_digest(resolved)
        name = self.artifact_name(resolved, build_config, pinned=self.planned_host_fields(), source_digest=digest)
        return [self.artifact_path(name)]

    @staticmethod
    def checked_handle(handle: EngineHandle, kind: type[H]) -> H:
        if not isinstance(handle, kind):
            raise InferenceError(f"handle {handle!r} was not created by this runtime ({kind.__name__} expected)")
        if handle.released:
            raise InferenceError(f"engine {handle.entry.path.name} was released; deserialize it again")
        return handle

    @staticmethod
    def device_slug(name: str | None) -> str | None:
        return slugify(name) if name else None
