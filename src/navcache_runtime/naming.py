"""Engine filename schema: build and parse round-trip.

The short form ``{model}__sm{SM}_jp{JP}_trt{TRT}_{precision}.engine`` (e.g.
``dinov2_vpr__sm87_jp6.2_trt10.3_fp16.engine``) is one instance of the full schema, so every such name
parses:

    {model}__{hardware tokens}_{precision}[__dev-{device}][__src-{hash}][__cfg-{hash}][__eager].{ext}

hardware tokens, each optional, in this order: ``sm{SM}`` ``jp{JetPack}`` ``trt{TensorRT}`` ``ort{ORT}``
``torch{PyTorch}`` ``cpu-{ISA}``. ``dev`` is the device model, ``src`` the source model's content hash
(first 16 hex), ``cfg`` the build config's hash (first 8 hex), ``eager`` marks a PyTorch eager fallback.
Extensions: ``.engine`` (TensorRT), ``.onnx`` (ONNX Runtime optimized / EP-context model), ``.pt2``
(PyTorch AOTInductor package or exported program).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from .errors import EngineSchemaMismatchError
from .types import PRECISIONS, HostFields, Precision, RuntimeLabel

EXTENSIONS: dict[str, RuntimeLabel] = {"engine": "tensorrt", "onnx": "onnx_trt_ep", "pt2": "pytorch_fp16"}
RUNTIME_EXTENSION: dict[str, str] = {label: ext for ext, label in EXTENSIONS.items()}

SOURCE_DIGEST_LEN = 16
CONFIG_DIGEST_LEN = 8

_MODEL = r"[A-Za-z0-9](?:[A-Za-z0-9.\-]|_(?=[A-Za-z0-9.\-]))*"  # single "_" inside only
_VERSION = r"\d+(?:\.\d+)*"
_SLUG = r"[a-z0-9](?:[a-z0-9.\-]*[a-z0-9])?"
# (HostFields attribute, token prefix, value pattern) in filename order.
_HW_TOKENS: tuple[tuple[str, str, str], ...] = (
    ("sm", "sm", r"\d+"),
    ("jetpack", "jp", _VERSION),
    ("trt", "trt", _VERSION),
    ("ort", "ort", _VERSION),
    ("torch", "torch", _VERSION),
    ("cpu_isa", "cpu-", _SLUG),
)
_NAME_RE = re.compile(
    rf"^(?P<model>{_MODEL})__"
    + "".join(rf"(?:{prefix}(?P<{attr}>{pattern})_)?" for attr, prefix, pattern in _HW_TOKENS)
    + rf"(?P<precision>{'|'.join(PRECISIONS)})"
    + rf"(?:__dev-(?P<device>{_SLUG}))?"
    + rf"(?:__src-(?P<source>[0-9a-f]{{{SOURCE_DIGEST_LEN}}}))?"
    + rf"(?:__cfg-(?P<config>[0-9a-f]{{{CONFIG_DIGEST_LEN}}}))?"
    + r"(?P<eager>__eager)?"
    + rf"\.(?P<ext>{'|'.join(EXTENSIONS)})$"
)


def slugify(text: str) -> str:
    """Lower-case, ``[a-z0-9.-]`` only: for device models such as "NVIDIA H100 80GB HBM3"."""
    slug = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return slug or "unknown"


@dataclass(frozen=True)
class EngineName:
    model: str
    precision: Precision
    ext: str
    host: HostFields = field(default_factory=HostFields)
    source: str | None = None
    config: str | None = None
    eager: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(_MODEL, self.model):
            raise EngineSchemaMismatchError(
                f"model name {self.model!r} cannot be used in an engine filename",
                hint="use letters, digits, '.', '-' and single '_' (no '__'), starting with a letter or digit",
            )
        if self.source is not None:
            object.__setattr__(self, "source", self.source[:SOURCE_DIGEST_LEN])
        if self.config is not None:
            object.__setattr__(self, "config", self.config[:CONFIG_DIGEST_LEN])
        if self.host.device is not None:
            object.__setattr__(self, "host", _replace_host(self.host, device=slugify(self.host.device)))
        if self.host.cpu_isa is not None:
            object.__setattr__(self, "host", _replace_host(self.host, cpu_isa=slugify(self.host.cpu_isa)))
        if self.ext not in EXTENSIONS:
            raise EngineSchemaMismatchError(f"unknown artifact extension {self.ext!r}; one of {sorted(EXTENSIONS)}")
        rendered = self.filename
        if _NAME_RE.match(rendered) is None:  # a field holds characters the schema cannot carry
            raise EngineSchemaMismatchError(f"engine name fields do not fit the schema: {rendered!r}")

    @property
    def runtime_label(self) -> RuntimeLabel:
        return EXTENSIONS[self.ext]

    @property
    def filename(self) -> str:
        hw = "".join(
            f"{prefix}{getattr(self.host, attr)}_"
            for attr, prefix, _ in _HW_TOKENS
            if getattr(self.host, attr) is not None
        )
        text = f"{self.model}__{hw}{self.precision}"
        if self.host.device:
            text += f"__dev-{self.host.device}"
        if self.source:
            text += f"__src-{self.source}"
        if self.config:
            text += f"__cfg-{self.config}"
        if self.eager:
            text += "__eager"
        return f"{text}.{self.ext}"

    def __str__(self) -> str:
        return self.filename


def _replace_host(host: HostFields, **changes: str | None) -> HostFields:
    values = {f.name: getattr(host, f.name) for f in fields(HostFields)}
    values.update(changes)
    return HostFields(**values)


def parse_engine_name(filename: str) -> EngineName:
    """Parse a filename (no directory) built by :class:`EngineName`; raise if it does not fit the schema."""
    match = _NAME_RE.match(filename)
    if match is None:
        raise EngineSchemaMismatchError(
            f"{filename!r} does not follow the engine filename schema "
            "{model}__sm{SM}_jp{JP}_trt{TRT}_{precision}[__dev-..][__src-..][__cfg-..].{engine|onnx|pt2}",
            hint="artifacts must keep the name navcache gave them; rebuild it with compile_engine",
            path=filename,
        )
    groups = match.groupdict()
    host = HostFields(**{attr: groups[attr] for attr, _, _ in _HW_TOKENS}, device=groups["device"])
    return EngineName(
        model=groups["model"],
        precision=groups["precision"],  # type: ignore[arg-type]
        ext=groups["ext"],
        host=host,
        source=groups["source"],
        config=groups["config"],
        eager=groups["eager"] is not None,
    )
