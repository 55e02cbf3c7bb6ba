"""A verdict on each claim of the paper, from the per-test-pair scores measured here.

The claims are data: the `claims:` list of paper_values.yaml, each restated in a few words with
where the paper makes it, a kind, the paper metrics it is about, its comparators and the claimed
direction. Every claim compares W-DUALMINE (the full model, `tables.REFERENCE_METHOD`) with its
comparators on the same test pairs of each modality pair it covers: the paper's peers (every
form of a peer run here: the authors' published fusions and/or the model retrained here), other
methods (plain averaging) or its own ablation variants. One *comparison* per pair, metric and
comparator: the mean of W-DUALMINE minus the comparator over the test pairs, the two-sided
paired Wilcoxon p, the rank-biserial effect size r and n (`stats.paired_test`).

A comparison of a directional kind (`vs_peers`, `ablation_lowers`, `collapses`) *holds* when the
mean difference and r both have the claimed sign and p < ALPHA; for `collapses` the drop must
also be at least `min_share_of_paper` of the paper's own drop, else it is *weaker*. It is
*opposite* when both have the other sign with p < ALPHA / k, k the claim's testable comparisons
(Bonferroni: many pairs and peers must not make a contradiction by chance). A `stays_close`
comparison holds when |mean difference| <= `tolerance`, and is opposite when it is larger with
p < ALPHA / k. A comparison whose method, variant, pair or metric was not run is *missing*.

The claim's verdict is the first of these that applies:
- contradicted: some comparison is opposite;
- not testable here: some comparison is missing (nothing missing may count as support);
- supported: every comparison holds (each at p < ALPHA: all must, so no correction is needed);
- weaker than claimed: every comparison holds or is weaker, and some are weaker;
- not significant: the rest: the direction may hold, but not beyond pair-to-pair noise.

Beside each claim the report gives the paper's own differences (with, for ablations, their size
relative to the paper's std over test pairs: Tables 4-5 differ in the third or fourth decimal),
where the paper's own tables do not show the claim, and how plain averaging compares (its means
here against the paper's W-DUALMINE row, and W-DUALMINE minus average here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfuse.report.stats import paired_test
from medfuse.report.tables import REFERENCE_METHOD, paper_values, write_table

ALPHA = 0.05
TINY_SHARE_OF_STD = 0.1  # a paper difference under a tenth of its own std is called tiny
FULL = "full"
AVERAGE = "average"
# Each kind and the comparators it may name (exactly one of them per claim).
KINDS = {
    "vs_peers": ("peers",),
    "ablation_lowers": ("variants",),
    "collapses": ("variants",),
    "stays_close": ("peers", "methods", "variants"),
}
DIRECTIONS = {"higher": 1, "lower": -1}

SUPPORTED = "supported"
WEAKER = "weaker than claimed"
NOT_SIGNIFICANT = "not significant"
CONTRADICTED = "contradicted"
NOT_TESTABLE = "not testable here"
VERDICTS = (SUPPORTED, WEAKER, NOT_SIGNIFICANT, CONTRADICTED, NOT_TESTABLE)

HOLDS, WEAK, OPPOSITE, UNCLEAR, MISSING = "holds", "weaker", "opposite", "unclear", "missing"


@dataclass(frozen=True)
class Comparator:
    label: str  # as the report names it
    method: str | None  # None: no form of this peer was run here
    variant: str = FULL
    paper_row: str | None = None  # its row in the paper's Tables 1-3, if any


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    where: str
    kind: str
    metrics: tuple[str, ...]
    pairs: tuple[str, ...]
    peers: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    direction: int = 1  # claimed sign of W-DUALMINE minus the comparator
    tolerance: float | None = None
    min_share_of_paper: float | None = None

    def comparators(self, methods_run: Sequence[str]) -> list[Comparator]:
        """Every comparator of the claim; a peer counts once per form of it that was run."""
        rows = paper_values()["paper_row"]
        found: list[Comparator] = []
        for peer in self.peers:
            forms = [m for m in methods_run if rows.get(m) == peer]
            found += [Comparator(m, m, FULL, peer) for m in forms] or [
                Comparator(peer, None, FULL, peer)
            ]
        found += [Comparator(m, m, FULL, rows.get(m)) for m in self.methods]
        found += [Comparator(v, REFERENCE_METHOD, v) for v in self.variants]
        return found


def _paper_tables(key: str) -> list[Mapping[str, Any]]:
    """The paper's comparison tables (key `values`: Tables 1-3) or ablations (`variants`)."""
    return [t for t in paper_values()["tables"].values() if key in t]


def _comparison_table(pair: str) -> Mapping[str, Any] | None:
    return next((t for t in _paper_tables("values") if t["pair"] == pair), None)


def _ablation_table(variant: str) -> Mapping[str, Any] | None:
    return next((t for t in _paper_tables("variants") if variant in t["variants"]), None)


def _check(condition: bool, claim_id: str, problem: str) -> None:
    if not condition:
        raise ValueError(f"paper_values.yaml, claim {claim_id!r}: {problem}")


def _validate(spec: Mapping[str, Any]) -> None:
    cid, kind = spec.get("id", "?"), spec.get("kind")
    _check(kind in KINDS, cid, f"kind {kind!r} is not one of {', '.join(KINDS)}")
    metrics = spec.get("metrics") or []
    unknown = set(metrics) - set(paper_values()["metrics"])
    _check(bool(metrics) and not unknown, cid, f"no metrics or unknown ones: {sorted(unknown)}")
    given = [key for key in ("peers", "methods", "variants") if spec.get(key)]
    _check(len(given) == 1 and given[0] in KINDS[kind], cid, f"{kind} names one of {KINDS[kind]}")
    peers = set().union(*(t["values"] for t in _paper_tables("values")))
    _check(set(spec.get("peers", [])) <= peers, cid, f"peers must be among {sorted(peers)}")
    variants = set(spec.get("variants", []))
    _check(
        all(_ablation_table(v) for v in variants - {FULL}) and FULL not in variants,
        cid,
        "variants must be ablation rows of the paper's tables (not full)",
    )
    _check(
        kind == "stays_close" or spec.get("direction") in DIRECTIONS,
        cid,
        f"direction must be one of {list(DIRECTIONS)}",
    )
    _check(kind != "stays_close" or spec.get("tolerance", 0) > 0, cid, "needs a tolerance > 0")
    _check(
        kind != "collapses" or spec.get("min_share_of_paper", 0) > 0,
        cid,
        "needs min_share_of_paper > 0",
    )
    _check(bool(spec.get("text")) and bool(spec.get("where")), cid, "needs text and where")


def _default_pairs(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The pairs of the paper tables that hold the claim's comparators."""
    if spec.get("variants"):
        tables = [_ablation_table(v) for v in spec["variants"]]
    else:
        tables = _paper_tables("values")
    return tuple(dict.fromkeys(t["pair"] for t in tables if t))


def parse_claim(spec: Mapping[str, Any]) -> Claim:
    """One `claims:` entry as a Claim, or a ValueError naming the claim and the problem."""
    _validate(spec)
    return Claim(
        id=spec["id"],
        text=spec["text"],
        where=spec["where"],
        kind=spec["kind"],
        metrics=tuple(spec["metrics"]),
        pairs=tuple(spec.get("pairs") or _default_pairs(spec)),
        peers=tuple(spec.get("peers", ())),
        methods=tuple(spec.get("methods", ())),
        variants=tuple(spec.get("variants", ())),
        direction=DIRECTIONS.get(spec.get("direction", "higher"), 1),
        tolerance=spec.get("tolerance"),
        min_share_of_paper=spec.get("min_share_of_paper"),
    )


def load_claims() -> list[Claim]:
    claims = [parse_claim(spec) for spec in paper_values().get("claims", [])]
    ids = [c.id for c in claims]
    _check(len(ids) == len(set(ids)), "?", f"claim ids repeat: {ids}")
    return claims


# --- the paper's own numbers -------------------------------------------------------------------


def _paper_subject(pair: str, metric: str) -> tuple[float, float]:
    """The paper's W-DUALMINE mean and std on a pair (Tables 1-3); NaN where it has none."""
    table = _comparison_table(pair)
    ours = (table or {}).get("values", {}).get(paper_values()["paper_row"][REFERENCE_METHOD])
    return tuple(map(float, ours[metric])) if ours else (np.nan, np.nan)


def _paper_delta(pair: str, metric: str, comparator: Comparator) -> float:
    """The paper's W-DUALMINE minus the comparator: the full row minus a variant's row of
    the same ablation table, or Tables 1-3's rows; NaN where the paper has no such row."""
    if comparator.variant != FULL:
        table = _ablation_table(comparator.variant)
        if table is None or table["pair"] != pair:
            return np.nan
        rows = table["variants"]
        return float(rows[FULL][metric] - rows[comparator.variant][metric])
    row = (_comparison_table(pair) or {}).get("values", {}).get(comparator.paper_row or "")
    return float(_paper_subject(pair, metric)[0] - row[metric][0]) if row else np.nan


def _paper_outcome(claim: Claim, delta: float) -> str:
    """Whether the paper's own tables show the comparison (UNCLEAR: they do not say)."""
    if not np.isfinite(delta):
        return UNCLEAR
    if claim.kind == "stays_close":
        return HOLDS if abs(delta) <= claim.tolerance else OPPOSITE
    return HOLDS if delta * claim.direction > 0 else OPPOSITE


# --- the comparisons measured here -------------------------------------------------------------


def _scores(per_pair: pd.DataFrame, method: str, pair: str, variant: str, column: str) -> pd.Series:
    chosen = per_pair[
        (per_pair.method == method) & (per_pair.pair == pair) & (per_pair.variant == variant)
    ]
    return chosen.set_index("name")[column].astype(float)


def _missing_part(per_pair: pd.DataFrame, pair: str, column: str, comparator: Comparator) -> str:
    """What a comparison lacks ('' when nothing): the metric, W-DUALMINE or the comparator."""
    if column not in per_pair:
        return f"metric {column}"
    if _scores(per_pair, REFERENCE_METHOD, pair, FULL, column).empty:
        return REFERENCE_METHOD
    if comparator.method is None:
        return f"{comparator.label} (no form of it)"
    if _scores(per_pair, comparator.method, pair, comparator.variant, column).empty:
        return comparator.label
    return ""


def compare(
    per_pair: pd.DataFrame, claim: Claim, pair: str, metric: str, comparator: Comparator
) -> dict[str, Any]:
    """One comparison: W-DUALMINE (full) minus the comparator on the test pairs both have."""
    column = paper_values()["metric_columns"][metric]
    row: dict[str, Any] = {
        "claim": claim.id,
        "pair": pair,
        "metric": metric,
        "column": column,
        "comparator": comparator.label,
        "paper_row": comparator.paper_row,
        "paper_delta": _paper_delta(pair, metric, comparator),
        "paper_subject_mean": _paper_subject(pair, metric)[0],
        "paper_subject_std": _paper_subject(pair, metric)[1],
        "missing": _missing_part(per_pair, pair, column, comparator),
    }
    stats = {"mean_diff": np.nan, "p_value": np.nan, "effect_size": np.nan, "n": 0}
    if not row["missing"]:
        ours = _scores(per_pair, REFERENCE_METHOD, pair, FULL, column)
        theirs = _scores(per_pair, comparator.method, pair, comparator.variant, column)
        joined = pd.concat([ours, theirs], axis=1, join="inner").dropna()
        a, b = joined.iloc[:, 0], joined.iloc[:, 1]
        stats = paired_test(a, b) | {"mean_diff": (a - b).mean()}
        row |= {"subject_mean": a.mean(), "comparator_mean": b.mean()}
        row["missing"] = "" if len(joined) else f"test pairs scored by both ({comparator.label})"
    return row | stats


def outcome(claim: Claim, row: Mapping[str, Any], contradiction_alpha: float) -> str:
    """holds / weaker / opposite / unclear / missing for one comparison (module docstring)."""
    if row["missing"] or row["n"] == 0:
        return MISSING
    diff, p, r = row["mean_diff"], row["p_value"], row["effect_size"]
    if claim.kind == "stays_close":
        if abs(diff) <= claim.tolerance:
            return HOLDS
        return OPPOSITE if p < contradiction_alpha else UNCLEAR
    sign = claim.direction
    if p < ALPHA and diff * sign > 0 and r * sign > 0:
        needed = (claim.min_share_of_paper or 0) * abs(row["paper_delta"])
        return WEAK if diff * sign < needed else HOLDS
    if p < contradiction_alpha and diff * sign < 0 and r * sign < 0:
        return OPPOSITE
    return UNCLEAR


def verdict(outcomes: Sequence[str]) -> str:
    """The claim's verdict from its comparisons' outcomes, by the rules of the docstring."""
    if OPPOSITE in outcomes:
        return CONTRADICTED
    if not outcomes or MISSING in outcomes:
        return NOT_TESTABLE
    if all(o == HOLDS for o in outcomes):
        return SUPPORTED
    if all(o in (HOLDS, WEAK) for o in outcomes):
        return WEAKER
    return NOT_SIGNIFICANT


def _averaging_rows(per_pair: pd.DataFrame, claim: Claim) -> list[dict[str, Any]]:
    """Plain averaging beside a comparison of methods, unless it is already a comparator."""
    if claim.variants or AVERAGE in claim.methods:
        return []
    average = Comparator(AVERAGE, AVERAGE)
    return [
        compare(per_pair, claim, pair, metric, average) | {"role": "averaging", "outcome": ""}
        for pair in claim.pairs
        for metric in claim.metrics
    ]


def evaluate_claim(per_pair: pd.DataFrame, claim: Claim) -> list[dict[str, Any]]:
    """Every comparison of one claim with its outcome, the claim's verdict on each row."""
    methods_run = list(dict.fromkeys(per_pair.method))
    rows = [
        compare(per_pair, claim, pair, metric, comparator) | {"role": "claim"}
        for pair in claim.pairs
        for metric in claim.metrics
        for comparator in claim.comparators(methods_run)
    ]
    testable = sum(1 for r in rows if not r["missing"] and r["n"] > 0)
    for row in rows:
        row["outcome"] = outcome(claim, row, ALPHA / max(testable, 1))
        row["paper_outcome"] = _paper_outcome(claim, row["paper_delta"])
    claim_verdict = verdict([r["outcome"] for r in rows])
    extra = {
        "text": claim.text,
        "where": claim.where,
        "kind": claim.kind,
        "tolerance": claim.tolerance,
        "min_share_of_paper": claim.min_share_of_paper,
    }
    return [r | extra | {"verdict": claim_verdict} for r in rows + _averaging_rows(per_pair, claim)]


# claims.csv: the claim, one comparison (role `claim`, or `averaging` beside it) and its
# outcome, what was measured here, then the paper's own numbers.
COLUMNS = [
    "claim", "text", "where", "kind", "tolerance", "min_share_of_paper", "verdict", "role",
    "pair", "metric", "column",
    "comparator", "outcome", "missing", "n", "mean_diff", "median_diff", "p_value",
    "effect_size", "subject_mean", "comparator_mean",
    "paper_row", "paper_delta", "paper_outcome", "paper_subject_mean", "paper_subject_std",
]  # fmt: skip


def evaluate_claims(per_pair: pd.DataFrame, claims: Iterable[Claim] | None = None) -> pd.DataFrame:
    """One tidy row per comparison of every claim (and per averaging comparison beside it)."""
    rows = [
        r
        for c in (load_claims() if claims is None else claims)
        for r in evaluate_claim(per_pair, c)
    ]
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


# --- Markdown ---------------------------------------------------------------------------------


def _p(value: float) -> str:
    return f"{value:.2g}" if np.isfinite(value) else "n/a"


def _stats(row: pd.Series) -> str:
    p, r = _p(row["p_value"]), row["effect_size"]
    return f"Δ {row['mean_diff']:+.4f}, p {p}, r {r:+.2f}, n {row['n']}"


def _prefix(row: pd.Series, several_metrics: bool) -> str:
    return f"{row['pair']} {row['metric']}" if several_metrics else row["pair"]


def _cell(lines: Iterable[str]) -> str:
    unique = list(dict.fromkeys(lines))
    return "<br>".join(unique) if unique else "—"


def _name_in_paper(row: pd.Series) -> str:
    return row["comparator"] if pd.isna(row["paper_row"]) else row["paper_row"]


def _paper_line(row: pd.Series, prefix: str) -> str | None:
    """The paper's own difference, with its size against the paper's std for ablations."""
    if not np.isfinite(row["paper_delta"]):
        return None
    line = f"{prefix} vs {_name_in_paper(row)}: Δ {row['paper_delta']:+.4f}"
    if pd.isna(row["paper_row"]) and row["kind"] != "stays_close":
        # an ablation: the paper's own difference against its spread over test pairs
        share = abs(row["paper_delta"]) / row["paper_subject_std"]
        line += f" ({share:.1%} of std{', tiny' if share < TINY_SHARE_OF_STD else ''})"
    return line + (" ✗ not in the paper's own table" if row["paper_outcome"] == OPPOSITE else "")


def _here_line(row: pd.Series, prefix: str) -> str:
    return f"{prefix} vs {row['comparator']}: " + ("not run" if row["missing"] else _stats(row))


def _averaging_line(row: pd.Series, prefix: str) -> str:
    if row["missing"]:
        return f"{prefix}: not run ({row['missing']})"
    line = (
        f"{prefix}: average {row['comparator_mean']:.4f} vs the paper's W-DUALMINE "
        f"{row['paper_subject_mean']:.4f}"
    )
    # where averaging is the claim's own comparator, its paired test is in "measured here"
    return line if row["role"] == "claim" else f"{line}; ours − average {_stats(row)}"


def _verdict_cell(rows: pd.DataFrame) -> str:
    claim_rows = rows[rows["role"] == "claim"]
    lacking = claim_rows[claim_rows["missing"] != ""].groupby("missing", sort=False)["pair"]
    parts = [f"{what} on {', '.join(dict.fromkeys(pairs))}" for what, pairs in lacking]
    note = f"<br>not run: {'; '.join(parts)}" if parts else ""
    return f"**{claim_rows['verdict'].iloc[0]}**{note}"


def _threshold(first: pd.Series) -> str:
    """The kind's own bound, said beside the claim."""
    if first["kind"] == "stays_close":
        return f" (\\|Δ\\| ≤ {first['tolerance']:g})"  # pipes escaped: a table cell
    if first["kind"] == "collapses":
        return f" (a drop of at least {first['min_share_of_paper']:.0%} of the paper's)"
    return ""


def _claim_row(rows: pd.DataFrame) -> str:
    first = rows.iloc[0]
    several = rows["metric"].nunique() > 1
    claim_rows = rows[rows["role"] == "claim"]
    cells = [
        f"`{first['claim']}` {first['text']}{_threshold(first)}",
        first["where"],
        _cell(
            filter(None, (_paper_line(r, _prefix(r, several)) for _, r in claim_rows.iterrows()))
        ),
        _cell(_here_line(r, _prefix(r, several)) for _, r in claim_rows.iterrows()),
        _cell(
            _averaging_line(r, _prefix(r, several))
            for _, r in rows[rows["comparator"] == AVERAGE].iterrows()
        ),
        _verdict_cell(rows),
    ]
    return "| " + " | ".join(cells) + " |"


def averaging_against_paper(per_pair: pd.DataFrame) -> list[str]:
    """Plain averaging measured here against the paper's W-DUALMINE row, per pair."""
    lines = []
    for pair in (t["pair"] for t in _paper_tables("values")):
        parts = []
        for metric, column in paper_values()["metric_columns"].items():
            if column not in per_pair or _scores(per_pair, AVERAGE, pair, FULL, column).empty:
                continue
            mean = _scores(per_pair, AVERAGE, pair, FULL, column).mean()
            paper = _paper_subject(pair, metric)[0]
            same = round(mean, 4) == round(paper, 4)
            gap = "equal to four decimals" if same else f"{mean - paper:+.4f}"
            parts.append(f"{metric} {mean:.4f} vs {paper:.4f} ({gap})")
        if parts:
            lines.append(f"- {pair}: " + ", ".join(parts))
    return lines


def _intro() -> list[str]:
    return [
        "Each claim of the paper's abstract, results, ablation and conclusion text, in a few "
        "words (the list is `claims:` in `src/medfuse/report/paper_values.yaml`), with the "
        "paper's own numbers, the evidence measured here and a verdict. Δ is W-DUALMINE (the "
        "full model) minus the comparator, averaged over the test pairs both have; p is the "
        "two-sided paired Wilcoxon test, r its rank-biserial effect size, n the test pairs. "
        "A peer is compared in every form run here (the authors' published fusions, "
        "`published-*`, and/or retrained here). PSNR is `PSNR_paper`; FMI is `FMI_dct`, not the "
        "paper's FMI (no variant reproduces it). For ablations the paper's Δ is also given as "
        "a share of its W-DUALMINE std over test pairs (tiny: under "
        f"{TINY_SHARE_OF_STD:.0%}); ✗ marks a comparison the paper's own tables do not show.",
        "",
        "Verdicts. A comparison *holds* when Δ and r have the claimed sign with "
        f"p < {ALPHA} (for a collapse, Δ must also reach the stated share of the paper's drop, "
        "else it is *weaker*); a closeness claim holds when |Δ| is within its tolerance. "
        f"**{CONTRADICTED}**: some comparison goes the other way with p < {ALPHA}/k (k "
        f"comparisons, Bonferroni); **{NOT_TESTABLE}**: a method, variant, pair or metric the "
        f"claim needs was not run; **{SUPPORTED}**: every comparison holds; **{WEAKER}**: "
        f"every one holds or is weaker; **{NOT_SIGNIFICANT}**: otherwise (within pair-to-pair "
        "noise).",
        "",
    ]


def claims_markdown(frame: pd.DataFrame, per_pair: pd.DataFrame) -> str:
    header = [
        "claim", "where in the paper", "the paper's numbers", "measured here",
        "plain averaging", "verdict",
    ]  # fmt: skip
    lines = ["## Claims", "", *_intro(), "| " + " | ".join(header) + " |"]
    lines.append("|---" * len(header) + "|")
    lines += [_claim_row(rows) for _, rows in frame.groupby("claim", sort=False)]
    averaging = averaging_against_paper(per_pair)
    if averaging:
        lines += ["", "Plain averaging here against the paper's W-DUALMINE row (means):", ""]
        lines += averaging
    return "\n".join([*lines, ""])


def claims_section(per_pair: pd.DataFrame, out_dir: Path) -> str:
    """Evaluate every claim, write results/tables/claims.csv and .md, return the Markdown."""
    frame = evaluate_claims(per_pair)
    markdown = claims_markdown(frame, per_pair)
    write_table(frame, markdown, out_dir, "claims")
    return markdown
