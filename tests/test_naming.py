from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from navcache_runtime import EngineName, EngineSchemaMismatchError, HostFields, parse_engine_name


@pytest.mark.parametrize(
    "filename",
    [
        "dinov2_vpr__sm87_jp6.2_trt10.3_fp16.engine",  # the original schema, unchanged
        "superpoint__sm72_jp5.1.2_trt8.5_int8.engine",
        "dinov2_vpr__sm90_trt10.13.3_fp16__dev-nvidia-h100-80gb-hbm3__src-0123456789abcdef__cfg-89abcdef.engine",
        "vpr__ort1.32.0_cpu-avx2_fp32__src-0123456789abcdef__cfg-89abcdef.onnx",
        "vpr__sm87_jp6.2_trt10.3_ort1.22.0_fp16__dev-jetson-agx-orin__src-0123456789abcdef.onnx",
        "vpr__torch2.13.0_cpu-avx512_fp32__src-0123456789abcdef__cfg-01234567__eager.pt2",
    ],
)
def test_filename_round_trips(filename: str) -> None:
    name = parse_engine_name(filename)
    assert name.filename == filename
    assert parse_engine_name(name.filename) == name


def test_original_schema_parses_into_its_fields() -> None:
    name = parse_engine_name("dinov2_vpr__sm87_jp6.2_trt10.3_fp16.engine")
    assert name.model == "dinov2_vpr"
    assert name.host == HostFields(sm="87", jetpack="6.2", trt="10.3")
    assert name.precision == "fp16"
    assert name.runtime_label == "tensorrt"
    assert (name.source, name.config, name.eager) == (None, None, False)


def test_device_and_isa_are_slugged_and_digests_shortened() -> None:
    name = EngineName(
        "vpr",
        "fp16",
        "engine",
        HostFields(sm="90", trt="10.3", device="NVIDIA H100 80GB HBM3"),
        source="ab" * 32,
        config="cd" * 32,
    )
    assert name.filename == (
        "vpr__sm90_trt10.3_fp16__dev-nvidia-h100-80gb-hbm3__src-abababababababab__cfg-cdcdcdcd.engine"
    )


@pytest.mark.parametrize(
    "filename",
    [
        "dinov2_vpr_sm87_jp6.2_trt10.3_fp16.engine",  # single underscore before the fields
        "dinov2_vpr__sm87_jp6.2_trt10.3_fp64.engine",  # unknown precision
        "dinov2_vpr__sm87_jp6.2_trt10.3_fp16.plan",  # unknown extension
        "dinov2_vpr__jp6.2_sm87_fp16.engine",  # fields out of order
        "../x__sm87_fp16.engine",
        "",
    ],
)
def test_malformed_names_are_rejected(filename: str) -> None:
    with pytest.raises(EngineSchemaMismatchError, match="schema"):
        parse_engine_name(filename)


def test_model_names_that_would_break_the_schema_are_rejected() -> None:
    with pytest.raises(EngineSchemaMismatchError, match="cannot be used"):
        EngineName("my__model", "fp32", "onnx")


_versions = st.lists(st.integers(0, 99), min_size=1, max_size=4).map(lambda v: ".".join(map(str, v)))
_maybe = st.one_of(st.none(), _versions)


@given(
    model=st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9.\-]|_(?!_)){0,20}", fullmatch=True).filter(
        lambda m: "__" not in m and not m.endswith("_")
    ),
    host=st.builds(
        HostFields,
        sm=st.one_of(st.none(), st.integers(10, 120).map(str)),
        jetpack=_maybe,
        trt=_maybe,
        ort=_maybe,
        torch=_maybe,
        cpu_isa=st.one_of(st.none(), st.sampled_from(["avx2", "avx512", "neon"])),
        device=st.one_of(st.none(), st.sampled_from(["nvidia-h100", "jetson-agx-orin"])),
    ),
    precision=st.sampled_from(["fp32", "fp16", "int8"]),
    ext=st.sampled_from(["engine", "onnx", "pt2"]),
    source=st.one_of(st.none(), st.text("0123456789abcdef", min_size=16, max_size=16)),
    eager=st.booleans(),
)
def test_any_valid_name_round_trips(
    model: str, host: HostFields, precision: str, ext: str, source: str | None, eager: bool
) -> None:
    name = EngineName(model, precision, ext, host, source=source, eager=eager)  # type: ignore[arg-type]
    assert parse_engine_name(name.filename) == name
