from __future__ import annotations

import pytest

import navcache_runtime as nr


def test_the_contract_names_nine_error_types() -> None:
    assert [e.__name__ for e in nr.CONTRACT_ERRORS] == [
        "EngineBuildError",
        "EngineDeserializeError",
        "EngineHashMismatchError",
        "EngineSchemaMismatchError",
        "EngineSidecarMissingError",
        "CalibrationCacheError",
        "InferenceError",
        "OutOfMemoryError",
        "TelemetryUnavailableError",
    ]


@pytest.mark.parametrize("error_type", [*nr.CONTRACT_ERRORS, nr.RuntimeNotAvailableError, nr.RuntimeConfigError])
def test_family_base_catches_every_subtype(error_type: type[nr.InferenceRuntimeError]) -> None:
    with pytest.raises(nr.InferenceRuntimeError) as caught:
        raise error_type("boom", hint="do this", path="/x/y")
    assert type(caught.value) is error_type
    assert str(caught.value) == "boom (fix: do this)"
    assert caught.value.path is not None and caught.value.path.name == "y"


def test_family_base_does_not_catch_unrelated_errors() -> None:
    with pytest.raises(ValueError):  # the inner handler must not swallow it
        try:
            raise ValueError("unrelated")
        except nr.InferenceRuntimeError:  # pragma: no cover - must not happen
            pytest.fail("an unrelated ValueError was caught by the runtime error family")
