"""Report pieces on synthetic per-pair scores: statistics, tables against the paper, figures."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from medfuse.report import figures, tables
from medfuse.report.markdown import _agreement_summary
from medfuse.report.stats import paired_test, rank_biserial


def test_rank_biserial_extremes_and_balance():
    assert rank_biserial(np.array([1.0, 2.0, 3.0])) == 1.0
    assert rank_biserial(np.array([-1.0, -2.0])) == -1.0
    # ranks 1..4 of |d|: positives get 1 and 4, negatives 2 and 3 -> (5 - 5) / 10 = 0
    assert rank_biserial(np.array([1.0, -2.0, -3.0, 4.0])) == 0.0
    assert rank_biserial(np.zeros(5)) == 0.0


def test_paired_test_matches_scipy_and_detects_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=24)
    ours = ref + 0.5 + rng.normal(scale=0.1, size=24)
    result = paired_test(ours, ref)
    assert result["p_value"] == pytest.approx(sps.wilcoxon(ours - ref).pvalue)
    assert result["p_value"] < 1e-4 and result["effect_size"] == 1.0 and result["n"] == 24
    assert np.isnan(paired_test(ref, ref)["p_value"])  # identical: no test, not p = 1


def _per_pair(method: str, pair: str, variant: str, en: float, n: int = 24) -> pd.DataFrame:
    rng = np.random.default_rng(zlib.crc32(f"{method}/{variant}".encode()))
    values = en + rng.normal(scale=0.01, size=n)
    return pd.DataFrame(
        {
            "method": method,
            "pair": pair,
            "variant": variant,
            "name": [f"{i:03d}" for i in range(n)],
            "EN": values,
            "MI": 3.6,
            "CC": 0.83,
            "PSNR_paper": 64.0,
            "FMI_dct": 0.42,
            "SD": 40.0,
        }
    )


def test_comparison_table_sets_ours_beside_the_paper():
    spec = tables.paper_values()["tables"]["table1"]
    per_pair = pd.concat(
        [
            _per_pair("wdualmine", "CT-MRI", "full", 4.3394),  # the paper's W-DUALMINE EN
            _per_pair("average", "CT-MRI", "full", 4.18),
        ]
    )
    frame = tables.comparison_table(per_pair, spec, ["wdualmine", "average"])
    ours = frame.set_index("method")
    assert ours.loc["wdualmine", "paper_EN_mean"] == 4.3394
    assert abs(ours.loc["wdualmine", "delta_EN"]) < 0.01
    assert ours.loc["wdualmine", "within_paper_std_EN"]
    assert np.isnan(ours.loc["average", "paper_EN_mean"])  # the paper has no such row
    assert ours.loc["wdualmine", "SD_mean"] == pytest.approx(40.0)  # extra metrics kept
    # our PSNR_paper column is never confused with the paper's PSNR value
    assert ours.loc["average", "PSNR_paper_mean"] == pytest.approx(64.0)
    assert ours.loc["wdualmine", "paper_PSNR_mean"] == 64.0891
    md = tables.comparison_markdown(frame, spec["title"])
    assert "4.3394 ± 0.2502" in md and "| average |" in md


def test_agreement_summary_counts_the_written_tables_flags():
    spec = tables.paper_values()
    per_pair = _per_pair("wdualmine", "CT-MRI", "full", 4.3394)
    frame = tables.comparison_table(per_pair, spec["tables"]["table1"], ["wdualmine"], ddof=0)
    flags = [frame.loc[0, f"within_paper_std_{m}"] for m in spec["metric_columns"]]
    known = [f for f in flags if f is not None]
    (line,) = _agreement_summary({"table1": frame})
    assert line.startswith("- CT-MRI, wdualmine vs the paper's W-DUALMINE:")
    assert f"{sum(known)} of {len(known)} metrics within" in line
    assert frame.loc[0, "within_paper_std_EN"]  # the EN mean was set to the paper's


def test_ablation_table_and_stats_use_the_reference_method():
    spec = tables.paper_values()["tables"]["table4"]
    per_pair = pd.concat(
        [
            _per_pair("wdualmine", "CT-MRI", v, 4.3 + i / 10)
            for i, v in enumerate(["full", "no_gce", "no_we", "no_sgm"])
        ]
        + [_per_pair("max", "CT-MRI", "full", 6.0)]
    )
    frame = tables.ablation_table(per_pair, spec, list(spec["variants"]))
    assert list(frame.variant) == ["no_gce", "no_we", "no_sgm", "full"]
    assert frame.set_index("variant").loc["full", "paper_EN"] == 4.3397
    stats = tables.paired_statistics(per_pair, "CT-MRI", ["EN"])
    assert list(stats.method) == ["max"] and stats.iloc[0]["effect_size"] == 1.0


def test_region_of_interest_finds_the_textured_window():
    image = np.zeros((64, 64))
    image[40:56, 8:24] = np.indices((16, 16)).sum(0) % 2 * 255  # a checkerboard patch
    y, x = figures.region_of_interest(image, 16)
    assert abs(y - 40) <= 2 and abs(x - 8) <= 2


def test_figures_are_saved_as_png_and_pdf(tmp_path):
    per_pair = pd.concat(
        [_per_pair(m, "CT-MRI", "full", e, n=5) for m, e in [("wdualmine", 4.3), ("average", 4.2)]]
    )
    written = figures.save_figure(figures.radar(per_pair, ["EN", "MI"], "r"), tmp_path / "radar")
    written += figures.save_figure(
        figures.per_pair_curves(per_pair, ["EN"], "c"), tmp_path / "curves"
    )
    rng = np.random.default_rng(0)
    row = {
        "CT": rng.integers(0, 255, (32, 32)),
        "MRI": rng.integers(0, 255, (32, 32)),
        "x": rng.integers(0, 255, (32, 32, 3)),
    }
    grid = figures.qualitative_grid([row, row], ["CT", "MRI", "x"], "g", 0.25)
    written += figures.save_figure(grid, tmp_path / "grid")
    assert sorted(p.name for p in written) == sorted(
        f"{s}.{e}" for s in ("radar", "curves", "grid") for e in ("png", "pdf")
    )
    assert all(p.stat().st_size > 1000 for p in written)
    assert figures.normalised_means(per_pair, ["EN"]).loc["wdualmine", "EN"] == 1.0


def test_comparison_table_reads_the_full_model_only():
    spec = tables.paper_values()["tables"]["table1"]
    per_pair = pd.concat(
        [
            _per_pair("wdualmine", "CT-MRI", "full", 4.3),
            _per_pair("wdualmine", "CT-MRI", "no_gce", 9.0),  # an ablation of the same pair
            _per_pair("wdualmine", "CT-MRI", "full_seed1", 7.0),  # another seed
        ]
    )
    frame = tables.comparison_table(per_pair, spec, ["wdualmine"]).set_index("method")
    assert abs(frame.loc["wdualmine", "EN_mean"] - 4.3) < 0.01


def test_seed_spread_averages_over_seeds_beside_the_spread_over_pairs():
    per_pair = pd.concat(
        [
            _per_pair("wdualmine", "CT-MRI", "full", 4.0),
            _per_pair("wdualmine", "CT-MRI", "full_seed1", 4.2),
            _per_pair("wdualmine", "CT-MRI", "full_seed2", 4.4),
            _per_pair("wdualmine", "CT-MRI", "no_gce", 9.0),  # not a seed of the full model
            _per_pair("wdualmine", "PET-MRI", "full", 5.0),  # one seed: no spread to show
            _per_pair("average", "CT-MRI", "full", 4.1),
        ]
    )
    frame = tables.seed_spread_table(per_pair)
    assert frame[["method", "pair", "seeds"]].values.tolist() == [["wdualmine", "CT-MRI", 3]]
    row = frame.iloc[0]
    ours = per_pair[(per_pair.method == "wdualmine") & (per_pair.pair == "CT-MRI")]
    per_seed = [ours[ours.variant == v].EN.mean() for v in ("full", "full_seed1", "full_seed2")]
    assert row["EN_mean"] == pytest.approx(np.mean(per_seed))
    assert row["EN_std_over_seeds"] == pytest.approx(np.std(per_seed, ddof=1))
    assert row["EN_std_over_pairs"] == pytest.approx(ours[ours.variant == "full"].EN.std(ddof=0))
    markdown = tables.seed_spread_markdown(frame)
    assert "| wdualmine | CT-MRI | 3 |" in markdown and "Seed spread" in markdown


def test_fmi_note_sets_each_published_peer_beside_the_paper():
    from medfuse.report.markdown import _fmi_note

    per_pair = pd.concat(
        [
            _per_pair("published-asfe-fusion", "CT-MRI", "full", 5.4),
            _per_pair("published-adafuse", "CT-MRI", "full", 5.0),
        ]
    )
    note = _fmi_note(per_pair)
    assert "ASFE-Fusion 0.4200 ± 0.0000 (paper 0.4066 ± 0.0180)" in note
    assert "AdaFuse 0.4200 ± 0.0000 (paper 0.4343 ± 0.0170)" in note
    assert _fmi_note(_per_pair("wdualmine", "CT-MRI", "full", 4.3)) == ""


def test_the_report_summarises_test_pairs_as_the_evaluation_files_do() -> None:
    """One mean ± std (issue 15, item 12): the report's cells are the evaluation summary's,
    the same ddof, and an undefined pair score is n/a in both rather than skipped by one."""
    from medfuse.metrics.evaluate import summarise

    per_pair = pd.DataFrame(
        {"name": ["1", "2", "3"], "EN": [5.0, 6.0, 7.0], "MI": [1.0, np.nan, 2.0]}
    )
    evaluation = summarise(per_pair, ddof=1)
    report = tables._ours(per_pair, ["EN", "MI"], ddof=1)
    assert report["EN"] == tuple(evaluation.loc["EN"]) == (6.0, 1.0)
    assert np.isnan(report["MI"][0]) and np.isnan(evaluation.loc["MI", "mean"])
