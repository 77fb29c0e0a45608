"""Run Python code in a fresh interpreter, optionally with some top-level modules made unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PRELUDE = """
import sys, importlib.abc
BLOCKED = set({blocked!r})
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is blocked in this test", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
"""


def run_python(
    code: str, *, blocked: tuple[str, ...] = (), env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    script = _PRELUDE.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )


def run_json(code: str, **kwargs: object) -> dict:
    """Run ``code``, which must print one JSON object as its last stdout line; return it."""
    proc = run_python(code, **kwargs)  # type: ignore[arg-type]
    if proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
