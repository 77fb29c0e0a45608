"""Thermal telemetry: sysfs zones on fake trees, NVML through a fake ``pynvml``, and the background poller."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from navcache_runtime import RuntimeConfig, TelemetryUnavailableError, ThermalState, ZoneReading
from navcache_runtime.thermal import (
    NvmlThermalSource,
    SysfsThermalSource,
    ThermalMonitor,
    ThermalSource,
    decode_nvml_throttle_reasons,
)

POLLER = "navcache-thermal-poller"


def pollers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == POLLER]


@pytest.fixture(autouse=True)
def no_leaked_poller() -> Iterator[None]:
    yield
    assert not pollers(), "a test left a thermal poller thread running"


# -- fake sysfs ----------------------------------------------------------------------------------------


Trips = tuple[tuple[str, int | str], ...]


def add_zone(root: Path, index: int, zone_type: str, temp: str | int, trips: Trips = ()) -> Path:
    zone = root / f"thermal_zone{index}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(f"{zone_type}\n")
    (zone / "temp").write_text(f"{temp}\n")
    for n, (trip_type, trip_temp) in enumerate(trips):
        (zone / f"trip_point_{n}_type").write_text(f"{trip_type}\n")
        (zone / f"trip_point_{n}_temp").write_text(f"{trip_temp}\n")
    return zone


def add_cooling_device(root: Path, index: int, cdev_type: str, cur: int, maximum: int = 10) -> None:
    cdev = root / f"cooling_device{index}"
    cdev.mkdir(parents=True)
    (cdev / "type").write_text(f"{cdev_type}\n")
    (cdev / "cur_state").write_text(f"{cur}\n")
    (cdev / "max_state").write_text(f"{maximum}\n")


@pytest.fixture
def jetson(tmp_path: Path) -> Path:
    """A Jetson (Xavier/Nano style) tree: cool zones with passive trips, critical trips, a fan."""
    root = tmp_path / "thermal"
    add_zone(root, 0, "CPU-therm", 45500, (("passive", 95000), ("critical", 102500)))
    add_zone(root, 1, "GPU-therm", 43000, (("passive", 95000), ("critical", 102500)))
    add_zone(root, 2, "Tboard_tegra", 38250, (("passive", 107000),))
    add_zone(root, 10, "thermal-fan-est", 40000, (("active", 35000),))  # active trips only spin the fan
    add_cooling_device(root, 0, "pwm-fan", 3)  # a fan at speed is not throttling
    add_cooling_device(root, 1, "cpufreq-cpu0", 0)
    return root


def by_name(state: ThermalState) -> dict[str, ZoneReading]:
    return {z.name: z for z in state.zones}


# -- sysfs source --------------------------------------------------------------------------------------


def test_sysfs_reads_exact_temperatures_and_trips(jetson: Path) -> None:
    state = SysfsThermalSource(jetson).read()
    assert [z.name for z in state.zones] == ["CPU-therm", "GPU-therm", "Tboard_tegra", "thermal-fan-est"]
    zones = by_name(state)
    assert zones["CPU-therm"] == ZoneReading("CPU-therm", 45.5, 95.0)
    assert zones["GPU-therm"] == ZoneReading("GPU-therm", 43.0, 95.0)
    assert zones["Tboard_tegra"] == ZoneReading("Tboard_tegra", 38.25, 107.0)
    assert zones["thermal-fan-est"].throttle_at_c is None  # no passive/hot trip
    assert state.throttled is False
    assert state.throttle_reasons == ()
    assert state.source == "sysfs"
    assert state.max_temp_c == 45.5
    assert abs(state.timestamp - time.time()) < 5


def test_sysfs_filters_zones_by_type_case_insensitively(jetson: Path) -> None:
    state = SysfsThermalSource(jetson, ("CPU-therm", "gpu-THERM")).read()
    assert [z.name for z in state.zones] == ["CPU-therm", "GPU-therm"]


def test_sysfs_zone_at_passive_trip_throttles(jetson: Path) -> None:
    add_zone(jetson, 3, "tj-thermal", 96000, (("critical", 104000), ("passive", 99000), ("hot", 95500)))
    state = SysfsThermalSource(jetson).read()
    tj = by_name(state)["tj-thermal"]
    assert tj.temp_c == 96.0
    assert tj.throttle_at_c == 95.5  # the lowest of the passive/hot trips, critical ignored
    assert state.throttled is True
    assert state.throttle_reasons == ("tj-thermal at 96.0 C >= hot trip 95.5 C",)
    # Exactly at the trip counts as throttling.
    (jetson / "thermal_zone3" / "temp").write_text("95500\n")
    assert SysfsThermalSource(jetson).read().throttled is True
    (jetson / "thermal_zone3" / "temp").write_text("95499\n")
    assert SysfsThermalSource(jetson).read().throttled is False


def test_sysfs_filtered_out_hot_zone_does_not_throttle(jetson: Path) -> None:
    add_zone(jetson, 3, "tj-thermal", 99000, (("passive", 95000),))
    assert SysfsThermalSource(jetson).read().throttled is True
    assert SysfsThermalSource(jetson, ("CPU-therm",)).read().throttled is False


def test_sysfs_freq_cooling_device_is_a_throttle_reason(jetson: Path) -> None:
    add_cooling_device(jetson, 2, "gpufreq", 2, maximum=5)
    add_cooling_device(jetson, 3, "devfreq-17000000.gv11b", 0)
    state = SysfsThermalSource(jetson).read()
    assert state.throttled is True
    assert state.throttle_reasons == ("cooling device gpufreq (cooling_device2) at state 2/5",)
    assert all(z.temp_c < 50 for z in state.zones)  # throttled although no zone is hot


def test_sysfs_ignores_disabled_trip_placeholders(tmp_path: Path) -> None:
    add_zone(tmp_path, 0, "soc0-thermal", 30000, (("passive", 0), ("hot", -274000), ("passive", "junk")))
    state = SysfsThermalSource(tmp_path).read()
    assert state.zones == (ZoneReading("soc0-thermal", 30.0, None),)
    assert state.throttled is False


def test_sysfs_duplicate_zone_types_get_unique_names(tmp_path: Path) -> None:
    add_zone(tmp_path, 0, "acpitz", 27800)
    add_zone(tmp_path, 1, "x86_pkg_temp", 51000)
    add_zone(tmp_path, 2, "acpitz", 29800)
    names = [z.name for z in SysfsThermalSource(tmp_path).read().zones]
    assert names == ["acpitz (thermal_zone0)", "x86_pkg_temp", "acpitz (thermal_zone2)"]


def test_sysfs_skips_garbage_and_unreadable_temps_with_a_log(jetson: Path, caplog: pytest.LogCaptureFixture) -> None:
    (jetson / "thermal_zone1" / "temp").write_text("garbage\n")
    (jetson / "thermal_zone2" / "temp").unlink()
    add_zone(jetson, 3, "PMIC-Die", -256000)  # switched-off sensor placeholder
    source = SysfsThermalSource(jetson)
    with caplog.at_level(logging.DEBUG, logger="navcache_runtime.thermal"):
        state = source.read()
        source.read()
    assert [z.name for z in state.zones] == ["CPU-therm", "thermal-fan-est"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # once per bad zone, not once per poll
    assert any("GPU-therm" in w and "garbage" in w for w in warnings)
    assert any("Tboard_tegra" in w for w in warnings)
    assert any("PMIC-Die" in w and "not a plausible temperature" in w for w in warnings)


def test_sysfs_errors_when_no_matching_zone_is_readable(jetson: Path) -> None:
    (jetson / "thermal_zone0" / "temp").write_text("n/a\n")
    with pytest.raises(TelemetryUnavailableError, match=r"matched \['CPU-therm'\] but none had a readable") as err:
        SysfsThermalSource(jetson, ("CPU-therm",)).read()
    assert "thermal_zone0/temp" in str(err.value)


def test_sysfs_no_matching_zone(jetson: Path, tmp_path: Path) -> None:
    source = SysfsThermalSource(jetson, ("cpu-thermal",))
    assert source.available() is False
    with pytest.raises(TelemetryUnavailableError) as err:
        source.read()
    message = str(err.value)
    assert f"no thermal zones under {jetson} matching ['cpu-thermal']" in message
    assert "present: ['CPU-therm', 'GPU-therm', 'Tboard_tegra', 'thermal-fan-est']" in message
    assert "fix: set thermal_zones" in message

    missing = SysfsThermalSource(tmp_path / "nowhere")
    assert missing.available() is False
    with pytest.raises(TelemetryUnavailableError, match="does not exist"):
        missing.read()
    assert SysfsThermalSource(jetson).available() is True


# -- fake NVML -----------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    def __init__(self, value: int, text: str = "Not Supported") -> None:
        super().__init__(text)
        self.value = value


def make_pynvml(
    *,
    temp: int = 61,
    slowdown: int | None = 87,
    reasons: int = 0,
    name: Any = "NVIDIA H100 80GB HBM3",
    event_api: bool = True,
) -> types.ModuleType:
    fake: Any = types.ModuleType("pynvml")
    fake.NVMLError = FakeNVMLError
    fake.NVML_TEMPERATURE_GPU = 0
    fake.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    fake.calls = []
    fake.temp, fake.reasons = temp, reasons
    fake.fail = {}  # function name -> the NVMLError it raises

    def api(fn_name: str, result: Callable[..., Any]) -> None:
        def call(*args: Any) -> Any:
            fake.calls.append(fn_name)
            if fn_name in fake.fail:
                raise fake.fail[fn_name]
            return result(*args)

        setattr(fake, fn_name, call)

    api("nvmlInit", lambda: None)
    api("nvmlShutdown", lambda: None)
    api("nvmlDeviceGetHandleByIndex", lambda index: ("handle", index))
    api("nvmlDeviceGetName", lambda h: name)
    api("nvmlDeviceGetTemperature", lambda h, sensor: fake.temp if sensor == 0 else -1)

    def threshold(h: Any, kind: int) -> int:
        if slowdown is None or kind != 1:
            raise FakeNVMLError(3)
        return slowdown

    api("nvmlDeviceGetTemperatureThreshold", threshold)
    api(
        "nvmlDeviceGetCurrentClocksEventReasons" if event_api else "nvmlDeviceGetCurrentClocksThrottleReasons",
        lambda h: fake.reasons,
    )
    return fake


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    fake = make_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_decode_nvml_reasons() -> None:
    assert decode_nvml_throttle_reasons(0) == ()
    assert decode_nvml_throttle_reasons(0x01 | 0x02 | 0x10 | 0x100) == ()  # idle, app clocks, sync boost, display
    assert decode_nvml_throttle_reasons(0x04 | 0x08 | 0x20 | 0x40 | 0x80) == (
        "sw power cap",
        "hw slowdown",
        "sw thermal slowdown",
        "hw thermal slowdown",
        "hw power brake",
    )


def test_nvml_reads_temperature_and_threshold(fake_nvml: Any) -> None:
    source = NvmlThermalSource(device_index=1)
    state = source.read()
    assert state.zones == (ZoneReading("NVIDIA H100 80GB HBM3", 61.0, 87.0),)
    assert state.throttled is False
    assert state.throttle_reasons == ()
    assert state.source == "nvml"
    source.read()
    assert fake_nvml.calls.count("nvmlInit") == 1  # initialised once, not per poll
    source.close()
    assert fake_nvml.calls[-1] == "nvmlShutdown"


def test_nvml_decodes_clock_event_reasons(fake_nvml: Any) -> None:
    fake_nvml.reasons = 0x20 | 0x80 | 0x01
    state = NvmlThermalSource().read()
    assert state.throttled is True
    assert state.throttle_reasons == ("sw thermal slowdown", "hw power brake")


def test_nvml_falls_back_to_throttle_reasons_api(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_pynvml(reasons=0x40 | 0x04, event_api=False, name=b"Tesla T4", slowdown=None)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    state = NvmlThermalSource().read()
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in fake.calls
    assert state.zones == (ZoneReading("Tesla T4", 61.0, None),)  # bytes name decoded, threshold unsupported
    assert state.throttle_reasons == ("sw power cap", "hw thermal slowdown")


def test_nvml_temperature_at_slowdown_threshold_throttles(fake_nvml: Any) -> None:
    fake_nvml.temp = 87
    state = NvmlThermalSource().read()
    assert state.throttled is True
    assert state.throttle_reasons == ("NVIDIA H100 80GB HBM3 at 87.0 C >= slowdown threshold 87.0 C",)


def test_nvml_errors_become_telemetry_unavailable(fake_nvml: Any) -> None:
    fake_nvml.fail["nvmlInit"] = FakeNVMLError(12, "NVML Shared Library Not Found")
    source = NvmlThermalSource()
    assert source.available() is False
    with pytest.raises(TelemetryUnavailableError, match=r"no NVML GPU at index 0 \(nvmlInit failed: NVML Shared"):
        source.read()

    del fake_nvml.fail["nvmlInit"]
    fake_nvml.fail["nvmlDeviceGetHandleByIndex"] = FakeNVMLError(2, "Invalid Argument")
    with pytest.raises(TelemetryUnavailableError, match="nvmlDeviceGetHandleByIndex failed: Invalid Argument"):
        source.read()
    assert fake_nvml.calls[-1] == "nvmlShutdown"  # the successful init is balanced

    del fake_nvml.fail["nvmlDeviceGetHandleByIndex"]
    assert source.available() is True
    fake_nvml.fail["nvmlDeviceGetTemperature"] = FakeNVMLError(15, "GPU is lost")
    with pytest.raises(TelemetryUnavailableError, match="NVML read of GPU 0 failed: GPU is lost") as err:
        source.read()
    assert isinstance(err.value.__cause__, FakeNVMLError)

    del fake_nvml.fail["nvmlDeviceGetTemperature"]
    inits = fake_nvml.calls.count("nvmlInit")
    assert source.read().zones[0].temp_c == 61.0  # recovers with a fresh init
    assert fake_nvml.calls.count("nvmlInit") == inits + 1


def test_nvml_without_pynvml_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    source = NvmlThermalSource()
    assert source.available() is False
    with pytest.raises(TelemetryUnavailableError, match="pynvml is not installed"):
        source.read()


# -- monitor -------------------------------------------------------------------------------------------


class CountingSource:
    """Returns a fixed zone and counts reads; raises ``error`` while it is set."""

    name = "fake"

    def __init__(self, temp_c: float = 40.0) -> None:
        self.temp_c = temp_c
        self.reads = 0
        self.error: Exception | None = None
        self.closed = False
        self.reached = threading.Event()
        self.target = 0

    def read(self) -> ThermalState:
        self.reads += 1
        if self.target and self.reads >= self.target:
            self.reached.set()
        if self.error is not None:
            raise self.error
        return ThermalState((ZoneReading("fake", self.temp_c),), False, (), self.name, time.time())

    def available(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def test_sources_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(SysfsThermalSource(tmp_path), ThermalSource)
    assert isinstance(NvmlThermalSource(), ThermalSource)
    assert isinstance(CountingSource(), ThermalSource)


def test_from_config_is_cheap_and_touches_nothing(
    monkeypatch: pytest.MonkeyPatch, fake_nvml: Any, tmp_path: Path
) -> None:
    config = RuntimeConfig(
        runtime="onnx_trt_ep", thermal_sysfs_root=tmp_path / "missing", thermal_zones=("CPU-therm",), device_id=2
    )
    monitor = ThermalMonitor.from_config(config)  # warm up imports and caches
    start = time.perf_counter()
    for _ in range(100):
        monitor = ThermalMonitor.from_config(config)
    per_call = (time.perf_counter() - start) / 100
    assert per_call < 1e-3
    assert fake_nvml.calls == []
    assert not pollers()
    sysfs, nvml = monitor.sources
    assert isinstance(sysfs, SysfsThermalSource) and isinstance(nvml, NvmlThermalSource)
    assert sysfs.root == tmp_path / "missing" and sysfs.zone_types == ("CPU-therm",)
    assert nvml.device_index == 2
    assert monitor.poll_hz == 1.0
    monitor.close()


def test_nothing_available_raises_from_state_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    add_zone(tmp_path, 0, "acpitz", 30000)
    config = RuntimeConfig(
        runtime="onnx_trt_ep", thermal_sysfs_root=tmp_path, thermal_zones=("CPU-therm",), thermal_poll_hz=0
    )
    with ThermalMonitor.from_config(config) as monitor, pytest.raises(TelemetryUnavailableError) as err:
        monitor.state()
    message = err.value.message
    assert message.startswith(f"no thermal zones under {tmp_path} matching ['CPU-therm'] (present: ['acpitz'])")
    assert " and no NVML GPU at index 0 (pynvml is not installed" in message
    assert err.value.hint is not None and "nvidia-ml-py" in err.value.hint


def test_sysfs_and_nvml_are_merged(jetson: Path, fake_nvml: Any) -> None:
    fake_nvml.reasons = 0x08
    config = RuntimeConfig(
        runtime="onnx_trt_ep", thermal_sysfs_root=jetson, thermal_zones=("CPU-therm", "GPU-therm"), thermal_poll_hz=0
    )
    with ThermalMonitor.from_config(config) as monitor:
        state = monitor.state()
    assert state.source == "sysfs+nvml"
    assert [(z.name, z.temp_c) for z in state.zones] == [
        ("CPU-therm", 45.5),
        ("GPU-therm", 43.0),
        ("NVIDIA H100 80GB HBM3", 61.0),
    ]
    assert state.throttled is True
    assert state.throttle_reasons == ("hw slowdown",)
    assert fake_nvml.calls[-1] == "nvmlShutdown"  # close() released NVML


def test_one_failing_source_does_not_hide_the_other(jetson: Path, fake_nvml: Any) -> None:
    fake_nvml.fail["nvmlInit"] = FakeNVMLError(9, "Driver Not Loaded")
    monitor = ThermalMonitor([SysfsThermalSource(jetson, ("CPU-therm",)), NvmlThermalSource()], poll_hz=0)
    state = monitor.state()
    assert state.source == "sysfs"
    assert state.zones == (ZoneReading("CPU-therm", 45.5, 95.0),)


def test_poll_hz_zero_reads_on_demand_without_a_thread(jetson: Path) -> None:
    monitor = ThermalMonitor([SysfsThermalSource(jetson, ("CPU-therm",))], poll_hz=0)
    assert monitor.state().zones[0].temp_c == 45.5
    (jetson / "thermal_zone0" / "temp").write_text("51000\n")
    state = monitor.state()
    assert state.zones[0].temp_c == 51.0  # read now, not from a cache
    assert state.age_s < 0.5
    assert not monitor.polling
    assert not pollers()
    monitor.close()


def test_poller_picks_up_new_values(jetson: Path) -> None:
    with ThermalMonitor([SysfsThermalSource(jetson, ("CPU-therm",))], poll_hz=20) as monitor:
        assert not pollers()  # lazily started
        assert monitor.state().zones[0].temp_c == 45.5
        assert monitor.polling and len(pollers()) == 1
        assert pollers()[0].daemon
        (jetson / "thermal_zone0" / "temp").write_text("88000\n")
        start = time.monotonic()
        while monitor.state().zones[0].temp_c != 88.0:
            assert time.monotonic() - start < 1.0, "poller did not pick up the new temperature within 1 s"
            time.sleep(0.01)
        state = monitor.state()
        assert 0 <= state.age_s < 0.5
        assert state.age_s == pytest.approx(time.time() - state.timestamp, abs=0.05)


def test_poller_runs_at_the_configured_rate() -> None:
    source = CountingSource()
    source.target = 11  # the synchronous first read + 10 background polls
    monitor = ThermalMonitor([source], poll_hz=20)
    try:
        start = time.monotonic()
        monitor.state()
        assert source.reached.wait(3.0), f"only {source.reads} reads in 3 s at 20 Hz"
        elapsed = time.monotonic() - start
    finally:
        monitor.close()
    assert 0.4 <= elapsed < 1.5  # 10 periods of 50 ms, no burst and no stall
    assert source.closed  # close() released the source


def test_state_between_polls_is_cached_with_age() -> None:
    source = CountingSource()
    with ThermalMonitor([source], poll_hz=0.5) as monitor:
        first = monitor.state()
        time.sleep(0.05)
        second = monitor.state()
        assert source.reads == 1
        assert second.timestamp == first.timestamp
        assert second.age_s >= 0.05 > first.age_s


def test_close_joins_the_poller_promptly() -> None:
    monitor = ThermalMonitor([CountingSource()], poll_hz=0.5)  # a 2 s period: close must not wait it out
    monitor.state()
    thread = pollers()[0]
    start = time.monotonic()
    monitor.close()
    assert time.monotonic() - start < 0.5
    assert not thread.is_alive()
    assert not monitor.polling
    monitor.close()  # idempotent
    # After close, state() still answers, synchronously and without a new thread.
    assert monitor.state().zones[0].name == "fake"
    assert not pollers()


def test_poll_errors_are_logged_and_raised_then_recover(caplog: pytest.LogCaptureFixture) -> None:
    source = CountingSource()
    with (
        ThermalMonitor([source], poll_hz=50) as monitor,
        caplog.at_level(logging.INFO, logger="navcache_runtime.thermal"),
    ):
        monitor.state()
        source.error = TelemetryUnavailableError("sensor bus timed out", hint="check the I2C bus")
        wait_until(lambda: raises_telemetry(monitor))
        with pytest.raises(TelemetryUnavailableError, match="sensor bus timed out") as err:
            monitor.state()
        assert err.value.hint == "check the I2C bus"
        reads = source.reads
        wait_until(lambda: source.reads >= reads + 3)  # the thread keeps polling
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "sensor bus timed out" in warnings[0].getMessage()  # logged once

        source.error = None
        wait_until(lambda: not raises_telemetry(monitor))
        assert monitor.state().zones[0].temp_c == 40.0
        assert any("recovered" in r.getMessage() for r in caplog.records)


def test_unexpected_poll_exception_does_not_kill_the_thread(caplog: pytest.LogCaptureFixture) -> None:
    source = CountingSource()
    with (
        ThermalMonitor([source], poll_hz=50) as monitor,
        caplog.at_level(logging.ERROR, logger="navcache_runtime.thermal"),
    ):
        monitor.state()
        source.error = ZeroDivisionError("driver bug")
        wait_until(lambda: raises_telemetry(monitor))
        with pytest.raises(TelemetryUnavailableError, match="ZeroDivisionError: driver bug") as err:
            monitor.state()
        assert isinstance(err.value.__cause__, ZeroDivisionError)
        assert monitor.polling
        # Logged with its traceback (the thread logs just after it stores the outcome, so wait for it).
        wait_until(lambda: any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records))
        source.error = None
        wait_until(lambda: not raises_telemetry(monitor))


def test_first_state_failure_still_starts_the_poller(tmp_path: Path) -> None:
    with ThermalMonitor([SysfsThermalSource(tmp_path)], poll_hz=20) as monitor:
        with pytest.raises(TelemetryUnavailableError, match="no thermal zones"):
            monitor.state()
        assert monitor.polling
        add_zone(tmp_path, 0, "cpu-thermal", 41000)  # a late sensor is picked up by the poller
        wait_until(lambda: not raises_telemetry(monitor))
        assert monitor.state().zones == (ZoneReading("cpu-thermal", 41.0, None),)


def test_monitor_rejects_bad_rate_and_reports_no_sources() -> None:
    with pytest.raises(ValueError, match="poll_hz"):
        ThermalMonitor([], poll_hz=-1)
    with pytest.raises(TelemetryUnavailableError, match="no thermal telemetry sources"):
        ThermalMonitor([], poll_hz=0).state()


def raises_telemetry(monitor: ThermalMonitor) -> bool:
    try:
        monitor.state()
    except TelemetryUnavailableError:
        return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)
