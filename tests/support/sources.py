"""Test doubles above real tile sources (they read real files; they only observe)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from navcache.imagery import DigestsItsInputs, TileSource
from navcache.types import Tile, TileId


@dataclass
class CountingSource:
    """A real source that records every tile it decodes and every tile whose raw digest it computes, and can
    pretend it cannot digest its bytes."""

    inner: TileSource
    digests: bool = True
    reads: list[TileId] = field(default_factory=list)
    digested: list[TileId] = field(default_factory=list)

    @property
    def tile_size(self) -> int:
        return self.inner.tile_size

    def read_tile(self, tile: TileId) -> Tile | None:
        self.reads.append(tile)
        return self.inner.read_tile(tile)

    def raw_identity(self) -> str:
        return self.inner.raw_identity()

    def reading(self) -> AbstractContextManager[None]:
        return self.inner.reading()

    def raw_digest(self, tile: TileId) -> str | None:
        return self.inner.raw_digest(tile) if self.digests else None

    def raw_digests(self, tiles: list[TileId]) -> list[str] | None:
        # One tile at a time through raw_digest, so a subclass that changes raw_digest changes both
        self.digested.extend(tiles)
        digests = [self.raw_digest(t) for t in tiles]
        return None if None in digests else digests  # type: ignore[return-value]

    def raw_digests_and_inputs(self, tiles: list[TileId]) -> tuple[list[str], tuple[str, ...]] | None:
        if not self.digests or not isinstance(self.inner, DigestsItsInputs):
            return None
        self.digested.extend(tiles)
        return self.inner.raw_digests_and_inputs(tiles)

    def inputs_digest(self, inputs: Sequence[str]) -> str | None:
        if not self.digests or not isinstance(self.inner, DigestsItsInputs):
            return None
        return self.inner.inputs_digest(inputs)
