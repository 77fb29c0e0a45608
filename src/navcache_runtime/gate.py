"""The engine gate: nothing is deserialised before its name, host fields and bytes check out.

Checks run cheapest first: the filename parses and is for this runtime; every host field pinned in the
name matches the running host; the sidecar exists; the streamed sha256 equals the sidecar (and the
entry's recorded digest, when an entry is given). Any failure raises a typed error; there is no
"load anyway".

:meth:`EngineGate.admit` only checks (the provisioning side's reuse decision). Loading goes through
:meth:`EngineGate.admit_verified`, which reads the artifact once and hands the loader exactly the bytes it
hashed (or, for loaders that take only a path, a private copy written while hashing): an artifact swapped
on disk after the check is never the one loaded.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import EngineDeserializeError, EngineHashMismatchError, EngineSchemaMismatchError
from .integrity import copy_hashed, private_directory, read_hashed, read_sidecar, verify_artifact
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


def entry_for(name: EngineName, path: Path, sha256: str, **measured: Any) -> EngineCacheEntry:
    """The one mapping from an artifact's parsed name to its entry: every field the name encodes, plus the
    artifact's ``path`` and ``sha256`` and what only a build measures (``compile_duration_s``, ...)."""
    return EngineCacheEntry(
        path=path,
        sha256=sha256,
        model_name=name.model,
        precision=name.precision,
        runtime_label=name.runtime_label,
        host=name.host,
        source_digest=name.source,
        config_digest=name.config,
        eager_fallback=name.eager,
        **measured,
    )


def entry_from_artifact(path: Path | str) -> EngineCacheEntry:
    """Describe an existing artifact from its filename and sidecar (no hashing, no host check)."""
    path = Path(path)
    return entry_for(parse_engine_name(path.name), path, read_sidecar(path))


@dataclass
class VerifiedEngine:
    """An admitted engine and the exact bytes the gate hashed: ``data`` in memory, or ``private_copy``, a
    file in a directory only this process's user can write (then ``data`` is None). Call :meth:`discard`
    once the runtime has loaded it (idempotent; the copy is not needed after loading)."""

    entry: EngineCacheEntry
    data: bytes | None = None
    private_copy: Path | None = None

    def discard(self) -> None:
        self.data = None
        if self.private_copy is not None:
            shutil.rmtree(self.private_copy.parent, ignore_errors=True)
            self.private_copy = None


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
        self._check_exists(path)
        digest = verify_artifact(path)
        if entry is None:
            return entry_from_artifact(path)
        self._check_entry_digest(entry, digest)
        return entry

    def admit_verified(self, target: EngineCacheEntry | Path | str, *, private_copy: bool = False) -> VerifiedEngine:
        """Like :meth:`admit`, but read the artifact once and return what was hashed, for the loader.

        ``private_copy=False``: the bytes, in memory (ONNX Runtime, TensorRT, ``torch.export.load``).
        ``private_copy=True``: a copy written while hashing into a fresh private directory, for loaders
        that take only a path (AOTInductor packages); the caller removes it with ``discard()``."""
        entry = target if isinstance(target, EngineCacheEntry) else None
        path = entry.path if entry else Path(target)  # type: ignore[arg-type]
        self.check_name(path)
        self._check_exists(path)
        expected = read_sidecar(path)
        copy_dir = private_directory("navcache-engine-") if private_copy else None
        data: bytes | None = None
        copy: Path | None = None
        try:
            if copy_dir is not None:
                copy, digest = copy_hashed(path, copy_dir)
            else:
                data, digest = read_hashed(path)
        except OSError as exc:
            if copy_dir is not None:
                shutil.rmtree(copy_dir, ignore_errors=True)
            cls = EngineHashMismatchError if exc.errno in (errno.EINVAL, errno.EAGAIN) else EngineDeserializeError
            message = f"cannot read engine {path.name}: {exc.strerror or exc}"
            raise cls(message, path=path, hint="re-provision the cache") from exc
        verified = VerifiedEngine(entry or entry_from_artifact(path), data, copy)
        try:
            if digest != expected:
                raise EngineHashMismatchError(
                    f"{path.name} does not match its sidecar (sha256 {digest[:12]}… != {expected[:12]}…): "
                    "tampered, truncated or corrupt",
                    hint="delete it and rebuild, or re-provision the cache",
                    path=path,
                )
            if entry is not None:
                self._check_entry_digest(entry, digest)
        except BaseException:
            verified.discard()
            raise
        return verified

    @staticmethod
    def _check_exists(path: Path) -> None:
        if not path.is_file():
            what = "is not a regular file" if path.exists() or path.is_symlink() else "does not exist"
            raise EngineDeserializeError(f"engine artifact {path} {what}", path=path, hint="re-provision the cache")

    @staticmethod
    def _check_entry_digest(entry: EngineCacheEntry, digest: str) -> None:
        if entry.sha256 != digest:
            raise EngineHashMismatchError(
                f"{entry.path.name} matches its sidecar but not the digest recorded in its cache entry "
                f"({digest[:12]}… != {entry.sha256[:12]}…): the artifact and its sidecar were replaced",
                hint="re-provision the cache",
                path=entry.path,
            )
