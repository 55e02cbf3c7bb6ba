"""MLflow tracking: one store, one experiment per modality pair, runs tagged by step and method.

Facts this module is built around (measured, see ../shared/spec/stack.md): the default store is
a SQLite file whose absolute URI takes four slashes; two processes creating a fresh database at
once both fail in its schema migration, so creation happens once (`medfuse init-tracking`) and,
as a second guard, under a file lock; an experiment needs an explicit artifact location or
artifacts land in whatever directory created it; batched logging is far faster than one call
per value.

A shared tracking server (`http://` or `https://` URI) needs none of the SQLite guards; it owns
its artifact store (`mlflow server --artifacts-destination`), so experiments created on it get
the server's artifact location, not a path on the client's disk. Credentials come from
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (read by MLflow itself); a refused login or
permission becomes one line naming the server (`TrackingAuthError`), not a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from medfuse.errors import TrackingAuthError, TrackingError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
_SQLITE = "sqlite:///"
_SERVER_SCHEMES = ("http://", "https://")
_BATCH = 100  # MLflow's limit of params (and tags) per log_batch call
_PARAM_MAX = 6000  # MLflow's limit of characters per param value
# The tags that name a run's job; an evaluation adds its convention.
JOB_TAGS = ("step", "method", "pair", "variant", "convention")


def tracking_uri(params: Mapping[str, Any]) -> str:
    """$MLFLOW_TRACKING_URI if set, else params.tracking.uri; SQLite paths made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or str(params["tracking"]["uri"])
    if uri.startswith(_SQLITE):
        path = Path(uri[len(_SQLITE) :])
        if not path.is_absolute():
            path = Path.cwd() / path
        # sqlite:/// + /abs/path gives the four slashes an absolute path needs.
        uri = _SQLITE + str(path.resolve())
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len(_SQLITE) :]) if uri.startswith(_SQLITE) else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation and experiment creation between processes (SQLite only)."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_server(uri: str) -> bool:
    """A tracking server (MLflow's REST API), as opposed to a database the client opens."""
    return uri.startswith(_SERVER_SCHEMES)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind an MLflow REST error or a failed artifact upload, if any."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code()
    response = getattr(exc, "response", None)  # requests.HTTPError from the artifact proxy
    return getattr(response, "status_code", None)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_mlflow_error(exc: BaseException) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    return isinstance(exc, (MlflowException, requests.RequestException))


def _refusal(uri: str, status: int, doing: str) -> str:
    """The one line for a 401 (login refused) or 403 (permission refused); never the password."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 and user:
        return (
            f"{uri}: the MLflow server rejected the password of user {user!r} (HTTP 401); "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if status == 401:
        return (
            f"{uri}: the MLflow server requires a login (HTTP 401); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    who = f"user {user!r}" if user else "an anonymous client"
    return (
        f"{uri}: {who} may not {doing} on the MLflow server (HTTP 403); "
        "ask the experiment's owner or the server's admin for EDIT permission"
    )


@contextlib.contextmanager
def mlflow_errors(uri: str, doing: str) -> Iterator[None]:
    """Turn MLflow's exceptions for a refused login (401) or permission (403), and, on a server,
    any other REST failure, into one line naming the store; other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        status = _http_status(exc)
        if status in (401, 403):
            raise TrackingAuthError(_refusal(uri, status, doing)) from None
        if is_server(uri) and _is_mlflow_error(exc):
            raise TrackingError(
                f"{uri}: cannot {doing} on the MLflow server ({_one_line(exc)})"
            ) from None
        raise


def init_store(params: Mapping[str, Any]) -> str:
    """Create (or migrate) the tracking database once, or check that the server answers and
    takes the credentials; return the store's URI. Safe to call again."""
    uri = tracking_uri(params)
    if is_server(uri):
        with mlflow_errors(uri, "list experiments"):
            _client(uri).search_experiments(max_results=1)
        return uri
    with _store_lock(uri):
        try:
            _client(uri).search_experiments(max_results=1)  # forces creation + migration
        except Exception as exc:  # MLflow raises many types here; all mean "store unusable"
            raise TrackingError(
                f"{uri}: cannot open or create the MLflow store ({_one_line(exc)})"
            ) from exc
    return uri


def artifact_location(params: Mapping[str, Any], pair: str, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts. A local store: tracking.artifact_root on this
    disk. A server: its own artifact store (None), unless artifact_root is itself a URI (e.g.
    s3://bucket/path) that every client can reach; a local folder would strand the artifacts
    on whichever machine created the experiment."""
    root_text = str(params["tracking"]["artifact_root"])
    if "://" in root_text:
        return f"{root_text.rstrip('/')}/{pair}"
    if is_server(uri):
        return None
    root = Path(root_text)
    if not root.is_absolute():
        root = Path.cwd() / root
    return (root.resolve() / pair).as_uri()


def _already_exists(exc: BaseException) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def experiment_id(client: Any, params: Mapping[str, Any], pair: str, uri: str) -> str:
    """The pair's experiment, created (with its artifact location) if it is new. On a server,
    two jobs may create it at once: the loser reads the winner's."""
    from mlflow.exceptions import MlflowException

    with _store_lock(uri):
        found = client.get_experiment_by_name(pair)
        if found is not None:
            return str(found.experiment_id)
        try:
            location = artifact_location(params, pair, uri)
            return str(client.create_experiment(pair, artifact_location=location))
        except MlflowException as exc:
            found = client.get_experiment_by_name(pair) if _already_exists(exc) else None
            if found is None:
                raise
            return str(found.experiment_id)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"}; lists kept as their string form."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_PARAM_MAX]
    return flat


def git_commit() -> str:
    """HEAD's commit (with "-dirty" when the tree has changes), or "unknown" outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def code_fingerprint() -> str:
    """sha256 of the medfuse package's source (every .py file, by path and bytes): what ran,
    also where git cannot tell (an installed wheel, uncommitted edits)."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def data_manifest_hash(params: Mapping[str, Any]) -> str:
    """sha256 of the prepared split manifest (which pairs were trained and tested on)."""
    from medfuse.data.prepared import MANIFEST_NAME
    from medfuse.io import sha256_file

    manifest = Path(str(params["data"]["prepare"]["out_dir"])) / MANIFEST_NAME
    return sha256_file(manifest) if manifest.is_file() else "missing"


class Run:
    """An open MLflow run: batched metric/param logging and artifacts."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in values.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH])

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def _reopen(client: Any, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except Exception:  # unknown run id in this store
        return False
    client.update_run(run_id, status="RUNNING")
    return True


@contextlib.contextmanager
def start_run(
    params: Mapping[str, Any],
    *,
    step: str,
    method: str,
    pair: str,
    variant: str = "full",
    run_id: str | None = None,
    log_all_params: bool = True,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Run]:
    """Open (or, with `run_id`, reopen) a run in the pair's experiment, tagged and described.
    Extra `tags` join the job tags, and their values the run name (e.g. an evaluation's
    convention: two evaluations of one folder get two names).

    New runs get every parameter (flattened), the git commit, the code and data manifest hashes.
    The run ends FINISHED, KILLED (interrupted) or FAILED (any other exception).
    """
    uri = init_store(params)
    client = _client(uri)
    doing = f"write runs in experiment {pair!r}"
    job = {"step": step, "method": method, "pair": pair, "variant": variant}
    with mlflow_errors(uri, doing):
        run_id, is_new = _open_run(client, params, uri, job, run_id, dict(tags or {}))
        run = Run(client, run_id)
        if is_new:
            run.set_tags(
                {
                    "git_commit": git_commit(),
                    "code_sha256": code_fingerprint(),
                    "data_manifest_sha256": data_manifest_hash(params),
                }
            )
            if log_all_params:
                run.log_params(flatten(params))
    status = "FINISHED"
    try:
        with mlflow_errors(uri, doing):  # the caller's logging inside the block, too
            yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        with mlflow_errors(uri, doing):
            client.set_terminated(run_id, status=status)


def _open_run(
    client: Any,
    params: Mapping[str, Any],
    uri: str,
    job: Mapping[str, str],
    run_id: str | None,
    extra: Mapping[str, str],
) -> tuple[str, bool]:
    """(run id, whether it is new): `run_id` reopened if the store has it, else a new run in
    the job's pair experiment, tagged with the job (step, method, pair, variant) and `extra`."""
    if run_id is not None and _reopen(client, run_id):
        return run_id, False
    if run_id is not None:
        log.warning("run %s not found in %s; starting a new run", run_id, uri)
    name = "-".join([job["step"], job["method"].replace(":", "-"), job["variant"], *extra.values()])
    created = client.create_run(
        experiment_id(client, params, job["pair"], uri), tags={**job, **extra}, run_name=name
    )
    return created.info.run_id, True


def list_runs(params: Mapping[str, Any]) -> Any:
    """Every run of the project's store (all pair experiments) as a pandas DataFrame with
    run_id, run_name, status, start_time (ms), the job tags (step, method, pair, variant),
    an evaluation's convention and the folder the run wrote or scored (`location`: a fusion's
    out_dir, an evaluation's fused_dir, a training's out_dir), newest first."""
    import pandas as pd

    uri = init_store(params)
    client = _client(uri)
    rows = []
    with mlflow_errors(uri, "list runs"):
        found = [
            run
            for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
        ]
    for run in found:
        tags = run.data.tags
        rows.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "start_time": run.info.start_time,
                **{key: tags.get(key, "") for key in JOB_TAGS},
                "location": tags.get("fused_dir")
                or tags.get("out_dir")
                or run.data.params.get("out_dir", ""),
            }
        )
    frame = pd.DataFrame(rows)
    return frame.sort_values("start_time", ascending=False) if rows else frame


def end_stale_runs(
    params: Mapping[str, Any], pair: str, tags: Mapping[str, str], run_ids: tuple[str, ...] = ()
) -> list[str]:
    """Mark KILLED the runs that a process killed outright left RUNNING (its `finally` never
    ran): those in `pair`'s experiment whose tags include all of `tags`, and those of `run_ids`
    that are still RUNNING; return their ids. The caller vouches that no live process owns them."""
    from mlflow.exceptions import MlflowException

    uri = init_store(params)
    client = _client(uri)
    with mlflow_errors(uri, f"end stale runs in experiment {pair!r}"):
        experiment = client.get_experiment_by_name(pair)
        found = []
        if experiment is not None:
            running = "attributes.status = 'RUNNING'"
            found = list(client.search_runs([experiment.experiment_id], filter_string=running))
        for run_id in run_ids:
            try:
                found.append(client.get_run(run_id))
            except MlflowException as exc:  # not in this store (e.g. the store was replaced)
                if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
        stale = sorted(
            {
                run.info.run_id
                for run in found
                if run.info.status == "RUNNING"
                and (run.info.run_id in run_ids or tags.items() <= run.data.tags.items())
            }
        )
        for run_id in stale:
            client.set_terminated(run_id, status="KILLED")
    return stale
