"""The quick profile end to end, with both workflow tools, in a fresh copy of the repository.

Each tool runs the whole DAG (download from the mirror, prepare, train, fuse, evaluate, report),
then runs again and must do nothing. DVC must then rerun only what a params edit touches. Without
the mirror in ../shared (or with MEDFUSE_TEST_NO_MIRROR=1) the data are phantom pairs served over
HTTP (tests/phantoms.py), so the whole workflow runs on any machine.
Slow (minutes): deselect with `-m "not workflow"` while iterating.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.workspace import BackgroundRun, DataSource, copy_repo, mirror_env, set_param

pytestmark = pytest.mark.workflow


def _run(cmd: list[str], repo: Path, env: dict[str, str]) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    print(f"{' '.join(cmd)}: {elapsed:.1f} s")
    return result.stdout + result.stderr, elapsed


def _assert_outputs(repo: Path) -> None:
    report = (repo / "results/report.md").read_text()
    assert "W-DUALMINE reproduction report" in report and "Profile `quick`" in report
    # The runs behind the numbers: each training's, each job's own fusion and evaluations.
    # model, trained on, variant, seed, epochs, precision, time, step, run
    trained = (
        r"\| wdualmine \| CT-MRI \| full \| \d+ \| \d+ \| \w+ \|[^|]+\|[^|]+\| `[0-9a-f]{32}` \|"
    )
    assert re.search(trained, report), report[report.index("## Trainings") :]
    assert re.search(r"\| dm-fnet \(first stage\) \| all \| full \| \d+ \|", report)
    assert "not trained" not in report and "not found" not in report
    for n in range(1, 6):
        assert (repo / f"results/tables/table{n}.csv").is_file()
        assert (repo / f"results/tables/table{n}.md").is_file()
    for n in (1, 2, 3):
        table = (repo / f"results/tables/table{n}.md").read_text()
        for method in ("published-adafuse", "published-asfe-fusion", "mmif-amin", "dm-fnet"):
            assert f"| {method} |" in table, (n, method)
        assert "| pretrained-mmif-amin |" in table, n
    assert "## Released weights and this dataset's split" in report
    for stem in ("fig3_CT-MRI", "fig4_PET-MRI", "fig5_SPECT-MRI", "fig6_curves", "fig6_radar"):
        for ext in ("png", "pdf"):
            assert (repo / f"results/figures/{stem}.{ext}").stat().st_size > 1000


def _assert_snapshot(repo: Path, env: dict[str, str], made_by_dvc: bool) -> None:
    """`medfuse snapshot` of the run copies every evaluation summary and model description,
    no weights or PDFs, keeps the folder's README, and takes dvc.lock only from a DVC run."""
    _run(["medfuse", "snapshot", "--profile", "quick", "--out", "docs/reference"], repo, env)
    results, out = repo / "results", repo / "docs/reference"

    def files(root: Path, pattern: str) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.glob(pattern)}

    for pattern in ("metrics/**/*.json", "models/**/model.json", "stage1/**/history.csv"):
        assert files(results, pattern) and files(out, pattern) == files(results, pattern)
    assert len(files(out, "metrics/**/*.json")) == 76  # 38 fusions x 2 conventions
    assert (out / "report.md").read_bytes() == (results / "report.md").read_bytes()
    assert not files(out, "**/*.pt") and not files(out, "**/*.pdf")
    assert (out / "README.md").read_bytes() == subprocess.run(
        ["git", "show", "HEAD:docs/reference/README.md"], cwd=repo, capture_output=True
    ).stdout
    assert (out / "dvc.lock").is_file() == made_by_dvc


@pytest.fixture(scope="module")
def quick_repo(tmp_path_factory, repo_root) -> Path:
    return copy_repo(repo_root, tmp_path_factory.mktemp("snakemake"))


def test_snakemake_quick_profile_end_to_end(
    quick_repo: Path, data_source: DataSource, dvc_run: BackgroundRun
):
    # dvc_run: DVC's whole run, started with the session, goes on alongside (next test).
    env = mirror_env(quick_repo, data_source)
    _run(["snakemake", "--profile", "workflow/profiles/quick", "all"], quick_repo, env)
    _assert_outputs(quick_repo)
    out, _ = _run(["snakemake", "--profile", "workflow/profiles/quick", "all"], quick_repo, env)
    assert "Nothing to be done" in out
    _assert_snapshot(quick_repo, env, made_by_dvc=False)

    # A second-stage setting of DM-FNet retrains its head, never its first stage.
    params = (quick_repo / "params.yaml").read_text()
    set_param(quick_repo, ["methods", "dm-fnet", "loss", "gradient"], 2.0)
    try:
        out, _ = _run(
            ["snakemake", "--profile", "workflow/profiles/quick", "-n", "all"], quick_repo, env
        )
    finally:
        (quick_repo / "params.yaml").write_text(params)
    planned = set(re.findall(r"^(?:local)?rule (\w+):$", out, re.M))
    assert "train" in planned and "train_stage1" not in planned, planned
    assert "output: results/models/dm-fnet/all/full/model.pt" in out
    assert out.count("output: results/models/") == 1

    # Snakemake removes a forced job's output before it runs it; the training gives the weights
    # back from its checkpoint (beside the model folder), byte for byte.
    weights = "results/models/wdualmine/CT-MRI/full/model.pt"
    before = (quick_repo / weights).read_bytes()
    _run(["snakemake", "--profile", "workflow/profiles/quick", "-f", weights], quick_repo, env)
    log = (quick_repo / "logs/train/wdualmine/CT-MRI/full.log").read_text()
    assert "resuming from epoch" in log and (quick_repo / weights).read_bytes() == before


def test_dvc_quick_profile_end_to_end_and_selective_rerun(dvc_run: BackgroundRun):
    repo, env = dvc_run.repo, dvc_run.env
    dvc_run.wait()
    _assert_outputs(repo)
    out, _ = _run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in out
    _assert_snapshot(repo, env, made_by_dvc=True)

    # Before it reruns a stage DVC removes its outs; the training continues from its checkpoint
    # (beside the model folder) and gives back the same bytes, so nothing downstream changes.
    stage = "train@wdualmine-CT-MRI-full"
    out, _ = _run(["dvc", "repro", "--force", "--no-run-cache", "-s", stage], repo, env)
    assert "resuming from epoch" in out, out[-3000:]
    assert json.loads(_run(["dvc", "status", "--json"], repo, env)[0].strip() or "{}") == {}
    metrics, _ = _run(["dvc", "metrics", "show"], repo, env)
    assert "results/metrics/paper/wdualmine/CT-MRI/full.json" in metrics
    plots, _ = _run(["dvc", "plots", "show", "-o", str(repo / "dvc_plots")], repo, env)
    assert "failed" not in plots.lower()
    assert (repo / "dvc_plots" / "index.html").is_file()

    set_param(repo, ["methods", "wdualmine", "loss", "mi"], 0.2)
    status = json.loads(_run(["dvc", "status", "--json"], repo, env)[0].strip() or "{}")
    trained = sorted(s for s in status if s.startswith("train"))
    assert trained and all("@wdualmine-" in s for s in trained), trained
    assert len(trained) == 3 + 8  # full on three pairs + eight ablations on CT-MRI

    # A second-stage setting of DM-FNet retrains its head, never its first stage.
    set_param(repo, ["methods", "wdualmine", "loss", "mi"], 0.1)
    set_param(repo, ["methods", "dm-fnet", "loss", "gradient"], 2.0)
    status = json.loads(_run(["dvc", "status", "--json"], repo, env)[0].strip() or "{}")
    trained = sorted(s for s in status if s.startswith("train"))
    assert trained == ["train_unified@dm-fnet-full"], trained


def test_mlflow_ui_lists_the_workflow_runs(quick_repo: Path):
    from mlflow.tracking import MlflowClient

    from tests.mlflow_ui import CHROMIUM, runs_listed_in_ui

    if not CHROMIUM.is_file():
        pytest.skip("Debian chromium not installed")
    store = f"sqlite:///{quick_repo / 'mlflow.db'}"
    if not (quick_repo / "mlflow.db").is_file():
        pytest.skip("the Snakemake quick run did not produce a tracking store")
    client = MlflowClient(store)
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    runs = [r for e in experiments for r in client.search_runs([e.experiment_id])]
    steps = {r.data.tags.get("step") for r in runs}
    assert {"train", "fuse", "evaluate"} <= steps, steps
    train_names = sorted({r.info.run_name for r in runs if r.data.tags.get("step") == "train"})
    shot = quick_repo / "results" / "mlflow-ui.png"
    seen = runs_listed_in_ui(
        store, [e.experiment_id for e in experiments], train_names, shot, quick_repo
    )
    assert seen == set(train_names), (sorted(seen), train_names)
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, Path(__file__).resolve().parents[1] / "results" / "mlflow-ui.png")
