"""The report's last section names the runs behind its numbers: each trained model's MLflow run
and cost, and each job's own fusion and evaluation runs out of everything the store keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medfuse.config import load_params
from medfuse.errors import DataError
from medfuse.plan import Job
from medfuse.report.provenance import runs_markdown, trainings_markdown
from tests.settings import ONE_PAIR_EXPERIMENTS, REPO


def test_each_trained_model_gets_its_run_time_and_step(tmp_path: Path) -> None:
    overlay = tmp_path / "one_pair.yaml"
    overlay.write_text(
        yaml.safe_dump({"experiments": {**ONE_PAIR_EXPERIMENTS, "extra_seeds": [7]}})
    )
    params = load_params(REPO / "params.yaml", [overlay], "quick")
    model = tmp_path / "results/models/wdualmine/CT-MRI/full"
    model.mkdir(parents=True)
    meta = {"seed": 3407, "epochs": 3, "precision": "float32", "run_id": "abc123"}
    (model / "model.json").write_text(json.dumps(meta))
    history = {"epoch": [1, 2, 3], "s_per_step": [4.0, 2.0, 3.0], "epoch_s": [3000, 2400, 3600]}
    pd.DataFrame(history).to_csv(model / "history.csv", index=False)

    text = trainings_markdown(params, tmp_path / "results")
    assert (
        "| wdualmine | CT-MRI | full | 3407 | 3 | float32 | 2 h 30 min | 3.00 s | `abc123` |"
        in text
    )
    assert "| wdualmine | CT-MRI | full_seed7 | not trained |" in text

    # A damaged model.json is one line naming it (the reader fusion and training use too).
    (model / "model.json").write_text('{"seed": 34')
    with pytest.raises(DataError, match=r"CT-MRI/full/model\.json: invalid JSON"):
        trainings_markdown(params, tmp_path / "results")


def _run(run_id: str, step: str, location: str, start: int, **tags: str) -> dict:
    job = {"method": "wdualmine", "pair": "CT-MRI", "variant": "full", "convention": ""}
    return {"run_id": run_id, "step": step, "status": tags.pop("status", "FINISHED"),
            "start_time": start, "location": location, **job, **tags}  # fmt: skip


def test_a_jobs_runs_are_its_newest_finished_ones_in_its_own_folder(tmp_path: Path) -> None:
    job = Job("wdualmine", "CT-MRI", "full", root=tmp_path / "results")
    own, study = str(job.fused_dir), str(tmp_path / "study/fused")
    runs = pd.DataFrame(
        [
            _run("old-fuse", "fuse", own, 1),
            _run("fuse", "fuse", own, 2),
            _run("study-fuse", "fuse", study, 3),  # newer, but another folder
            _run("failed-fuse", "fuse", own, 4, status="FAILED"),
            _run("paper", "evaluate", own, 5, convention="paper"),
            _run("train", "train", str(tmp_path / "results/models"), 0),
        ]
    )
    text = runs_markdown(runs, [job], ["paper", "standard"])
    assert "| wdualmine | CT-MRI | full | `fuse` | `paper` | not found |" in text
    assert "holds 3 other fusion and evaluation runs" in text
    assert runs_markdown(pd.DataFrame(), [job], ["paper"]).startswith("No MLflow runs")
