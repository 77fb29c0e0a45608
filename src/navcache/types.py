"""Values that cross provisioning steps. Frozen, small, explicit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class TileId:
    """A cell of a grid at one zoom: a Web-Mercator XYZ storage tile, or a retrieval chunk (whose
    ``x``/``y`` index the chunk grid; with span 1 and no overlap the two grids coincide)."""

    z: int
    x: int
    y: int

    def __str__(self) -> str:
        return f"{self.z}/{self.x}/{self.y}"

    @classmethod
    def parse(cls, text: str) -> TileId:
        z, x, y = (int(part) for part in text.split("/"))
        return cls(z, x, y)


@dataclass(frozen=True)
class Tile:
    """Pixels of one tile or window: RGB uint8 (H, W, 3) and a validity mask (H, W) (False = nodata)."""

    rgb: np.ndarray
    valid: np.ndarray

    @property
    def valid_fraction(self) -> float:
        return np.count_nonzero(self.valid) / self.valid.size if self.valid.size else 0.0


Bounds = tuple[float, float, float, float]  # west, south, east, north in degrees (WGS84)
