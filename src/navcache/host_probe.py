"""Probe the provisioning host (never cached): what engines built here will be tied to."""

from __future__ import annotations

import logging
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from navcache_runtime.host import HostProbe, package_version

from .errors import SortieError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostCapabilities:
    hostname: str
    cpu_arch: str
    cpu_model: str
    cpu_isa: str
    cpu_cores: int
    memory_bytes: int | None
    gpu_name: str | None
    gpu_sm: str | None  # compute capability without the dot, e.g. "87"
    gpu_sm_count: int | None  # streaming multiprocessors
    l4t: str | None
    jetpack: str | None
    tensorrt: str | None
    onnxruntime: str | None
    torch: str | None
    cuda: str | None
    execution_providers: tuple[str, ...]
    free_disk_bytes: int | None

    def identity(self) -> dict[str, str]:
        """The fields that go into the signed manifest (strings only; no floats in signed data)."""
        return {
            k: str(v) if not isinstance(v, tuple) else ",".join(v)
            for k, v in asdict(self).items()
            if v is not None and k not in ("free_disk_bytes", "memory_bytes")
        }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _torch_gpu() -> tuple[int | None, str | None]:
    """SM count and CUDA version from torch, only if torch is already installed (never required)."""
    if package_version("torch") is None:
        return None, None
    try:
        import torch
    except ImportError:
        return None, None
    cuda = torch.version.cuda
    if not torch.cuda.is_available():
        return None, cuda
    return int(torch.cuda.get_device_properties(0).multi_processor_count), cuda


def _execution_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
    except ImportError:
        return ()
    return tuple(onnxruntime.get_available_providers())


def probe_host(cache_dir: Path | None = None, probe: HostProbe | None = None) -> HostCapabilities:
    probe = probe or HostProbe()
    gpu = probe.gpu()
    sm_count, cuda = _torch_gpu() if gpu is not None else (None, None)
    free = None
    if cache_dir is not None:
        existing = next((p for p in (cache_dir, *cache_dir.parents) if p.exists()), None)
        free = shutil.disk_usage(existing).free if existing else None
    return HostCapabilities(
        hostname=platform.node(),
        cpu_arch=platform.machine(),
        cpu_model=_cpu_model(),
        cpu_isa=probe.cpu_isa(),
        cpu_cores=os.cpu_count() or 1,
        memory_bytes=_memory_bytes(),
        gpu_name=gpu.name if gpu else None,
        gpu_sm=gpu.sm if gpu else None,
        gpu_sm_count=sm_count,
        l4t=probe.l4t_release(),
        jetpack=probe.jetpack(),
        tensorrt=package_version("trt"),
        onnxruntime=package_version("ort"),
        torch=package_version("torch"),
        cuda=cuda,
        execution_providers=_execution_providers(),
        free_disk_bytes=free,
    )


#: How many shards a provision run describes at once (Prefect's own thread-pool size, when set, wins).
SHARDS_IN_FLIGHT_ENV = "NAVCACHE_SHARDS_IN_FLIGHT"


def shards_in_flight() -> int:
    """How many shards this host describes at once: ``$NAVCACHE_SHARDS_IN_FLIGHT`` (a positive integer), else
    the host's default.

    Each shard in flight holds its own working set (decode threads, prefetched batches, warped windows:
    ~250 MiB), so the bound, not the area, sets peak memory. One shard already keeps every core busy (ONNX
    Runtime's threads plus the decode threads); a second overlaps one shard's decoding and writing with the
    other's inference. Hosts with many cores get a few more (one per 4 cores, at most 4), still a fixed bound.
    A malformed value is refused in preflight (exit 2), before a run starts.
    """
    raw = os.environ.get(SHARDS_IN_FLIGHT_ENV, "").strip()
    if not raw:
        return max(2, min(4, (os.cpu_count() or 1) // 4))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SortieError(
            f"{SHARDS_IN_FLIGHT_ENV}={raw!r} is not a positive integer",
            where=f"environment {SHARDS_IN_FLIGHT_ENV}",
            hint="set it to how many shards to describe at once (e.g. 2), or unset it for the host's default",
        )
    return value
