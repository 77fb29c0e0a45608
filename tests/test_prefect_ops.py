"""What the operator sees in Prefect, read back through Prefect's API: red gates with one clear message,
navcache's own lines in the run log, the engine table on failure, compile runs named after their backbone,
the parameter form's descriptions and the retry policy."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from navcache.errors import CoverageError, ProvisionError, SortieError
from navcache_tasks.runlog import is_transient
from tests.support.sorties import Assets, block_tiles, tiles_polygon, write_sortie


def _run(sortie: Path) -> Any:
    from navcache_flows.provision_sortie import provision_sortie

    return provision_sortie(str(sortie), return_state=True)


def _task_runs(flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def _logs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def _artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (latest,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1)
    return latest


@pytest.mark.usefixtures("prefect_harness")
def test_a_good_run_logs_navcache_lines_names_compiles_and_a_coverage_failure_reads_as_one_red_gate(
    assets: Assets, tmp_path: Path
) -> None:
    import logging

    from navcache_tasks.reporting import artifact_key

    first, second = block_tiles()
    cache = tmp_path / "cache"
    good = write_sortie(tmp_path / "ops-good.toml", assets, area=tiles_polygon(first), cache_dir=cache)
    state = _run(good)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    runs = _task_runs(flow_run_id)
    assert {"compile-tiny_vpr", "compile-local_features", "coverage-gate", "verify-cache"} <= set(runs)
    assert runs["coverage-gate"].state.is_completed()
    lines = [(log.level, log.message) for log in _logs(flow_run_id)]
    text = "\n".join(message for _, message in lines)
    assert "engine tiny_vpr: BUILT" in text and "engine local_features: BUILT" in text
    assert "takes a `navcache-compile:" in text  # the per-host compile slot, named in the log
    assert "shard " in text and "computed, 4 described" in text
    assert "index Flat" in text and "4 vectors" in text
    assert "coverage 100.00 %" in text and "coverage gate passed" in text
    assert "manifest v1 signed for test-ops-good (expires " in text and str(cache / "manifest.dsse.json") in text
    assert all(level >= logging.INFO for level, _ in lines if "engine " in _)
    manifest = _artifact(artifact_key("manifest", "test-ops-good"))
    assert manifest.type == "markdown"
    for field in ("payload sha256", "signing keyids", "expires", "built for host", str(cache / "manifest.dsse.json")):
        assert field in manifest.data

    # One tile 20 km east, outside the orthophoto: 8 of 9 tiles covered (88.89 %), close enough to the
    # threshold that preflight's estimate lets the run start and the coverage gate decides.
    far = [type(t)(t.z, t.x + 100, t.y) for t in first[:1]]
    area = tiles_polygon(first + second + far)
    partial = write_sortie(tmp_path / "ops-partial.toml", assets, area=area, cache_dir=cache, threshold=92.0)
    state = _run(partial)
    assert state.is_failed()
    with pytest.raises(CoverageError):
        state.result()
    # The flow's state message is navcache's own message, nothing of Prefect's wrapping.
    assert state.message.startswith("test-ops-partial: coverage 88.89 % is below the threshold 92"), state.message
    runs = _task_runs(state.state_details.flow_run_id)
    red = {name for name, run in runs.items() if not run.state.is_completed()}
    assert red == {"coverage-gate"}, red  # one red task: the gate; every other step completed
    assert runs["coverage-gate"].state.message == state.message
    assert "verify-cache" not in runs and "sign-manifest" not in runs
    logs = _logs(state.state_details.flow_run_id)
    text = "\n".join(log.message for log in logs)
    assert "Traceback" not in text and "NoneType: None" not in text
    assert text.count("coverage 88.89 % is below the threshold") == 2  # the gate's line and the flow's final state
    engines = _artifact(artifact_key("engines", "test-ops-partial"))
    assert "REUSED" in str(engines.data)


@pytest.mark.usefixtures("prefect_harness")
def test_a_compile_that_fails_writes_a_failed_row_and_fails_the_run_with_its_message(
    assets: Assets, tmp_path: Path
) -> None:
    from navcache.engines import backbone_build, for_runtime, provisioning_runtime
    from navcache.preflight import preflight
    from navcache_runtime import RuntimeConfig
    from navcache_tasks.reporting import artifact_key

    first, _ = block_tiles()
    cache = tmp_path / "cache"
    sortie = write_sortie(tmp_path / "ops-broken.toml", assets, area=tiles_polygon(first), cache_dir=cache)
    # A directory where the first engine file goes: preflight is satisfied (the cache is writable), and the
    # build fails the same way on every try (IsADirectoryError).
    spec = preflight(sortie)
    runtime = provisioning_runtime(RuntimeConfig(runtime=spec.runtime, engine_dir=cache / "engines"))
    build = for_runtime(runtime, backbone_build(spec.backbones[0]))
    for path in runtime.expected_artifacts(build.onnx, build.build_config):
        path.mkdir(parents=True)
    state = _run(sortie)
    assert state.is_failed()
    engines = _artifact(artifact_key("engines", "test-ops-broken"))
    rows = engines.data if isinstance(engines.data, list) else __import__("json").loads(engines.data)
    assert [(row["model"], row["outcome"]) for row in rows] == [("tiny_vpr", "FAILED"), ("local_features", "SKIPPED")]
    assert "tiny_vpr" in rows[0]["why"] and rows[1]["why"] == "not attempted: an earlier backbone failed"
    assert state.message == rows[0]["why"]
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs["compile-tiny_vpr"].run_count == 1  # deterministic: not retried
    text = "\n".join(log.message for log in _logs(state.state_details.flow_run_id))
    assert "Traceback" not in text


def test_the_deployment_form_describes_every_parameter_with_its_type() -> None:
    from prefect.utilities.callables import parameter_schema, parameter_schema_from_entrypoint

    from navcache_flows.provision_sortie import provision_sortie

    schema = parameter_schema(provision_sortie).model_dump()
    assert schema == parameter_schema_from_entrypoint("flows/provision_sortie.py:provision_sortie").model_dump()
    properties = schema["properties"]
    assert set(properties) == {"sortie", "cache_dir", "lock_timeout_s", "dask_address"}
    for name, prop in properties.items():
        assert len(prop.get("description", "")) > 30, name
    assert properties["sortie"]["type"] == "string" and properties["lock_timeout_s"]["type"] == "number"
    for name in ("cache_dir", "dask_address"):
        assert (
            properties[name]["anyOf"] == [{"type": "string"}, {"type": "null"}] and properties[name]["default"] is None
        )
    assert schema["required"] == ["sortie"]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError(errno.EIO, "Input/output error", "/mnt/ortho.tif"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError("peer reset"), True),
        (MemoryError(), True),
        (FileNotFoundError(errno.ENOENT, "No such file", "/data/ortho.tif"), False),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/c/engines"), False),
        (CoverageError("coverage 50 %"), False),
        (SortieError("bad field"), False),
        (ProvisionError("shard is inconsistent"), False),
        (TypeError("unsupported operand"), False),
        (KeyError("sortie_id"), False),
        (ValueError("could not convert"), False),
    ],
)
def test_only_transient_failures_are_retried(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_numerical_mismatch_and_out_of_memory_builds() -> None:
    from navcache.engines import BackboneBuildError, NumericalMismatchError
    from navcache_runtime.errors import EngineBuildError, OutOfMemoryError

    assert is_transient(BackboneBuildError("vpr", OutOfMemoryError("CUDA OOM"), transient=True))
    assert not is_transient(BackboneBuildError("vpr", EngineBuildError("unsupported op")))
    assert not is_transient(NumericalMismatchError.__new__(NumericalMismatchError))
    assert is_transient(OutOfMemoryError("CUDA OOM"))


def test_the_failed_sortie_automation_is_a_valid_prefect_automation() -> None:
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    data = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "deployments" / "notify-failed-sortie.yaml").read_text()
    )
    (automation,) = [AutomationCore.model_validate(item) for item in data["automations"]]
    assert automation.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert automation.actions[0].type == "send-notification"


def test_deploying_without_navcache_repo_stops_early_and_a_missing_checkout_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from navcache_tasks.deploy import DeployConfigError, enter_repo, require_repo

    monkeypatch.delenv("NAVCACHE_REPO", raising=False)
    with pytest.raises(DeployConfigError, match=r"NAVCACHE_REPO is not set.*Fix: NAVCACHE_REPO=/opt/navcache"):
        require_repo()
    monkeypatch.setenv("NAVCACHE_REPO", "relative/path")
    with pytest.raises(DeployConfigError, match="relative path"):
        require_repo()
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("NAVCACHE_REPO", str(repo))
    assert require_repo() == {"directory": str(repo)}
    with pytest.raises(DeployConfigError, match=r"flows/provision_sortie\.py does not exist"):
        enter_repo(str(tmp_path))
    with pytest.raises(DeployConfigError, match="not at"):
        enter_repo("{{ $NAVCACHE_REPO }}")
    monkeypatch.chdir(tmp_path)
    assert enter_repo(str(repo)) == {"directory": str(repo)} and Path.cwd() == repo
    # The root prefect.yaml is the one configuration; deployments/prefect.yaml points at it.
    assert (repo / "deployments" / "prefect.yaml").resolve() == (repo / "prefect.yaml").resolve()


@pytest.mark.usefixtures("prefect_harness")
def test_dask_progress_reaches_100_percent_and_the_sub_flow_is_named_after_the_sortie(
    assets: Assets, tmp_path: Path
) -> None:
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("prefect_dask")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from navcache_tasks.reporting import artifact_key

    first, second = block_tiles()
    sortie = write_sortie(
        tmp_path / "ops-dask.toml", assets, area=tiles_polygon(first + second), cache_dir=tmp_path / "cache"
    )
    # A real scheduler with two worker processes: each has its own per-batch counter, which sees only its
    # own shards; the flow counts from the shard results, so the progress reaches 100 %.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        from navcache_flows.provision_sortie import provision_sortie

        state = provision_sortie(str(sortie), dask_address=cluster.scheduler_address, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["shards"]["total"] == 2 and summary["verified"]
    assert float(_artifact(artifact_key("descriptors", "test-ops-dask")).data) == 100.0
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    assert [run.name for run in subflows] == ["test-ops-dask-shards-on-dask"]


def test_prefect_retry_and_failure_records_read_as_navcache_lines() -> None:
    import logging
    import sys

    from navcache_tasks.runlog import ReadableFailures

    readable = ReadableFailures()
    error = OSError(errno.EIO, "Input/output error", "/mnt/ortho.tif")
    retry = logging.LogRecord(
        "prefect.task_runs",
        logging.INFO,
        __file__,
        1,
        "Task run failed with %s: %r - Retry %s/%s will start %s",
        ("exception", error, 1, 2, "10 second(s) from now"),
        None,
    )
    assert readable.filter(retry)
    assert retry.levelno == logging.WARNING
    assert retry.getMessage() == (
        "retry 1/2 (10 second(s) from now) after a transient failure: [Errno 5] Input/output error: '/mnt/ortho.tif'"
    )
    try:
        raise CoverageError("coverage 88.89 % is below the threshold 92 %", where="s42")
    except CoverageError:
        failed = logging.LogRecord(
            "prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed with exception: %r", (1,), sys.exc_info()
        )
    assert readable.filter(failed)
    assert failed.exc_info is None and failed.getMessage() == "s42: coverage 88.89 % is below the threshold 92 %"
