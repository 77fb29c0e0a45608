"""What the running host is, as far as compiled artifacts care: GPU SM and model, JetPack, CPU ISA and
the versions of the inference libraries. Reads files and package metadata only; imports no inference
library (so it is cheap and keeps the runtime package slim).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from .naming import slugify
from .types import HostFields

log = logging.getLogger(__name__)

# L4T release (from /etc/nv_tegra_release) -> JetPack release. Source: NVIDIA's JetPack archive.
L4T_TO_JETPACK: dict[str, str] = {
    "38.2": "7.0",
    "36.4.4": "6.2.1",
    "36.4.3": "6.2",
    "36.4": "6.1",
    "36.3": "6.0",
    "35.6": "5.1.4",
    "35.5": "5.1.3",
    "35.4": "5.1.2",
    "35.3": "5.1.1",
    "35.2": "5.1",
    "35.1": "5.0.2",
    "32.7": "4.6.1",
}
# Jetson modules have no NVML on older JetPacks: map the device-tree model to the GPU's SM.
JETSON_SM: tuple[tuple[str, str], ...] = (
    ("thor", "110"),
    ("orin", "87"),
    ("xavier", "72"),
    ("nano", "53"),
    ("tx2", "62"),
)

_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "trt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-lean", "tensorrt_lean"),
    "ort": ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml"),
    "torch": ("torch",),
}


def package_version(field: str) -> str | None:
    """Installed version of the library behind a host field ("trt", "ort", "torch"), local part dropped."""
    for dist in _DISTRIBUTIONS[field]:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        match = re.match(r"\d+(?:\.\d+)*", version)
        return match.group(0) if match else None
    return None


@dataclass(frozen=True)
class GpuInfo:
    sm: str
    name: str


@dataclass
class HostProbe:
    """Reads the host. Roots are injectable so tests can present a Jetson or a dGPU box."""

    proc_root: Path = Path("/proc")
    etc_root: Path = Path("/etc")
    device_tree_root: Path = Path("/proc/device-tree")
    use_nvml: bool = True

    def cpu_isa(self) -> str:
        machine = platform.machine().lower()
        try:
            cpuinfo = (self.proc_root / "cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
        flags: set[str] = set()
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
        if machine in ("aarch64", "arm64") or "asimd" in flags:
            return "sve" if "sve" in flags else "neon"
        if {"avx512f", "avx512bw", "avx512vl"} <= flags:
            return "avx512"
        if {"avx2", "fma"} <= flags:
            return "avx2"
        if "avx" in flags:
            return "avx"
        if "sse4_2" in flags:
            return "sse42"
        return slugify(machine or "unknown")

    def l4t_release(self) -> str | None:
        try:
            text = (self.etc_root / "nv_tegra_release").read_text(errors="replace")
        except OSError:
            return None
        match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
        return f"{match.group(1)}.{match.group(2)}" if match else None

    def jetpack(self) -> str | None:
        l4t = self.l4t_release()
        if l4t is None:
            return None
        for release, jetpack in L4T_TO_JETPACK.items():  # most specific first
            if l4t == release or l4t.startswith(release + "."):
                return jetpack
        log.warning("unknown L4T release %s; naming artifacts with jpl4t-%s", l4t, l4t)
        return l4t

    def jetson_model(self) -> str | None:
        try:
            return (self.device_tree_root / "model").read_text(errors="replace").strip("\x00 \n") or None
        except OSError:
            return None

    def gpu(self, index: int = 0) -> GpuInfo | None:
        if self.use_nvml:
            info = _nvml_gpu(index)
            if info is not None:
                return info
        model = self.jetson_model()
        if model and self.l4t_release():
            for key, sm in JETSON_SM:
                if key in model.lower():
                    return GpuInfo(sm=sm, name=model)
        return None

    def host_fields(self, gpu_index: int = 0) -> HostFields:
        gpu = self.gpu(gpu_index)
        return HostFields(
            sm=gpu.sm if gpu else None,
            jetpack=self.jetpack(),
            trt=package_version("trt"),
            ort=package_version("ort"),
            torch=package_version("torch"),
            cpu_isa=self.cpu_isa(),
            device=slugify(gpu.name) if gpu else None,
        )


def _nvml_gpu(index: int) -> GpuInfo | None:
    try:
        import pynvml  # nvidia-ml-py; optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return GpuInfo(sm=f"{major}{minor}", name=name.decode() if isinstance(name, bytes) else str(name))


@functools.lru_cache(maxsize=8)
def detect_host_fields(gpu_index: int = 0) -> HostFields:
    """The running host's fields, probed once per process."""
    return HostProbe().host_fields(gpu_index)
