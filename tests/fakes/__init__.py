"""Fakes of third-party modules for tests on machines without the real thing (no GPU, no TensorRT builder).

``tests/fakes/tensorrt.py`` stands in for ``tensorrt``; :class:`HostMemory` stands in for the TensorRT
strategy's device-memory seam, with plain numpy arrays whose addresses the fake execution context reads and
writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class HostBuffer:
    array: np.ndarray

    @property
    def ptr(self) -> int:
        return int(self.array.ctypes.data)


class HostMemory:
    """``DeviceMemory`` in host RAM: what the fake ``tensorrt`` context reads/writes by address."""

    def __init__(self) -> None:
        self.activations = 0
        self.synchronizations = 0
        self.allocated: list[tuple[tuple[int, ...], np.dtype[Any]]] = []

    def activate(self) -> None:
        self.activations += 1

    def to_device(self, array: np.ndarray) -> HostBuffer:
        copy = np.array(array, copy=True, order="C")  # a "device" copy the caller cannot alias
        self.allocated.append((tuple(copy.shape), copy.dtype))
        return HostBuffer(copy)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> HostBuffer:
        array = np.empty(tuple(shape), dtype)
        # NaN-filled so a context that never writes its outputs is caught by the numeric checks.
        array.fill(np.nan if np.dtype(dtype).kind == "f" else 0)
        self.allocated.append((tuple(array.shape), array.dtype))
        return HostBuffer(array)

    def to_host(self, buffer: Any) -> np.ndarray:
        return np.array(buffer.array, copy=True)

    def stream(self) -> int:
        return 0x5EED  # any handle: the fake context only checks that it is an int

    def synchronize(self) -> None:
        self.synchronizations += 1
