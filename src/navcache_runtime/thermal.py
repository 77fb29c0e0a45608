"""Thermal telemetry: per-zone temperatures and throttling from sysfs thermal zones (Jetson) and NVML (dGPU).

Sources read synchronously (:class:`SysfsThermalSource`, :class:`NvmlThermalSource`);
:class:`ThermalMonitor` merges them and keeps the latest reading fresh from a daemon thread at
``RuntimeConfig.thermal_poll_hz``. Nothing here touches the hardware until the first :meth:`ThermalMonitor.state`
call, so building a runtime stays cheap and never fails for lack of telemetry. ``pynvml`` is imported lazily.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .config import RuntimeConfig
from .errors import TelemetryUnavailableError
from .types import ThermalState, ZoneReading

log = logging.getLogger(__name__)

DEFAULT_SYSFS_ROOT = Path("/sys/class/thermal")

#: Trip types at which the kernel starts throttling (``critical`` shuts down; ``active`` only spins fans).
THROTTLE_TRIP_TYPES: tuple[str, ...] = ("passive", "hot")
#: Cooling devices whose non-zero ``cur_state`` means clocks are being capped.
FREQ_COOLING_MARKERS: tuple[str, ...] = ("cpufreq", "gpufreq", "devfreq")

# Clock-event reason bits from nvml.h (stable ABI; identical for the old "ClocksThrottle" names).
# Idle, application clocks, sync boost and display clock settings are deliberate, not throttling.
NVML_THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0x04, "sw power cap"),
    (0x08, "hw slowdown"),
    (0x20, "sw thermal slowdown"),
    (0x40, "hw thermal slowdown"),
    (0x80, "hw power brake"),
)

# Colder than any airframe meets: drivers use values like -256000 for "sensor off", not a temperature.
_MIN_PLAUSIBLE_C = -100.0
_ZONE_DIR = re.compile(r"thermal_zone(\d+)$")
_CDEV_DIR = re.compile(r"cooling_device(\d+)$")
_TRIP_TYPE = re.compile(r"trip_point_(\d+)_type$")


def decode_nvml_throttle_reasons(mask: int) -> tuple[str, ...]:
    """Readable names of the throttling bits set in an NVML clock-event/throttle-reason mask."""
    return tuple(name for bit, name in NVML_THROTTLE_BITS if mask & bit)


@runtime_checkable
class ThermalSource(Protocol):
    """One place temperatures come from. ``read`` raises TelemetryUnavailableError, never anything else."""

    name: str

    def read(self) -> ThermalState: ...

    def available(self) -> bool: ...

    def close(self) -> None: ...


# -- sysfs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Zone:
    directory: Path
    type: str


def _numbered(root: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Entries of ``root`` matching ``pattern``, in numeric order (zone10 after zone9)."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := pattern.match(name))]
    return [root / name for _, name in sorted(found)]


def _read_text(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


def _read_millicelsius(path: Path) -> float:
    """A sysfs temperature in degrees C. Raises ValueError for text that is not a plausible temperature."""
    text = _read_text(path)
    celsius = int(text) / 1000.0
    if celsius < _MIN_PLAUSIBLE_C:
        raise ValueError(f"{text!r} is not a plausible temperature (below {_MIN_PLAUSIBLE_C:.0f} C)")
    return celsius


class SysfsThermalSource:
    """Thermal zones under ``root`` (``/sys/class/thermal``), matched by their ``type`` (case-insensitive).

    A zone throttles when its temperature reaches its lowest ``passive``/``hot`` trip point; a
    cpufreq/gpufreq/devfreq cooling device with ``cur_state > 0`` is a throttle reason as well.
    Zones whose temperature cannot be read are skipped (logged once per zone).
    """

    name = "sysfs"

    def __init__(self, root: Path | str = DEFAULT_SYSFS_ROOT, zone_types: Iterable[str] = ()) -> None:
        self.root = Path(root)
        self.zone_types = tuple(zone_types)
        self._wanted = {t.casefold() for t in self.zone_types}
        self._warned: set[str] = set()  # keys already logged at WARNING, so a 1 Hz poller does not spam

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        log.log(level, message, *args)

    def _zones(self) -> tuple[list[_Zone], list[str]]:
        """(matching zones, every zone type seen)."""
        matching: list[_Zone] = []
        seen: list[str] = []
        for directory in _numbered(self.root, _ZONE_DIR):
            try:
                zone_type = _read_text(directory / "type")
            except OSError as exc:
                self._warn_once(
                    f"{directory}/type", "skipping thermal zone %s: cannot read its type: %s", directory, exc
                )
                continue
            seen.append(zone_type)
            if not self._wanted or zone_type.casefold() in self._wanted:
                matching.append(_Zone(directory, zone_type))
        return matching, seen

    def available(self) -> bool:
        return bool(self._zones()[0])

    def _not_found(self, seen: list[str]) -> TelemetryUnavailableError:
        what = f"no thermal zones under {self.root}"
        if self._wanted:
            what += f" matching {list(self.zone_types)}"
        if seen:
            what += f" (present: {sorted(set(seen))})"
        elif not self.root.is_dir():
            what += " (the directory does not exist)"
        return TelemetryUnavailableError(
            what,
            path=self.root,
            hint="set thermal_zones to zone types present on this host (or leave it empty for all)"
            if seen
            else "check thermal_sysfs_root",
        )

    def _throttle_trip(self, zone: _Zone) -> tuple[float, str] | None:
        """The lowest passive/hot trip of a zone as (temp C, trip type), or None."""
        trips: list[tuple[float, str]] = []
        for type_file in zone.directory.glob("trip_point_*_type"):
            m = _TRIP_TYPE.match(type_file.name)
            if not m:
                continue
            try:
                trip_type = _read_text(type_file)
                if trip_type not in THROTTLE_TRIP_TYPES:
                    continue
                trip_c = _read_millicelsius(zone.directory / f"trip_point_{m.group(1)}_temp")
            except (OSError, ValueError) as exc:
                log.debug("ignoring trip point %s: %s", type_file, exc)
                continue
            # A trip at or below 0 C is a disabled placeholder on some boards, not a real limit.
            if trip_c > 0:
                trips.append((trip_c, trip_type))
        return min(trips, default=None)

    def _cooling_reasons(self) -> list[str]:
        reasons: list[str] = []
        for directory in _numbered(self.root, _CDEV_DIR):
            try:
                cdev_type = _read_text(directory / "type")
                if not any(marker in cdev_type.casefold() for marker in FREQ_COOLING_MARKERS):
                    continue
                cur = int(_read_text(directory / "cur_state"))
            except (OSError, ValueError) as exc:
                log.debug("ignoring cooling device %s: %s", directory, exc)
                continue
            if cur > 0:
                try:
                    limit = f"/{int(_read_text(directory / 'max_state'))}"
                except (OSError, ValueError):
                    limit = ""
                reasons.append(f"cooling device {cdev_type} ({directory.name}) at state {cur}{limit}")
        return reasons

    def read(self) -> ThermalState:
        zones, seen = self._zones()
        if not zones:
            raise self._not_found(seen)
        readings: list[tuple[_Zone, float, tuple[float, str] | None]] = []
        failures: list[str] = []
        for zone in zones:
            temp_file = zone.directory / "temp"
            try:
                temp_c = _read_millicelsius(temp_file)
            except (OSError, ValueError) as exc:
                # e.g. a Jetson GPU zone while the GPU is rail-gated: skip it, keep the others.
                failures.append(f"{temp_file} ({zone.type}): {exc}")
                self._warn_once(
                    str(temp_file),
                    "skipping thermal zone %s (%s): unreadable temperature: %s",
                    zone.directory.name,
                    zone.type,
                    exc,
                )
                continue
            readings.append((zone, temp_c, self._throttle_trip(zone)))
        if not readings:
            raise TelemetryUnavailableError(
                f"thermal zones under {self.root} matched {[z.type for z in zones]} but none had a readable "
                f"temperature: {'; '.join(failures)}",
                path=self.root,
                hint="check the sensor drivers, or pick other zones with thermal_zones",
            )
        # Several zones can share a type (e.g. two "acpitz"); keep names unique for consumers that key by name.
        counts: dict[str, int] = {}
        for zone, _, _ in readings:
            counts[zone.type] = counts.get(zone.type, 0) + 1
        out: list[ZoneReading] = []
        reasons: list[str] = []
        for zone, temp_c, trip in readings:
            name = zone.type if counts[zone.type] == 1 else f"{zone.type} ({zone.directory.name})"
            out.append(ZoneReading(name, temp_c, trip[0] if trip else None))
            if trip and temp_c >= trip[0]:
                reasons.append(f"{name} at {temp_c:.1f} C >= {trip[1]} trip {trip[0]:.1f} C")
        reasons.extend(self._cooling_reasons())
        return ThermalState(tuple(out), bool(reasons), tuple(reasons), self.name, time.time())

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"SysfsThermalSource(root={str(self.root)!r}, zone_types={self.zone_types!r})"


# -- NVML ----------------------------------------------------------------------------------------------


class NvmlThermalSource:
    """GPU temperature, slowdown threshold and clock-event (throttle) reasons through NVML (``pynvml``).

    NVML is initialised on the first read and shut down by :meth:`close`; any NVML error becomes a
    TelemetryUnavailableError and the next read starts over with a fresh ``nvmlInit``.
    """

    name = "nvml"

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index
        self._nvml: Any = None  # the pynvml module once initialised
        self._handle: Any = None
        self._lock = threading.Lock()

    def _unavailable(self, detail: str) -> TelemetryUnavailableError:
        return TelemetryUnavailableError(
            f"no NVML GPU at index {self.device_index} ({detail})",
            hint="install nvidia-ml-py and the NVIDIA driver, or rely on sysfs thermal zones",
        )

    def _open(self) -> tuple[Any, Any]:
        if self._handle is not None:
            return self._nvml, self._handle
        try:
            import pynvml
        except ImportError as exc:
            raise self._unavailable(f"pynvml is not installed: {exc}") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise self._unavailable(f"nvmlInit failed: {exc}") from exc
        self._nvml = pynvml
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except pynvml.NVMLError as exc:
            self._shutdown()
            raise self._unavailable(f"nvmlDeviceGetHandleByIndex failed: {exc}") from exc
        return pynvml, self._handle

    def _shutdown(self) -> None:
        nvml, self._nvml, self._handle = self._nvml, None, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                log.debug("nvmlShutdown failed: %s", exc)

    def available(self) -> bool:
        with self._lock:
            try:
                self._open()
            except TelemetryUnavailableError:
                return False
            return True

    def read(self) -> ThermalState:
        with self._lock:
            nvml, handle = self._open()
            try:
                return self._read(nvml, handle)
            except nvml.NVMLError as exc:
                self._shutdown()  # e.g. GPU lost or driver reloaded: re-initialise on the next read
                raise TelemetryUnavailableError(
                    f"NVML read of GPU {self.device_index} failed: {exc}",
                    hint="check the NVIDIA driver (nvidia-smi)",
                ) from exc

    def _read(self, nvml: Any, handle: Any) -> ThermalState:
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # older pynvml returns bytes
            name = name.decode(errors="replace")
        temp_c = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        slowdown_c: float | None = None
        try:
            slowdown_c = float(nvml.nvmlDeviceGetTemperatureThreshold(handle, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
        except nvml.NVMLError as exc:  # not supported on every board
            log.debug("GPU %d has no slowdown threshold: %s", self.device_index, exc)
        # nvmlDeviceGetCurrentClocksThrottleReasons was renamed to ...ClocksEventReasons in NVML 12.
        get_reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        reasons: list[str] = []
        if get_reasons is not None:
            try:
                reasons.extend(decode_nvml_throttle_reasons(int(get_reasons(handle))))
            except nvml.NVMLError as exc:
                log.debug("GPU %d reports no clock-event reasons: %s", self.device_index, exc)
        if slowdown_c is not None and temp_c >= slowdown_c:
            reasons.append(f"{name} at {temp_c:.1f} C >= slowdown threshold {slowdown_c:.1f} C")
        return ThermalState(
            (ZoneReading(name, temp_c, slowdown_c),), bool(reasons), tuple(reasons), self.name, time.time()
        )

    def close(self) -> None:
        with self._lock:
            self._shutdown()

    def __repr__(self) -> str:
        return f"NvmlThermalSource(device_index={self.device_index})"


# -- monitor -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    state: ThermalState | None
    error: BaseException | None
    at: float  # time.monotonic() of the poll


class ThermalMonitor:
    """Merges its sources into one ThermalState and keeps it fresh in the background.

    ``poll_hz > 0``: the first :meth:`state` reads synchronously, then starts a daemon thread that polls at
    ``poll_hz``; later calls return the latest reading with ``age_s`` set. ``poll_hz == 0``: every call
    reads synchronously and no thread is ever started. After :meth:`close` calls read synchronously.
    A source that fails is left out while another works; when none works, :meth:`state` raises
    TelemetryUnavailableError naming what was looked for.
    """

    def __init__(self, sources: Sequence[ThermalSource], poll_hz: float = 1.0) -> None:
        if not 0 <= poll_hz <= 100:
            raise ValueError(f"poll_hz must be between 0 and 100, got {poll_hz!r}")
        self.sources = tuple(sources)
        self.poll_hz = float(poll_hz)
        self._latest: _Outcome | None = None
        self._poll_lock = threading.Lock()  # one poll at a time: the sources are not re-entrant
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing: dict[str, str] = {}  # source name -> last error, to log changes only

    @classmethod
    def from_config(cls, config: RuntimeConfig) -> ThermalMonitor:
        """Sysfs zones and NVML as the config names them. Touches no file, no NVML, starts no thread."""
        return cls(
            [SysfsThermalSource(config.thermal_sysfs_root, config.thermal_zones), NvmlThermalSource(config.device_id)],
            poll_hz=config.thermal_poll_hz,
        )

    # -- polling ---------------------------------------------------------------------------------------
    def _merge(self) -> ThermalState:
        states: list[ThermalState] = []
        errors: list[TelemetryUnavailableError] = []
        for source in self.sources:
            try:
                states.append(source.read())
            except TelemetryUnavailableError as exc:
                errors.append(exc)
                if self._failing.get(source.name) != exc.message:
                    log.info("thermal source %s unavailable: %s", source.name, exc)
                    self._failing[source.name] = exc.message
                continue
            if self._failing.pop(source.name, None) is not None:
                log.info("thermal source %s is available again", source.name)
        if not states:
            if not errors:
                raise TelemetryUnavailableError("no thermal telemetry sources configured")
            hints = [e.hint for e in errors if e.hint]
            raise TelemetryUnavailableError(
                " and ".join(e.message for e in errors), hint="; ".join(hints) if hints else None
            )
        if len(states) == 1:
            return states[0]
        return ThermalState(
            zones=tuple(z for s in states for z in s.zones),
            throttled=any(s.throttled for s in states),
            throttle_reasons=tuple(r for s in states for r in s.throttle_reasons),
            source="+".join(s.source for s in states),
            timestamp=time.time(),
        )

    def poll(self) -> ThermalState:
        """Read all sources now (synchronously), remember the result and return it."""
        with self._poll_lock:
            try:
                state = self._merge()
            except Exception as exc:
                self._latest = _Outcome(None, exc, time.monotonic())
                raise
            self._latest = _Outcome(state, None, time.monotonic())
            return state

    def _run(self) -> None:
        period = 1.0 / self.poll_hz
        next_at = time.monotonic() + period  # state() has just polled synchronously
        last_error: str | None = None
        try:
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                next_at = max(next_at + period, time.monotonic())  # keep the rate; never burst to catch up
                try:
                    self.poll()
                except TelemetryUnavailableError as exc:
                    if str(exc) != last_error:
                        log.warning("thermal poll failed: %s", exc)
                    last_error = str(exc)
                except Exception as exc:  # a bug or an odd driver must not kill the poller
                    log.exception("thermal poll failed unexpectedly")
                    last_error = repr(exc)
                else:
                    if last_error is not None:
                        log.info("thermal poll recovered")
                    last_error = None
        finally:
            if not self._stop.is_set():
                log.error("thermal poller thread exited unexpectedly; the next state() restarts it")

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="navcache-thermal-poller", daemon=True)
            self._thread.start()

    # -- public API ----------------------------------------------------------------------------------
    def state(self) -> ThermalState:
        """The latest reading (``age_s`` = seconds since it was polled). Raises TelemetryUnavailableError."""
        background = self.poll_hz > 0 and not self._closed
        latest = self._latest
        if not background or latest is None:
            try:
                self.poll()
            finally:
                if background:
                    self._ensure_thread()  # also after a failure: the source may appear later
            latest = self._latest
        elif self._thread is None or not self._thread.is_alive():
            self._ensure_thread()
        assert latest is not None
        if latest.error is not None:
            exc = latest.error
            if isinstance(exc, TelemetryUnavailableError):
                raise TelemetryUnavailableError(exc.message, hint=exc.hint, path=exc.path) from exc
            raise TelemetryUnavailableError(f"thermal poll failed: {type(exc).__name__}: {exc}") from exc
        assert latest.state is not None
        return dataclasses.replace(latest.state, age_s=max(0.0, time.monotonic() - latest.at))

    def close(self, timeout: float = 2.0) -> None:
        """Stop the poller (joins it) and release the sources. Idempotent."""
        with self._start_lock:
            self._closed = True
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():  # stuck in a driver read; it is a daemon, so it cannot block exit
                log.warning("thermal poller did not stop within %.1f s; leaving its sources open", timeout)
                return
        with self._poll_lock:
            for source in self.sources:
                source.close()

    @property
    def polling(self) -> bool:
        """Whether the background poller thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ThermalMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ThermalMonitor(sources={list(self.sources)!r}, poll_hz={self.poll_hz})"
