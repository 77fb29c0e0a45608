"""The TensorRT strategy module imported over the fake ``tensorrt`` (tests/fakes/tensorrt.py), for the tests
that drive the strategy without a GPU."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

import navcache_runtime.strategies as strategies_pkg
from tests.fakes import tensorrt as fake_trt

STRATEGY = "navcache_runtime.strategies.tensorrt"


def strategy_over_fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A fixture body (``yield from`` it): the strategy module, imported with the fake installed as
    ``tensorrt``; removed again afterwards so no strategy bound to the fake outlives the test."""
    fake_trt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.delitem(sys.modules, STRATEGY, raising=False)
    monkeypatch.delattr(strategies_pkg, "tensorrt", raising=False)
    module = importlib.import_module(STRATEGY)
    yield module
    sys.modules.pop(STRATEGY, None)
    if getattr(strategies_pkg, "tensorrt", None) is module:
        delattr(strategies_pkg, "tensorrt")
    fake_trt.reset()
