"""The engine gate: nothing is deserialised before its name, host fields and bytes check out.

Checks run cheapest first: the filename parses and is for this runtime; every host field pinned in the
name matches the running host; the sidecar exists; the streamed sha256 equals the sidecar (and the
entry's recorded digest, when an entry is given). Any failure raises a typed error; there is no
"load anyway".
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .errors import EngineDeserializeError, EngineHashMismatchError, EngineSchemaMismatchError
from .integrity import read_sidecar, verify_artifact
from .naming import EngineName, parse_engine_name
from .types import EngineCacheEntry, HostFields, RuntimeLabel

_VERSION_FIELDS = {"jetpack", "trt", "ort", "torch"}
_LABELS = {
    "sm": "GPU SM",
    "jetpack": "JetPack",
    "trt": "TensorRT",
    "ort": "ONNX Runtime",
    "torch": "PyTorch",
    "cpu_isa": "CPU ISA",
    "device": "device model",
}


def _version_matches(pinned: str, actual: str) -> bool:
    """``10.3`` pins ``10.3.x``; ``10.3.0`` pins ``10.3.0`` only."""
    want, have = pinned.split("."), actual.split(".")
    return have[: len(want)] == want


def host_mismatches(pinned: HostFields, actual: HostFields) -> list[str]:
    """Human-readable differences between an artifact's pinned fields and the running host."""
    problems = []
    for f in fields(HostFields):
        want = getattr(pinned, f.name)
        if want is None:
            continue
        have = getattr(actual, f.name)
        ok = have is not None and (_version_matches(want, have) if f.name in _VERSION_FIELDS else want == have)
        if not ok:
            problems.append(f"{_LABELS[f.name]} {want} in the name but {have or 'none'} on this host")
    return problems


def entry_from_artifact(path: Path | str) -> EngineCacheEntry:
    """Describe an existing artifact from its filename and sidecar (no hashing, no host check)."""
    path = Path(path)
    name = parse_engine_name(path.name)
    return EngineCacheEntry(
        path=path,
        sha256=read_sidecar(path),
        model_name=name.model,
        precision=name.precision,
        runtime_label=name.runtime_label,
        host=name.host,
        source_digest=name.source,
        config_digest=name.config,
        eager_fallback=name.eager,
    )


class EngineGate:
    def __init__(self, host: HostFields, runtime_label: RuntimeLabel | None = None) -> None:
        self.host = host
        self.runtime_label = runtime_label

    def check_name(self, path: Path) -> EngineName:
        name = parse_engine_name(path.name)
        if self.runtime_label is not None and name.runtime_label != self.runtime_label:
            raise EngineSchemaMismatchError(
                f"{path.name} is a {name.runtime_label} artifact, this runtime is {self.runtime_label}",
                hint="configure the runtime that built it, or rebuild it for this one",
                path=path,
            )
        problems = host_mismatches(name.host, self.host)
        if problems:
            raise EngineSchemaMismatchError(
                f"{path.name} was built for other hardware: " + "; ".join(problems),
                hint="compile it on this host (engines are tied to the GPU, JetPack and library versions)",
                path=path,
            )
        return name

    def admit(self, target: EngineCacheEntry | Path | str) -> EngineCacheEntry:
        """Return the verified entry for ``target`` or raise; never returns an unverified artifact."""
        entry = target if isinstance(target, EngineCacheEntry) else None
        path = entry.path if entry else Path(target)  # type: ignore[arg-type]
        self.check_name(path)
        if not path.is_file():
            raise EngineDeserializeError(
                f"engine artifact {path} does not exist", path=path, hint="re-provision the cache"
            )
        digest = verify_artifact(path)
        if entry is None:
            return entry_from_artifact(path)
        if entry.sha256 != digest:
            raise EngineHashMismatchError(
                f"{path.name} matches its sidecar but not the digest recorded in its cache entry "
                f"({digest[:12]}… != {entry.sha256[:12]}…): the artifact and its sidecar were replaced",
                hint="re-provision the cache",
                path=path,
            )
        return entry
