"""Bring-your-own backbones: each backbone's ONNX file checked against what the sortie declares for it, the
way it will run, in about a second and before anything is built. Needs the ``onnx`` package (the sortie
reader, :func:`navcache.sortie.load_sortie`, only needs the model files to exist).

:func:`validate_models` refuses, per backbone:

* a file that does not parse or fails the ONNX checker (external data is resolved against the model's folder);
* a configured ``input`` the graph does not have (the error lists its inputs), or a rank other than the
  configured shape's;
* for the vpr backbone, a shape that is not a 3-channel image batch in the declared layout (NCHW by default,
  NHWC when ``[backbones.preprocess] layout`` says so), or a model whose fixed dims put the channels on the
  other layout's axis (the hint gives the swapped shape or the layout to declare);
* a fixed model axis that the configured min..max range does not match exactly;
* for the vpr backbone, a descriptor output that is not a FLOAT/FLOAT16 ``[N, D]`` tensor, or none named
  where the model has several outputs or a first output that is not ``[N, D]`` (shapes from the graph's
  declarations, completed by ONNX shape inference);
* a precision this host's runtime cannot build (``onnx_trt_ep``: fp16 needs the CUDA or TensorRT execution
  provider, int8 TensorRT; ``pytorch_fp16``: no int8).

A vpr ``shape`` with batch > 1 gets a profile from batch 1 when the sortie is read (one onboard frame costs
one image); where the model's batch axis is fixed, the given batch is put back and a warning says what a
frame then costs.

Errors are :class:`navcache.errors.SortieError` with ``where`` = ``"<file> [[backbones]][i].<field>"`` and a
``hint`` saying how to fix it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from navcache_runtime.types import InputProfile

from .errors import SortieError
from .sortie import BackboneSpec, Sortie

logger = logging.getLogger(__name__)


def validate_models(sortie: Sortie) -> Sortie:
    """Check each backbone's ONNX file against the sortie, the way it will run, in about a second: it parses
    and passes the ONNX checker; has the configured input with the configured rank, fixed axes that match the
    profile and, for the vpr backbone, 3 channels where the declared layout puts them; the vpr backbone's
    descriptor output is a float [N, D] tensor (several outputs or a feature map need an explicit
    ``output``); and this host's runtime can build the precision. Needs the ``onnx`` package. Raises
    :class:`SortieError`.

    Returns the sortie to run: a vpr ``shape`` with batch > 1 got a profile from batch 1 at load time; where
    the model's batch axis is fixed that batch is put back (and a warning says what it costs onboard)."""
    backbones = []
    for index, backbone in enumerate(sortie.backbones):
        where = f"{sortie.path.name} [[backbones]][{index}]"
        backbones.append(_validate_model(backbone, where, sortie.runtime))
        logger.info("backbone %s: ONNX model %s checked", backbone.name, backbone.onnx.name)
    return replace(sortie, backbones=tuple(backbones))


def _validate_model(backbone: BackboneSpec, where: str, runtime: str | None = None) -> BackboneSpec:
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import uses_external_data

    name, path = backbone.name, backbone.onnx
    try:
        model = onnx.load(str(path), load_external_data=False)
        external = any(uses_external_data(t) for t in model.graph.initializer)
        # external data resolves against the model's folder only when the checker gets the path
        onnx.checker.check_model(str(path) if external else model)
    except (DecodeError, onnx.checker.ValidationError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SortieError(
            f"backbone {name!r}: {path} is not a valid ONNX model ({reason})",
            where=f"{where}.onnx",
            hint="re-export the model; the file may be truncated or corrupt",
        ) from None

    initializers = {t.name for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    graph_input = inputs.get(backbone.input_name)
    if graph_input is None:
        raise SortieError(
            f"backbone {name!r}: the model has no input {backbone.input_name!r}; its inputs are "
            f"{', '.join(map(repr, inputs)) or 'none'}",
            where=f"{where}.input",
            hint=f"set input = {next(iter(inputs), 'image')!r}",
        )
    tensor = graph_input.type.tensor_type
    dims = list(tensor.shape.dim) if tensor.HasField("shape") else None
    if dims is not None and len(dims) != len(backbone.profile.opt):
        raise SortieError(
            f"backbone {name!r}: input {backbone.input_name!r} has rank {len(dims)} "
            f"({_dims_text(dims)}) but the configured shape has rank {len(backbone.profile.opt)} "
            f"{list(backbone.profile.opt)}",
            where=f"{where}.shape",
            hint=f"give a shape with {len(dims)} axes",
        )
    if backbone.role == "vpr":
        _check_layout(backbone, where, dims)
    if dims is not None:
        backbone = _check_fixed_axes(backbone, where, dims)
    if backbone.role == "vpr":
        _check_descriptor_output(model, backbone, where)
    if runtime is not None:
        _check_precision(backbone, where, runtime)
    return backbone


def _fixed(dim: Any) -> int | None:
    return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _check_layout(backbone: BackboneSpec, where: str, dims: list[Any] | None) -> None:
    """The vpr input is a 3-channel image where the declared layout (default NCHW) puts the channels, in the
    configured shape and, where the model fixes them, in the model's dims."""
    name, shape, layout = backbone.name, list(backbone.profile.opt), backbone.layout
    declared = "layout" in dict(backbone.preprocess_options)
    channel_axis, other_axis = (3, 1) if layout == "NHWC" else (1, 3)
    other = "NCHW" if layout == "NHWC" else "NHWC"
    if len(shape) != 4:
        raise SortieError(
            f"backbone {name!r}: the vpr input shape {shape} is not an image batch "
            f"({'[N, H, W, 3]' if layout == 'NHWC' else '[N, 3, H, W]'} for layout {layout})",
            where=f"{where}.shape",
            hint="give the model's 4-axis image input shape",
        )
    swapped = [shape[0], shape[3], shape[1], shape[2]] if layout == "NCHW" else [shape[0], shape[2], shape[3], shape[1]]
    if shape[channel_axis] != 3:
        looks_other = shape[other_axis] == 3
        raise SortieError(
            f"backbone {name!r}: shape {shape} has {shape[channel_axis]} channels on axis {channel_axis}, but "
            f"layout {layout}{'' if declared else ' (the default)'} puts the 3 image channels there"
            + (f"; the shape is {other}" if looks_other else ""),
            where=f"{where}.shape",
            hint=(
                f"for an {layout} model give shape = {swapped}; for an {other} model declare layout = "
                f'"{other}" in [backbones.preprocess]'
                if looks_other
                else "give the model's image input shape with 3 channels"
            ),
        )
    if dims is None or len(dims) != 4:
        return
    model_channels = [axis for axis in (1, 3) if _fixed(dims[axis]) == 3]
    if model_channels == [other_axis]:
        # the shape fits the declared layout; the model wants the other one
        swapped = (
            [shape[0], shape[2], shape[3], shape[1]] if layout == "NCHW" else [shape[0], shape[3], shape[1], shape[2]]
        )
        raise SortieError(
            f"backbone {name!r}: the model's input {backbone.input_name!r} is {_dims_text(dims)}, channels on "
            f"axis {other_axis} ({other}), but the sortie declares layout {layout} with shape {shape}",
            where=f"{where}.preprocess.layout" if layout == "NHWC" else f"{where}.shape",
            hint=(
                f'declare layout = "NHWC" in [backbones.preprocess] and give shape = {swapped}'
                if other == "NHWC"
                else f'remove layout = "NHWC" (the model is NCHW) and give shape = {swapped}'
            ),
        )


def _check_fixed_axes(backbone: BackboneSpec, where: str, dims: list[Any]) -> BackboneSpec:
    name, profile = backbone.name, backbone.profile
    batch = _fixed(dims[0]) if dims else None
    if backbone.batch_defaulted and batch is not None and batch == profile.max[0]:
        logger.warning(
            "backbone %s: the model's batch axis is fixed at %d, so the engine always runs %d images: one onboard "
            "frame costs a batch of %d; export the model with a dynamic batch axis to run single frames",
            name,
            batch,
            batch,
            batch,
        )
        profile = InputProfile(profile.name, profile.max, profile.max, profile.max)
        backbone = replace(backbone, profile=profile, batch_defaulted=False)
    for axis, dim in enumerate(dims):
        value = _fixed(dim)
        if value is None:
            continue
        lo, hi = profile.min[axis], profile.max[axis]
        if not lo == hi == value:
            raise SortieError(
                f"backbone {name!r}: input {backbone.input_name!r} axis {axis} is fixed at "
                f"{value} in the model but the configured range is {lo}..{hi}",
                where=f"{where}.shape",
                hint=f"use {value} on axis {axis}, or export the model with a dynamic axis",
            )
    return backbone


def _value_shapes(model: Any) -> dict[str, str]:
    """Output name → its dims as text ("[N, 384]"), from the graph's declarations, completed by ONNX shape
    inference where an output declares none (cheap: no weights are loaded)."""
    import onnx

    shapes = {}
    missing = False
    for output in model.graph.output:
        tensor = output.type.tensor_type
        if output.type.HasField("tensor_type") and tensor.HasField("shape"):
            shapes[output.name] = _dims_text(tensor.shape.dim)
        else:
            missing = True
    if missing:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # inference is a courtesy: unknown shapes are checked when the engine runs
            return shapes
        for info in list(inferred.graph.output) + list(inferred.graph.value_info):
            tensor = info.type.tensor_type
            if info.name not in shapes and tensor.HasField("shape") and tensor.shape.dim:
                shapes[info.name] = _dims_text(tensor.shape.dim)
    return shapes


def _check_descriptor_output(model: Any, backbone: BackboneSpec, where: str) -> None:
    """The vpr output is a FLOAT/FLOAT16 tensor of rank 2, [N, D]; with several outputs, or a first output
    that is not [N, D], ``output`` must name it."""
    import onnx

    name = backbone.name
    outputs = list(model.graph.output)
    if backbone.output_name is not None:
        chosen = next((o for o in outputs if o.name == backbone.output_name), None)
        if chosen is None:
            raise SortieError(
                f"backbone {name!r}: the model has no output {backbone.output_name!r}; its outputs are "
                f"{', '.join(repr(o.name) for o in outputs) or 'none'}",
                where=f"{where}.output",
                hint="set output to one of the model's outputs",
            )
    else:
        chosen = outputs[0] if outputs else None
    if chosen is None:
        raise SortieError(
            f"backbone {name!r}: the model has no outputs", where=f"{where}.onnx", hint="re-export the model"
        )
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    float_names = [o.name for o in outputs if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in floats]
    if chosen.name not in float_names:
        elem = chosen.type.tensor_type.elem_type if chosen.type.HasField("tensor_type") else None
        kind = onnx.TensorProto.DataType.Name(elem) if elem else "not a tensor"
        hint = (
            f"set output = {float_names[0]!r} (float outputs: {', '.join(map(repr, float_names))})"
            if float_names
            else "export the model with a FLOAT or FLOAT16 descriptor output"
        )
        raise SortieError(
            f"backbone {name!r}: output {chosen.name!r} used as the descriptor is {kind}, not a FLOAT/FLOAT16 tensor",
            where=f"{where}.output",
            hint=hint,
        )
    shapes = _value_shapes(model)
    rank = {o: text.count(",") + 1 if text != "[]" else 0 for o, text in shapes.items()}
    listing = ", ".join(f"{o.name!r} {shapes.get(o.name, '[?]')}" for o in outputs)
    descriptors = [o for o in float_names if rank.get(o) == 2]
    fix = (
        f'set output = "{descriptors[0]}" in {where}'
        if descriptors
        else "export the model with an [N, D] descriptor output (pool or flatten the feature map in the graph)"
    )
    if chosen.name in rank and rank[chosen.name] != 2:
        which = "the descriptor output" if backbone.output_name is not None else "the first output (no output set)"
        raise SortieError(
            f"backbone {name!r}: {which} {chosen.name!r} is {shapes[chosen.name]}, but a descriptor must be [N, D]; "
            f"the model's outputs: {listing}",
            where=f"{where}.output",
            hint=fix,
        )
    if backbone.output_name is None and len(outputs) > 1:
        raise SortieError(
            f"backbone {name!r}: the model has {len(outputs)} outputs ({listing}); say which one is the descriptor",
            where=f"{where}.output",
            hint=fix,
        )


_EP_NAMES = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA"}


def _check_precision(backbone: BackboneSpec, where: str, runtime: str) -> None:
    """Refuse a precision no available provider of the runtime builds (what compile_engine would find out
    after loading the model)."""
    name, precision = backbone.name, backbone.precision
    if runtime == "onnx_trt_ep" and precision in ("fp16", "int8"):
        try:
            import onnxruntime as ort
        except ImportError:
            return  # the runtime check names the missing package
        available = list(ort.get_available_providers())
        needs = (
            ["TensorrtExecutionProvider"]
            if precision == "int8"
            else ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        )
        if not set(needs) & set(available):
            raise SortieError(
                f"backbone {name!r}: precision {precision!r} needs the "
                f"{' or '.join(_EP_NAMES[n] for n in needs)} execution provider, but "
                f"this host's ONNX Runtime offers {', '.join(available)} (the CPU provider builds fp32 engines only)",
                where=f"{where}.precision",
                hint='use precision = "fp32" on this host, or provision on the airframe with onnxruntime-gpu',
            )
    elif runtime == "pytorch_fp16" and precision == "int8":
        raise SortieError(
            f"backbone {name!r}: the pytorch_fp16 runtime cannot build int8 engines",
            where=f"{where}.precision",
            hint='use precision = "fp16" or "fp32", or runtime = "tensorrt" for int8',
        )


def _dims_text(dims: Any) -> str:
    return "[" + ", ".join(d.dim_param if d.HasField("dim_param") else str(d.dim_value) for d in dims) + "]"


__all__ = ["validate_models"]
