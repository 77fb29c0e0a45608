"""A thermal-aware localisation loop: describe and query camera frames, slowing down when the host is hot.

An example consumer of the onboard runtime contract (docs/runtime-contract.md, version 1.x). Before each
frame it reads ``runtime.thermal_state()`` (a ``ThermalState``: zones, ``throttled``, ``max_temp_c``,
``age_s``) and picks a stride:

* **nominal** — every frame, while the host is below ``hot_c`` and not throttling;
* **reduced** — every ``reduced_stride``-th frame while the host throttles or is at/above ``hot_c``
  (the GPU is already clocked down; queuing frames only adds latency);
* **blind** — telemetry unavailable (``TelemetryUnavailableError``) or older than ``stale_s``: the loop
  cannot tell, so it stays at the nominal rate and says so once (the flight controller's own thermal
  protection still applies); it never crashes for want of a sensor.

    python examples/onboard/thermal_loop.py CACHE --trusted-keys K --frames DIR [--runtime-config R.toml]

``DIR`` holds camera frames as ``.npy`` RGB uint8 (H, W, 3) arrays, read in name order. One JSON line per
frame: the frame, the mode, the hottest zone and the best tile (or ``null`` when the frame was skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import navcache_runtime as nr

log = logging.getLogger("thermal_loop")


@dataclass(frozen=True)
class ThermalPolicy:
    hot_c: float = 85.0  # below the Jetson's passive trip points (≈ 95 °C): act before the kernel throttles
    reduced_stride: int = 4
    stale_s: float = 5.0  # a reading older than this says nothing about now


@dataclass(frozen=True)
class Step:
    frame: int
    mode: str  # nominal | reduced | blind
    max_temp_c: float | None
    tile: tuple[int, int, int] | None  # best candidate; None when the frame was skipped
    score: float | None


def thermal_mode(runtime: nr.InferenceRuntime, policy: ThermalPolicy) -> tuple[str, float | None]:
    """(mode, hottest zone in °C) from the runtime's latest thermal reading."""
    try:
        state = runtime.thermal_state()
    except nr.TelemetryUnavailableError:
        return "blind", None
    if state.age_s > policy.stale_s:
        return "blind", state.max_temp_c
    hottest = state.max_temp_c
    if state.throttled or (hottest is not None and hottest >= policy.hot_c):
        return "reduced", hottest
    return "nominal", hottest


def run_loop(cache: nr.OnboardCache, frames: Iterable[np.ndarray], policy: ThermalPolicy) -> Iterator[Step]:
    """Localise each frame the thermal mode lets through; yield one Step per frame."""
    since_last = policy.reduced_stride  # the first frame is always processed
    warned_blind = False
    for number, frame in enumerate(frames):
        mode, hottest = thermal_mode(cache.runtime, policy)
        if mode == "blind" and not warned_blind:
            log.warning("no usable thermal telemetry: running at the nominal rate")
            warned_blind = True
        if mode == "reduced" and since_last < policy.reduced_stride - 1:
            since_last += 1
            yield Step(number, mode, hottest, None, None)
            continue
        since_last = 0
        descriptor = cache.describe(cache.preprocess(frame))[0]
        hits = cache.query(descriptor, k=1)
        best = hits[0] if hits else None
        assert best is None or isinstance(best, nr.Candidate)
        yield Step(number, mode, hottest, best.tile if best else None, best.score if best else None)


def read_frames(directory: Path) -> Iterator[np.ndarray]:
    for path in sorted(directory.glob("*.npy")):
        yield np.load(path, allow_pickle=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--trusted-keys", type=Path, required=True)
    parser.add_argument("--frames", type=Path, required=True, help="a directory of .npy RGB uint8 frames")
    parser.add_argument("--runtime-config", type=Path, help="runtime TOML (thermal_zones, thermal_poll_hz, ...)")
    parser.add_argument("--state", type=Path, help="the device's state file (rollback protection)")
    parser.add_argument("--hot-c", type=float, default=ThermalPolicy.hot_c)
    parser.add_argument("--reduced-stride", type=int, default=ThermalPolicy.reduced_stride)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.frames.is_dir():
        parser.exit(2, f"error: frames directory {args.frames} does not exist\n")
    if args.reduced_stride < 1:
        parser.exit(2, "error: --reduced-stride must be at least 1\n")
    policy = ThermalPolicy(hot_c=args.hot_c, reduced_stride=args.reduced_stride)
    options = {"state_path": args.state} if args.state is not None else {}
    try:
        with nr.open_cache(args.cache, args.trusted_keys, runtime_config=args.runtime_config, **options) as cache:
            for step in run_loop(cache, read_frames(args.frames), policy):
                print(json.dumps(asdict(step)), flush=True)
    except nr.InferenceRuntimeError as exc:  # a refused cache or an unusable runtime: say why, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
