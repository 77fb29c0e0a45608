"""The demo's two model files, each as ``.onnx`` and ``.pt2`` in one folder, exported when missing.

- ``tiny_vpr``: :class:`~navcache.demo.backbones.TinyVPR` (seed 0, width 32, depth 4): ``image``
  [B,3,128,128] → ``descriptor`` [B,128];
- ``local_features``: :class:`~navcache.demo.backbones.LocalFeatures` (seed 0): ``image`` [B,3,128,128] →
  ``heatmap`` [B,1,128,128], ``features`` [B,64,16,16].

Both with a dynamic batch of 1 to ``MODEL_MAX_BATCH``. A pair already present counts as valid when the
``.pt2`` is a zip archive and the ONNX graph reads and has the input ``image`` and the outputs in
``MODEL_OUTPUTS``; anything else is exported again. An export goes to a private temp folder beside the
targets and is moved into place ``.pt2`` first, so a crash between the two moves leaves a pair that is
exported again. torch is imported only to export, and the exporter prints nothing while it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from navcache_runtime.integrity import fsync_dir, fsync_file

logger = logging.getLogger(__name__)

VPR_STEM = "tiny_vpr"
LOCAL_STEM = "local_features"
MODEL_INPUT_SIZE = 128
MODEL_MAX_BATCH = 16
VPR_DESCRIPTOR_DIM = 128
LOCAL_DESCRIPTOR_DIM = 64

# What each model's ONNX graph must expose to count as valid. The backbones module spells the same output
# names for its exports; it is not imported here because it imports torch.
MODEL_OUTPUTS: dict[str, tuple[str, ...]] = {VPR_STEM: ("descriptor",), LOCAL_STEM: ("heatmap", "features")}


def generate_demo_models(directory: Path) -> dict[str, Path]:
    """Export the demo backbones into ``directory`` (``tiny_vpr`` and ``local_features``, each as ``.onnx``
    and ``.pt2``). Models already present and valid are kept. Returns ``{name.ext: path}``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for stem in (VPR_STEM, LOCAL_STEM):
        onnx_path, pt2_path = directory / f"{stem}.onnx", directory / f"{stem}.pt2"
        if _model_is_valid(onnx_path, pt2_path, MODEL_OUTPUTS[stem]):
            logger.debug("demo model %s present, kept", stem)
        else:
            logger.info("exporting demo model %s to %s", stem, directory)
            _export_atomically(stem, directory)
        paths[f"{stem}.onnx"], paths[f"{stem}.pt2"] = onnx_path, pt2_path
    return paths


def _model_is_valid(onnx_path: Path, pt2_path: Path, outputs: tuple[str, ...]) -> bool:
    if not (onnx_path.is_file() and pt2_path.is_file() and zipfile.is_zipfile(pt2_path)):
        return False
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:
        logger.warning("demo model %s is unreadable; exporting it again", onnx_path)
        return False
    names_in = [i.name for i in model.graph.input]
    names_out = tuple(o.name for o in model.graph.output)
    return names_in == ["image"] and names_out == outputs


def _export_atomically(stem: str, directory: Path) -> None:
    """Export into a private temp folder beside the targets, then move the files into place."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=".navcache-tmp-", dir=directory))
    try:
        with _quiet_exporter():
            _export(stem, tmp_dir)
        # .pt2 first: the validity check needs both, so a crash between the two renames re-exports.
        for ext in ("pt2", "onnx"):
            final = directory / f"{stem}.{ext}"
            fsync_file(tmp_dir / final.name)
            os.replace(tmp_dir / final.name, final)
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The ONNX exporter logs warnings (e.g. "torchvision is not installed") straight to stderr through
    torch's own handler; the demo should print nothing, so hold those loggers at ERROR meanwhile."""
    import torch  # noqa: F401 - importing torch resets its loggers' levels, so it must come first

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(stem: str, tmp_dir: Path) -> None:
    from .backbones import export_local_features, export_models, make_local_features_model, make_model

    if stem == VPR_STEM:
        vpr = make_model(seed=0, descriptor_dim=VPR_DESCRIPTOR_DIM, width=32, depth=4)
        export_models(vpr, tmp_dir, stem, size=MODEL_INPUT_SIZE, max_batch=MODEL_MAX_BATCH)
    else:
        local = make_local_features_model(seed=0, descriptor_dim=LOCAL_DESCRIPTOR_DIM)
        export_local_features(local, tmp_dir, stem, size=MODEL_INPUT_SIZE, max_batch=MODEL_MAX_BATCH)
