"""Thermal telemetry (placeholder interface; the full implementation replaces this file)."""

from __future__ import annotations

from .config import RuntimeConfig
from .errors import TelemetryUnavailableError
from .types import ThermalState


class ThermalMonitor:
    @classmethod
    def from_config(cls, config: RuntimeConfig) -> ThermalMonitor:
        return cls()

    def state(self) -> ThermalState:
        raise TelemetryUnavailableError("no thermal telemetry source on this host")

    def close(self) -> None:
        pass
