"""The onboard self-test: before take-off, the drone's own engine and index must find the signed query views.

Provisioning stores a small set of drone-like views (``selftest/queries-{sha16}.npz``: ``views`` uint8
(N, H, W, 3) at the VPR engine's input size, ``expected`` int32 (N, 2) chunk x, y) and signs, in the
manifest's ``self_test.onboard`` block, the file and ``min_hits_at_5``: how many of the N must find their
chunk in the top 5 (80 % of what the ground's engine found). :func:`run_self_test` runs them through
:meth:`OnboardCache.preprocess`, :meth:`~OnboardCache.describe` and :meth:`~OnboardCache.query` — exactly what a
flight does — so an engine compiled on the airframe that disagrees with the descriptors (precision, a bad
TensorRT build, a driver change, other weights) is caught on the ground, not in the air.

Standard library and numpy only (the npz is read with ``allow_pickle=False`` from the verified bytes).
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InferenceRuntimeError

if TYPE_CHECKING:
    from .cache import OnboardCache

#: The largest query set read onboard (views x height x width x 3 bytes, decompressed).
MAX_QUERY_BYTES = 256 << 20


class SelfTestFailedError(InferenceRuntimeError):
    """The cache verified, but the drone's engine and index do not find the signed query views."""


@dataclass(frozen=True)
class OnboardSelfTest:
    queries: int
    hits_at_5: int
    hits_at_1: int
    min_hits_at_5: int
    seconds: float

    @property
    def passed(self) -> bool:
        return self.hits_at_5 >= self.min_hits_at_5

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"self-test {verdict}: {self.hits_at_5}/{self.queries} views found their tile in the top 5 "
            f"(signed floor {self.min_hits_at_5}), {self.hits_at_1} at rank 1, in {self.seconds:.2f} s"
        )


def onboard_block(self_test: Mapping[str, Any] | None) -> tuple[str, int, int] | None:
    """(path, queries, min_hits_at_5) of a signed ``self_test`` block, or None when it has no onboard set."""
    if not isinstance(self_test, Mapping):
        return None
    onboard = self_test.get("onboard")
    if not isinstance(onboard, Mapping):
        return None
    path, queries, floor = onboard.get("path"), onboard.get("queries"), onboard.get("min_hits_at_5")
    if not isinstance(path, str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in (queries, floor)):
        return None
    return path, int(queries), int(floor)  # type: ignore[arg-type]


def load_queries(data: bytes, expected_count: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The views and expected chunks of a query set, from the bytes the verifier hashed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            views, expected = npz["views"], npz["expected"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise SelfTestFailedError(f"cannot read the self-test query set {name}: {exc}", path=name) from None
    if (
        views.dtype != np.uint8
        or views.ndim != 4
        or views.shape[3] != 3
        or expected.shape != (len(views), 2)
        or len(views) != expected_count
        or views.nbytes > MAX_QUERY_BYTES
    ):
        raise SelfTestFailedError(
            f"{name} is not the signed query set (views {views.dtype} {views.shape}, expected {expected.shape}, "
            f"{expected_count} signed)",
            path=name,
        )
    return views, expected.astype(np.int64)


def run_self_test(cache: OnboardCache, views: np.ndarray, expected: np.ndarray, min_hits_at_5: int) -> OnboardSelfTest:
    """Run the views through the cache's engine and index; the result says whether the floor is met."""
    started = time.perf_counter()
    batch = np.stack([cache.preprocess(view) for view in views])
    descriptors = cache.describe(batch)
    hits = cache.query_batch(descriptors, k=5)
    at5 = at1 = 0
    for found, (x, y) in zip(hits, expected, strict=True):
        ranks = [rank for rank, c in enumerate(found) if (c.tile[1], c.tile[2]) == (int(x), int(y))]
        at5 += bool(ranks)
        at1 += bool(ranks) and ranks[0] == 0
    return OnboardSelfTest(len(views), at5, at1, min_hits_at_5, time.perf_counter() - started)
