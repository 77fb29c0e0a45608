"""Small but real backbones in plain torch, for the demo, the tests and the benchmarks (no downloads).

- :class:`TinyVPR` (:func:`make_model`): a CNN with a GeM-pooled, L2-normalised global descriptor head, the
  shape of a VPR backbone; ``image`` [B,3,H,W] → ``descriptor`` [B,D].
- :class:`LocalFeatures` (:func:`make_local_features_model`): SuperPoint-shaped; ``image`` [B,3,H,W] →
  ``heatmap`` [B,1,H,W] (keypoint probability per pixel) and ``features`` [B,D,H/8,W/8] (L2-normalised).

Weights are random from a seed, with non-trivial batch-norm statistics so that a fusion bug in a compiler
would show. :func:`export_models` and :func:`export_local_features` write each network both as ONNX and as a
``torch.export`` program (``.pt2``) with a dynamic batch, so every runtime strategy compiles the same
network. Importing this module imports torch; :mod:`navcache.demo.models` imports it only to export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

_Module = TypeVar("_Module", bound=nn.Module)


class TinyVPR(nn.Module):
    def __init__(self, descriptor_dim: int = 64, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(depth):
            out = width * 2 ** min(i, 3)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.gem_p = nn.Parameter(torch.tensor(3.0))
        self.head = nn.Linear(channels, descriptor_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.features(image).clamp(min=1e-6)
        x = x.pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)  # GeM pooling
        return nn.functional.normalize(self.head(x), dim=1)


class LocalFeatures(nn.Module):
    def __init__(self, descriptor_dim: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (16, 32, 64):  # three stride-2 stages: 1/8 resolution
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.encoder = nn.Sequential(*layers)
        self.detector = nn.Conv2d(channels, 65, 1)  # 64 cells of an 8x8 patch + "no keypoint"
        self.descriptor = nn.Conv2d(channels, descriptor_dim, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(image)
        scores = torch.softmax(self.detector(x), dim=1)[:, :64]
        heatmap = nn.functional.pixel_shuffle(scores, 8)
        features = nn.functional.normalize(self.descriptor(x), dim=1)
        return heatmap, features


LOCAL_FEATURES_OUTPUTS = ("heatmap", "features")


def make_model(seed: int = 0, descriptor_dim: int = 64, width: int = 16, depth: int = 3) -> TinyVPR:
    torch.manual_seed(seed)
    return _with_batch_norm_statistics(TinyVPR(descriptor_dim, width, depth)).eval()


def make_local_features_model(seed: int = 0, descriptor_dim: int = 64) -> LocalFeatures:
    torch.manual_seed(seed)
    return _with_batch_norm_statistics(LocalFeatures(descriptor_dim)).eval()


def _with_batch_norm_statistics(model: _Module) -> _Module:
    """Draw every batch norm's running statistics (fresh ones are 0 and 1, which would hide fusion bugs)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None  # track_running_stats
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def export_models(
    model: nn.Module, directory: Path, stem: str, size: int = 64, max_batch: int = 16
) -> tuple[Path, Path]:
    """Write ``{stem}.onnx`` (input "image", output "descriptor", dynamic batch) and ``{stem}.pt2``."""
    directory.mkdir(parents=True, exist_ok=True)
    example = (torch.randn(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = {"image": {0: batch}}
    onnx_path, pt2_path = directory / f"{stem}.onnx", directory / f"{stem}.pt2"
    # The exporter logs one warning per torchvision op it cannot register; torchvision is absent on purpose.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            onnx_path,
            input_names=["image"],
            output_names=["descriptor"],
            dynamic_shapes=dynamic,
            dynamo=True,
            verbose=False,
            external_data=False,
        )
        torch.export.save(torch.export.export(model, example, dynamic_shapes=dynamic), pt2_path)
    registration.setLevel(previous)
    return onnx_path, pt2_path


def export_local_features(
    model: nn.Module, directory: Path, stem: str, size: int = 64, max_batch: int = 16
) -> tuple[Path, Path]:
    """Write ``{stem}.onnx`` (input "image", outputs ``LOCAL_FEATURES_OUTPUTS``, dynamic batch) and
    ``{stem}.pt2``, both from one traced program."""
    example = (torch.zeros(2, 3, size, size),)
    dynamic = {"image": {0: torch.export.Dim("batch", min=1, max=max_batch)}}
    onnx_path, pt2_path = directory / f"{stem}.onnx", directory / f"{stem}.pt2"
    program = torch.export.export(model, example, dynamic_shapes=dynamic)  # traced once, saved twice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            program,
            example,
            onnx_path,
            input_names=["image"],
            output_names=list(LOCAL_FEATURES_OUTPUTS),
            dynamic_shapes=dynamic,
            dynamo=True,
            verbose=False,
            external_data=False,
        )
    torch.export.save(program, pt2_path)
    return onnx_path, pt2_path
