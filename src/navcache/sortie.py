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

    [orthophoto]                      # (required) exactly one of:
    geotiff = "ortho.tif"             # or xyz = "tiles/" (a {z}/{x}/{y} folder) or mbtiles = "area.mbtiles"

    [descriptors]
    batch_size = 16

    [[backbones]]                     # one per model; exactly one with role = "vpr"
    name = "tiny_vpr"                 # letters, digits, '.', '-', single '_' (it names engine files)
    onnx = "models/tiny_vpr.onnx"     # must exist
    role = "vpr"                      # vpr (global descriptor) | local (features for re-ranking)
    precision = "fp32"                # fp32 | fp16 | int8
    input = "image"                   # default "image": the graph input the tiles are fed to
    shape = [8, 3, 128, 128]          # a fixed shape, or instead a range:
    # [backbones.profile]
    # min = [1, 3, 128, 128]
    # opt = [8, 3, 128, 128]
    # max = [16, 3, 128, 128]
    # output = "descriptor"           # vpr: the float descriptor output; default the first output
    # [backbones.builder_options]     # passed to the runtime's engine builder (strings, numbers, bools)

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
from shapely.geometry import LineString, MultiPolygon, Point, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from navcache_runtime.errors import EngineSchemaMismatchError
from navcache_runtime.naming import EngineName
from navcache_runtime.types import (
    PRECISIONS,
    RUNTIME_LABELS,
    BuildConfig,
    InputProfile,
    OptionValue,
    Precision,
    RuntimeLabel,
)

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
)
_TABLES: dict[str, tuple[str, ...]] = {
    "takeoff": ("lat", "lon"),
    "area": ("geojson", "file", "corridor_m"),
    "tiles": ("zoom", "size", "chunk_span", "overlap", "budget", "shard_block"),
    "orthophoto": ORTHOPHOTO_KINDS,
    "descriptors": ("batch_size",),
    "backbones": ("name", "onnx", "role", "precision", "input", "shape", "profile", "output", "builder_options"),
    "backbones.profile": ("min", "opt", "max"),
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

    def grid(self) -> ChunkGrid:
        return ChunkGrid(self.zoom, self.size, self.chunk_span, self.overlap)


@dataclass(frozen=True)
class OrthophotoSpec:
    kind: str  # "geotiff" | "xyz" | "mbtiles"
    path: Path


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

    def build_config(self) -> BuildConfig:
        return BuildConfig(
            precision=self.precision,
            input_shapes=(self.profile,),
            builder_options=self.builder_options,
            model_name=self.name,
        )


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

    @property
    def vpr(self) -> BackboneSpec:
        return next(b for b in self.backbones if b.role == "vpr")

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
    _check_takeoff(takeoff_t, area, lat, lon, corridor_m)

    tiles_t = top.table("tiles", "tiles")
    tiles = TileSpec(
        zoom=tiles_t.integer("zoom", TileSpec.zoom, lo=10, hi=21),
        size=_choice_int(tiles_t, "size", TileSpec.size, (256, 512)),
        chunk_span=tiles_t.integer("chunk_span", TileSpec.chunk_span, lo=1, hi=4),
        overlap=tiles_t.number("overlap", TileSpec.overlap, lo=0.0, hi=0.75),
        budget=tiles_t.integer("budget", TileSpec.budget, lo=1),
        shard_block=tiles_t.integer("shard_block", TileSpec.shard_block, lo=8, hi=256),
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
    )
    logger.info(
        "sortie %s: %d chunks at z%d, %d backbone(s), runtime %s", sortie_id, count, tiles.zoom, len(backbones), runtime
    )
    return sortie


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
    path = table.path(kind, must="dir" if kind == "xyz" else "file", what=f"orthophoto ({kind})")
    return OrthophotoSpec(kind, path)


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
    if table.has("shape"):
        shape = _shape(table, "shape", table.raw("shape"))
        profile = _profile(table, "shape", input_name, shape, shape, shape)
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
    )
    try:
        config = spec.build_config()
    except ValueError as exc:
        raise table.error("builder_options", f"backbone {name!r}: {exc}") from None
    return replace(spec, builder_options=config.builder_options)  # normalised (sorted) by BuildConfig


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


def _local_crs(lon: float, lat: float) -> Any:
    from pyproj import CRS

    return CRS.from_proj4(f"+proj=aeqd +lat_0={lat:.9f} +lon_0={lon:.9f} +datum=WGS84 +units=m +no_defs")


def _buffer_route(table: _Table, key: str, points: np.ndarray, corridor_m: float) -> Polygon | MultiPolygon:
    """Every point within ``corridor_m`` metres of the route. Buffered in pieces of about _PIECE_M, each
    in an azimuthal-equidistant projection at its centre (scale error < 1e-4 over the piece), then
    densified before returning to lon/lat so the edges stay where they were drawn."""
    from pyproj import Geod, Transformer

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
        forward = Transformer.from_crs("EPSG:4326", _local_crs(*centre), always_xy=True)
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


def _distance_m(area: BaseGeometry, lon: float, lat: float) -> float:
    """Geodesic distance from a point to the area: in an azimuthal-equidistant projection centred on
    the point, distances from the centre are true."""
    from pyproj import Transformer

    forward = Transformer.from_crs("EPSG:4326", _local_crs(lon, lat), always_xy=True)
    dense = shapely.segmentize(area, 0.01)
    local = shapely.transform(dense, lambda xy: np.column_stack(forward.transform(xy[:, 0], xy[:, 1])))
    return float(local.distance(Point(0.0, 0.0)))


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


def validate_models(sortie: Sortie) -> None:
    """Check each backbone's ONNX file: it parses and passes the ONNX checker, has the configured input
    with the configured rank (and fixed axes that match the profile), and, for the vpr backbone, a
    float descriptor output. Needs the ``onnx`` package. Raises :class:`SortieError`."""
    for index, backbone in enumerate(sortie.backbones):
        where = f"{sortie.path.name} [[backbones]][{index}]"
        _validate_model(backbone, where)
        logger.info("backbone %s: ONNX model %s checked", backbone.name, backbone.onnx.name)


def _validate_model(backbone: BackboneSpec, where: str) -> None:
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
    profile = backbone.profile
    tensor = graph_input.type.tensor_type
    if tensor.HasField("shape"):
        dims = tensor.shape.dim
        if len(dims) != len(profile.opt):
            raise SortieError(
                f"backbone {name!r}: input {backbone.input_name!r} has rank {len(dims)} "
                f"({_dims_text(dims)}) but the configured shape has rank {len(profile.opt)} {list(profile.opt)}",
                where=f"{where}.shape",
                hint=f"give a shape with {len(dims)} axes",
            )
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                lo, hi = profile.min[axis], profile.max[axis]
                if not lo == hi == dim.dim_value:
                    raise SortieError(
                        f"backbone {name!r}: input {backbone.input_name!r} axis {axis} is fixed at "
                        f"{dim.dim_value} in the model but the configured range is {lo}..{hi}",
                        where=f"{where}.shape",
                        hint=f"use {dim.dim_value} on axis {axis}, or export the model with a dynamic axis",
                    )

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
    if backbone.role == "vpr":
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        float_names = [
            o.name for o in outputs if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in floats
        ]
        if chosen is None:
            raise SortieError(
                f"backbone {name!r}: the model has no outputs", where=f"{where}.onnx", hint="re-export the model"
            )
        if chosen.name not in float_names:
            elem = chosen.type.tensor_type.elem_type if chosen.type.HasField("tensor_type") else None
            kind = onnx.TensorProto.DataType.Name(elem) if elem else "not a tensor"
            hint = (
                f"set output = {float_names[0]!r} (float outputs: {', '.join(map(repr, float_names))})"
                if float_names
                else "export the model with a FLOAT or FLOAT16 descriptor output"
            )
            raise SortieError(
                f"backbone {name!r}: output {chosen.name!r} used as the descriptor is {kind}, "
                "not a FLOAT/FLOAT16 tensor",
                where=f"{where}.output",
                hint=hint,
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
