"""The sortie file: one TOML file describes one flight's cache. Loaded into frozen dataclasses and
validated up front, so a typo fails in a second, not after an hour of descriptor computation.

Layout (every field, with its default; relative paths are resolved against this file's directory)::

    sortie_id = "demo-001"            # flight id: [A-Za-z0-9._-]{1,64}            (required)
    runtime = "onnx_trt_ep"           # tensorrt | onnx_trt_ep | pytorch_fp16       (required)
    cache_dir = "cache"               # default "cache"; --cache-dir overrides
    signing_key = "keys/operator.key" # Ed25519 operator key, must exist            (required)
    # signing_key = "sslib:3f2a9c1e:hv:navcache-ops/1"   # or a securesystemslib signer (the ``signers``
    #                                 # extra): sslib:<keyid>:<private key URI>, kept as written for
    #                                 # navcache.keys.load_signer; needs trusted_keys (its keyid is looked up
    #                                 # there); preflight loads it; a PIN comes from $NAVCACHE_SIGNER_SECRET
    trusted_keys = "keys/trusted_keys.json"   # optional; must exist when given
    coverage_threshold = 99.0         # percent of the area's tiles that must be covered
    expires_hours = 72                # the manifest expires this long after signing

    [takeoff]                         # (required) must lie inside the area / corridor
    lat = 48.137
    lon = 11.575

    [area]                            # (required) exactly one of geojson / file
    geojson = \'\'\'{"type": "Polygon", "coordinates": [...]}\'\'\'   # a GeoJSON string or an inline table
    # file = "area.geojson"           # Feature, FeatureCollection with one feature, or a bare geometry
    # corridor_m = 400                # LineString routes only (and required for them): the area is every
    #                                 # point within corridor_m metres of the route (buffered in local
    #                                 # azimuthal-equidistant projections, not in degrees)

    [tiles]
    zoom = 17                         # 10..21
    size = 256                        # 256 | 512 pixels per storage tile
    chunk_span = 1                    # 1..4: a retrieval chunk is span x span tiles
    overlap = 0.0                     # 0..0.75 between neighbouring chunks (aerial VPR: 0.4-0.5, span >= 2)
    budget = 250000                   # most retrieval chunks the area may need
    shard_block = 64                  # 8..256: a descriptor shard holds block x block chunks
    max_upsampling = 4.0              # >= 1: warn when a tile pixel is this many times finer than the
    #                                 # imagery's (imagery m/px / tile m/px at the area; 130 m/px imagery at
    #                                 # zoom 17 is ~150x: flat tiles whose descriptors cannot tell neighbours apart)

    [orthophoto]                      # (required) exactly one of:
    geotiff = "ortho.tif"             # or xyz = "tiles/" (a {z}/{x}/{y} folder) or mbtiles = "area.mbtiles"
    # geotiff = "sheets/*.tif"        # sheets: a glob, or an array of files and globs ["a.tif", "b/*.tif"];
    #                                 # any CRSs (e.g. two UTM zones), composited in sorted-path order, the
    #                                 # first valid pixel winning; the scan memo works per sheet
    # geotiff = "ortho.vrt"           # a GDAL VRT (alone), read as one raster; its scan memo tracks each source
    #                                 # file's version (any write re-decodes the tiles over that file)
    blank_std = 2.0                   # 0..255: a retrieval chunk is *blank* (not described, nothing to localise
    #                                 # against) when under half its pixels are valid (nodata) or no RGB
    #                                 # channel's standard deviation over its valid pixels reaches blank_std
    #                                 # grey levels (near-uniform: water, snow, clipped sky). Lower it for faint
    #                                 # but usable imagery; 0 keeps every chunk with enough valid pixels

    [descriptors]
    batch_size = 16

    [self_test]                       # does the cache localise? (navcache.selftest; README "Self-test")
    samples = 256                     # drone-like views rendered from the orthophoto (all chunks if fewer)
    seed = 0                          # same inputs and seed, same figures
    max_rotation_deg = 20.0           # each view: rotation within +-this,
    scale_range = [0.85, 1.15]        # scale (> 1 sees more ground),
    max_offset = 0.2                  # offset up to this fraction of a chunk,
    brightness = 0.15                 # brightness +-, contrast 1 +- contrast,
    contrast = 0.15
    max_blur_px = 1.0                 # a Gaussian blur up to this radius,
    jpeg_quality = [60, 95]           # and a JPEG round trip at a quality in this range
    # min_recall_at_5 = 0.8           # a gate: below it the run fails before signing (default: report only)
    onboard_samples = 32              # views stored in the cache for `navcache_runtime selftest` (0: none)

    [[backbones]]                     # one per model; exactly one with role = "vpr"
    name = "tiny_vpr"                 # letters, digits, '.', '-', single '_' (it names engine files)
    onnx = "models/tiny_vpr.onnx"     # must exist
    role = "vpr"                      # vpr (global descriptor) | local (features for re-ranking)
    precision = "fp32"                # fp32 | fp16 | int8 (onnx_trt_ep: fp16 needs the CUDA or TensorRT
    #                                 # provider, int8 TensorRT; refused in preflight where the host lacks it)
    input = "image"                   # default "image": the graph input the tiles are fed to
    shape = [8, 3, 128, 128]          # a fixed shape, or instead a range (below). vpr: a fixed shape with
    #                                 # batch > 1 builds the profile min [1, ...], opt = max = the shape, so
    #                                 # one onboard frame costs one image; if the model's batch axis is fixed,
    #                                 # the shape is kept and a warning says a frame costs the whole batch
    # [backbones.profile]
    # min = [1, 3, 128, 128]
    # opt = [8, 3, 128, 128]          # vpr: the image size the tiles are resized to (H, W of opt)
    # max = [16, 3, 128, 128]
    # output = "descriptor"           # vpr: the descriptor output, a FLOAT/FLOAT16 [N, D] tensor; required
    #                                 # when the model has several outputs or its first is not [N, D]
    # [backbones.builder_options]     # passed to the runtime's engine builder (strings, numbers, bools)
    # [backbones.preprocess]          # vpr only: how a tile (and onboard, a camera frame) becomes the input
    # resize = "squash"               # squash (stretch to H x W) | center_crop (largest centred region of the
    #                                 # input's aspect, then resize) | pad (black borders to that aspect, then
    #                                 # resize); resizing is Pillow's bilinear filter
    # mean = [0.485, 0.456, 0.406]    # per channel, in the model's channel order; default ImageNet's
    # std = [0.229, 0.224, 0.225]     #   (x 255 with scale = "byte"); kept to 6 decimals
    # scale = "unit"                  # unit: (v / 255 - mean) / std | byte: (v - mean) / std, v = 0..255
    # channels = "RGB"                # RGB | BGR
    # layout = "NCHW"                 # NCHW: shape [N, 3, H, W] | NHWC: shape [N, H, W, 3]

The bring-your-own backbone contract (vpr): the model takes one float image batch in the declared layout,
preprocessed as declared (without [backbones.preprocess]: squash, ImageNet mean/std, unit scale, RGB,
NCHW), and returns a float [N, D] descriptor. The preprocessing is one definition
(:mod:`navcache_runtime.preprocessing`) used for the tiles and, from the signed manifest
(``predicate.preprocess``), by ``open_cache(...).preprocess`` for camera frames. Descriptors are
L2-normalised (retrieval is by cosine) and stored as float16, so raw outputs of any scale are fine.
:func:`navcache.model_checks.validate_models` refuses, before anything runs: a shape in the other layout than
declared (or than the model's fixed dims), an output that is not [N, D] or an unnamed one among several, and a
precision the host's runtime cannot build.

The area's GeoJSON (rings, coordinates, the route corridor, the takeoff inside it) is checked by
:mod:`navcache.area`.

Errors are :class:`navcache.errors.SortieError` with ``where`` = ``"<file> <table>.<field>"`` (for
example ``sortie.toml [tiles].zom``) and a ``hint`` saying how to fix it. ``validate_models`` (it needs
the onnx package) checks the models themselves; :func:`load_sortie` only needs their files to exist.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from shapely.geometry import MultiPolygon, Polygon

from navcache_runtime.coverage import DEFAULT_BLANK_STD
from navcache_runtime.errors import EngineSchemaMismatchError
from navcache_runtime.naming import EngineName
from navcache_runtime.preprocessing import (
    CHANNEL_ORDERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LAYOUTS,
    RESIZE_MODES,
    SCALES,
    Preprocess,
)
from navcache_runtime.types import (
    PRECISIONS,
    RUNTIME_LABELS,
    BuildConfig,
    InputProfile,
    OptionValue,
    Precision,
    RuntimeLabel,
)

from .area import area_geometry, area_shape, check_signable, check_takeoff, geojson_of, parse_geojson
from .errors import SortieError, TileBudgetError, short_repr, type_phrase
from .keys import SSLIB_PREFIX
from .tiles import ChunkGrid

logger = logging.getLogger(__name__)

ROLES = ("vpr", "local")
ORTHOPHOTO_KINDS = ("geotiff", "xyz", "mbtiles")

_SORTIE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MIN_CORRIDOR_M, _MAX_CORRIDOR_M = 1.0, 50_000.0

# Known fields per table: the unknown-field check and its "did you mean" use these.
_TOP = (
    "sortie_id",
    "runtime",
    "cache_dir",
    "signing_key",
    "trusted_keys",
    "coverage_threshold",
    "expires_hours",
    "takeoff",
    "area",
    "tiles",
    "orthophoto",
    "descriptors",
    "backbones",
    "self_test",
)
_TABLES: dict[str, tuple[str, ...]] = {
    "takeoff": ("lat", "lon"),
    "area": ("geojson", "file", "corridor_m"),
    "tiles": ("zoom", "size", "chunk_span", "overlap", "budget", "shard_block", "max_upsampling"),
    "orthophoto": (*ORTHOPHOTO_KINDS, "blank_std"),
    "descriptors": ("batch_size",),
    "self_test": (
        "samples",
        "seed",
        "max_rotation_deg",
        "scale_range",
        "max_offset",
        "brightness",
        "contrast",
        "max_blur_px",
        "jpeg_quality",
        "min_recall_at_5",
        "onboard_samples",
    ),
    "backbones": (
        "name",
        "onnx",
        "role",
        "precision",
        "input",
        "shape",
        "profile",
        "output",
        "builder_options",
        "preprocess",
    ),
    "backbones.profile": ("min", "opt", "max"),
    "backbones.preprocess": ("resize", "mean", "std", "scale", "channels", "layout"),
}


# --- dataclasses ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileSpec:
    """The tile and retrieval-chunk grid (see :mod:`navcache.tiles`)."""

    zoom: int = 17
    size: int = 256
    chunk_span: int = 1
    overlap: float = 0.0
    budget: int = 250_000
    shard_block: int = 64
    max_upsampling: float = 4.0  # warn above this imagery-to-tile resolution ratio (see the module docstring)

    def grid(self) -> ChunkGrid:
        return ChunkGrid(self.zoom, self.size, self.chunk_span, self.overlap)


@dataclass(frozen=True)
class OrthophotoSpec:
    """The imagery: ``paths`` are every file read (several only for GeoTIFF sheets, sorted by path, which
    is also their compositing order); ``path`` is the first of them (the only one for the other kinds)."""

    kind: str  # "geotiff" | "xyz" | "mbtiles"
    path: Path
    paths: tuple[Path, ...] = ()
    blank_std: float = DEFAULT_BLANK_STD  # the blank rule's contrast floor (see the module docstring)

    def __post_init__(self) -> None:
        if not self.paths:
            object.__setattr__(self, "paths", (self.path,))


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    onnx: Path
    role: str  # "vpr" | "local"
    precision: Precision
    input_name: str = "image"
    profile: InputProfile = field(kw_only=True)  # the shape range of input_name
    output_name: str | None = None  # vpr: the descriptor output; None = the model's first output
    builder_options: tuple[tuple[str, OptionValue], ...] = ()
    # [backbones.preprocess] as given (resize, mean, std, scale, channels, layout); the rest are defaults
    preprocess_options: tuple[tuple[str, Any], ...] = ()
    # vpr with a fixed shape of batch > 1: the profile's min batch was lowered to 1 (see validate_models)
    batch_defaulted: bool = False

    @property
    def layout(self) -> str:
        return str(dict(self.preprocess_options).get("layout", "NCHW"))

    @property
    def preprocess(self) -> Preprocess:
        """The tiles' (and the drone's frames') preprocessing at the input size of the profile's opt shape.
        Raises InferenceError when that shape is not a 3-channel image in the declared layout (which
        :func:`validate_models` refuses first, naming the fix)."""
        return Preprocess.for_input_shape(self.profile.opt, **dict(self.preprocess_options))

    def build_config(self) -> BuildConfig:
        return BuildConfig(
            precision=self.precision,
            input_shapes=(self.profile,),
            builder_options=self.builder_options,
            model_name=self.name,
        )


@dataclass(frozen=True)
class SelfTestConfig:
    """``[self_test]``: how the provision checks that the cache localises (see :mod:`navcache.selftest`)."""

    samples: int = 256
    seed: int = 0
    max_rotation_deg: float = 20.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    max_offset: float = 0.2  # of a chunk's width
    brightness: float = 0.15  # +- fraction of full scale
    contrast: float = 0.15  # contrast factor in 1 +- this
    max_blur_px: float = 1.0  # Gaussian blur radius, pixels of the view
    jpeg_quality: tuple[int, int] = (60, 95)
    min_recall_at_5: float | None = None  # None: report only
    onboard_samples: int = 32

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        qlo, qhi = self.jpeg_quality
        problems = [
            (self.samples < 1, "samples must be at least 1"),
            (not 0 <= self.max_rotation_deg <= 180, "max_rotation_deg must be within 0..180"),
            (not 0 < lo <= hi <= 4, "scale_range must be [min, max] with 0 < min <= max <= 4"),
            (not 0 <= self.max_offset <= 1, "max_offset must be within 0..1 (of a chunk)"),
            (not 0 <= self.brightness <= 1, "brightness must be within 0..1"),
            (not 0 <= self.contrast < 1, "contrast must be within 0..1"),
            (not 0 <= self.max_blur_px <= 10, "max_blur_px must be within 0..10"),
            (not 1 <= qlo <= qhi <= 100, "jpeg_quality must be [min, max] within 1..100"),
            (
                self.min_recall_at_5 is not None and not 0 <= self.min_recall_at_5 <= 1,
                "min_recall_at_5 must be within 0..1",
            ),
            (not 0 <= self.onboard_samples <= 256, "onboard_samples must be within 0..256"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


@dataclass(frozen=True)
class Sortie:
    path: Path
    sortie_id: str
    area: Polygon | MultiPolygon  # lon/lat; for a route, the buffered corridor
    area_geojson: dict[str, Any]  # the geometry as given (for a route, the LineString)
    corridor_m: float | None
    takeoff: tuple[float, float]  # (lat, lon)
    tiles: TileSpec
    orthophoto: OrthophotoSpec
    backbones: tuple[BackboneSpec, ...]
    runtime: RuntimeLabel
    signing_key: Path | str  # a key file, or an ``sslib:<keyid>:<private key URI>`` signer as written
    trusted_keys: Path | None
    cache_dir: Path
    coverage_threshold: float = 99.0
    expires_hours: int = 72
    batch_size: int = 16
    self_test: SelfTestConfig = SelfTestConfig()

    @property
    def vpr(self) -> BackboneSpec:
        return next(b for b in self.backbones if b.role == "vpr")

    @property
    def signed_area_geojson(self) -> dict[str, Any]:
        """The area the cache is provisioned for, as the manifest signs it: the polygon as given, or for a
        route the buffered corridor (the drone checks its takeoff against this, not against the line)."""
        if self.corridor_m is None:
            return self.area_geojson
        return geojson_of(self.area)

    @property
    def grid(self) -> ChunkGrid:
        return self.tiles.grid()


# --- reading helpers --------------------------------------------------------------------------------------

_REQUIRED: Any = object()


class _Table:
    """One TOML table plus how to name its fields in errors."""

    def __init__(self, data: dict[str, Any], label: str, file: str, base: Path, schema: str | None) -> None:
        self.data = data
        self.label = label  # "[tiles]", "[[backbones]][0]", "" for the top level
        self.file = file
        self.base = base
        self.schema = schema  # key into _TABLES, None for the top level

    def where(self, key: str | None = None) -> str:
        if key is None:
            return f"{self.file} {self.label}" if self.label else self.file
        return f"{self.file} {self.label}.{key}" if self.label else f"{self.file} {key}"

    def error(self, key: str | None, message: str, hint: str | None = None) -> SortieError:
        return SortieError(message, where=self.where(key), hint=hint)

    def check_unknown(self) -> None:
        known = _TOP if self.schema is None else _TABLES[self.schema]
        for key in self.data:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            suggestion = f"did you mean {close[0]!r}? " if close else ""
            elsewhere = [t for t, fields in _TABLES.items() if key in fields and t != self.schema]
            if not close and elsewhere:  # right field, wrong table
                suggestion = f"{key!r} belongs in [{elsewhere[0]}]; "
            where_text = f"in {self.label}" if self.label else "at the top level"
            raise self.error(
                key,
                f"unknown field {key!r} {where_text}",
                hint=f"{suggestion}valid fields: {', '.join(known)}",
            )

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _REQUIRED, hint: str | None = None) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise self.error(key, f"missing required field {key!r}", hint=hint or f"add {key} = ...")
        return default

    def string(
        self, key: str, default: Any = _REQUIRED, *, choices: tuple[str, ...] = (), hint: str | None = None
    ) -> Any:
        if key not in self.data:
            if choices and hint is None:
                hint = f"add {key} = {choices[0]!r} (one of: {', '.join(choices)})"
            return self.raw(key, default, hint=hint)
        value = self.data[key]
        if not isinstance(value, str):
            raise self.error(key, f"{key} must be a string, got {type_phrase(value)} ({short_repr(value)})", hint=hint)
        if choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            maybe = f"did you mean {close[0]!r}? " if close else ""
            raise self.error(
                key,
                f"{key} {value!r} is not one of: {', '.join(choices)}",
                hint=f"{maybe}use one of: {', '.join(choices)}",
            )
        return value

    def integer(self, key: str, default: Any = _REQUIRED, *, lo: int, hi: int | None = None) -> int:
        value = self.raw(key, default)
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"{key} must be an integer {bounds}, got {type_phrase(value)} ({short_repr(value)})")
        if value < lo or (hi is not None and value > hi):
            raise self.error(key, f"{key} = {value} is out of range", hint=f"use an integer {bounds}")
        return int(value)

    def number(self, key: str, default: Any = _REQUIRED, *, lo: float, hi: float) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"{key} must be a number, got {type_phrase(value)} ({short_repr(value)})")
        value = float(value)
        if not math.isfinite(value) or value > hi or value < lo:
            raise self.error(key, f"{key} = {value:g} is out of range", hint=f"use a number from {lo:g} to {hi:g}")
        return value

    def path(self, key: str, default: Any = _REQUIRED, *, must: str | None = "file", what: str = "") -> Any:
        """A path field resolved against the sortie's folder; ``must`` = "file" / "dir" / None (may not exist)."""
        if key not in self.data and default is not _REQUIRED:
            return None if default is None else _resolve(self.base, default)
        value = self.string(key)
        if not value.strip() or "\x00" in value:
            raise self.error(
                key, f"{key} is not a usable path: {short_repr(value)}", hint="give a path relative to the sortie file"
            )
        try:
            path = _resolve(self.base, value)
        except (RuntimeError, OSError, ValueError) as exc:  # "~nobody/...", loops of symlinks
            raise self.error(key, f"{key} {value!r} cannot be resolved: {exc}", hint="give a plain path") from None
        wanted = {"file": (Path.is_file, "a file"), "dir": (Path.is_dir, "a directory")}.get(must or "")
        if wanted is not None and not wanted[0](path):
            state = f"is not {wanted[1]}" if path.exists() else "does not exist"
            raise self.error(
                key, f"{what or key} {path} {state}", hint=f"fix the path (relative paths start at {self.base})"
            )
        return path

    def table(self, key: str, schema: str, *, required: bool = False) -> _Table:
        value = self.raw(key, _REQUIRED if required else {}, hint=f"add a [{key}] table")
        if not isinstance(value, dict):
            raise self.error(key, f"{key} must be a table ([{key}]), got {type_phrase(value)} ({short_repr(value)})")
        label = f"{self.label}.{key}" if self.label else f"[{key}]"
        sub = _Table(value, label, self.file, self.base, schema)
        sub.check_unknown()
        return sub


def _signing_key(top: _Table) -> Path | str:
    """A key file (a path like any other), or an ``sslib:<keyid>:<private key URI>`` signer kept exactly as
    written: :func:`navcache.keys.load_signer` builds the signer from it, and a URI is no path to resolve
    against the sortie's folder (its scheme decides what the rest means)."""
    value = top.data.get("signing_key")
    if not (isinstance(value, str) and value.startswith(SSLIB_PREFIX)):
        return cast(Path, top.path("signing_key", what="signing key"))
    keyid, _, uri = value[len(SSLIB_PREFIX) :].partition(":")
    if not keyid or not uri:
        raise top.error(
            "signing_key",
            f"signing_key {value!r} is not a securesystemslib signer URI",
            hint="write sslib:<keyid>:<private key URI>, e.g. sslib:3f2a9c1e:hv:navcache-ops/1",
        )
    return value


def _resolve(base: Path, value: str | Path) -> Path:
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


# --- load -------------------------------------------------------------------------------------------------


def load_sortie(path: Path, *, cache_dir_override: Path | None = None) -> Sortie:
    """Read and validate a sortie file (see the module docstring). Raises :class:`SortieError`."""
    path = Path(path)
    name = path.name
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SortieError(
            f"cannot read the sortie file: {exc.strerror or exc}", where=str(path), hint="check the path"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SortieError(
            "the sortie file is not UTF-8 text", where=f"{name} line {line}", hint="save the file as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(name, text, exc) from None
    except RecursionError:
        raise SortieError("the sortie file nests too deeply", where=name, hint="flatten the nested arrays") from None
    base = path.resolve().parent
    top = _Table(data, "", name, base, None)
    top.check_unknown()

    sortie_id = top.string("sortie_id", hint='add sortie_id = "my-flight-001"')
    if not _SORTIE_ID.fullmatch(sortie_id):
        raise top.error(
            "sortie_id",
            f"sortie_id {sortie_id!r} is not a valid flight id",
            hint="use 1-64 characters from letters, digits, '.', '_' and '-'",
        )
    runtime = cast(RuntimeLabel, top.string("runtime", choices=RUNTIME_LABELS))
    signing_key = _signing_key(top)
    trusted_keys = top.path("trusted_keys", None, what="trusted keys file")
    if isinstance(signing_key, str) and trusted_keys is None:
        raise top.error(
            "signing_key",
            "a securesystemslib signer needs trusted_keys: its keyid is looked up in that allowlist",
            hint='add trusted_keys = "keys/trusted_keys.json" (the operator allowlist holding the signer\'s key)',
        )
    if cache_dir_override is not None:
        cache_dir = Path(cache_dir_override).expanduser().resolve()
        cache_where = "--cache-dir"
    else:
        cache_dir = top.path("cache_dir", "cache", must=None)
        cache_where = top.where("cache_dir")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise SortieError(
            f"cache directory {cache_dir} exists and is not a directory", where=cache_where, hint="choose another path"
        )
    threshold = top.number("coverage_threshold", Sortie.coverage_threshold, lo=0.0, hi=100.0)
    expires = top.integer("expires_hours", Sortie.expires_hours, lo=1, hi=24 * 365)

    takeoff_t = top.table("takeoff", "takeoff", required=True)
    lat = takeoff_t.number("lat", lo=-90.0, hi=90.0)
    lon = takeoff_t.number("lon", lo=-180.0, hi=180.0)

    area_t = top.table("area", "area", required=True)
    geometry, corridor_m, area = _read_area(area_t)
    check_takeoff(area, lat, lon, corridor_m, takeoff_t.where())

    tiles_t = top.table("tiles", "tiles")
    tiles = TileSpec(
        zoom=tiles_t.integer("zoom", TileSpec.zoom, lo=10, hi=21),
        size=_choice_int(tiles_t, "size", TileSpec.size, (256, 512)),
        chunk_span=tiles_t.integer("chunk_span", TileSpec.chunk_span, lo=1, hi=4),
        overlap=tiles_t.number("overlap", TileSpec.overlap, lo=0.0, hi=0.75),
        budget=tiles_t.integer("budget", TileSpec.budget, lo=1),
        shard_block=tiles_t.integer("shard_block", TileSpec.shard_block, lo=8, hi=256),
        max_upsampling=tiles_t.number("max_upsampling", TileSpec.max_upsampling, lo=1.0, hi=1e6),
    )
    try:
        count = tiles.grid().count_chunks(area, tiles.budget)
    except TileBudgetError as exc:
        raise TileBudgetError(exc.message, where=tiles_t.where("budget"), hint=exc.hint) from None
    if count == 0:
        raise area_t.error(None, "the area covers no tile at this zoom", hint="draw a larger area")

    orthophoto = _read_orthophoto(top.table("orthophoto", "orthophoto", required=True))
    batch_size = top.table("descriptors", "descriptors").integer("batch_size", Sortie.batch_size, lo=1, hi=4096)
    backbones = _read_backbones(top)
    self_test = _read_self_test(top.table("self_test", "self_test"))

    sortie = Sortie(
        path=path.resolve(),
        sortie_id=sortie_id,
        area=area,
        area_geojson=geometry,
        corridor_m=corridor_m,
        takeoff=(lat, lon),
        tiles=tiles,
        orthophoto=orthophoto,
        backbones=backbones,
        runtime=runtime,
        signing_key=signing_key,
        trusted_keys=trusted_keys,
        cache_dir=cache_dir,
        coverage_threshold=threshold,
        expires_hours=expires,
        batch_size=batch_size,
        self_test=self_test,
    )
    logger.info(
        "sortie %s: %d chunks at z%d, %d backbone(s), runtime %s", sortie_id, count, tiles.zoom, len(backbones), runtime
    )
    return sortie


def _read_self_test(table: _Table) -> SelfTestConfig:
    d = SelfTestConfig()
    lo, hi = _pair(table, "scale_range", d.scale_range, 0.01, 4.0)
    qlo, qhi = _pair(table, "jpeg_quality", d.jpeg_quality, 1, 100, integers=True)
    floor = table.raw("min_recall_at_5", None)
    try:
        return SelfTestConfig(
            samples=table.integer("samples", d.samples, lo=1, hi=100_000),
            seed=table.integer("seed", d.seed, lo=0, hi=2**31 - 1),
            max_rotation_deg=table.number("max_rotation_deg", d.max_rotation_deg, lo=0.0, hi=180.0),
            scale_range=(lo, hi),
            max_offset=table.number("max_offset", d.max_offset, lo=0.0, hi=1.0),
            brightness=table.number("brightness", d.brightness, lo=0.0, hi=1.0),
            contrast=table.number("contrast", d.contrast, lo=0.0, hi=0.99),
            max_blur_px=table.number("max_blur_px", d.max_blur_px, lo=0.0, hi=10.0),
            jpeg_quality=(int(qlo), int(qhi)),
            min_recall_at_5=None if floor is None else table.number("min_recall_at_5", lo=0.0, hi=1.0),
            onboard_samples=table.integer("onboard_samples", d.onboard_samples, lo=0, hi=256),
        )
    except ValueError as exc:
        raise table.error(None, str(exc)) from None


def _pair(
    table: _Table, key: str, default: tuple[Any, Any], lo: float, hi: float, *, integers: bool = False
) -> tuple[Any, Any]:
    """A ``[min, max]`` field within ``lo``..``hi``."""
    value = table.raw(key, list(default))
    kinds = (int,) if integers else (int, float)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
        or not (lo <= value[0] <= value[1] <= hi)
    ):
        what = "integers" if integers else "numbers"
        raise table.error(
            key, f"{key} must be [min, max], two {what} with {lo:g} <= min <= max <= {hi:g}, got {short_repr(value)}"
        )
    return value[0], value[1]


def _toml_error(name: str, text: str, exc: tomllib.TOMLDecodeError) -> SortieError:
    message = str(exc)
    found = re.search(r"at line (\d+), column (\d+)", message)
    lines = text.splitlines()
    # "at end of document": the problem opened somewhere above (an unclosed array...); point at the end
    line = int(found.group(1)) if found else max(1, len(lines))
    detail = re.sub(r"\s*\((at line \d+, column \d+|at end of document)\)", "", message)
    source = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    shown = f": {source[:80]!r}" if source else ""
    return SortieError(
        f"malformed TOML: {detail}{shown}",
        where=f"{name} line {line}",
        hint="check the syntax near that line: strings need quotes, tables are [name], "
        "repeated tables are [[name]], each key once per table",
    )


def _choice_int(table: _Table, key: str, default: int, choices: tuple[int, ...]) -> int:
    value = table.integer(key, default, lo=min(choices), hi=max(choices))
    if value not in choices:
        raise table.error(key, f"{key} = {value} is not supported", hint=f"use one of: {', '.join(map(str, choices))}")
    return value


def _read_orthophoto(table: _Table) -> OrthophotoSpec:
    given = [k for k in ORTHOPHOTO_KINDS if table.has(k)]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise table.error(
            None,
            f"[orthophoto] needs exactly one source, got {what}",
            hint='give one of geotiff = "ortho.tif", xyz = "tiles/" or mbtiles = "area.mbtiles"',
        )
    kind = given[0]
    blank_std = table.number("blank_std", DEFAULT_BLANK_STD, lo=0.0, hi=255.0)
    if kind == "geotiff":
        paths = _geotiff_paths(table)
        return OrthophotoSpec(kind, paths[0], paths, blank_std=blank_std)
    path = table.path(kind, must="dir" if kind == "xyz" else "file", what=f"orthophoto ({kind})")
    return OrthophotoSpec(kind, path, blank_std=blank_std)


_GLOB_CHARS = frozenset("*?[")
# Files that sit next to rasters and that a loose glob ("sheets/*") also matches; never sheets themselves.
_SIDECAR_SUFFIXES = (".ovr", ".msk", ".aux.xml", ".tfw", ".tifw", ".wld", ".prj", ".xml", ".txt", ".md5")


def _geotiff_paths(table: _Table) -> tuple[Path, ...]:
    """``geotiff`` as one file, a ``.vrt``, a glob, or an array of files and globs: the files, sorted by
    path (their compositing order), each existing; a ``.vrt`` only alone."""
    value = table.raw("geotiff")
    entries = value if isinstance(value, list) else [value]
    fix = 'give a file, a glob or a list of files: geotiff = "sheets/*.tif" or geotiff = ["a.tif", "b.tif"]'
    if not entries or not all(isinstance(e, str) for e in entries):
        got = "an empty array" if not entries else f"{type_phrase(value)} ({short_repr(value)})"
        raise table.error("geotiff", f"geotiff must be a path, a glob or an array of them, got {got}", hint=fix)
    found: list[Path] = []
    for entry in entries:
        if not entry.strip() or "\x00" in entry:
            raise table.error("geotiff", f"geotiff entry {short_repr(entry)} is not a usable path", hint=fix)
        if _GLOB_CHARS & set(entry):
            found.extend(_glob(table, entry))
            continue
        try:
            path = _resolve(table.base, entry)
        except (RuntimeError, OSError, ValueError) as exc:
            raise table.error(
                "geotiff", f"geotiff {entry!r} cannot be resolved: {exc}", hint="give a plain path"
            ) from None
        if not path.is_file():
            state = "is not a file" if path.exists() else "does not exist"
            raise table.error(
                "geotiff",
                f"orthophoto (geotiff) {path} {state}",
                hint=f"fix the path (relative paths start at {table.base})",
            )
        found.append(path)
    paths = tuple(sorted(dict.fromkeys(found), key=str))
    vrts = [p for p in paths if p.suffix.lower() == ".vrt"]
    if vrts and len(paths) > 1:
        raise table.error(
            "geotiff",
            f"geotiff mixes a VRT ({vrts[0].name}) with {len(paths) - 1} other file(s)",
            hint="give the .vrt alone, or list the sheets (a glob) without it",
        )
    return paths


def _glob(table: _Table, pattern: str) -> list[Path]:
    base = Path(pattern).expanduser()
    root, rel = (Path(base.anchor), base.relative_to(base.anchor)) if base.is_absolute() else (table.base, base)
    try:
        matches = sorted(p.resolve() for p in root.glob(str(rel)) if p.is_file())
    except (ValueError, OSError) as exc:
        raise table.error("geotiff", f"geotiff glob {pattern!r} is not usable: {exc}", hint="fix the pattern") from None
    if not matches:
        raise table.error(
            "geotiff",
            f"geotiff glob {pattern!r} matches no file under {root}",
            hint=f'fix the pattern (relative patterns start at {table.base}), e.g. "sheets/*.tif"',
        )
    sidecars = [p for p in matches if p.name.lower().endswith(_SIDECAR_SUFFIXES)]
    if sidecars:
        raise table.error(
            "geotiff",
            f"geotiff glob {pattern!r} also matches {sidecars[0].name}, which is not a sheet",
            hint='narrow the pattern to the rasters, e.g. "sheets/*.tif"',
        )
    return matches


def _read_backbones(top: _Table) -> tuple[BackboneSpec, ...]:
    value = top.raw("backbones", hint='add a [[backbones]] table with name, onnx, role = "vpr", precision, shape')
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise top.error(
            "backbones",
            f"backbones must be an array of tables ([[backbones]]), got {type_phrase(value)}",
            hint="write each backbone under its own [[backbones]] header",
        )
    specs = []
    for index, item in enumerate(value):
        table = _Table(item, f"[[backbones]][{index}]", top.file, top.base, "backbones")
        table.check_unknown()
        specs.append(_read_backbone(table))
    if not specs:
        raise top.error("backbones", "no backbone configured", hint='add a [[backbones]] table with role = "vpr"')
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise SortieError(
                f"backbone name {name!r} is used twice",
                where=f"{top.file} [[backbones]][{i}].name",
                hint="give every backbone its own name (it names the engine files)",
            )
    vpr = [s.name for s in specs if s.role == "vpr"]
    if len(vpr) != 1:
        found = "none" if not vpr else ", ".join(map(repr, vpr))
        raise SortieError(
            f"exactly one backbone must have role 'vpr', found {found}",
            where=f"{top.file} [[backbones]].role",
            hint='set role = "vpr" on the global-descriptor model and role = "local" on the others',
        )
    return tuple(specs)


def _read_backbone(table: _Table) -> BackboneSpec:
    name = table.string("name", hint='add name = "my_model"')
    try:
        EngineName(model=name, precision="fp32", ext="onnx")
    except EngineSchemaMismatchError:
        raise table.error(
            "name",
            f"backbone name {name!r} cannot name engine files",
            hint="use letters, digits, '.', '-' and single '_' (no '__'), starting with a letter or digit",
        ) from None
    onnx_path = table.path("onnx", what=f"ONNX model of backbone {name!r}")
    role = table.string("role", choices=ROLES)
    precision = cast(Precision, table.string("precision", choices=PRECISIONS))
    input_name = table.string("input", "image")
    if not input_name:
        raise table.error("input", "input is empty", hint='name the graph input, e.g. input = "image"')
    output = table.string("output", None)
    if table.has("shape") == table.has("profile"):
        raise table.error(
            None,
            f"backbone {name!r} needs exactly one of shape = [...] or [backbones.profile]",
            hint="give a fixed shape = [8, 3, 224, 224], or a profile table with min, opt and max",
        )
    batch_defaulted = False
    if table.has("shape"):
        shape = _shape(table, "shape", table.raw("shape"))
        low = shape
        if role == "vpr" and shape[0] > 1:
            # A profile that starts at batch 1 lets the drone run one frame at the cost of one; validate_models
            # puts the given batch back (with a warning) when the model's batch axis is fixed.
            low = (1, *shape[1:])
            batch_defaulted = True
        profile = _profile(table, "shape", input_name, low, shape, shape)
    else:
        sub = table.table("profile", "backbones.profile")
        lo, mid, hi = (_shape(sub, k, sub.raw(k, hint=f"add {k} = [1, 3, 224, 224]")) for k in ("min", "opt", "max"))
        profile = _profile(sub, None, input_name, lo, mid, hi)
    options = table.raw("builder_options", {})
    if not isinstance(options, dict):
        raise table.error("builder_options", f"builder_options must be a table, got {type_phrase(options)}")
    for key, val in options.items():
        if isinstance(val, (dict, list)):
            raise table.error(
                f"builder_options.{key}",
                f"builder option {key!r} must be a string, number or boolean, got {type_phrase(val)}",
            )
    spec = BackboneSpec(
        name=name,
        onnx=onnx_path,
        role=role,
        precision=precision,
        input_name=input_name,
        profile=profile,
        output_name=output,
        builder_options=tuple(sorted(options.items())),
        preprocess_options=_read_preprocess(table, role),
        batch_defaulted=batch_defaulted,
    )
    try:
        config = spec.build_config()
    except ValueError as exc:
        raise table.error("builder_options", f"backbone {name!r}: {exc}") from None
    return replace(spec, builder_options=config.builder_options)  # normalised (sorted) by BuildConfig


def _read_preprocess(table: _Table, role: str) -> tuple[tuple[str, Any], ...]:
    """[backbones.preprocess]: the declared options, checked (the input size comes from the shape later)."""
    if not table.has("preprocess"):
        return ()
    sub = table.table("preprocess", "backbones.preprocess")
    if role != "vpr":
        raise sub.error(
            None,
            "preprocess applies to the vpr backbone only (navcache feeds tiles to that model alone)",
            hint="remove [backbones.preprocess] from this backbone",
        )
    options: dict[str, Any] = {}
    choices_of = {"resize": RESIZE_MODES, "scale": SCALES, "channels": CHANNEL_ORDERS, "layout": LAYOUTS}
    for key, choices in choices_of.items():
        if sub.has(key):
            options[key] = sub.string(key, choices=choices)
    for key in ("mean", "std"):
        if not sub.has(key):
            continue
        value = sub.raw(key)
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise sub.error(
                key,
                f"{key} must be 3 numbers, one per channel in the model's channel order, got {short_repr(value)}",
                hint=f"e.g. {key} = {list(IMAGENET_MEAN if key == 'mean' else IMAGENET_STD)}",
            )
        options[key] = tuple(float(v) for v in value)
    try:
        Preprocess(1, 1, **options)  # mean/std ranges, positive std
    except ValueError as exc:
        key = "std" if "std" in str(exc) else "mean"
        raise sub.error(key, str(exc), hint="std must be positive; both at most 1e6 in size") from None
    return tuple(sorted(options.items()))


def _shape(table: _Table, key: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 20 for d in value)
    ):
        raise table.error(
            key, f"{key} must be a list of positive integers, got {short_repr(value)}", hint="e.g. [8, 3, 224, 224]"
        )
    return tuple(value)


def _profile(
    table: _Table, key: str | None, name: str, lo: tuple[int, ...], mid: tuple[int, ...], hi: tuple[int, ...]
) -> InputProfile:
    try:
        return InputProfile(name, lo, mid, hi)
    except ValueError as exc:
        raise table.error(key, str(exc), hint="min, opt and max need the same rank and min <= opt <= max") from None


# --- area -------------------------------------------------------------------------------------------------


def _read_area(table: _Table) -> tuple[dict[str, Any], float | None, Polygon | MultiPolygon]:
    """The geometry as given (unwrapped from a Feature / FeatureCollection), corridor_m, and the area's
    lon/lat shape, checked to fit a signed manifest (see :mod:`navcache.area`)."""
    if table.has("geojson") == table.has("file"):
        raise table.error(
            None,
            "[area] needs exactly one of geojson or file",
            hint="give geojson = '''{\"type\": \"Polygon\", ...}''' or file = \"area.geojson\"",
        )
    if table.has("geojson"):
        key = "geojson"
        value = table.raw("geojson")
        if isinstance(value, str):
            doc = parse_geojson(value, "the GeoJSON string", table.where(key))
        elif isinstance(value, dict):
            doc = value
        else:
            raise table.error(key, f"geojson must be a string or an inline table, got {type_phrase(value)}")
    else:
        key = "file"
        file = table.path("file", what="area file")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise table.error(key, f"cannot read the area file {file}: {exc}") from None
        doc = parse_geojson(text, str(file), table.where(key))
    geometry = area_geometry(doc, table.where(key))
    corridor_m = None
    if table.has("corridor_m"):
        if geometry.get("type") != "LineString":
            raise table.error(
                "corridor_m",
                f"corridor_m applies only to LineString routes, the area is a {geometry.get('type')}",
                hint="remove corridor_m, or give the route as a LineString",
            )
        corridor_m = table.number("corridor_m", lo=_MIN_CORRIDOR_M, hi=_MAX_CORRIDOR_M)
    elif geometry.get("type") == "LineString":
        raise table.error(
            "corridor_m",
            "a LineString route needs corridor_m, the half-width of the corridor in metres",
            hint="add corridor_m = 400 to [area]",
        )
    area = area_shape(geometry, corridor_m, table.where(key))
    check_signable(area, table.where())
    return geometry, corridor_m, area


__all__ = [
    "ORTHOPHOTO_KINDS",
    "ROLES",
    "BackboneSpec",
    "OrthophotoSpec",
    "Sortie",
    "TileSpec",
    "load_sortie",
]
