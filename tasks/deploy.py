"""Deploy-time steps named in prefect.yaml (run by `prefect deploy`, before anything is stored on the server)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ENV = "NAVCACHE_REPO"


class DeployConfigError(RuntimeError):
    """A deployment setting is missing or wrong; `prefect deploy` stops before storing anything."""


def require_repo(env: str = REPO_ENV) -> dict[str, str]:
    """The ``build`` step of prefect.yaml: refuse to deploy when ``$NAVCACHE_REPO`` (the checkout's path on the
    companion computers, which the pull step moves each run into) is unset, instead of storing the literal
    ``{{ $NAVCACHE_REPO }}`` that every run would later crash on ("Process exited with status code: 1").
    Returns ``{"directory": ...}`` for the deploy log."""
    value = os.environ.get(env, "").strip()
    if not value:
        raise DeployConfigError(
            f"{env} is not set: the deployments' pull step moves each run into that directory. "
            f"Fix: {env}=/opt/navcache prefect --no-prompt deploy --all  (the navcache checkout's path on every "
            "companion computer; the same path on each)"
        )
    path = Path(value)
    if not path.is_absolute():
        raise DeployConfigError(
            f"{env}={value!r} is a relative path; workers start in their own directory. Fix: give the absolute "
            "path of the navcache checkout on the companion computers"
        )
    if not (path / "flows" / "provision_sortie.py").is_file():
        # A warning, not an error: the workers' path need not exist on the machine that deploys.
        print(
            f"warning: {env}={value} has no flows/provision_sortie.py on this machine; "
            "make sure it is the checkout's path on the companion computers"
        )
    return {"directory": str(path)}


def enter_repo(directory: str) -> dict[str, str]:
    """The ``pull`` step of prefect.yaml, on the worker before each run: move into the navcache checkout, or
    fail the run saying plainly which file is missing on which host (rather than a bare "Process exited with
    status code: 1" from a flow file that is not there)."""
    import platform

    path = Path(directory)
    flow_file = path / "flows" / "provision_sortie.py"
    if "{{" in directory or not flow_file.is_file():
        raise DeployConfigError(
            f"the navcache checkout is not at {directory!r} on {platform.node()}: {flow_file} does not exist. "
            f"Fix: install navcache at that path on this companion computer, or redeploy with {REPO_ENV} set to "
            "the checkout's path on the workers"
        )
    os.chdir(path)
    return {"directory": str(path)}
