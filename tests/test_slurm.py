"""The `slurm` profile against a real one-node SLURM cluster started by the test (Debian
slurm-wlm + munge; tests/services.py).

Snakemake polls job status with `squeue` (the cluster has no slurmdbd, so `sacct` could never
report a job finished and Snakemake would wait forever). The quick workflow, cut to one pair
(tests/services.py REDUCED_DAG), runs through `snakemake --profile workflow/profiles/slurm` with
the quick settings and must give the same tables as the same DAG run locally; a request the
cluster cannot satisfy must fail in seconds with the rule named.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.services import (
    SlurmCluster,
    reduced_workflow_env,
    result_tables,
    run_tool,
    start_slurm,
    tool_env,
)
from tests.workspace import DataSource, copy_repo

pytestmark = pytest.mark.services

# The plugin's default poll waits 40 s before the first check; 1 s keeps the test short (it
# needs MinJobAge >= 3 s, or the plugin falls back to sacct).
SLURM_RUN = [
    "snakemake",
    "--profile",
    "workflow/profiles/slurm",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
]
TRAIN_MEM_MB = 6000  # the slurm profile's request for a W-DUALMINE training
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with start_slurm(tmp_path_factory.mktemp("slurm")) as started:
        yield started


def _submitted_jobs(output: str) -> dict[str, list[str]]:
    """Rule -> the SLURM job ids Snakemake submitted for it."""
    jobs: dict[str, list[str]] = {}
    for job_id, rule in SUBMITTED.findall(output):
        jobs.setdefault(rule, []).append(job_id)
    return jobs


def _slurm_job(job_id: str) -> str:
    """`scontrol show job` (a finished job stays listed for MinJobAge = 300 s)."""
    return subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True
    ).stdout


def test_quick_workflow_on_slurm_gives_the_local_runs_tables(
    cluster: SlurmCluster,
    tmp_path_factory: pytest.TempPathFactory,
    repo_root: Path,
    data_source: DataSource,
):
    if cluster.memory_mb < TRAIN_MEM_MB:
        pytest.skip(f"the test node has {cluster.memory_mb} MB; a training asks {TRAIN_MEM_MB}")
    on_slurm = copy_repo(repo_root, tmp_path_factory.mktemp("on-slurm"))
    local = copy_repo(repo_root, tmp_path_factory.mktemp("local"))
    # The local reference runs meanwhile: the SLURM run spends most of its time between polls.
    with open(local / "local-run.log", "w") as log:
        reference = subprocess.Popen(
            ["snakemake", "--profile", "workflow/profiles/quick", "all"],
            cwd=local,
            env=reduced_workflow_env(local, data_source),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            env = reduced_workflow_env(on_slurm, data_source)
            out, _ = run_tool([*SLURM_RUN, "all", "--config", "profile=quick"], on_slurm, env)
        finally:
            code = reference.wait(600)
    assert code == 0, (local / "local-run.log").read_text()[-4000:]

    jobs = _submitted_jobs(out)
    rules = {"download", "prepare", "init_tracking", "train", "fuse", "evaluate", "report"}
    assert set(jobs) == rules, jobs
    train = _slurm_job(jobs["train"][0])  # the profile's request for a W-DUALMINE training
    assert "JobState=COMPLETED" in train and f"cpu=2,mem={TRAIN_MEM_MB}M" in train, train
    assert "gres/gpu" not in train, train

    slurm_tables, local_tables = result_tables(on_slurm), result_tables(local)
    assert "table1.csv" in slurm_tables and slurm_tables.keys() == local_tables.keys()
    for name, table in slurm_tables.items():
        assert table.equals(local_tables[name]), name


def test_a_request_the_cluster_cannot_satisfy_fails_at_once_naming_the_rule(
    cluster: SlurmCluster, tmp_path: Path, repo_root: Path
):
    """A retrained peer at the paper profile asks for a GPU and 24 GB: this node has neither.
    Only that training is planned (its inputs are stubs), so the failure is the request's."""
    repo = copy_repo(repo_root, tmp_path / "repo")
    overlay = repo / "peer.yaml"
    overlay.write_text(
        yaml.safe_dump({"experiments": {"pairs": ["CT-MRI"], "retrained_peers": ["asfe-fusion"]}})
    )
    for stub in ("data/raw/aanlib/x", "data/prepared/manifest.csv", "results/tracking/store.json"):
        (repo / stub).parent.mkdir(parents=True, exist_ok=True)
        (repo / stub).write_text("stub\n")
    env = tool_env(MEDFUSE_PARAMS_OVERLAY=str(overlay))
    target = "results/models/asfe-fusion/CT-MRI/full/model.pt"

    start = time.monotonic()
    result = subprocess.run(
        [*SLURM_RUN, target], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - start
    out = result.stdout + result.stderr
    print(f"unsatisfiable request failed in {elapsed:.1f} s")
    assert result.returncode != 0, out[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "Error in rule train" in out and "SLURM sbatch failed" in out, out[-3000:]
    assert "--gpus=1" in out and "--mem 24000" in out, out[-3000:]
    queued = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    assert not queued.strip(), f"jobs left in the queue:\n{queued}"
