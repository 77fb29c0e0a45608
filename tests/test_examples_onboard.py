"""The example consumers under examples/onboard, run against a cache provisioned by the real flow; and the
airframe install: the base wheel in a bare virtual environment runs verify, open_cache and query."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("faiss")

import navcache_runtime as nr
from tests import test_open_cache
from tests.test_thermal import add_zone

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "onboard"

# The cache the onboard tests use, provisioned once for this module by the real flow (not a copy of it).
provisioned = test_open_cache.provisioned
Provisioned = test_open_cache.Provisioned


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def run_example(
    name: str, *args: str | Path, python: str = sys.executable, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, str(EXAMPLES / f"{name}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def index_file(cache: Path) -> Path:
    (found,) = (cache / "index").glob("index-*.faiss")
    return found


# -- the take-off check (docs/runtime-contract.md WC-4) ----------------------------------------------------


def test_takeoff_check_goes_on_a_good_cache_and_not_on_a_tampered_one(
    provisioned: Provisioned, assets: Any, tmp_path: Path
) -> None:
    keys = assets.trusted_keys
    go = run_example("takeoff_check", provisioned.cache, "--trusted-keys", keys, "--state", tmp_path / "state.json")
    assert go.returncode == 0, go.stdout + go.stderr
    verdict = go.stdout.strip().splitlines()[-1]
    assert verdict.startswith("GO: ") and f"{len(provisioned.tiles)} tiles" in verdict, verdict

    # The contract's query path: a frame of a cached tile comes back first.
    with nr.open_cache(provisioned.cache, keys, state_path=tmp_path / "state.json") as cache:
        tile = provisioned.tiles[3]
        hits = cache.query(cache.describe(cache.preprocess(provisioned.pixels[tile]))[0], k=5)
        assert isinstance(hits[0], nr.Candidate) and hits[0].tile == (tile.z, tile.x, tile.y)

    tampered = tmp_path / "tampered"
    shutil.copytree(provisioned.cache, tampered)
    index = index_file(tampered)
    flip_one_byte(index)
    with pytest.raises(nr.CacheVerificationError) as refused:
        nr.open_cache(tampered, keys, state_path=tmp_path / "state-2.json")
    name = index.relative_to(tampered).as_posix()
    assert (nr.FailureCode.ARTIFACT_DIGEST_MISMATCH, name) in {
        (f.code, f.subject) for f in refused.value.report.failures
    }

    no_go = run_example("takeoff_check", tampered, "--trusted-keys", keys, "--state", tmp_path / "s3.json", "--json")
    assert no_go.returncode == 1, no_go.stdout + no_go.stderr
    result = json.loads(no_go.stdout.strip().splitlines()[-1])
    assert result["go"] is False and f"artifact_digest_mismatch: {name}" in result["failures"]
    assert "Traceback" not in no_go.stderr


def test_takeoff_check_refuses_usage_errors_without_a_traceback(assets: Any, tmp_path: Path) -> None:
    proc = run_example("takeoff_check", tmp_path / "nowhere", "--trusted-keys", assets.trusted_keys)
    assert proc.returncode == 2 and "cache directory" in proc.stderr and "Traceback" not in proc.stderr


# -- the thermal-aware loop --------------------------------------------------------------------------------


def jetson_tree(root: Path) -> Path:
    add_zone(root, 0, "CPU-therm", 45500, (("passive", 95000),))
    add_zone(root, 1, "GPU-therm", 43000, (("passive", 95000),))
    return root


def test_thermal_loop_slows_down_while_the_host_is_hot(provisioned: Provisioned, assets: Any, tmp_path: Path) -> None:
    loop = example("thermal_loop")
    sysfs = jetson_tree(tmp_path / "thermal")
    config = {
        "runtime": "onnx_trt_ep",
        "engine_dir": provisioned.cache / "engines",
        "thermal_sysfs_root": sysfs,
        "thermal_poll_hz": 0,  # read on demand: the test changes the temperature between frames
    }
    tiles = provisioned.tiles * 2

    def frames() -> Iterator[np.ndarray]:
        for number, tile in enumerate(tiles):
            if number == 4:  # the GPU zone crosses its passive trip point: the kernel throttles
                (sysfs / "thermal_zone1" / "temp").write_text("96000\n")
            if number == 12:
                (sysfs / "thermal_zone1" / "temp").write_text("60000\n")
            yield provisioned.pixels[tile]

    policy = loop.ThermalPolicy(hot_c=85.0, reduced_stride=4)
    with nr.open_cache(
        provisioned.cache, assets.trusted_keys, runtime_config=config, state_path=tmp_path / "s"
    ) as cache:
        steps = list(loop.run_loop(cache, frames(), policy))

    assert [s.mode for s in steps] == ["nominal"] * 4 + ["reduced"] * 8 + ["nominal"] * 4
    processed = [s.frame for s in steps if s.tile is not None]
    assert processed == [0, 1, 2, 3, 7, 11, 12, 13, 14, 15]  # one frame in four while hot
    for step in steps:
        assert step.max_temp_c == (96.0 if step.mode == "reduced" else 45.5 if step.frame < 4 else 60.0)
        if step.tile is not None:
            tile = tiles[step.frame]
            assert step.tile == (tile.z, tile.x, tile.y) and step.score is not None and step.score > 0.99


def test_thermal_loop_runs_blind_without_telemetry(provisioned: Provisioned, assets: Any, tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for number, tile in enumerate(provisioned.tiles):
        np.save(frames / f"{number:03d}.npy", provisioned.pixels[tile])
    (tmp_path / "no-sensors").mkdir()
    config = tmp_path / "runtime.toml"
    config.write_text(
        f'runtime = "onnx_trt_ep"\nengine_dir = "{provisioned.cache / "engines"}"\n'
        f'thermal_sysfs_root = "{tmp_path / "no-sensors"}"\n'
    )
    proc = run_example(
        "thermal_loop", provisioned.cache, "--trusted-keys", assets.trusted_keys, "--frames", frames,
        "--runtime-config", config, "--state", tmp_path / "state.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["mode"] for s in steps] == ["blind"] * len(provisioned.tiles)
    assert [tuple(s["tile"]) for s in steps] == [(t.z, t.x, t.y) for t in provisioned.tiles]
    assert proc.stderr.count("no usable thermal telemetry") == 1


# -- installing on the airframe ----------------------------------------------------------------------------


def _requirement_closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions ``names`` need on this interpreter (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(seen.values())


def _link_installed(site: Path, names: list[str]) -> list[str]:
    """Install already-installed distributions (and what they need) into ``site`` by symlinking their
    top-level files, dist-info included: what ``pip install`` of the same wheels would put there, offline."""
    linked = []
    for dist in _requirement_closure(names):
        root = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            source, target = root / top, site / top
            if top.endswith(".pth") or top == "__pycache__" or target.exists() or not source.exists():
                continue
            target.symlink_to(source)
        linked.append(dist.metadata["Name"].lower())
    return sorted(linked)


@pytest.mark.slow
def test_the_base_install_runs_verify_and_needs_only_its_extras_for_open_cache_and_query(
    provisioned: Provisioned, assets: Any, tmp_path: Path
) -> None:
    started = time.perf_counter()
    # The wheel the airframe installs, built from this tree; then a virtual environment with nothing else.
    # (Built from a copy: setuptools writes build/ and egg-info next to the sources it builds.)
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "generated")
    for part in ("src", "tasks", "flows", "cli"):
        shutil.copytree(REPO / part, tree / part, ignore=skip)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, tree / part)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(tree)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("navcache-*.whl")
    venv = tmp_path / "airframe"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--no-deps", str(wheel)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    assert (site / "navcache_runtime" / "py.typed").is_file()  # PEP 561: the wheel ships the marker
    base = _link_installed(site, ["numpy", "cryptography"])
    assert base == ["cffi", "cryptography", "numpy", "pycparser"]
    # Nothing else is importable there: no faiss, onnxruntime, torch, prefect, and no repository on the path.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    absent = ("faiss", "onnxruntime", "torch", "prefect", "onnx", "rasterio")
    probe = f"import importlib.util as u; print([m for m in {absent!r} if u.find_spec(m)])"
    assert subprocess.check_output([python, "-c", probe], text=True, env=env, cwd=tmp_path).strip() == "[]"
    requirements = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "check"], capture_output=True, text=True, check=False
    )
    assert requirements.returncode == 0, requirements.stdout  # the base install's own requirements are met

    keys = assets.trusted_keys
    # 1. verify: standard library + cryptography.
    verify = subprocess.run(
        [python, "-m", "navcache_runtime", "verify", str(provisioned.cache), "--trusted-keys", str(keys),
         "--state", str(tmp_path / "state.json")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and "VERIFIED" in verify.stdout, verify.stdout + verify.stderr

    # 2. open_cache without the query extra: a clear refusal naming the extra, not a traceback.
    bare = run_example(
        "takeoff_check", provisioned.cache, "--trusted-keys", keys, "--state", tmp_path / "state.json", "--json",
        python=python, env=env,
    )  # fmt: skip
    assert bare.returncode == 1 and "Traceback" not in bare.stderr, bare.stdout + bare.stderr
    refusal = json.loads(bare.stdout.strip().splitlines()[-1])
    assert refusal["error"] == "RuntimeNotAvailableError" and "navcache[faiss]" in refusal["reason"], refusal

    # 3. with the extras this airframe flies with (navcache[ort,faiss]): open_cache and query.
    extras = _link_installed(site, ["faiss-cpu", "onnxruntime"])
    assert {"faiss-cpu", "onnxruntime"} <= set(extras) and "torch" not in extras
    go = run_example(
        "takeoff_check", provisioned.cache, "--trusted-keys", keys, "--state", tmp_path / "state.json", "--json",
        python=python, env=env,
    )  # fmt: skip
    assert go.returncode == 0, go.stdout + go.stderr
    verdict = json.loads(go.stdout.strip().splitlines()[-1])
    assert verdict["go"] and verdict["runtime"] == "onnx_trt_ep" and verdict["tiles"] == len(provisioned.tiles)
    print(f"airframe install: base {base}, extras {extras}; {time.perf_counter() - started:.1f} s")
