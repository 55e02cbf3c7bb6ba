"""MLflow tracking: one store, one experiment per modality pair, runs tagged by step and method.

Facts this module is built around (measured, see ../shared/spec/stack.md): the default store is
a SQLite file whose absolute URI takes four slashes; two processes creating a fresh database at
once both fail in its schema migration, so creation happens once (`medfuse init-tracking`) and,
as a second guard, under a file lock; an experiment needs an explicit artifact location or
artifacts land in whatever directory created it; batched logging is far faster than one call
per value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from medfuse.errors import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
_SQLITE = "sqlite:///"
_BATCH = 100  # MLflow's limit of params (and tags) per log_batch call
_PARAM_MAX = 6000  # MLflow's limit of characters per param value


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


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def init_store(params: Mapping[str, Any]) -> str:
    """Create (or migrate) the tracking store once; return its URI. Safe to call again."""
    uri = tracking_uri(params)
    with _store_lock(uri):
        try:
            _client(uri).search_experiments(max_results=1)  # forces creation + migration
        except Exception as exc:  # MLflow raises many types here; all mean "store unusable"
            raise ConfigError(f"{uri}: cannot open or create the MLflow store ({exc})") from exc
    return uri


def artifact_location(params: Mapping[str, Any], pair: str) -> str:
    root = Path(str(params["tracking"]["artifact_root"]))
    if not root.is_absolute():
        root = Path.cwd() / root
    return (root.resolve() / pair).as_uri()


def experiment_id(client: Any, params: Mapping[str, Any], pair: str, uri: str) -> str:
    """The pair's experiment, created with an explicit artifact location if it is new."""
    with _store_lock(uri):
        found = client.get_experiment_by_name(pair)
        if found is not None:
            return str(found.experiment_id)
        return str(
            client.create_experiment(pair, artifact_location=artifact_location(params, pair))
        )


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

    New runs get every parameter (flattened), the git commit and the data manifest hash.
    The run ends FINISHED, KILLED (interrupted) or FAILED (any other exception).
    """
    uri = init_store(params)
    client = _client(uri)
    if run_id is not None and not _reopen(client, run_id):
        log.warning("run %s not found in %s; starting a new run", run_id, uri)
        run_id = None
    is_new = run_id is None
    if is_new:
        extra = dict(tags or {})
        name = "-".join([step, method.replace(":", "-"), variant, *extra.values()])
        created = client.create_run(
            experiment_id(client, params, pair, uri),
            tags={"step": step, "method": method, "pair": pair, "variant": variant, **extra},
            run_name=name,
        )
        run_id = created.info.run_id
    run = Run(client, run_id)
    if is_new:
        run.set_tags(
            {"git_commit": git_commit(), "data_manifest_sha256": data_manifest_hash(params)}
        )
        if log_all_params:
            run.log_params(flatten(params))
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        client.set_terminated(run_id, status=status)


def list_runs(params: Mapping[str, Any]) -> Any:
    """Every run of the project's store (all pair experiments) as a pandas DataFrame with
    run_id, run_name, status and the job tags (step, method, pair, variant), newest first."""
    import pandas as pd

    client = _client(init_store(params))
    rows = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], order_by=["start_time DESC"]):
            tags = run.data.tags
            rows.append(
                {
                    "run_id": run.info.run_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    **{key: tags.get(key, "") for key in ("step", "method", "pair", "variant")},
                }
            )
    return pd.DataFrame(rows)
