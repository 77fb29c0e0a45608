"""Property: whatever happens to a signed cache's tree, the verifier ends in a report (never a traceback),
refuses the cache and names every listed artifact that was changed; its text rendering cannot be forged.

One real signed cache (``tests.test_manifest.make_cache``) is built per module; each example copies it and
mutates the copy at random: a listed artifact becomes a directory, a symlink (inside, outside, dangling, a
loop), a FIFO, a socket, is truncated, grown, flipped or renamed to an odd name (ESC, newline, CR, bidi
override, undecodable bytes); the engine sidecar gets the same treatment, and odd unlisted files appear.
The default example count keeps the file under ~30 s on a shared 2-core machine; ``-m slow`` runs more.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from navcache_runtime import cli
from navcache_runtime.errors import FailureCode, printable
from navcache_runtime.verify import VerificationReport, verify_cache
from tests.test_manifest import NOW, Cache, make_cache

F = FailureCode
SIDECAR = "engines/vpr__sm87_jp6.2_trt10.3_fp16.engine.sha256"  # unlisted: the engine gate's business
KINDS = (
    "directory",
    "directory_with_file",
    "symlink_sibling",
    "symlink_outside",
    "symlink_dangling",
    "symlink_loop",
    "fifo",
    "socket",
    "truncate",
    "append",
    "flip",
    "rename_odd",
)
# Names an attacker would use against a terminal or a parser, as raw bytes (the file system takes any).
ODD_NAMES = (
    b"\x1b[1A\x1b[2KVERIFIED: all good 0 failures",
    b"evil\nVERIFIED: forged 0 failures\n",
    b"cr\rVERIFIED",
    b"bidi\xe2\x80\xaegnp.exe",
    b"undecodable\xff\xfe",
    b"tab\tand\x07bell",
    b"back\\slash",
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return make_cache(tmp_path_factory.mktemp("mutations"))


@contextmanager
def copy_of(cache: Cache) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="navcache-mut-") as tmp:
        root = Path(tmp) / "cache"
        shutil.copytree(cache.root, root, symlinks=True)
        yield root


def _mutate(root: Path, name: str, kind: str, amount: int, odd: bytes, outside: Path) -> None:
    path = root / name
    data = path.read_bytes()
    if kind in ("directory", "directory_with_file"):
        path.unlink()
        path.mkdir()
        if kind == "directory_with_file":
            (path / "inner").write_bytes(data)  # the right bytes, one level too deep
    elif kind.startswith("symlink"):
        path.unlink()
        if kind == "symlink_sibling":
            others = sorted(p for p in root.rglob("*") if p.is_file() and p != path and p.name != "manifest.dsse.json")
            path.symlink_to(others[amount % len(others)])
        elif kind == "symlink_outside":
            outside.write_bytes(data)  # the right bytes, outside the cache root
            path.symlink_to(outside)
        elif kind == "symlink_dangling":
            path.symlink_to(path.with_name("no-such-file"))
        else:
            path.symlink_to(path.name)  # points at itself
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "socket":
        path.unlink()
        with socket.socket(socket.AF_UNIX) as server:
            try:
                server.bind(str(path))
            except OSError:  # AF_UNIX paths are limited to ~108 bytes
                pytest.skip("socket path too long on this machine")
    elif kind == "truncate":
        path.write_bytes(data[: amount % len(data)])
    elif kind == "append":
        path.write_bytes(data + odd[: 1 + amount % len(odd)])
    elif kind == "flip":
        flipped = bytearray(data)
        flipped[amount % len(flipped)] ^= 1 << (amount % 8)
        path.write_bytes(bytes(flipped))
    else:  # renamed away to a name a terminal would interpret
        os.rename(os.fsencode(path), os.fsencode(path.parent) + b"/" + odd)


mutations = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 1 << 20), st.sampled_from(ODD_NAMES)), min_size=1, max_size=4
)


def _check_example(cache: Cache, plan: list[tuple[str, int, bytes]], pick: list[int], extras: list[bytes]) -> None:
    listed = sorted(cache.artifacts)
    targets = sorted({listed[i % len(listed)] for i in pick})[: len(plan)]
    with copy_of(cache) as root, tempfile.TemporaryDirectory() as away:
        outside = Path(away) / "outside.bin"
        for name, (kind, amount, odd) in zip(targets, plan, strict=False):
            _mutate(root, name, kind, amount, odd, outside)
        sidecar_kind, sidecar_amount, sidecar_odd = plan[-1]
        if len(plan) > 1:  # sometimes the (unlisted) sidecar too: it must not break the report either
            _mutate(root, SIDECAR, sidecar_kind, sidecar_amount, sidecar_odd, outside)
        for odd in extras:
            (Path(os.fsdecode(os.fsencode(root / "tiles") + b"/" + odd))).write_bytes(b"x")

        report = verify_cache(root, cache.trusted, now=NOW, mode="operator")

        assert isinstance(report, VerificationReport)
        assert not report.ok
        named = {failure.subject for failure in report.failures}
        missing = [name for name in targets if name not in named]
        assert not missing, f"mutated {missing} not named in {report.failures}"
        for failure in report.failures:
            assert isinstance(failure.code, FailureCode)
        json.loads(report.to_json())  # JSON stays JSON, whatever the names

        out = io.StringIO()
        with redirect_stdout(out):
            cli._print_report(report)
        _assert_terminal_safe(out.getvalue(), verdict="REFUSED")
        _assert_terminal_safe(report.summary(), verdict="REFUSED", verdict_first=True)


def _assert_terminal_safe(text: str, *, verdict: str, verdict_first: bool = False) -> None:
    """No control character reaches the terminal and exactly one line carries a verdict, where it belongs."""
    assert not any((ord(ch) < 0x20 and ch != "\n") or 0x7F <= ord(ch) < 0xA0 for ch in text), repr(text)
    assert not any(0xD800 <= ord(ch) <= 0xDFFF or ch in "\u202e\u2066\u2067" for ch in text), repr(text)
    text.encode("utf-8")  # printable on any UTF-8 terminal (a raw surrogate would raise here)
    lines = text.splitlines()
    verdicts = [i for i, line in enumerate(lines) if line.startswith(("VERIFIED", "REFUSED"))]
    assert verdicts == [0 if verdict_first else len(lines) - 1], text
    assert lines[verdicts[0]].startswith(verdict + ":")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations, st.lists(st.integers(0, 100), min_size=4, max_size=4), st.lists(st.sampled_from(ODD_NAMES)))
def test_any_mutated_tree_ends_in_a_report_naming_every_mutation(
    pristine: Cache, plan: list[tuple[str, int, bytes]], pick: list[int], extras: list[bytes]
) -> None:
    _check_example(pristine, plan, pick, extras)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations, st.lists(st.integers(0, 100), min_size=4, max_size=4), st.lists(st.sampled_from(ODD_NAMES)))
def test_any_mutated_tree_ends_in_a_report_naming_every_mutation_many(
    pristine: Cache, plan: list[tuple[str, int, bytes]], pick: list[int], extras: list[bytes]
) -> None:
    _check_example(pristine, plan, pick, extras)


# --------------------------------------------------------------------------------------------------------
# Cases the random examples reach only by chance, pinned as plain tests


@pytest.mark.parametrize("name", ["index/tiles.faiss", "coverage.json"])
def test_a_listed_artifact_replaced_by_a_directory_is_reported_with_the_other_failures(
    pristine: Cache, name: str
) -> None:
    with copy_of(pristine) as root:
        (root / name).unlink()
        (root / name).mkdir()
        tampered = root / "tiles/17/68000/45000.webp"
        data = bytearray(tampered.read_bytes())
        data[0] ^= 1
        tampered.write_bytes(bytes(data))  # a real digest failure in the same cache
        report = verify_cache(root, pristine.trusted, now=NOW, mode="operator")
    failures = {(f.code, f.subject) for f in report.failures}
    assert (F.ARTIFACT_NOT_REGULAR, name) in failures
    assert (F.ARTIFACT_DIGEST_MISMATCH, "tiles/17/68000/45000.webp") in failures
    assert "a directory" in next(f.message for f in report.failures if f.subject == name)


def test_a_signed_subject_name_with_a_lone_surrogate_is_an_invalid_path(pristine: Cache, tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    statement = json.loads(json.dumps(cache.statement))
    for bad in ("tiles/\ud800.webp", "tiles/\udcff.webp"):
        statement["subject"].append({"name": bad, "digest": {"sha256": "0" * 64}})
        statement["predicate"]["artifacts"][bad] = {"length": 1}
    # rfc8785 refuses lone surrogates, as any careful signer would: sign the JSON text an attacker would.
    cache.resign(json.dumps(statement, sort_keys=True, separators=(",", ":")).encode())
    report = cache.verify()
    assert not report.ok
    invalid = {f.subject for f in report.failures if f.code == F.PATH_INVALID}
    assert invalid == {"tiles/\ud800.webp", "tiles/\udcff.webp"}  # noqa: B033 (two different surrogates)
    assert "\\ud800" in report.summary() and "\\xff" in report.summary()


def test_printable_escapes_what_a_terminal_would_interpret() -> None:
    assert printable("engines/vpr.onnx") == "engines/vpr.onnx"
    assert printable("a\x1b[2K\nVERIFIED\r") == "a\\x1b[2K\\nVERIFIED\\r"
    assert printable("back\\slash") == "back\\\\slash"  # so a literal "\x1b" in a name is not an escape
    assert printable("bidi\u202eevil") == "bidi\\u202eevil"
    assert printable(os.fsdecode(b"raw\xff")) == "raw\\xff"
    assert printable("\ud800") == "\\ud800"
    assert printable("café 🛩") == "café 🛩"


def test_the_cli_cannot_be_made_to_print_a_forged_verified_line(
    pristine: Cache, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = b"x\x1b[1A\x1b[2K\rVERIFIED: cache (airborne) sortie SORTIE-0042 version 1; 5 artifacts, 0 failures\n"
    with copy_of(pristine) as root:
        (Path(os.fsdecode(os.fsencode(root) + b"/" + forged))).write_bytes(b"unlisted")
        os.rename(root / "tiles/17/68000/45000.webp", os.fsdecode(os.fsencode(root / "tiles") + b"/" + forged))
        code = cli.main(["verify", str(root), "--trusted-keys", str(pristine.trusted), "--now", "2026-11-23T12:00:00Z"])
        text = capsys.readouterr().out
        assert code == 1
        _assert_terminal_safe(text, verdict="REFUSED")
        assert "\\x1b[1A\\x1b[2K\\rVERIFIED" in text  # shown, escaped
        code = cli.main(
            ["verify", str(root), "--trusted-keys", str(pristine.trusted), "--now", "2026-11-23T12:00:00Z", "--json"]
        )
        doc = json.loads(capsys.readouterr().out)
    assert code == 1 and not doc["ok"]
    assert os.fsdecode(b"tiles/" + forged) in doc["extra_files"]  # JSON keeps the raw name, validly escaped


def test_inspect_escapes_what_the_manifest_says_and_survives_malformed_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = make_cache(tmp_path)
    statement = json.loads(json.dumps(cache.statement))
    forged = "x\x1b[1A\x1b[2K\rVERIFIED\n"
    statement["predicate"]["sortie_id"] = forged
    statement["predicate"]["version"] = forged
    statement["subject"].append({"name": "engines/" + forged, "digest": {"sha256": "0" * 64}})
    statement["subject"].append("not an object")
    statement["predicate"]["artifacts"]["engines/" + forged] = "not an object"
    statement["predicate"]["coverage"] = ["not", "an", "object"]
    cache.resign(json.dumps(statement).encode())
    (cache.root / "index").mkdir(exist_ok=True)
    os.mkfifo(cache.root / "index" / "index-0.json")  # a listed-looking report that is a FIFO: no hang
    statement["subject"].append({"name": "index/index-0.json", "digest": {"sha256": "0" * 64}})
    cache.resign(json.dumps(statement).encode())

    assert cli.main(["inspect", str(cache.root)]) == 0
    text = capsys.readouterr().out
    _assert_no_control_characters(text)
    assert "x\\x1b[1A\\x1b[2K\\rVERIFIED\\n" in text and "UNVERIFIED" in text

    assert cli.main(["inspect", str(cache.root), "--trusted-keys", str(cache.trusted)]) == 1
    text = capsys.readouterr().out
    _assert_no_control_characters(text)
    assert "REFUSED" in text and not any(line.startswith("VERIFIED") for line in text.splitlines())


def _assert_no_control_characters(text: str) -> None:
    assert not any((ord(ch) < 0x20 and ch != "\n") or 0x7F <= ord(ch) < 0xA0 for ch in text), repr(text)
