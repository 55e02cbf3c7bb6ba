"""The paper's Tables 1-5 rebuilt from our per-pair metrics, beside the paper's own values.

Input everywhere is one tidy frame of per-test-pair scores: columns `method, pair, variant, name`
plus one column per metric. Each table is written as CSV (numbers) and Markdown (formatted).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medfuse.config import split_seed
from medfuse.io import write_text_atomic
from medfuse.metrics.evaluate import mean_std
from medfuse.report.stats import paired_test

KEYS = ["method", "pair", "variant", "name"]
REFERENCE_METHOD = "wdualmine"


@cache
def paper_values() -> dict[str, Any]:
    text = resources.files("medfuse.report").joinpath("paper_values.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def metric_columns(per_pair: pd.DataFrame) -> list[str]:
    return [c for c in per_pair.columns if c not in KEYS]


def _fmt(mean: float, std: float | None = None, digits: int = 4) -> str:
    if not np.isfinite(mean):
        return "inf" if mean == np.inf else "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _ours(rows: pd.DataFrame, metrics: list[str], ddof: int) -> dict[str, tuple[float, float]]:
    return {m: mean_std(rows[m], ddof) for m in metrics if m in rows}


def comparison_table(
    per_pair: pd.DataFrame, table: Mapping[str, Any], methods: list[str], ddof: int = 0
) -> pd.DataFrame:
    """Tables 1-3: each method's mean ± std, the paper's value, the delta, and agreement."""
    spec = paper_values()
    columns = spec["metric_columns"]
    rows = []
    full = per_pair[(per_pair.variant == "full") & (per_pair.pair == table["pair"])]
    for method in methods:
        subset = full[full.method == method]  # not the ablations or the other seeds
        if subset.empty:
            continue
        ours = _ours(subset, metric_columns(per_pair), ddof)
        paper = table["values"].get(spec["paper_row"].get(method, ""), {})
        row: dict[str, Any] = {"method": method, "paper_row": spec["paper_row"].get(method, "")}
        for paper_metric, ours_metric in columns.items():
            mean, std = ours.get(ours_metric, (np.nan, np.nan))
            p_mean, p_std = paper.get(paper_metric, (np.nan, np.nan))
            row |= {
                f"{ours_metric}_mean": mean,
                f"{ours_metric}_std": std,
                f"paper_{paper_metric}_mean": p_mean,
                f"paper_{paper_metric}_std": p_std,
                f"delta_{paper_metric}": mean - p_mean,
                f"within_paper_std_{paper_metric}": bool(abs(mean - p_mean) <= p_std)
                if np.isfinite(p_mean) and np.isfinite(mean)
                else None,
            }
        for extra in sorted(set(ours) - set(columns.values())):
            row |= {f"{extra}_mean": ours[extra][0], f"{extra}_std": ours[extra][1]}
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_table(
    per_pair: pd.DataFrame, table: Mapping[str, Any], variants: list[str], ddof: int = 0
) -> pd.DataFrame:
    """Tables 4-5: each variant's mean ± std beside the paper's mean (the paper gives no std)."""
    columns = paper_values()["metric_columns"]
    subset = per_pair[(per_pair.method == REFERENCE_METHOD) & (per_pair.pair == table["pair"])]
    rows = []
    for variant in variants:
        chosen = subset[subset.variant == variant]
        if chosen.empty:
            continue
        ours = _ours(chosen, list(columns.values()), ddof)
        paper = table["variants"].get(variant, {})
        row: dict[str, Any] = {"variant": variant}
        for paper_metric, ours_metric in columns.items():
            mean, std = ours.get(ours_metric, (np.nan, np.nan))
            p_mean = paper.get(paper_metric, np.nan)
            row |= {
                f"{ours_metric}_mean": mean,
                f"{ours_metric}_std": std,
                f"paper_{paper_metric}": p_mean,
                f"delta_{paper_metric}": mean - p_mean,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def seed_spread_table(per_pair: pd.DataFrame, ddof: int = 0) -> pd.DataFrame:
    """Each method whose full model ran with several seeds (`full`, `full_seed<N>`), per pair:
    the mean over seeds of the per-seed means, their std over seeds (sample, ddof 1: a few
    seeds), and beside it the std over test pairs of the run with `seed` (ddof as the tables)."""
    columns = list(paper_values()["metric_columns"].values())
    base = per_pair.variant.map(lambda v: split_seed(v)[0])
    rows = []
    for (method, pair), group in per_pair[base == "full"].groupby(["method", "pair"], sort=False):
        if group.variant.nunique() < 2:
            continue
        metrics = [m for m in columns if m in group]
        per_seed = group.groupby("variant")[metrics].mean()
        main = group[group.variant == "full"]
        row: dict[str, Any] = {"method": method, "pair": pair, "seeds": len(per_seed)}
        for m in metrics:
            row |= {
                f"{m}_mean": per_seed[m].mean(),
                f"{m}_std_over_seeds": per_seed[m].std(ddof=1),
                f"{m}_std_over_pairs": mean_std(main[m], ddof)[1] if not main.empty else np.nan,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def seed_spread_markdown(table: pd.DataFrame) -> str:
    metrics = [c.removesuffix("_mean") for c in table.columns if c.endswith("_mean")]
    lines = [
        "### Seed spread: mean ± std over seeds (std over test pairs of the `seed` run)",
        "",
        "| method | pair | seeds | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    for _, r in table.iterrows():
        cells = [
            f"{_fmt(r[f'{m}_mean'], r[f'{m}_std_over_seeds'])} ({_fmt(r[f'{m}_std_over_pairs'])})"
            for m in metrics
        ]
        lines.append(f"| {r.method} | {r.pair} | {r.seeds} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def paired_statistics(per_pair: pd.DataFrame, pair: str, metrics: list[str]) -> pd.DataFrame:
    """Every method against W-DUALMINE (full) on the same test pairs: Wilcoxon + effect size."""
    subset = per_pair[(per_pair.pair == pair) & (per_pair.variant == "full")]
    reference = subset[subset.method == REFERENCE_METHOD]
    rows = []
    if reference.empty:
        return pd.DataFrame(rows)
    for method, group in subset[subset.method != REFERENCE_METHOD].groupby("method"):
        joined = group.merge(reference, on="name", suffixes=("", "_ref"))
        for metric in metrics:
            if metric not in joined or f"{metric}_ref" not in joined:
                continue
            result = paired_test(joined[metric].to_numpy(), joined[f"{metric}_ref"].to_numpy())
            rows.append({"pair": pair, "method": method, "metric": metric, **result})
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame, title: str) -> str:
    columns = paper_values()["metric_columns"]
    header = ["method", *[f"{p} (ours)" for p in columns], *[f"{p} (paper)" for p in columns]]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for _, row in table.iterrows():
        ours = []
        for p, o in columns.items():
            mark = " ✓" if row.get(f"within_paper_std_{p}") else ""
            ours.append(_fmt(row[f"{o}_mean"], row[f"{o}_std"]) + mark)
        paper = [
            _fmt(row[f"paper_{p}_mean"], row[f"paper_{p}_std"])
            if np.isfinite(row[f"paper_{p}_mean"])
            else "—"
            for p in columns
        ]
        lines.append("| " + " | ".join([row["method"], *ours, *paper]) + " |")
    lines += ["", "✓: our mean lies within the paper's ± std.", ""]
    return "\n".join(lines)


def ablation_markdown(table: pd.DataFrame, title: str) -> str:
    columns = paper_values()["metric_columns"]
    header = ["variant", *[f"{p} (ours)" for p in columns], *[f"{p} (paper)" for p in columns]]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for _, row in table.iterrows():
        ours = [_fmt(row[f"{o}_mean"], row[f"{o}_std"]) for o in columns.values()]
        paper = [_fmt(row[f"paper_{p}"]) for p in columns]
        lines.append("| " + " | ".join([row["variant"], *ours, *paper]) + " |")
    return "\n".join([*lines, ""])


def extra_metrics_markdown(per_pair: pd.DataFrame, pair: str, ddof: int = 0) -> str:
    """Every metric we compute (not only the paper's five), per method, on one modality pair."""
    subset = per_pair[(per_pair.pair == pair) & (per_pair.variant == "full")]
    metrics = metric_columns(per_pair)
    lines = [f"### All metrics, {pair}", "", "| method | " + " | ".join(metrics) + " |"]
    lines.append("|---" * (len(metrics) + 1) + "|")
    for method, group in subset.groupby("method"):
        cells = [_fmt(*mean_std(group[m], ddof), digits=3) for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def stats_markdown(stats_table: pd.DataFrame, pair: str) -> str:
    lines = [
        f"### Paired tests against W-DUALMINE, {pair}",
        "",
        "| method | metric | median diff | effect size (r) | p (Wilcoxon) | n |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in stats_table.iterrows():
        lines.append(
            f"| {r.method} | {r.metric} | {r.median_diff:+.4f} | {r.effect_size:+.2f} "
            f"| {r.p_value:.3g} | {r.n} |"
        )
    return "\n".join([*lines, ""])


def write_table(frame: pd.DataFrame, markdown: str, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    write_text_atomic(csv_path, frame.to_csv(index=False))
    write_text_atomic(md_path, markdown)
    return [csv_path, md_path]
