"""`navcache` as the ground crew run it: a subprocess, real files, exit codes and what is printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import navcache
from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie


@pytest.fixture
def good_sortie(assets: Assets, tmp_path: Path) -> Path:
    first, _ = block_tiles()
    return write_sortie(tmp_path / "sortie.toml", assets, area=tiles_polygon(first), cache_dir=tmp_path / "cache")


def _broken(kind: str, assets: Assets, tmp_path: Path, good: Path) -> tuple[Path, str]:
    text = good.read_text()
    first, _ = block_tiles()
    if kind == "malformed toml":
        good.write_text(text.replace('sortie_id = "test-sortie"', 'sortie_id = "test-sortie'))
        return good, "line"
    if kind == "unknown field":
        good.write_text(text.replace("expires_hours = 24", "expires_hours = 24\nexpire_hours = 24"))
        return good, "expire_hours"
    if kind == "area not closed":
        area = tiles_polygon(first[:1])
        ring = area["coordinates"][0][0]
        area = {"type": "Polygon", "coordinates": [ring[:-1]]}
        return write_sortie(good, assets, area=area, cache_dir=tmp_path / "cache"), "not closed"
    if kind == "takeoff outside":
        return write_sortie(
            good, assets, area=tiles_polygon(first), cache_dir=tmp_path / "cache", takeoff=(48.0, 11.0)
        ), "takeoff"
    if kind == "missing onnx":
        return write_sortie(
            good, assets, area=tiles_polygon(first), cache_dir=tmp_path / "cache", vpr_onnx=tmp_path / "nope.onnx"
        ), "nope.onnx"
    if kind == "corrupt onnx":
        corrupt = tmp_path / "corrupt.onnx"
        corrupt.write_bytes(assets.vpr_onnx.read_bytes()[:4000])
        return write_sortie(
            good, assets, area=tiles_polygon(first), cache_dir=tmp_path / "cache", vpr_onnx=corrupt
        ), "corrupt.onnx"
    if kind == "geotiff outside the area":
        far = [type(t)(t.z, t.x + 2000, t.y) for t in first]
        return write_sortie(good, assets, area=tiles_polygon(far), cache_dir=tmp_path / "cache"), "does not overlap"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "malformed toml",
        "unknown field",
        "area not closed",
        "takeoff outside",
        "missing onnx",
        "corrupt onnx",
        "geotiff outside the area",
    ],
)
def test_bad_input_is_one_clear_error_with_nothing_written(
    kind: str, assets: Assets, tmp_path: Path, good_sortie: Path
) -> None:
    sortie, phrase = _broken(kind, assets, tmp_path, good_sortie)
    proc = navcache("provision", str(sortie), home=tmp_path / "prefect-home")
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and phrase in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "prefect-home").exists()  # Prefect never started


def test_provision_json_then_verify_and_inspect_onboard(good_sortie: Path, assets: Assets, tmp_path: Path) -> None:
    proc = navcache("provision", str(good_sortie), "--json", home=tmp_path / "prefect-home")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)  # stdout is the summary only; logs and progress went to stderr
    assert summary["verified"] is True
    assert Path(summary["manifest"]).is_file() and Path(summary["cache_dir"]) == tmp_path / "cache"
    assert Path(summary["trusted_keys"]) == assets.trusted_keys
    verify = navcache("verify", summary["cache_dir"], "--trusted-keys", summary["trusted_keys"], home=tmp_path)
    assert verify.returncode == 0 and "VERIFIED" in verify.stdout, verify.stdout + verify.stderr
    inspect = navcache("inspect", summary["cache_dir"], "--trusted-keys", summary["trusted_keys"], home=tmp_path)
    assert inspect.returncode == 0 and "tiny_vpr" in inspect.stdout and "VERIFIED" in inspect.stdout
    engine = next((tmp_path / "cache" / "engines").glob("tiny_vpr__*.onnx"))
    engine.write_bytes(engine.read_bytes() + b"x")
    refused = navcache("verify", summary["cache_dir"], "--trusted-keys", summary["trusted_keys"], home=tmp_path)
    assert refused.returncode == 1 and "REFUSED" in refused.stdout and engine.name in refused.stdout


def test_cache_dir_override(good_sortie: Path, tmp_path: Path) -> None:
    proc = navcache(
        "provision",
        str(good_sortie),
        "--cache-dir",
        str(tmp_path / "elsewhere"),
        "--json",
        home=tmp_path / "prefect-home",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cache_dir"] == str(tmp_path / "elsewhere")
    assert not (tmp_path / "cache").exists()


def test_the_library_never_imports_prefect_or_the_layers_above_it() -> None:
    """The CLI is the top of the stack (navcache_cli); every library module imports without Prefect, the
    tasks, the flows or the CLI (``navcache.__main__`` is the ``python -m navcache`` entry, not a library module)."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, navcache\n"
        "for info in pkgutil.iter_modules(navcache.__path__):\n"
        "    if info.name != '__main__':\n"
        "        importlib.import_module(f'navcache.{info.name}')\n"
        "above = ('prefect', 'prefect_dask', 'navcache_tasks', 'navcache_flows', 'navcache_cli')\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & set(above)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
