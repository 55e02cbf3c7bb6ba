"""The job plan: where a unified model and a first stage live, and which jobs train them."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfuse.config import deep_merge
from medfuse.errors import ConfigError, DataError
from medfuse.plan import (
    ALL_PAIRS,
    fusion_jobs,
    job_of_fused_dir,
    stage1_dir,
    stage1_methods,
    training_jobs,
)


def _jobs(params: dict, method: str) -> list:
    return [job for job in fusion_jobs(params) if job.method == method]


def test_a_unified_method_fuses_every_pair_with_one_model(params: dict) -> None:
    jobs = _jobs(params, "dm-fnet")
    assert [job.pair for job in jobs] == params["experiments"]["pairs"]
    assert {job.model_dir for job in jobs} == {Path("results/models/dm-fnet/all/full")}
    trained = [job for job in training_jobs(params) if job.method == "dm-fnet"]
    assert [(job.pair, job.variant) for job in trained] == [(ALL_PAIRS, "full")]


def test_a_per_pair_method_has_a_model_per_pair(params: dict) -> None:
    dirs = [job.model_dir for job in _jobs(params, "mmif-amin")]
    assert dirs == [
        Path(f"results/models/mmif-amin/{p}/full") for p in params["experiments"]["pairs"]
    ]


def test_the_first_stage_is_trained_once_for_the_method(params: dict) -> None:
    assert stage1_methods(params) == ["dm-fnet"]
    assert stage1_dir("dm-fnet") == Path("results/stage1/dm-fnet")


def test_the_per_pair_variant_of_a_unified_method_trains_per_pair(params: dict) -> None:
    ablated = deep_merge(
        params,
        {"experiments": {"ablation_method": "dm-fnet", "ablations": ["per_pair"]}},
    )
    (job,) = [j for j in fusion_jobs(ablated) if j.variant == "per_pair"]
    assert job.model_dir == Path(f"results/models/dm-fnet/{job.pair}/per_pair")


def test_a_unified_method_listed_as_per_pair_is_refused(params: dict) -> None:
    wrong = deep_merge(
        params, {"experiments": {"learned": ["wdualmine", "dm-fnet"], "unified": []}}
    )
    with pytest.raises(ConfigError, match=r"experiments.learned: 'dm-fnet'.*unified"):
        fusion_jobs(wrong)


def test_a_per_pair_method_listed_as_unified_is_refused(params: dict) -> None:
    wrong = deep_merge(params, {"experiments": {"unified": ["dm-fnet", "mmif-amin"]}})
    with pytest.raises(ConfigError, match=r"experiments.unified: 'mmif-amin'"):
        fusion_jobs(wrong)


def test_extra_seeds_retrain_the_seed_methods_only(params: dict) -> None:
    seeded = deep_merge(params, {"experiments": {"extra_seeds": [1]}})
    added = {(j.method, j.pair, j.variant) for j in fusion_jobs(seeded)} - {
        (j.method, j.pair, j.variant) for j in fusion_jobs(params)
    }
    assert added == {("wdualmine", "CT-MRI", "full_seed1")}  # not mmif-amin (hours a seed)
    both = deep_merge(seeded, {"experiments": {"seed_methods": ["wdualmine", "mmif-amin"]}})
    assert ("mmif-amin", "CT-MRI", "full_seed1") in {
        (j.method, j.pair, j.variant) for j in fusion_jobs(both)
    }
    unified = deep_merge(seeded, {"experiments": {"seed_methods": ["dm-fnet"]}})
    with pytest.raises(ConfigError, match=r"experiments.seed_methods: 'dm-fnet'"):
        fusion_jobs(unified)


def test_the_results_folder_is_one_setting_of_every_job(params: dict, tmp_path: Path) -> None:
    jobs = fusion_jobs(params, tmp_path)
    assert all(job.fused_dir.is_relative_to(tmp_path) for job in jobs)
    assert all(job.metrics_stem("paper").is_relative_to(tmp_path) for job in jobs)
    unified = next(job for job in jobs if job.method == "dm-fnet")
    assert unified.model_dir == tmp_path / "models/dm-fnet/all/full"


def test_a_fused_folder_names_its_job_and_metrics() -> None:
    job = job_of_fused_dir(Path("/x/results/fused/dwt/CT-MRI/full"))
    assert (job.method, job.pair, job.variant) == ("dwt", "CT-MRI", "full")
    assert job.metrics_stem("paper") == Path("/x/results/metrics/paper/dwt/CT-MRI/full")
    with pytest.raises(DataError, match="not a results/fused/<method>/<pair>/<variant> folder"):
        job_of_fused_dir(Path("elsewhere/CT-MRI"))


def test_report_reads_the_results_folder_it_is_given(params: dict, tmp_path: Path) -> None:
    from medfuse.report.build import build_report

    with pytest.raises(DataError, match=str(tmp_path / "metrics")):
        build_report(params, results_dir=tmp_path)
