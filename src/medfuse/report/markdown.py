"""The text of results/report.md: what was reproduced, what differs and by how much."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medfuse.report import tables
from medfuse.tracking import git_commit

log = logging.getLogger(__name__)


def _agreement_summary(comparisons: Mapping[str, pd.DataFrame]) -> list[str]:
    """How many of our means fall within the paper's ± std, per compared method, from the
    comparison tables (1-3) as the report wrote them."""
    lines = []
    spec = tables.paper_values()
    for key, frame in comparisons.items():
        table = spec["tables"][key]
        for _, row in frame.iterrows():
            flags = [row.get(f"within_paper_std_{m}") for m in spec["metric_columns"]]
            known = [f for f in flags if f is not None]
            if known:
                lines.append(
                    f"- {table['pair']}, {row['method']} vs the paper's "
                    f"{row['paper_row']}: {sum(known)} of {len(known)} metrics within "
                    f"the paper's ± std."
                )
    return lines


def _distance_from_average(per_pair: pd.DataFrame, pairs: list[str]) -> list[str]:
    """The paper's model is a bounded residual over the average: measure how far it moved."""
    lines = []
    for pair in pairs:
        chosen = per_pair[(per_pair.pair == pair) & (per_pair.variant == "full")]
        ours = chosen[chosen.method == tables.REFERENCE_METHOD].set_index("name")
        avg = chosen[chosen.method == "average"].set_index("name")
        if ours.empty or avg.empty:
            continue
        parts = []
        for metric in ("EN", "MI", "CC", "PSNR_paper"):
            if metric in ours and metric in avg:
                diff = (ours[metric] - avg[metric]).dropna()
                parts.append(f"{metric} {diff.mean():+.4f} (max |Δ| {diff.abs().max():.4f})")
        lines.append(
            f"- {pair}: W-DUALMINE minus average fusion, mean over test pairs: " + ", ".join(parts)
        )
    return lines


def _fmi_note(per_pair: pd.DataFrame) -> str:
    """The authors' published images against the paper's FMI column, for each published peer."""
    spec = tables.paper_values()
    paper = spec["tables"]["table1"]["values"]
    parts = []
    for method, row in spec["paper_row"].items():
        published = per_pair[(per_pair.method == method) & (per_pair.pair == "CT-MRI")]
        if not method.startswith("published-") or published.empty or "FMI_dct" not in published:
            continue
        mean, std = published["FMI_dct"].mean(), published["FMI_dct"].std(ddof=0)
        p_mean, p_std = paper[row]["FMI"]
        parts.append(f"{row} {mean:.4f} ± {std:.4f} (paper {p_mean:.4f} ± {p_std:.4f})")
    if not parts:
        return ""
    return (
        "On the authors' published CT-MRI images, FMI_dct computed as their toolbox does gives "
        + "; ".join(parts)
        + ". No FMI variant reproduces the paper's FMI column from those images "
        "(docs/metrics.md), so FMI comparisons with the paper are indicative only."
    )


def render_report(
    params: Mapping[str, Any],
    per_pair: pd.DataFrame,
    markdown: Mapping[str, str],
    comparisons: Mapping[str, pd.DataFrame],
    other_conventions: Mapping[str, Mapping[str, str]],
    figure_files: list[Path],
    out: Path,
) -> str:
    pairs = params["experiments"]["pairs"]
    counts = per_pair[per_pair.variant == "full"].groupby("pair")["name"].nunique()
    profile = params["profile"]
    sections = [
        "# W-DUALMINE reproduction report",
        "",
        f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from commit "
        f"`{git_commit()}` with profile **{profile}**.",
        "",
    ]
    if profile != "paper":
        sections += [
            f"> **Profile `{profile}`:** sizes, pair counts and epochs are reduced so the whole "
            "workflow runs in minutes. These numbers check the pipeline, not the paper: "
            "run the `paper` profile to compare with the paper.",
            "",
        ]
    sections += [
        "## What was run",
        "",
        "- Test pairs per modality pair: "
        + ", ".join(f"{p} {int(counts.get(p, 0))}" for p in pairs),
        f"- Methods: {', '.join(dict.fromkeys(per_pair.method))}",
        f"- Metric convention of the tables: `{params['evaluate']['convention']}` "
        "(docs/metrics.md): EN/MI/CC on MATLAB-style grey, PSNR as the paper computes it "
        "(`PSNR_paper`), FMI compared as `FMI_dct`.",
        f"- Standard deviations over test pairs with ddof = {params['report']['std_ddof']}.",
        "",
        markdown.get("claims"),  # what a reader wants first: a verdict on each claim
        "## Agreement with the paper",
        "",
        *_agreement_summary(comparisons),
        "",
        "### How far W-DUALMINE moves from plain averaging",
        "",
        *(_distance_from_average(per_pair, pairs) or ["- (average fusion not run)"]),
        "",
        "Paired Wilcoxon tests below say whether a difference from W-DUALMINE is beyond "
        "pair-to-pair noise (p < 0.05) and how large it is (rank-biserial r).",
        "",
        _fmi_note(per_pair),
        "",
        markdown.get("releases"),
        "## Tables 1-3: comparison with the paper",
        "",
        *[markdown[k] for k in ("table1", "table2", "table3", "seeds") if k in markdown],
        "## Tables 4-5: ablations",
        "",
        *[markdown[k] for k in ("table4", "table5") if k in markdown],
        "## Paired statistics",
        "",
        *[markdown[f"stats_{p}"] for p in pairs if f"stats_{p}" in markdown],
        "## Every metric",
        "",
        *[markdown[f"all_{p}"] for p in pairs if f"all_{p}" in markdown],
    ]
    for convention, per_pair_md in other_conventions.items():
        sections += [f"## Every metric, `{convention}` convention", "", *per_pair_md.values()]
    sections += ["## Figures", ""]
    sections += [f"![{f.stem}]({f.relative_to(out).as_posix()})\n" for f in figure_files]
    sections += [
        "## Trainings and MLflow runs",
        "",
        markdown.get("trainings"),
        markdown.get("runs"),
    ]
    return "\n".join(s for s in sections if s is not None) + "\n"


__all__ = ["render_report"]
