"""Small but real backbone models for tests, benchmarks and the demo (no downloads).

A CNN with a GeM-pooled, L2-normalised global descriptor head (the shape of a VPR backbone), written
once in plain torch and exported both to ONNX and as a ``torch.export`` program (``.pt2``), so every
runtime strategy compiles the same network.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn


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


def make_model(seed: int = 0, descriptor_dim: int = 64, width: int = 16, depth: int = 3) -> TinyVPR:
    torch.manual_seed(seed)
    model = TinyVPR(descriptor_dim, width, depth)
    for module in model.modules():  # non-trivial BN statistics so fusion bugs would show
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None  # track_running_stats
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


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
