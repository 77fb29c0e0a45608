"""The onboard command line's exit codes (``python -m navcache_runtime``): 0 verified, 1 refused, 2 a usage
or configuration error on this side with nothing checked, the same rule for verify, inspect and selftest.
A malformed option value is one ``error:`` line on stderr and nothing on stdout."""

from __future__ import annotations

from pathlib import Path

import pytest

from navcache_runtime import cli
from tests.test_manifest import NOW, Cache, make_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return make_cache(tmp_path_factory.mktemp("signed"))


def verify(cache: Cache, *options: str) -> list[str]:
    return ["verify", str(cache.root), "--trusted-keys", str(cache.trusted), "--no-state", *options]


@pytest.mark.parametrize(
    ("now", "message"),
    [
        ("x", "error: --now 'x' is not an ISO 8601 time (e.g. 2026-11-23T08:00:00Z)"),
        ("2026-11-23T13:00:00", "error: --now needs a time zone (e.g. 2026-11-23T08:00:00Z)"),
    ],
)
def test_a_malformed_now_is_a_usage_error_in_one_line(
    cache: Cache, now: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(verify(cache, "--now", now)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [message]


def test_verify_exits_0_when_verified_and_1_when_refused(cache: Cache, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(verify(cache, "--now", NOW.isoformat())) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("VERIFIED: ")
    long_after = NOW.replace(year=NOW.year + 1).isoformat()
    assert cli.main(verify(cache, "--now", long_after)) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("REFUSED: ")


@pytest.mark.parametrize("command", ["verify", "inspect", "selftest"])
def test_an_invalid_trusted_keys_file_is_a_configuration_error_in_every_command(
    cache: Cache, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "trusted_keys.json"
    broken.write_text("{not json")
    options = ["--no-state"] if command != "inspect" else []
    assert cli.main([command, str(cache.root), "--trusted-keys", str(broken), *options]) == 2
    shown = "REFUSED (1 failures" if command == "inspect" else "FAIL  [trusted_keys_invalid]"
    assert shown in capsys.readouterr().out


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        (None, "error: runtime config file {path} does not exist"),
        ("runtime = [", "error: {path} is not valid TOML: "),
    ],
)
def test_selftest_with_a_malformed_runtime_config_is_a_usage_error_before_anything_is_verified(
    cache: Cache, config_text: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "runtime.toml"
    if config_text is not None:
        config.write_text(config_text)
    args = ["selftest", str(cache.root), "--trusted-keys", str(cache.trusted), "--no-state"]
    assert cli.main([*args, "--runtime-config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no verification report: nothing was checked
    (line,) = err.splitlines()
    assert line.startswith(message.format(path=config))


def test_a_missing_cache_directory_is_a_usage_error(cache: Cache, tmp_path: Path) -> None:
    absent = tmp_path / "no-cache"
    for command in ("verify", "selftest"):
        assert cli.main([command, str(absent), "--trusted-keys", str(cache.trusted), "--no-state"]) == 2
    assert cli.main(["inspect", str(absent)]) == 2
