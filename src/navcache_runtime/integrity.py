"""Streaming sha256, ``.sha256`` sidecars and atomic artifact writes.

An artifact is committed as: write to a temp file in the same directory, fsync it, ``os.replace`` it to
its final name, then the same for its sidecar, then fsync the directory. The sidecar is written last, so a
valid sidecar implies a complete artifact; a crash in between leaves an artifact whose sidecar is missing
or stale, which the engine gate refuses (fail-closed) and the next build replaces.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import io
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EngineHashMismatchError, EngineSidecarMissingError

# The file patterns are the layout's (navcache_runtime.layout); they are re-exported here for the writers.
from .layout import SCAN_MEMO_PREFIX as SCAN_MEMO_PREFIX
from .layout import SIDECAR_SUFFIX as SIDECAR_SUFFIX
from .layout import TEMP_PREFIX as TEMP_PREFIX

_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")

#: TEST SEAM, off by default: ``NAVCACHE_FAULT_INJECT="enospc:<glob>|eio:<glob>"`` makes every atomic write
#: whose final file name matches a glob fail with OSError(ENOSPC/EIO), as a full or failing disk would.
#: Read once at import; when unset the only cost is one ``is None`` test per write. Never set it in production.
FAULT_INJECT_ENV = "NAVCACHE_FAULT_INJECT"
_FAULT_CODES = {"enospc": errno.ENOSPC, "eio": errno.EIO}


def _parse_faults(setting: str | None) -> tuple[tuple[int, str], ...] | None:
    if not setting:
        return None
    faults = []
    for part in setting.split("|"):
        kind, _, pattern = part.partition(":")
        if kind.strip().lower() not in _FAULT_CODES or not pattern:
            raise ValueError(f"{FAULT_INJECT_ENV}: bad entry {part!r} (expected enospc:<glob> or eio:<glob>)")
        faults.append((_FAULT_CODES[kind.strip().lower()], pattern))
    return tuple(faults)


_FAULTS = _parse_faults(os.environ.get(FAULT_INJECT_ENV))


def _inject_fault(final: Path) -> None:
    assert _FAULTS is not None
    for code, pattern in _FAULTS:
        if fnmatch.fnmatch(final.name, pattern):
            raise OSError(code, f"{os.strerror(code)} (injected by {FAULT_INJECT_ENV})", str(final))


def sha256_file(path: Path | str, chunk_size: int = _CHUNK) -> str:
    """sha256 of a file, read in fixed-size chunks into one reused buffer (never the whole file)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for error messages."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def fdopen_regular(fd: int) -> io.FileIO:
    """Wrap an open descriptor in an unbuffered binary file, or close it and raise ``OSError(EINVAL)``
    when it is not a regular file. The type is checked on the raw descriptor first: ``open(fd)`` itself
    raises a bare ``IsADirectoryError`` for a directory (and leaves the descriptor open)."""
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"not a regular file ({file_kind(info.st_mode)})")
    return open(fd, "rb", buffering=0)


def open_regular(path: Path | str) -> io.FileIO:
    """Open ``path`` for reading, refusing anything but a regular file (``OSError(EINVAL)``) without
    blocking on a FIFO."""
    return fdopen_regular(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)))


def read_hashed(path: Path | str) -> tuple[bytes, str]:
    """Read a regular file once and hash exactly the bytes read: (the bytes, their sha256 hex).

    What a caller deserialises is then exactly what it verified: a file swapped on disk after this read
    cannot reach the loader. One allocation of the file's size (no second copy). Raises ``OSError``
    (``EINVAL`` for a non-regular file, ``EAGAIN`` when the file changed size while it was read)."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        parts = [handle.read(size + 1)]  # one spare byte: a file that grows meanwhile is noticed
        while sum(map(len, parts)) <= size and parts[-1]:  # short reads (rare on regular files)
            parts.append(handle.read(size + 1 - sum(map(len, parts))))
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) != size:
        raise OSError(errno.EAGAIN, f"{Path(path).name} changed size while it was read ({len(data)} != {size} bytes)")
    return data, hashlib.sha256(data).hexdigest()


def copy_hashed(path: Path | str, directory: Path | str, chunk_size: int = _CHUNK) -> tuple[Path, str]:
    """Copy a regular file into ``directory`` (which the caller keeps private, e.g. a ``mkdtemp``),
    hashing the bytes as they are copied: (the copy, its sha256 hex). For loaders that only take a path
    (AOTInductor packages): the copy is what was hashed, and nobody else can write it."""
    source = Path(path)
    target = Path(directory) / source.name
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open_regular(source) as handle:
        size = os.fstat(handle.fileno()).st_size
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        total = 0
        with open(fd, "wb", buffering=0) as out:
            while True:
                n = handle.readinto(buffer)
                if not n:
                    break
                digest.update(view[:n])
                out.write(view[:n])
                total += n
    if total != size:
        raise OSError(errno.EAGAIN, f"{source.name} changed size while it was copied ({total} != {size} bytes)")
    return target, digest.hexdigest()


def private_directory(prefix: str = "navcache-") -> Path:
    """A new directory only this user can enter (``mkdtemp`` makes it mode 0700)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def sidecar_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def temp_path_for(final: Path) -> Path:
    """A unique temp path beside ``final`` that keeps its name as suffix (tools infer formats from it)."""
    if _FAULTS is not None:  # test seam (see FAULT_INJECT_ENV): every atomic write asks for a temp path first
        _inject_fault(final)
    return final.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{final.name}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, final: Path) -> None:
    fsync_file(tmp)
    os.replace(tmp, final)


def read_sidecar(path: Path | str) -> str:
    """The digest recorded for ``path``; raises if the sidecar is missing or malformed."""
    side = sidecar_path(path)
    try:
        with open_regular(side) as handle:
            raw = handle.read(1024)  # bounded: a sidecar is 64 hex chars
    except FileNotFoundError:
        raise EngineSidecarMissingError(
            f"{Path(path).name} has no {SIDECAR_SUFFIX} sidecar, so it cannot be trusted",
            hint="rebuild the artifact (compile_engine writes it with its sidecar)",
            path=side,
        ) from None
    except OSError as exc:  # a directory, FIFO, dangling loop... in place of the sidecar: fail closed, typed
        raise EngineHashMismatchError(
            f"sidecar {side.name} cannot be read: {exc.strerror or exc}",
            hint="rebuild the artifact, or re-provision the cache",
            path=side,
        ) from None
    text = raw.decode("ascii", errors="replace").strip()
    if not _HEX64.fullmatch(text):
        raise EngineHashMismatchError(
            f"sidecar {side.name} is malformed (expected 64 lowercase hex characters)",
            hint="rebuild the artifact",
            path=side,
        )
    return text


def verify_artifact(path: Path | str) -> str:
    """Stream-hash ``path`` and compare with its sidecar; return the digest when they match."""
    path = Path(path)
    expected = read_sidecar(path)
    try:
        actual = sha256_file(path)
    except FileNotFoundError:
        raise EngineHashMismatchError(f"{path.name} is missing but its sidecar exists", path=path) from None
    except OSError as exc:  # e.g. a directory in its place
        raise EngineHashMismatchError(
            f"{path.name} cannot be read: {exc.strerror or exc}", hint="re-provision the cache", path=path
        ) from None
    if actual != expected:
        raise EngineHashMismatchError(
            f"{path.name} does not match its sidecar (sha256 {actual[:12]}… != {expected[:12]}…): "
            "tampered, truncated or corrupt",
            hint="delete it and rebuild, or re-provision the cache",
            path=path,
        )
    return actual


def commit_artifact(tmp: Path, final: Path) -> str:
    """Hash ``tmp``, move it to ``final`` and write its sidecar, all atomically. Returns the digest."""
    digest = sha256_file(tmp)
    side_tmp = temp_path_for(sidecar_path(final))
    try:
        _replace_durably(tmp, final)
        side_tmp.write_text(digest, encoding="ascii")
        _replace_durably(side_tmp, sidecar_path(final))
    finally:
        with contextlib.suppress(FileNotFoundError):
            side_tmp.unlink()
    fsync_dir(final.parent)
    return digest


@contextlib.contextmanager
def _temp_beside(final: Path) -> Iterator[Path]:
    """Create ``final``'s directory and yield a fresh temp path in it (see :func:`temp_path_for`); on exit
    the temp file is removed if it is still there, so a failed write leaves no debris and ``final`` as it was.
    The caller writes the temp file and moves it into place inside the ``with``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def staged_artifact(final: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``final``; the caller writes it; on clean exit it is committed with its
    sidecar, on error it is removed and nothing at ``final`` changes. Use :func:`write_artifact` when
    the bytes are already in memory.
    """
    final = Path(final)
    with _temp_beside(final) as tmp:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the builder wrote nothing to {tmp}")
        commit_artifact(tmp, final)


def write_artifact(final: Path | str, data: bytes) -> str:
    """Atomically write ``data`` to ``final`` with its sidecar; return the digest."""
    final = Path(final)
    with _temp_beside(final) as tmp:
        tmp.write_bytes(data)
        return commit_artifact(tmp, final)


def write_artifact_once(final: Path | str, data: bytes) -> str:
    """Like :func:`write_artifact`, but a content-addressed file that already exists and verifies is left
    alone: an older manifest may name it, and rewriting it (even with equal bytes) would race its readers."""
    final = Path(final)
    if final.is_file():
        try:
            return verify_artifact(final)
        except (EngineHashMismatchError, EngineSidecarMissingError):
            pass  # damaged: replace it
    return write_artifact(final, data)


def atomic_write_bytes(final: Path | str, data: bytes) -> None:
    """Atomically replace ``final`` with ``data`` (no sidecar): for caches such as TensorRT timing caches."""
    final = Path(final)
    with _temp_beside(final) as tmp:
        tmp.write_bytes(data)
        _replace_durably(tmp, final)
        fsync_dir(final.parent)
