"""Collect every evaluation, then write tables, figures and the report from them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfuse.data.prepared import PreparedData
from medfuse.errors import DataError
from medfuse.io import read_image, write_text_atomic
from medfuse.plan import RESULTS, Job, fusion_jobs
from medfuse.report import claims, figures, provenance, releases, tables
from medfuse.report.markdown import render_report

log = logging.getLogger(__name__)


def load_per_pair(jobs: list[Job], convention: str) -> pd.DataFrame:
    """One tidy frame of per-test-pair scores for every job, under one convention."""
    frames = []
    for job in jobs:
        path = job.metrics_stem(convention).with_suffix(".csv")
        if not path.is_file():
            raise DataError(f"{path}: missing evaluation; run `medfuse evaluate` for this job")
        frame = pd.read_csv(path, dtype={"name": str})
        frames.append(frame.assign(method=job.method, pair=job.pair, variant=job.variant))
    combined = pd.concat(frames, ignore_index=True)
    keys = tables.KEYS
    return combined[keys + [c for c in combined.columns if c not in keys]]


def _sample_names(names: list[str], count: int) -> list[str]:
    picks = np.linspace(0, len(names) - 1, num=min(count, len(names))).round().astype(int)
    return [names[i] for i in sorted(set(picks.tolist()))]


def _fused_image(job: Job, name: str) -> np.ndarray:
    return read_image(job.fused_dir / f"{name}.png")


def qualitative_figures(params: Mapping[str, Any], jobs: list[Job], out: Path) -> list[Path]:
    """Figs 3-5: sources and every method's fusion for a few test pairs of each modality pair."""
    cfg = params["report"]
    data = PreparedData(params["data"]["prepare"]["out_dir"])
    written = []
    for number, pair in enumerate(params["experiments"]["pairs"], start=3):
        methods = [j for j in jobs if j.pair == pair and j.variant == "full"]
        samples = {s.name: s for s in data.samples(pair, "test")}
        rows = []
        functional = pair.split("-")[0]
        for name in _sample_names(sorted(samples), cfg["figure_samples"]):
            sample = samples[name]
            images = {
                functional: sample.a_rgb if sample.a_rgb is not None else sample.a,
                "MRI": sample.b,
            }
            images |= {job.method: _fused_image(job, name) for job in methods}
            rows.append(images)
        columns = [functional, "MRI", *[j.method for j in methods]]
        fig = figures.qualitative_grid(rows, columns, f"Fig. {number}: {pair}", cfg["roi_fraction"])
        written += figures.save_figure(fig, out / f"fig{number}_{pair}")
    return written


def metric_figures(params: Mapping[str, Any], per_pair: pd.DataFrame, out: Path) -> list[Path]:
    """Fig. 6: per-pair curves on the ablation pair and a radar plot of normalised means."""
    pair = params["experiments"]["ablation_pair"]
    metrics = [m for m in params["report"]["figure_metrics"] if m in per_pair]
    chosen = per_pair[(per_pair.pair == pair) & (per_pair.variant == "full")]
    curves = figures.per_pair_curves(chosen, metrics, f"Fig. 6: per-pair metrics, {pair}")
    radar = figures.radar(chosen, metrics, f"Normalised mean metrics, {pair}")
    return figures.save_figure(curves, out / "fig6_curves") + figures.save_figure(
        radar, out / "fig6_radar"
    )


def write_tables(
    params: Mapping[str, Any], per_pair: pd.DataFrame, out: Path
) -> tuple[dict[str, str], dict[str, pd.DataFrame]]:
    """Tables 1-5, all-metrics tables and paired statistics. Returns their Markdown by name,
    and the comparison tables (1-3) as frames by name, for the report's agreement summary."""
    ddof = params["report"]["std_ddof"]
    methods = list(dict.fromkeys(per_pair.method))
    spec = tables.paper_values()["tables"]
    markdown: dict[str, str] = {}
    comparisons: dict[str, pd.DataFrame] = {}
    for key, table in spec.items():
        if "variants" in table:
            frame = tables.ablation_table(per_pair, table, list(table["variants"]), ddof)
            markdown[key] = tables.ablation_markdown(frame, table["title"])
        else:
            frame = comparisons[key] = tables.comparison_table(per_pair, table, methods, ddof)
            markdown[key] = tables.comparison_markdown(frame, table["title"])
        tables.write_table(frame, markdown[key], out, key)
    seeds = tables.seed_spread_table(per_pair, ddof)
    if not seeds.empty:
        markdown["seeds"] = tables.seed_spread_markdown(seeds)
        tables.write_table(seeds, markdown["seeds"], out, "seeds")
    metrics = tables.metric_columns(per_pair)
    for pair in params["experiments"]["pairs"]:
        stats = tables.paired_statistics(per_pair, pair, metrics)
        markdown[f"stats_{pair}"] = tables.stats_markdown(stats, pair)
        tables.write_table(stats, markdown[f"stats_{pair}"], out, f"stats_{pair}")
        markdown[f"all_{pair}"] = tables.extra_metrics_markdown(per_pair, pair, ddof)
    return markdown, comparisons


def remove_stale(folder: Path, written: set[Path] | list[Path]) -> None:
    """Delete the files of `folder` this report did not write, e.g. a pair's tables from a run
    with other `experiments.pairs`: DVC empties the folder before the stage, Snakemake does not,
    and `medfuse snapshot` copies the folder whole."""
    keep = set(written)
    for path in folder.iterdir():
        if path.is_file() and path not in keep:
            log.info("removing %s (not written by this report)", path)
            path.unlink()


def build_report(
    params: Mapping[str, Any], results_dir: str | Path = RESULTS, out_dir: str | Path | None = None
) -> Path:
    """Write results/tables, results/figures and results/report.md; return the report's path."""
    out = Path(out_dir or results_dir)
    jobs = fusion_jobs(params, Path(results_dir))
    primary = params["evaluate"]["convention"]
    per_pair = load_per_pair(jobs, primary)
    markdown, comparisons = write_tables(params, per_pair, out / "tables")
    markdown["claims"] = claims.claims_section(per_pair, out / "tables")
    prepared = PreparedData(params["data"]["prepare"]["out_dir"])
    markdown["releases"] = releases.overlap_markdown(params, prepared.manifest)
    others = {}
    for convention in params["evaluate"]["conventions"]:
        if convention != primary:
            extra = load_per_pair(jobs, convention)
            others[convention] = {
                pair: tables.extra_metrics_markdown(extra, pair, params["report"]["std_ddof"])
                for pair in params["experiments"]["pairs"]
            }
    markdown["trainings"] = provenance.trainings_markdown(params, Path(results_dir))
    conventions = params["evaluate"]["conventions"]
    markdown["runs"] = provenance.runs_markdown(provenance.tracking_runs(params), jobs, conventions)
    written = qualitative_figures(params, jobs, out / "figures")
    written += metric_figures(params, per_pair, out / "figures")
    report = out / "report.md"
    figures = [p for p in written if p.suffix == ".png"]
    written_tables = {out / "tables" / f"{key}.{ext}" for key in markdown for ext in ("csv", "md")}
    remove_stale(out / "tables", written_tables)
    remove_stale(out / "figures", written)
    text = render_report(params, per_pair, markdown, comparisons, others, figures, out)
    write_text_atomic(report, text)
    log.info("report written to %s (%d figure files)", report, len(written))
    print(report)
    return report
