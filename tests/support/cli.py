"""`navcache` as the ground crew run it: a subprocess with its own Prefect home, no colours, a fixed width."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def navcache(*args: str, home: Path, columns: int = 200, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PREFECT_HOME=str(home), NO_COLOR="1", COLUMNS=str(columns))
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # shared, busy CI cores
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "navcache", *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
