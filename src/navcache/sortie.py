"""The sortie file: one TOML file describes one flight's cache. Loaded into frozen dataclasses and
validated up front, so a typo fails in a second, not after an hour of descriptor computation.

Layout (every field, with its default; relative paths are resolved against this file's directory)::

    sortie_id = "demo-001"            # flight id: [A-Za-z0-9._-]{1,64}            (required)
    runtime = "onnx_trt_ep"           # tensorrt | onnx_trt_ep | pytorch_fp16       (required)
    cache_dir = "cache"               # default "cache"; --cache-dir overrides
    signing_key = "keys/operator.key" # Ed25519 operator key, must exist            (required)
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
preprocessed as declared (the defaults are navcache's original behaviour: squash, ImageNet mean/std, unit
scale, RGB, NCHW), and returns a float [N, D] descriptor. The preprocessing is one definition
(:mod:`navcache_runtime.preprocessing`) used for the tiles and, from the signed manifest
(``predicate.preprocess``), by ``open_cache(...).preprocess`` for camera frames. Descriptors are
L2-normalised (retrieval is by cosine) and stored as float16, so raw outputs of any scale are fine.
:func:`validate_models` refuses, before anything runs: a shape in the other layout than declared (or than the
model's fixed dims), an output that is not [N, D] or an unnamed one among several, and a precision the host's
runtime cannot build.

Errors are :class:`navcache.errors.SortieError` with ``where`` = ``"<file> <table>.<field>"`` (for
example ``sortie.toml [tiles].zom``) and a ``hint`` saying how to fix it. ``validate_models`` (it needs
the onnx package) checks the models themselves; :func:`load_sortie` only needs their files to exist.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, mapping
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

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
from navcache_runtime.verify import VerifierConfig

from .errors import SortieError, TileBudgetError
from .tiles import MAX_LATITUDE, ChunkGrid

logger = logging.getLogger(__name__)

ROLES = ("vpr", "local")
ORTHOPHOTO_KINDS = ("geotiff", "xyz", "mbtiles")
AREA_TYPES = ("Polygon", "MultiPolygon", "LineString")

_SORTIE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MIN_CORRIDOR_M, _MAX_CORRIDOR_M = 1.0, 50_000.0
_DENSIFY_M = 1000.0  # vertex spacing when moving lines between lon/lat and local projections
_PIECE_M = 50_000.0  # a route is buffered in pieces this long, each in its own local projection

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
    signing_key: Path
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
        return _geojson_lists(mapping(self.area))

    @property
    def grid(self) -> ChunkGrid:
        return self.tiles.grid()


# --- reading helpers --------------------------------------------------------------------------------------

_REQUIRED: Any = object()


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
            raise self.error(key, f"{key} must be a string, got {_type_name(value)} ({_short(value)})", hint=hint)
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
            raise self.error(key, f"{key} must be an integer {bounds}, got {_type_name(value)} ({_short(value)})")
        if value < lo or (hi is not None and value > hi):
            raise self.error(key, f"{key} = {value} is out of range", hint=f"use an integer {bounds}")
        return int(value)

    def number(self, key: str, default: Any = _REQUIRED, *, lo: float, hi: float) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"{key} must be a number, got {_type_name(value)} ({_short(value)})")
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
                key, f"{key} is not a usable path: {_short(value)}", hint="give a path relative to the sortie file"
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
            raise self.error(key, f"{key} must be a table ([{key}]), got {_type_name(value)} ({_short(value)})")
        label = f"{self.label}.{key}" if self.label else f"[{key}]"
        sub = _Table(value, label, self.file, self.base, schema)
        sub.check_unknown()
        return sub


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
    signing_key = top.path("signing_key", what="signing key")
    trusted_keys = top.path("trusted_keys", None, what="trusted keys file")
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
    geometry, corridor_m = _read_area(area_t)
    area = _area_geometry(area_t, geometry, corridor_m)
    _check_signable(area_t, area)
    _check_takeoff(takeoff_t, area, lat, lon, corridor_m)

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
            key, f"{key} must be [min, max], two {what} with {lo:g} <= min <= max <= {hi:g}, got {_short(value)}"
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
        got = "an empty array" if not entries else f"{_type_name(value)} ({_short(value)})"
        raise table.error("geotiff", f"geotiff must be a path, a glob or an array of them, got {got}", hint=fix)
    found: list[Path] = []
    for entry in entries:
        if not entry.strip() or "\x00" in entry:
            raise table.error("geotiff", f"geotiff entry {_short(entry)} is not a usable path", hint=fix)
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
            f"backbones must be an array of tables ([[backbones]]), got {_type_name(value)}",
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
        raise table.error("builder_options", f"builder_options must be a table, got {_type_name(options)}")
    for key, val in options.items():
        if isinstance(val, (dict, list)):
            raise table.error(
                f"builder_options.{key}",
                f"builder option {key!r} must be a string, number or boolean, got {_type_name(val)}",
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
                f"{key} must be 3 numbers, one per channel in the model's channel order, got {_short(value)}",
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
            key, f"{key} must be a list of positive integers, got {_short(value)}", hint="e.g. [8, 3, 224, 224]"
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


def _read_area(table: _Table) -> tuple[dict[str, Any], float | None]:
    """The geometry dict (unwrapped from a Feature / FeatureCollection) and corridor_m."""
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
            doc = _parse_json(table, key, value, "the GeoJSON string")
        elif isinstance(value, dict):
            doc = value
        else:
            raise table.error(key, f"geojson must be a string or an inline table, got {_type_name(value)}")
    else:
        key = "file"
        file = table.path("file", what="area file")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise table.error(key, f"cannot read the area file {file}: {exc}") from None
        doc = _parse_json(table, key, text, str(file))
    geometry = _unwrap(table, key, doc)
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
    return geometry, corridor_m


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number GeoJSON allows")


def _parse_json(table: _Table, key: str, text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise table.error(
            key,
            f"invalid JSON in {what}: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            hint="check the GeoJSON (quotes, commas, brackets)",
        ) from None
    except (ValueError, RecursionError) as exc:
        raise table.error(key, f"invalid JSON in {what}: {exc}", hint="check the GeoJSON") from None


def _unwrap(table: _Table, key: str, doc: Any) -> dict[str, Any]:
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list) or len(features) != 1:
            count = len(features) if isinstance(features, list) else "no"
            raise table.error(
                key,
                f"a FeatureCollection area must hold exactly one feature, it has {count}",
                hint="merge the features into one (Multi)Polygon, or split the flight into several sorties",
            )
        doc = features[0]
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        doc = doc.get("geometry")
        if not isinstance(doc, dict):
            raise table.error(key, "the area Feature has no geometry", hint="give the Feature a Polygon geometry")
    if not isinstance(doc, dict):
        raise table.error(key, f"the area must be a GeoJSON object, got {_type_name(doc)}")
    kind = doc.get("type")
    if kind not in AREA_TYPES:
        raise table.error(
            key,
            f"area type {_short(kind)} is not supported",
            hint=f"use one of: {', '.join(AREA_TYPES)} (a Feature or a one-feature FeatureCollection may wrap it)",
        )
    if "coordinates" not in doc:
        raise table.error(key, f"the {kind} has no coordinates", hint="add its coordinates")
    return doc


def _position(table: _Table, key: str, value: Any, path: str) -> tuple[float, float]:
    if (
        not isinstance(value, list)
        or len(value) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise table.error(key, f"coordinate {path} must be [lon, lat], got {_short(value)}")
    try:
        lon, lat = float(value[0]), float(value[1])
    except OverflowError:  # JSON integers have no size limit
        lon = lat = math.inf
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise table.error(key, f"coordinate {path} is not finite: {_short(value)}")
    if not -180.0 <= lon <= 180.0:
        raise table.error(
            key,
            f"coordinate {path} [{lon:g}, {lat:g}] has longitude outside [-180, 180]",
            hint="GeoJSON is [lon, lat] in degrees from -180 to 180; areas crossing the antimeridian are "
            "not supported (split the area)",
        )
    if not -MAX_LATITUDE <= lat <= MAX_LATITUDE:
        raise table.error(
            key,
            f"coordinate {path} [{lon:g}, {lat:g}] is outside the Web-Mercator latitude range [-85.0511, 85.0511]",
            hint="GeoJSON order is [lon, lat]; polar areas cannot be tiled in Web Mercator",
        )
    return lon, lat


def _ring(table: _Table, key: str, value: Any, path: str) -> np.ndarray:
    if not isinstance(value, list):
        raise table.error(key, f"ring {path} must be an array of positions, got {_type_name(value)}")
    points = [_position(table, key, p, f"{path}[{i}]") for i, p in enumerate(value)]
    if len(points) < 4:
        raise table.error(
            key,
            f"ring {path} has {len(points)} positions; a closed ring needs at least 4",
            hint="draw at least a triangle",
        )
    if points[0] != points[-1]:
        raise table.error(
            key,
            f"area not closed: ring {path} starts at [{points[0][0]:g}, {points[0][1]:g}] "
            f"but ends at [{points[-1][0]:g}, {points[-1][1]:g}]",
            hint="repeat the first position at the end of every ring (GeoJSON rings are closed)",
        )
    return np.asarray(points, dtype=np.float64)


def _polygon_rings(table: _Table, key: str, value: Any, path: str) -> list[np.ndarray]:
    if not isinstance(value, list) or not value:
        raise table.error(key, f"polygon {path} must be a non-empty array of rings", hint="the area is empty")
    return [_ring(table, key, r, f"{path}[{i}]") for i, r in enumerate(value)]


def _area_geometry(table: _Table, geometry: dict[str, Any], corridor_m: float | None) -> Polygon | MultiPolygon:
    key = "geojson" if table.has("geojson") else "file"
    kind, coords = geometry["type"], geometry["coordinates"]
    if kind == "Polygon":
        polygons = [_polygon_rings(table, key, coords, "coordinates")]
    elif kind == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            raise table.error(key, "the MultiPolygon area is empty", hint="give at least one polygon")
        polygons = [_polygon_rings(table, key, p, f"coordinates[{i}]") for i, p in enumerate(coords)]
    else:  # LineString
        if not isinstance(coords, list):
            raise table.error(key, "the LineString route must be an array of positions")
        points = np.asarray([_position(table, key, p, f"coordinates[{i}]") for i, p in enumerate(coords)])
        if len(points) < 2 or not np.any(points != points[0]):
            raise table.error(key, "the route needs at least two distinct positions", hint="the area is empty")
        _check_antimeridian(table, key, points[:, 0])
        assert corridor_m is not None  # _read_area enforces it
        return _buffer_route(table, key, points, corridor_m)

    lons = np.concatenate([ring[:, 0] for rings in polygons for ring in rings])
    _check_antimeridian(table, key, lons)
    try:
        shapes = [Polygon(rings[0], rings[1:]) for rings in polygons]
        area: Polygon | MultiPolygon = shapes[0] if kind == "Polygon" else MultiPolygon(shapes)
    except (ValueError, shapely.errors.GEOSException) as exc:
        raise table.error(key, f"the area is not a valid {kind}: {exc}") from None
    if area.is_empty:
        raise table.error(key, "the area is empty", hint="draw a polygon with a surface")
    if not area.is_valid:
        reason = explain_validity(area)
        what = "self-intersecting" if "self-intersection" in reason.lower() else "not a valid polygon"
        raise table.error(
            key,
            f"the area is {what}: {reason}",
            hint="redraw it without crossing edges, or repair it (QGIS: Fix Geometries; shapely: make_valid)",
        )
    if area.area == 0:
        raise table.error(key, "the area is empty (it encloses no surface)", hint="draw a polygon with a surface")
    return area


def _check_antimeridian(table: _Table, key: str, lons: np.ndarray) -> None:
    if float(lons.max() - lons.min()) > 180.0:
        raise table.error(
            key,
            f"the area spans longitudes {lons.min():g} to {lons.max():g}: crossing the antimeridian "
            "(or spanning more than half the globe) is not supported",
            hint="split the area at the antimeridian into one sortie per side",
        )


def _local_transformer(lon: float, lat: float) -> Any:
    """lon/lat (WGS84) → metres in an azimuthal-equidistant projection centred on (lon, lat); ``direction=
    "INVERSE"`` goes back. Built from a PROJ pipeline string: the same numbers as ``Transformer.from_crs``
    with an aeqd CRS, at ~0.3 ms instead of ~20 ms, which matters for a long route's many pieces."""
    from pyproj import Transformer

    return Transformer.from_pipeline(
        "+proj=pipeline +step +proj=unitconvert +xy_in=deg +xy_out=rad "
        f"+step +proj=aeqd +lat_0={lat:.9f} +lon_0={lon:.9f} +ellps=WGS84"
    )


def _buffer_route(table: _Table, key: str, points: np.ndarray, corridor_m: float) -> Polygon | MultiPolygon:
    """Every point within ``corridor_m`` metres of the route. Buffered in pieces of about _PIECE_M, each
    in an azimuthal-equidistant projection at its centre (scale error < 1e-4 over the piece), then
    densified before returning to lon/lat so the edges stay where they were drawn."""
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    line = shapely.segmentize(LineString(points), _DENSIFY_M / 111_320.0)  # ~1 km in lon/lat
    coords = np.asarray(line.coords)
    seg = geod.inv(coords[:-1, 0], coords[:-1, 1], coords[1:, 0], coords[1:, 1])[2]
    along = np.concatenate([[0.0], np.cumsum(seg)])
    pieces = []
    start = 0
    while start < len(coords) - 1:
        stop = int(np.searchsorted(along, along[start] + _PIECE_M, side="right"))
        stop = min(max(stop, start + 2), len(coords))
        part = coords[start:stop]
        centre = part[len(part) // 2]
        forward = _local_transformer(*centre)
        x, y = forward.transform(part[:, 0], part[:, 1])
        buffered = shapely.segmentize(LineString(np.column_stack((x, y))).buffer(corridor_m, quad_segs=16), _DENSIFY_M)
        lon_lat = shapely.transform(
            buffered, lambda xy, t=forward: np.column_stack(t.transform(xy[:, 0], xy[:, 1], direction="INVERSE"))
        )
        west, south, east, north = lon_lat.bounds
        if east - west > 180.0:  # pyproj wraps longitudes: a piece over the antimeridian jumps by ~360
            raise table.error(
                key,
                "the route corridor crosses the antimeridian, which is not supported",
                hint="split the route at the antimeridian into one sortie per side",
            )
        if south < -MAX_LATITUDE or north > MAX_LATITUDE:
            raise table.error(
                key,
                "the route corridor reaches beyond the Web-Mercator latitude limit (85.0511)",
                hint="keep the route and its corridor within +-85.05 degrees latitude",
            )
        pieces.append(lon_lat)
        start = stop - 1
    try:
        area = shapely.union_all(pieces)
        if not area.is_valid:
            area = shapely.make_valid(area)
    except shapely.errors.GEOSException as exc:
        raise table.error(key, f"cannot build the route corridor: {exc}", hint="simplify the route") from None
    if not isinstance(area, (Polygon, MultiPolygon)):  # make_valid may return a collection
        area = shapely.union_all([g for g in shapely.get_parts(area) if isinstance(g, (Polygon, MultiPolygon))])
    return area


def _geojson_lists(value: Any) -> Any:
    """shapely's ``mapping`` gives tuples; GeoJSON (and the manifest's canonical JSON) has lists."""
    if isinstance(value, dict):
        return {k: _geojson_lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_geojson_lists(v) for v in value]
    return value


def _distance_m(area: BaseGeometry, lon: float, lat: float) -> float:
    """Geodesic distance from a point to the area: in an azimuthal-equidistant projection centred on
    the point, distances from the centre are true."""

    forward = _local_transformer(lon, lat)
    dense = shapely.segmentize(area, 0.01)
    local = shapely.transform(dense, lambda xy: np.column_stack(forward.transform(xy[:, 0], xy[:, 1])))
    return float(local.distance(Point(0.0, 0.0)))


def _check_signable(table: _Table, area: BaseGeometry) -> None:
    """The manifest signs the area's vertices and the drone's verifier caps their number; a route corridor
    is densified, so a very long route can pass that cap. Refuse it now, not after the run."""
    limit = VerifierConfig().max_area_vertices
    vertices = int(shapely.get_num_coordinates(area))
    if vertices > limit:
        raise table.error(
            None,
            f"the area has {vertices:,} vertices; a signed manifest holds at most {limit:,}",
            hint="simplify the area or the route, or split the flight into several sorties",
        )


def _check_takeoff(table: _Table, area: BaseGeometry, lat: float, lon: float, corridor_m: float | None) -> None:
    if area.covers(Point(lon, lat)):
        return
    distance = _distance_m(area, lon, lat)
    inside = "the route corridor" if corridor_m is not None else "the area"
    raise table.error(
        None,
        f"takeoff (lat {lat:g}, lon {lon:g}) lies {distance:,.0f} m outside {inside}",
        hint="fix [takeoff] (lat/lon, not lon/lat?) or extend the area to include it",
    )


# --- models -----------------------------------------------------------------------------------------------


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


__all__ = [
    "AREA_TYPES",
    "ORTHOPHOTO_KINDS",
    "ROLES",
    "BackboneSpec",
    "OrthophotoSpec",
    "Sortie",
    "TileSpec",
    "load_sortie",
    "validate_models",
]
