"""The runtime contract (docs/runtime-contract.md) and the code it describes, held together.

Every table in the document's Shape section is marked ``<!-- contract-table: NAME -->``; its first column is
the key and some of its columns are *checked*: this module derives the same columns from the code by
introspection (``navcache_runtime.__all__``, ``inspect.signature``, ``dataclasses.fields``, class bases,
``RuntimeConfig``'s fields, the runtime labels) and fails with the exact rows that differ. Other columns are
prose for the reader and are not compared.

The surface's fingerprint (a sha256 over the checked columns, as derived from the code) is recorded in the
document's Versions table next to the contract version: changing the surface without a new version row
fails, and the failure message says which version to pick and what to write.

``python -m tests.test_runtime_contract`` prints every table as the code has it, and the fingerprint.
"""

from __future__ import annotations

import ast
import builtins
import collections.abc
import dataclasses
import enum
import hashlib
import importlib
import inspect
import json
import re
import sys
import typing
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import navcache_runtime as nr

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "runtime-contract.md"
INIT = Path(nr.__file__)  # the package under test (a mutated copy in the self-tests)
HOW_TO_FIX = (
    "Update docs/runtime-contract.md (the rows above are written as the code has them; "
    "`python -m tests.test_runtime_contract` prints every table), then bump the contract version: "
    "see its 'Versioning rules' and test_surface_change_needs_a_new_version."
)

# table name -> (key column, checked columns). Column names are the document's header cells, lower case.
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "exports": ("name", ("kind", "module")),
    "protocol": ("method", ("parameters", "returns")),
    "functions": ("function", ("parameters", "returns")),
    "members": ("member", ("kind", "parameters", "returns")),
    "dtos": ("dto", ("frozen",)),
    "fields": ("field", ("type", "default")),
    "errors": ("error", ("bases",)),
    "config": ("key", ("type", "default")),
    "labels": ("label", ("extension", "library", "extra")),
    "constants": ("constant", ("value",)),
    "failure_codes": ("code", ("value",)),
    "referenced": ("name", ()),
}
# The dunder members that are part of a class's public use (construction, `with`).
PUBLIC_DUNDERS = ("__init__", "__enter__", "__exit__")


# --------------------------------------------------------------------------------------------------------
# The document


def _cells(line: str) -> list[str]:
    """Cells of one markdown table row; ``\\|`` is a literal pipe, one pair of backticks is dropped."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    cells = []
    for raw in re.split(r"(?<!\\)\|", body):
        cell = raw.strip().replace("\\|", "|")
        if len(cell) >= 2 and cell.startswith("`") and cell.endswith("`") and cell.count("`") == 2:
            cell = cell[1:-1]
        cells.append(cell)
    return cells


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every marked table: name -> rows as {lower-case header: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for number, line in enumerate(lines):
        mark = re.fullmatch(r"\s*<!--\s*contract-table:\s*([a-z_]+)\s*-->\s*", line)
        if mark is None:
            continue
        name = mark.group(1)
        assert name not in tables, f"{DOC.name}:{number + 1}: table {name!r} is marked twice"
        rows = [row for row in lines[number + 1 :] if row.strip()]
        block = []
        for row in rows:
            if not row.lstrip().startswith("|"):
                break
            block.append(row)
        assert len(block) >= 2, f"{DOC.name}:{number + 1}: no markdown table follows the {name!r} marker"
        header = [c.lower() for c in _cells(block[0])]
        assert all(re.fullmatch(r":?-{3,}:?", c) for c in _cells(block[1])), f"{name}: malformed separator"
        parsed = []
        for row in block[2:]:
            cells = _cells(row)
            assert len(cells) == len(header), f"{name}: row {row!r} has {len(cells)} cells, header {len(header)}"
            parsed.append(dict(zip(header, cells, strict=True)))
        tables[name] = parsed
    return tables


def doc_version(text: str) -> str:
    match = re.search(r"^\*\*Version:\*\*\s*`?(\d+\.\d+\.\d+)`?\s*$", text, re.MULTILINE)
    assert match, f"{DOC.name} has no '**Version:** X.Y.Z' line"
    return match.group(1)


# --------------------------------------------------------------------------------------------------------
# The code


def render_value(value: Any) -> str:
    """A default or constant as the document writes it: stable across platforms and hash seeds."""
    if isinstance(value, Path):
        return f"Path({str(value)!r})"
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (frozenset, set)):
        inner = ", ".join(sorted(render_value(v) for v in value))
        return f"{type(value).__name__}({{{inner}}})" if value else f"{type(value).__name__}()"
    if isinstance(value, tuple):
        inner = ", ".join(render_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        return f"timedelta(seconds={int(seconds) if seconds.is_integer() else seconds})"
    return repr(value)


def render_annotation(annotation: Any) -> str:
    # Every runtime module uses `from __future__ import annotations`: annotations are the source text.
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def render_parameters(function: Callable[..., Any], *, skip_first: bool) -> tuple[str, str]:
    """(parameters, return annotation) of ``function`` as ``name: type = default`` with ``*`` and ``/``."""
    signature = inspect.signature(function)
    params = list(signature.parameters.values())[1 if skip_first else 0 :]
    parts: list[str] = []
    star_written = False
    for index, param in enumerate(params):
        if param.kind is param.KEYWORD_ONLY and not star_written:
            parts.append("*")
            star_written = True
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text, star_written = f"*{param.name}", True
        elif param.kind is param.VAR_KEYWORD:
            text = f"**{param.name}"
        if param.annotation is not param.empty:
            text += f": {render_annotation(param.annotation)}"
        if param.default is not param.empty:
            text += f" = {render_value(param.default)}"
        parts.append(text)
        following = params[index + 1] if index + 1 < len(params) else None
        if param.kind is param.POSITIONAL_ONLY and (following is None or following.kind is not param.POSITIONAL_ONLY):
            parts.append("/")
    return ", ".join(parts), render_annotation(signature.return_annotation)


def _export_modules() -> dict[str, str]:
    """name -> module it is imported from, read from __init__.py (eager imports and the _LAZY table)."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    origin: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                origin[alias.asname or alias.name] = f"navcache_runtime.{node.module}"
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            for name, module in ast.literal_eval(node.value).items():
                origin[name] = f"navcache_runtime.{module}"
    return origin


def exported() -> dict[str, Any]:
    return {name: getattr(nr, name) for name in nr.__all__}


def kind_of(obj: Any) -> str:
    if obj is nr.InferenceRuntime:
        return "protocol"
    if isinstance(obj, type):
        if issubclass(obj, BaseException):
            return "error"
        if issubclass(obj, enum.Enum):
            return "enum"
        return "dataclass" if dataclasses.is_dataclass(obj) else "class"
    if inspect.isfunction(inspect.unwrap(obj)):  # functools.cache wrappers included
        return "function"
    if typing.get_origin(obj) is typing.Literal:
        return "type alias"
    return "constant"


def _member_rows(cls: type) -> dict[str, dict[str, str]]:
    field_names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    rows: dict[str, dict[str, str]] = {}
    for name, member in vars(cls).items():
        if name in field_names or (name.startswith("_") and name not in PUBLIC_DUNDERS):
            continue
        if name == "__init__" and dataclasses.is_dataclass(cls):
            continue  # its parameters are the fields table
        key = f"{cls.__name__}.{name}"
        if isinstance(member, property):
            assert member.fget is not None
            rows[key] = {
                "kind": "property",
                "parameters": "",
                "returns": render_parameters(member.fget, skip_first=True)[1],
            }
        elif isinstance(member, classmethod):
            params, returns = render_parameters(member.__func__, skip_first=True)
            rows[key] = {"kind": "classmethod", "parameters": params, "returns": returns}
        elif isinstance(member, staticmethod):
            params, returns = render_parameters(member.__func__, skip_first=False)
            rows[key] = {"kind": "staticmethod", "parameters": params, "returns": returns}
        elif inspect.isfunction(member):
            params, returns = render_parameters(member, skip_first=True)
            if name == "__init__" and re.search(r"(?<![\w.])_[A-Za-z]", params):
                continue  # takes the runtime's private types: built by the runtime (open_cache), not by callers
            rows[key] = {"kind": "method", "parameters": params, "returns": returns}
        else:
            rows[key] = {"kind": "attribute", "parameters": "", "returns": render_value(member)}
    return rows


def _field_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        text = render_value(f.default)
    elif f.default_factory is not dataclasses.MISSING:
        text = f"{getattr(f.default_factory, '__name__', repr(f.default_factory))}()"
    else:
        text = "required"
    return text if f.init else f"{text} (not an argument)"


# Names an annotation may use without the runtime exporting them: the language's, typing's, the standard
# library's and numpy's. Any other name a consumer meets in a signature must be exported, or be listed (and
# explained) in the document's "referenced" table.
STANDARD_NAMES = frozenset(dir(builtins)) | frozenset(typing.__all__) | frozenset(collections.abc.__all__) | {
    "Path", "datetime", "timedelta", "TracebackType", "np", "Ed25519PublicKey",
}  # fmt: skip


def annotation_names(objects: dict[str, Any]) -> set[str]:
    """Every top-level name used in the annotations of the exported functions, methods and fields."""
    texts: list[str] = []

    def signature_of(function: Callable[..., Any]) -> None:
        signature = inspect.signature(function)
        annotations = [render_annotation(p.annotation) for p in signature.parameters.values()]
        if function.__name__ == "__init__" and re.search(r"(?<![\w.])_[A-Za-z]", " ".join(annotations)):
            return  # built by the runtime only (see _member_rows)
        texts.extend(annotations)
        texts.append(render_annotation(signature.return_annotation))

    for obj in objects.values():
        if inspect.isfunction(inspect.unwrap(obj)):
            signature_of(obj)
        if not isinstance(obj, type) or issubclass(obj, (BaseException, enum.Enum)):
            continue
        if dataclasses.is_dataclass(obj):
            texts.extend(render_annotation(f.type) for f in dataclasses.fields(obj))
        for name, member in vars(obj).items():
            if name.startswith("_") and name not in PUBLIC_DUNDERS:
                continue
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if inspect.isfunction(function):
                signature_of(function)
    names: set[str] = set()
    for text in texts:
        unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", text)
        names.update(m.split(".")[0] for m in re.findall(r"[A-Za-z_][\w.]*", unquoted))
    return names


def code_tables() -> dict[str, dict[str, dict[str, str]]]:
    """Every checked column of every table, derived from the code: table -> key -> column -> text."""
    from navcache_runtime.factory import STRATEGIES
    from navcache_runtime.naming import RUNTIME_EXTENSION

    objects = exported()
    origin = _export_modules()
    tables: dict[str, dict[str, dict[str, str]]] = {name: {} for name in TABLES}
    for name, obj in objects.items():
        kind = kind_of(obj)
        tables["exports"][name] = {"kind": kind, "module": origin.get(name, "?")}
        if kind == "protocol":
            for method, member in vars(obj).items():
                if not method.startswith("_") and inspect.isfunction(member):
                    params, returns = render_parameters(member, skip_first=True)
                    tables["protocol"][method] = {"parameters": params, "returns": returns}
        elif kind == "function":
            params, returns = render_parameters(obj, skip_first=False)
            tables["functions"][name] = {"parameters": params, "returns": returns}
        elif kind == "error":
            tables["errors"][name] = {"bases": ", ".join(base.__name__ for base in obj.__bases__)}
        elif kind == "enum":
            for member in obj:
                row = {"value": render_value(member.value)}
                if obj.__name__ == "FailureCode":
                    tables["failure_codes"][member.name] = row
                else:
                    tables["members"][f"{name}.{member.name}"] = {
                        "kind": "member",
                        "parameters": "",
                        "returns": row["value"],
                    }
        elif kind in ("type alias", "constant"):
            value = f"Literal[{', '.join(map(repr, typing.get_args(obj)))}]" if kind == "type alias" else obj
            tables["constants"][name] = {
                "value": value if isinstance(value, str) and kind == "type alias" else render_value(value)
            }
        if kind in ("dataclass", "class"):
            tables["members"].update(_member_rows(obj))
        if kind == "dataclass":
            tables["dtos"][name] = {"frozen": "yes" if obj.__dataclass_params__.frozen else "no"}
            target = "config" if obj is nr.RuntimeConfig else "fields"
            for f in dataclasses.fields(obj):
                key = f.name if target == "config" else f"{name}.{f.name}"
                tables[target][key] = {"type": render_annotation(f.type), "default": _field_default(f)}
    for name in sorted(annotation_names(objects) - STANDARD_NAMES - set(objects)):
        tables["referenced"][name] = {}
    for label in nr.RUNTIME_LABELS:
        _module, _cls, library, extra = STRATEGIES.get(label, ("", "", "(none)", "(none)"))
        extension = f".{RUNTIME_EXTENSION[label]}" if label in RUNTIME_EXTENSION else "(none)"
        tables["labels"][label] = {"extension": extension, "library": library, "extra": extra}
    return tables


def fingerprint(tables: dict[str, dict[str, dict[str, str]]]) -> str:
    canonical = json.dumps(tables, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _row(table: str, key: str, columns: dict[str, str]) -> str:
    def cell(text: str) -> str:
        return f"`{text}`".replace("|", "\\|") if text else ""

    return "| " + " | ".join([cell(key), *(cell(columns[c]) for c in TABLES[table][1])]) + " |"


def differences(table: str, documented: list[dict[str, str]], code: dict[str, dict[str, str]]) -> list[str]:
    """Every difference between one document table and the code, one line each, ready for a message."""
    key_column, checked = TABLES[table]
    problems: list[str] = []
    doc_rows: dict[str, dict[str, str]] = {}
    for row in documented:
        missing = [c for c in (key_column, *checked) if c not in row]
        if missing:
            return [f"table {table!r} lacks the column(s) {missing}; it needs {[key_column, *checked]}"]
        if row[key_column] in doc_rows:
            problems.append(f"{row[key_column]!r} is listed twice")
        doc_rows[row[key_column]] = row
    for key in sorted(set(code) - set(doc_rows)):
        problems.append(f"in the code, not in the document: {key!r}; add the row {_row(table, key, code[key])}")
    for key in sorted(set(doc_rows) - set(code)):
        problems.append(f"in the document, not in the code: {key!r}; remove the row (or restore it in the code)")
    for key in sorted(set(doc_rows) & set(code)):
        for column in checked:
            if doc_rows[key][column] != code[key][column]:
                problems.append(
                    f"{key!r} column {column!r}: the document says {doc_rows[key][column]!r}, "
                    f"the code has {code[key][column]!r}"
                )
    return problems


def render_all(tables: dict[str, dict[str, dict[str, str]]]) -> str:
    out = []
    for table, (key_column, checked) in TABLES.items():
        out += [f"<!-- contract-table: {table} -->", f"| {key_column} | {' | '.join(checked)} |"]
        out.append("|" + "---|" * (len(checked) + 1))
        out += [_row(table, key, columns) for key, columns in tables[table].items()]
        out.append("")
    out.append(f"surface fingerprint: {fingerprint(tables)}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def document() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def documented(document: str) -> dict[str, list[dict[str, str]]]:
    return parse_tables(document)


@pytest.fixture(scope="module")
def code() -> dict[str, dict[str, dict[str, str]]]:
    return code_tables()


@pytest.mark.parametrize("table", list(TABLES))
def test_document_table_matches_the_code(
    table: str, documented: dict[str, list[dict[str, str]]], code: dict[str, dict[str, dict[str, str]]]
) -> None:
    assert table in documented, f"{DOC.name} has no table marked <!-- contract-table: {table} -->"
    problems = differences(table, documented[table], code[table])
    assert not problems, (
        f"{DOC.name}, table {table!r}, differs from the code:\n  " + "\n  ".join(problems) + (f"\n{HOW_TO_FIX}")
    )


def _semver(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text)
    assert match, f"{text!r} is not a semantic version MAJOR.MINOR.PATCH"
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def test_surface_change_needs_a_new_version(
    document: str, documented: dict[str, list[dict[str, str]]], code: dict[str, dict[str, dict[str, str]]]
) -> None:
    version = doc_version(document)
    history = documented.get("versions")
    assert history, f"{DOC.name} has no Versions table (<!-- contract-table: versions -->)"
    versions = [_semver(row["version"]) for row in history]
    assert versions == sorted(set(versions)), (
        f"the Versions table must list each version once, oldest first: {versions}"
    )
    prints = [row["surface sha256"] for row in history]
    assert len(prints) == len(set(prints)), (
        "two versions in the Versions table record the same surface fingerprint: a version row is history, "
        "add a new row instead of editing an old one"
    )
    latest = history[-1]
    assert latest["version"] == version, (
        f"the document's **Version:** is {version} but the newest row of its Versions table is {latest['version']}"
    )
    assert nr.__version__ == version, (
        f"navcache_runtime.__version__ is {nr.__version__} but the contract is {version}; set __version__ = "
        f'"{version}" in src/navcache_runtime/__init__.py'
    )
    now = fingerprint(code)
    if latest["surface sha256"] != now:
        major, minor, patch = versions[-1]
        drift = [p for table in TABLES for p in differences(table, documented.get(table, []), code[table])]
        pytest.fail(
            f"the public surface of navcache_runtime changed (fingerprint {now}) but the contract version did not "
            f"(version {version} records {latest['surface sha256']}).\n"
            + ("What differs from the document:\n  " + "\n  ".join(drift) + "\n" if drift else "")
            + "To release the change: update the Shape tables, then bump the version — "
            f"{major + 1}.0.0 if anything was removed or changed, {major}.{minor + 1}.0 if things were only added, "
            f"{major}.{minor}.{patch + 1} if only the spelling of an annotation changed — in three places: the "
            f"'**Version:**' line, a new last row `| <version> | {now} | <what changed> |` in the Versions table "
            "(never edit an old row), and navcache_runtime.__version__."
        )


def test_all_is_an_explicit_list_of_unique_resolvable_names() -> None:
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    assigned: list[ast.expr | None] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            assigned.append(getattr(node, "value", None))
    assert len(assigned) == 1 and isinstance(assigned[0], ast.List), "__all__ must be assigned once, a literal list"
    names = ast.literal_eval(assigned[0])
    assert names == nr.__all__ and len(names) == len(set(names))
    # The lazy names are imported for type checkers too (so a consumer's mypy sees their types): same list.
    checking = {
        alias.name: f"navcache_runtime.{node.module}"
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    lazy = {name: module for name, module in _export_modules().items() if name in nr._LAZY}
    assert checking == lazy, "the TYPE_CHECKING imports in __init__.py must list exactly the _LAZY names"
    for name in names:
        assert getattr(nr, name) is not None
    assert set(dir(nr)) >= set(names)


def test_every_runtime_error_type_is_exported() -> None:
    """A subtype of the family defined anywhere in the runtime is part of the contract. (The strategies'
    modules, which import their libraries, are left out: they rewrap into the family, they do not extend it.)"""
    import pkgutil

    for info in pkgutil.walk_packages(nr.__path__, "navcache_runtime."):
        if info.name != "navcache_runtime.__main__" and (
            not info.name.startswith("navcache_runtime.strategies.") or info.name.endswith("._base")
        ):
            importlib.import_module(info.name)

    def family(cls: type) -> set[type]:
        found: set[type] = {cls}
        subclasses: list[type] = type.__subclasses__(cls)
        for sub in subclasses:
            found |= family(sub)
        return found

    ours = {c for c in family(nr.InferenceRuntimeError) if c.__module__.startswith("navcache_runtime")}
    missing = sorted(c.__name__ for c in ours if getattr(nr, c.__name__, None) is not c)
    assert not missing, f"error types of the runtime that navcache_runtime does not export: {missing}"


def test_py_typed_marker_is_shipped() -> None:
    import tomllib

    assert (REPO / "src" / "navcache_runtime" / "py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["navcache_runtime"]


def test_every_worked_case_names_a_test_that_exists(document: str) -> None:
    cases = re.findall(r"^#### (WC-\d+)[^\n]*\n(?:[^\n]*\n)*?Test: `(tests/[\w/]+\.py)::(\w+)`", document, re.MULTILINE)
    assert len(cases) >= 5, f"{DOC.name} needs at least five worked cases with a 'Test:' line, found {cases}"
    for case, path, name in cases:
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert name in defined, f"{case} names {path}::{name}, which does not exist"


# -- the checks notice a changed surface: mutate a copy of the package, run them against it ----------------

# (file under src/navcache_runtime, text to replace, replacement, what the difference must name)
MUTATIONS: dict[str, tuple[str, str, str, str]] = {
    "protocol method added": (
        "protocol.py",
        "    def current_runtime_label(self) -> RuntimeLabel:",
        "    def warm_up(self, handle: EngineHandle) -> None: ...\n\n"
        "    def current_runtime_label(self) -> RuntimeLabel:",
        "in the code, not in the document: 'warm_up'",
    ),
    "DTO field removed": (
        "types.py",
        "    age_s: float = 0.0  # how old the reading was when handed out\n",
        "",
        "in the document, not in the code: 'ThermalState.age_s'",
    ),
    "parameter type changed": (
        "protocol.py",
        "def release_engine(self, handle: EngineHandle) -> None:",
        "def release_engine(self, handle: EngineHandle | None) -> None:",
        "'release_engine' column 'parameters'",
    ),
    "error base changed": (
        "errors.py",
        "class OutOfMemoryError(InferenceRuntimeError):",
        "class OutOfMemoryError(InferenceError):",
        "'OutOfMemoryError' column 'bases': the document says 'InferenceRuntimeError', the code has 'InferenceError'",
    ),
    "label added": (
        "types.py",
        'RuntimeLabel = Literal["tensorrt", "onnx_trt_ep", "pytorch_fp16"]',
        'RuntimeLabel = Literal["tensorrt", "onnx_trt_ep", "pytorch_fp16", "openvino"]',
        "in the code, not in the document: 'openvino'",
    ),
    "unexported type in a signature": (
        "protocol.py",
        "    def thermal_state(self) -> ThermalState:",
        "    def thermal_state(self) -> ThermalReading:  # type: ignore[name-defined]  # noqa: F821",
        "in the code, not in the document: 'ThermalReading'",
    ),
    "export removed": ("__init__.py", '    "preprocess",\n', "", "in the document, not in the code: 'preprocess'"),
    "config default changed": (
        "config.py",
        "thermal_poll_hz: float = 1.0",
        "thermal_poll_hz: float = 2.0",
        "'thermal_poll_hz' column 'default': the document says '1.0', the code has '2.0'",
    ),
}

_PROBE = """
import json
from tests.test_runtime_contract import DOC, TABLES, code_tables, differences, fingerprint, parse_tables
import navcache_runtime
documented = parse_tables(DOC.read_text(encoding="utf-8"))
code = code_tables()
problems = [f"{t}: {p}" for t in TABLES for p in differences(t, documented.get(t, []), code[t])]
print(json.dumps({"module": navcache_runtime.__file__, "problems": problems, "fingerprint": fingerprint(code)}))
"""


def _mutated_package(tmp_path: Path, mutation: str) -> Path:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "navcache_runtime", src / "navcache_runtime")
    filename, old, new, _ = MUTATIONS[mutation]
    path = src / "navcache_runtime" / filename
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"the mutation {mutation!r} no longer applies to {filename}; update MUTATIONS"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return src


def _run(args: list[str], src: Path, timeout: float = 120) -> Any:
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(REPO)])}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, check=False)


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_checks_notice_a_changed_surface(mutation: str, tmp_path: Path, documented: Any) -> None:
    src = _mutated_package(tmp_path, mutation)
    proc = _run([sys.executable, "-c", _PROBE], src)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith(str(src))  # the copy was checked, not the installed package
    expected = MUTATIONS[mutation][3]
    assert any(expected in problem for problem in result["problems"]), result["problems"]
    assert result["fingerprint"] != documented["versions"][-1]["surface sha256"]


def test_the_version_check_fails_on_a_changed_surface_and_says_what_to_do(tmp_path: Path, document: str) -> None:
    major, minor, _ = _semver(doc_version(document))
    src = _mutated_package(tmp_path, "protocol method added")
    proc = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-header",
            "-x",
            f"{Path(__file__).relative_to(REPO)}::test_surface_change_needs_a_new_version",
        ],
        src,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the public surface of navcache_runtime changed" in proc.stdout
    assert "in the code, not in the document: 'warm_up'" in proc.stdout
    assert f"{major + 1}.0.0 if anything was removed or changed, {major}.{minor + 1}.0 if things" in proc.stdout


# -- worked test cases (docs/runtime-contract.md, "Worked test cases") ---------------------------------------


@pytest.fixture(scope="module")
def compiled(
    tiny_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nr.InferenceRuntime, nr.EngineCacheEntry]:
    runtime = nr.build_inference_runtime({"runtime": "onnx_trt_ep", "engine_dir": tmp_path_factory.mktemp("engines")})
    return runtime, runtime.compile_engine(tiny_model.onnx, tiny_model.build_config())


def test_wc1_inference_protocol_end_to_end(compiled: Any, tiny_model: Any) -> None:
    runtime, entry = compiled
    assert isinstance(runtime, nr.InferenceRuntime) and runtime.current_runtime_label() == "onnx_trt_ep"
    assert isinstance(entry, nr.EngineCacheEntry) and entry.path.is_file() and nr.sidecar_path(entry.path).is_file()
    name = nr.parse_engine_name(entry.path.name)
    assert (name.model, name.precision, name.runtime_label) == ("tiny_vpr", "fp32", "onnx_trt_ep")
    assert entry.compile_duration_s is not None and entry.compile_duration_s > 0

    handle = runtime.deserialize_engine(nr.entry_from_artifact(entry.path))
    inputs = tiny_model.inputs(batch=4)
    outputs = runtime.infer(handle, inputs)
    (descriptor,) = outputs.values()
    np.testing.assert_allclose(descriptor, tiny_model.reference(inputs), atol=1e-4)

    runtime.release_engine(handle)
    runtime.release_engine(handle)  # idempotent
    with pytest.raises(nr.InferenceError) as refused:
        runtime.infer(handle, inputs)
    assert isinstance(refused.value, nr.InferenceRuntimeError)


def _copy(entry: nr.EngineCacheEntry, directory: Path, name: str, *, sidecar: bool = True) -> Path:
    import shutil

    directory.mkdir(exist_ok=True)
    target = Path(shutil.copy(entry.path, directory / name))
    if sidecar:
        shutil.copy(nr.sidecar_path(entry.path), nr.sidecar_path(target))
    return target


def test_wc2_engine_gate_and_filename_schema(compiled: Any, tmp_path: Path) -> None:
    runtime, entry = compiled
    parsed = nr.parse_engine_name(entry.path.name)
    other_gpu = dataclasses.replace(parsed, host=dataclasses.replace(parsed.host, sm="87")).filename
    with pytest.raises(nr.EngineSchemaMismatchError, match="GPU SM 87"):
        runtime.deserialize_engine(nr.entry_from_artifact(_copy(entry, tmp_path / "other-gpu", other_gpu)))

    unsigned = _copy(entry, tmp_path / "no-sidecar", entry.path.name, sidecar=False)
    with pytest.raises(nr.EngineSidecarMissingError):
        runtime.deserialize_engine(dataclasses.replace(entry, path=unsigned))

    tampered = _copy(entry, tmp_path / "tampered", entry.path.name)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    with pytest.raises(nr.EngineHashMismatchError):
        runtime.deserialize_engine(nr.entry_from_artifact(tampered))

    original = "dinov2_vpr__sm87_jp6.2_trt10.3_fp16.engine"
    name = nr.parse_engine_name(original)
    assert (name.model, name.precision, name.runtime_label) == ("dinov2_vpr", "fp16", "tensorrt")
    assert name.host.pinned() == {"sm": "87", "jetpack": "6.2", "trt": "10.3"}
    assert name.filename == original


def test_wc3_thermal_state(tmp_path: Path) -> None:
    from tests.test_thermal import add_zone

    root = tmp_path / "thermal"
    add_zone(root, 0, "CPU-therm", 45500, (("passive", 95000), ("critical", 102500)))
    add_zone(root, 1, "GPU-therm", 43000, (("passive", 95000),))
    config = {"runtime": "onnx_trt_ep", "engine_dir": tmp_path / "engines", "thermal_poll_hz": 0}
    runtime = nr.build_inference_runtime({**config, "thermal_sysfs_root": root})
    state = runtime.thermal_state()
    assert isinstance(state, nr.ThermalState)
    assert {z.name for z in state.zones} == {"CPU-therm", "GPU-therm"}
    assert state.max_temp_c == 45.5 and state.throttled is False and state.throttle_reasons == ()

    (root / "thermal_zone0" / "temp").write_text("96000\n")
    hot = runtime.thermal_state()
    assert hot.throttled is True and any("CPU-therm" in reason for reason in hot.throttle_reasons)

    (tmp_path / "empty").mkdir()
    bare = nr.build_inference_runtime({**config, "thermal_sysfs_root": tmp_path / "empty"})
    with pytest.raises(nr.TelemetryUnavailableError):
        bare.thermal_state()


def test_wc5_verifier_report(tmp_path: Path) -> None:
    from tests.test_manifest import NOW, make_cache

    cache = make_cache(tmp_path)
    report = nr.verify_cache(cache.root, cache.trusted, now=NOW)
    assert report.ok and report.failures == [] and all(a.ok for a in report.artifacts)
    assert report.raise_if_failed() is report

    tampered = cache.root / "tiles/17/68000/45000.webp"
    tampered.write_bytes(b"x" + tampered.read_bytes()[1:])
    (cache.root / "index/tiles.faiss").unlink()
    report = nr.verify_cache(cache.root, cache.trusted, now=NOW)
    assert not report.ok
    assert {(f.code, f.subject) for f in report.failures} == {
        (nr.FailureCode.ARTIFACT_DIGEST_MISMATCH, "tiles/17/68000/45000.webp"),
        (nr.FailureCode.ARTIFACT_MISSING, "index/tiles.faiss"),
    }
    with pytest.raises(nr.CacheVerificationError) as refused:
        report.raise_if_failed()
    assert refused.value.report is report
    codes = {failure["code"] for failure in json.loads(report.to_json())["failures"]}
    assert codes == {"artifact_digest_mismatch", "artifact_missing"}


def main() -> int:
    print(render_all(code_tables()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
