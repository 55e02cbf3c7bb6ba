"""Where the report's numbers come from: each trained model's MLflow run and what its training
cost, and the runs that fused and scored each job.

A project's tracking store also keeps earlier runs, runs into other folders and ad-hoc commands;
they are counted, not listed. A job's fusion or evaluation run is the newest finished one with
the job's tags that wrote or scored the job's own folder.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medfuse.plan import HISTORY, WEIGHTS, Job, model_folders, weights_meta

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _training_row(model: str, job: Job, folder: Path) -> str:
    meta = weights_meta(folder / WEIGHTS)
    if not meta:
        return f"| {model} | {job.pair} | {job.variant} | not trained | | | | | |"
    history = pd.read_csv(folder / HISTORY) if (folder / HISTORY).is_file() else pd.DataFrame()
    time = _duration(history["epoch_s"].sum()) if "epoch_s" in history else "—"
    step = f"{statistics.median(history['s_per_step']):.2f} s" if "s_per_step" in history else "—"
    return (
        f"| {model} | {job.pair} | {job.variant} | {meta.get('seed', '—')} "
        f"| {meta.get('epochs', '—')} "
        f"| {meta.get('precision', '—')} | {time} | {step} | `{meta.get('run_id', '—')}` |"
    )


def trainings_markdown(params: Mapping[str, Any], results: Path) -> str:
    """One row per trained model: its seed, epochs, precision, time and MLflow run."""
    folders = model_folders(params, results)
    if not folders:
        return "No model is trained in this job list.\n"
    lines = [
        "Training time is the sum of the epochs' wall-clock times in `history.csv` (a resumed "
        "run counts each epoch once); the step time is the median over epochs.",
        "",
        "| model | trained on | variant | seed | epochs | precision | training time "
        "| s per step | MLflow run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_training_row(*folder) for folder in folders]
    return "\n".join(lines) + "\n"


def tracking_runs(params: Mapping[str, Any]) -> pd.DataFrame:
    """Every MLflow run of the project's store with the tags that identify its job."""
    try:
        from medfuse.tracking import list_runs

        return list_runs(params)
    except Exception as exc:  # the report must not fail because the store is unreachable
        log.warning("could not read MLflow runs: %s", exc)
        return pd.DataFrame()


def _same_folder(location: str, folder: Path) -> bool:
    return bool(location) and Path(location).resolve() == folder.resolve()


def _newest_run(runs: pd.DataFrame, job: Job, step: str, convention: str = "") -> str | None:
    """The newest finished `step` run of `job` (and `convention`) in `job`'s own folder."""
    chosen = runs[
        (runs.status == "FINISHED")
        & (runs.step == step)
        & (runs.method == job.method)
        & (runs.pair == job.pair)
        & (runs.variant == job.variant)
        & (runs.convention == convention)
    ]
    for _, run in chosen.sort_values("start_time", ascending=False).iterrows():
        if _same_folder(run.location, job.fused_dir):
            return run.run_id
    return None


def runs_markdown(runs: pd.DataFrame, jobs: list[Job], conventions: list[str]) -> str:
    """Each job's fusion and evaluation runs; the other runs of the store counted."""
    if runs.empty:
        return "No MLflow runs found in the tracking store.\n"
    heads = " | ".join(f"evaluate ({c})" for c in conventions)
    lines = [
        f"| method | pair | variant | fuse | {heads} |",
        "|---|---|---|---|" + "---|" * len(conventions),
    ]
    listed: set[str] = set()
    for job in jobs:
        ids = [_newest_run(runs, job, "fuse")]
        ids += [_newest_run(runs, job, "evaluate", c) for c in conventions]
        listed.update(i for i in ids if i)
        cells = " | ".join(f"`{i}`" if i else "not found" for i in ids)
        lines.append(f"| {job.method} | {job.pair} | {job.variant} | {cells} |")
    others = len(runs[runs.step.isin(["fuse", "evaluate"])]) - len(listed)
    lines += [
        "",
        f"The store holds {others} other fusion and evaluation runs (earlier runs, other "
        "folders, commands run by hand) and every training run; `mlflow ui` lists them all.",
    ]
    return "\n".join(lines) + "\n"
