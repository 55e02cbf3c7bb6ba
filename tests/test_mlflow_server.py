"""A shared MLflow tracking server, as a lab runs one: `mlflow server` on PostgreSQL with proxied
artifacts and the basic-auth app, started by the test (tests/services.py).

The reduced quick workflow (tests/services.py REDUCED_DAG) runs through Snakemake with
MLFLOW_TRACKING_URI on the server and alice's credentials in the environment; every command
(download, prepare, init-tracking, train, fuse, evaluate, report) then talks to the server.
The runs, metrics and artifacts are read back through the server. A wrong password and a write
into another user's experiment must each be one medfuse line naming the server (exit 2). The
first tests, of the mapping itself, need no server.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.services import (
    MlflowServer,
    reduced_workflow_env,
    run_tool,
    start_mlflow_server,
    start_postgres,
    tool_env,
)
from tests.workspace import DataSource, copy_repo

services = pytest.mark.services
URL = "http://mlflow.lab.example:5000"
ALICE = ("alice", "alice-password-1")
BOB = ("bob", "bob-password-12")


def test_a_server_keeps_the_artifacts_of_its_experiments(tmp_path: Path, monkeypatch):
    from medfuse.tracking import artifact_location

    monkeypatch.chdir(tmp_path)
    local = {"tracking": {"artifact_root": "mlartifacts"}}
    assert artifact_location(local, "CT-MRI", URL) is None  # the server's own store
    expected = (tmp_path / "mlartifacts" / "CT-MRI").as_uri()
    assert artifact_location(local, "CT-MRI", "sqlite:///mlflow.db") == expected
    shared = {"tracking": {"artifact_root": "s3://lab-bucket/mlflow/"}}
    assert artifact_location(shared, "CT-MRI", URL) == "s3://lab-bucket/mlflow/CT-MRI"


@pytest.mark.parametrize(("code", "status"), [("UNAUTHENTICATED", 401), ("PERMISSION_DENIED", 403)])
def test_a_refusal_is_one_line_naming_the_server_and_user(code: str, status: int, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    from medfuse.errors import TrackingAuthError
    from medfuse.tracking import mlflow_errors

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "carols-secret")
    refused = MlflowException(
        "API request failed\nResponse body: 'no'", getattr(databricks_pb2, code)
    )
    with pytest.raises(TrackingAuthError) as caught, mlflow_errors(URL, "write runs"):
        raise refused
    message = str(caught.value)
    assert "\n" not in message and URL in message and f"HTTP {status}" in message, message
    assert "'carol'" in message and "carols-secret" not in message


def test_a_refused_artifact_upload_is_one_line_too(monkeypatch):
    import requests

    from medfuse.errors import TrackingAuthError
    from medfuse.tracking import mlflow_errors

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    response = requests.Response()
    response.status_code = 403
    refused = pytest.raises(TrackingAuthError, match="anonymous client may not upload")
    with refused, mlflow_errors(URL, "upload artifacts"):
        raise requests.HTTPError("403 Forbidden", response=response)


def test_other_errors_pass_unchanged():
    from medfuse.tracking import mlflow_errors

    with pytest.raises(ValueError, match="a bug"), mlflow_errors(URL, "log metrics"):
        raise ValueError("a bug")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with start_postgres() as postgres:
        postgres.create_database("mlflow")
        postgres.create_database("mlflow_auth")
        base = tmp_path_factory.mktemp("mlflow-server")
        with start_mlflow_server(base, postgres.uri("mlflow"), postgres.uri("mlflow_auth")) as up:
            up.create_user(*ALICE)
            up.create_user(*BOB)
            yield up


def _login(server: MlflowServer, user: tuple[str, str]) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": server.url,
        "MLFLOW_TRACKING_USERNAME": user[0],
        "MLFLOW_TRACKING_PASSWORD": user[1],
    }


@pytest.fixture(scope="module")
def alices_run(
    server: MlflowServer,
    tmp_path_factory: pytest.TempPathFactory,
    repo_root: Path,
    data_source: DataSource,
) -> Path:
    """The reduced quick workflow, every job logging to the server as alice."""
    repo = copy_repo(repo_root, tmp_path_factory.mktemp("team"))
    env = reduced_workflow_env(repo, data_source, **_login(server, ALICE))
    run_tool(["snakemake", "--profile", "workflow/profiles/quick", "all"], repo, env)
    return repo


@pytest.fixture
def as_alice(server: MlflowServer, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    for name, value in _login(server, ALICE).items():
        monkeypatch.setenv(name, value)
    return MlflowClient(server.url)


@services
def test_workflow_runs_metrics_and_artifacts_are_on_the_server(
    server: MlflowServer, alices_run: Path, as_alice
):
    experiment = as_alice.get_experiment_by_name("CT-MRI")
    # The server keeps the artifacts (proxied), not the disk of the client that made it.
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment
    assert not (alices_run / "mlartifacts").exists()
    assert not (alices_run / "mlflow.db").exists()
    runs = as_alice.search_runs([experiment.experiment_id])
    by_step = {(r.data.tags["step"], r.data.tags["method"]): r for r in runs}
    assert set(by_step) == {
        ("train", "wdualmine"),
        ("fuse", "wdualmine"),
        ("fuse", "average"),
        ("evaluate", "wdualmine"),
        ("evaluate", "average"),
    }, sorted(by_step)
    assert {r.info.status for r in runs} == {"FINISHED"}

    train = by_step["train", "wdualmine"].info.run_id
    history = as_alice.get_metric_history(train, "loss/total")
    assert [m.step for m in history] == [1, 2]  # the quick profile's two epochs
    summary = json.loads(
        (alices_run / "results/metrics/paper/wdualmine/CT-MRI/full.json").read_text()
    )
    evaluated = by_step["evaluate", "wdualmine"].data.metrics
    assert evaluated["paper/EN"] == pytest.approx(summary["EN"])

    weights = Path(as_alice.download_artifacts(train, "model/model.pt", str(alices_run / "dl")))
    local = alices_run / "results/models/wdualmine/CT-MRI/full/model.pt"
    assert weights.read_bytes() == local.read_bytes()
    on_server = list(server.artifacts.rglob(f"{train}/artifacts/model/model.pt"))
    assert len(on_server) == 1, list(server.artifacts.rglob("*"))[:20]
    # The report read its run list from the server too.
    assert train in (alices_run / "results/report.md").read_text()


def _medfuse(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["medfuse", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )


def _tracking_overlay(repo: Path, server: MlflowServer) -> dict[str, str]:
    """tracking.uri in an overlay (the params route, not MLFLOW_TRACKING_URI)."""
    overlay = repo / "team-server.yaml"
    overlay.write_text(yaml.safe_dump({"tracking": {"uri": server.url}}))
    return tool_env(MEDFUSE_PARAMS_OVERLAY=f"{repo / 'reduced-dag.yaml'}{os.pathsep}{overlay}")


def _one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The command failed with exit 2 and one error line (its INFO log lines may precede it)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"medfuse {command}")]
    assert len(errors) == 1 and errors[0].startswith(f"medfuse {command}: error: "), result.stderr
    return errors[0]


@services
def test_a_wrong_password_is_one_line_naming_the_server(server: MlflowServer, alices_run: Path):
    env = _tracking_overlay(alices_run, server)
    env.update(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD="not-her-password")
    result = _medfuse(alices_run, env, "init-tracking", "--profile", "quick")
    line = _one_error_line(result, "init-tracking")
    print(line)
    assert server.url in line and "'alice'" in line and "HTTP 401" in line, line
    assert "not-her-password" not in result.stderr


@services
@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")  # mlflow.server
def test_a_user_cannot_write_into_another_users_experiment(
    server: MlflowServer, alices_run: Path, as_alice
):
    env = _tracking_overlay(alices_run, server)
    env.update(MLFLOW_TRACKING_USERNAME=BOB[0], MLFLOW_TRACKING_PASSWORD=BOB[1])
    experiment = as_alice.get_experiment_by_name("CT-MRI")
    before = len(as_alice.search_runs([experiment.experiment_id]))
    fused = "results/fused/average/CT-MRI/full"
    args = ["--pair", "CT-MRI", "--fused", fused, "--out", "bob/average"]
    result = _medfuse(alices_run, env, "evaluate", "--profile", "quick", *args)
    line = _one_error_line(result, "evaluate")
    print(line)
    assert server.url in line and "'bob'" in line and "'CT-MRI'" in line, line
    assert "HTTP 403" in line, line
    assert len(as_alice.search_runs([experiment.experiment_id])) == before

    # What the message advises: the experiment's owner grants EDIT, and bob's run goes in.
    from mlflow.server import get_app_client

    owner = get_app_client("basic-auth", tracking_uri=server.url)  # alice, from the environment
    owner.grant_user_permission(BOB[0], "experiment", experiment.experiment_id, "EDIT")
    granted = _medfuse(alices_run, env, "evaluate", "--profile", "quick", *args)
    assert granted.returncode == 0, granted.stderr[-3000:]
    assert len(as_alice.search_runs([experiment.experiment_id])) == before + 1
