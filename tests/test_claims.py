"""The report's verdict on each claim of the paper, on synthetic per-pair scores.

Every method's scores share one per-test-pair spread (a paired design); a method differs from
W-DUALMINE only by the shift it is given, so each verdict follows from the shift alone.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np
import pandas as pd
import pytest

from medfuse.report import claims, markdown, tables
from tests.test_report import _per_pair

N = 12  # test pairs per modality pair
PAIRS = ("CT-MRI", "PET-MRI", "SPECT-MRI")
BASE = {"EN": 4.3, "MI": 3.6, "CC": 0.83, "PSNR_paper": 64.0, "FMI_dct": 0.42}
# Differences with (nearly) balanced signed ranks: a spread without a direction (p >> 0.05).
NOISE = np.array([(-1) ** k * (k + 1) for k in range(N)], float)


def _scores(method: str, pair: str = "CT-MRI", variant: str = "full", **shift: Any) -> pd.DataFrame:
    spread = np.random.default_rng(zlib.crc32(pair.encode())).normal(size=N)
    spread -= spread.mean()  # so that each mean is exactly the base plus the shift
    # A jitter far below every shift keeps |differences| distinct: with ties scipy's Wilcoxon
    # turns to a slow permutation test.
    jitter = np.random.default_rng(zlib.crc32(f"{method}/{variant}".encode())).normal(size=N)
    columns = {m: BASE[m] + 0.05 * spread + 1e-8 * jitter + shift.get(m, 0.0) for m in BASE}
    names = [f"{i:03d}" for i in range(N)]
    return pd.DataFrame(
        {"method": method, "pair": pair, "variant": variant, "name": names, **columns}
    )


def _frame(*parts: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True)


def _on_every_pair(method: str, **shift: Any) -> list[pd.DataFrame]:
    return [_scores(method, pair, **shift) for pair in PAIRS]


def _claim(kind: str, **spec: Any) -> claims.Claim:
    return claims.parse_claim(
        {"id": f"test_{kind}", "text": "t", "where": "w", "kind": kind} | spec
    )


def _verdict(per_pair: pd.DataFrame, claim: claims.Claim) -> str:
    rows = claims.evaluate_claim(per_pair, claim)
    return rows[0]["verdict"]


BEST_MI = {"metrics": ["MI"], "peers": ["AdaFuse", "ASFE-Fusion"], "direction": "higher"}


def _peers(**shift: Any) -> list[pd.DataFrame]:
    return _on_every_pair("adafuse", **shift) + _on_every_pair("published-asfe-fusion", **shift)


# --- the claims of paper_values.yaml ---------------------------------------------------------


def test_every_claim_of_the_paper_parses_and_names_known_metrics_and_variants(params):
    found = claims.load_claims()
    spec = tables.paper_values()
    assert {"best_mi", "best_cc", "best_psnr", "best_fmi", "gce_raises_mi", "we_raises_en"} <= {
        c.id for c in found
    }
    forms = set(spec["paper_row"].values())
    for claim in found:
        assert claim.kind in claims.KINDS and claim.text and claim.where
        assert set(claim.metrics) <= set(spec["metric_columns"])
        assert set(claim.variants) <= set(params["experiments"]["ablations"])
        assert set(claim.pairs) <= set(params["experiments"]["pairs"])
        assert set(claim.peers) <= forms  # every peer has a method here that stands for it
        assert set(claim.methods) <= set(params["experiments"]["classical"])
    ablations = {c.id: c.pairs for c in found if c.variants}
    assert set(ablations.values()) == {(params["experiments"]["ablation_pair"],)}


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"kind": "bogus"}, "kind"),
        ({"kind": "vs_peers", "metrics": ["SSIM"], "peers": ["AdaFuse"]}, "metrics"),
        ({"kind": "ablation_lowers", "metrics": ["MI"], "variants": ["no_x"]}, "variants"),
        ({"kind": "vs_peers", "metrics": ["MI"], "peers": ["AdaFuse"]}, "direction"),
        ({"kind": "vs_peers", "metrics": ["MI"], "variants": ["no_gce"]}, "names one of"),
        ({"kind": "stays_close", "metrics": ["CC"], "methods": ["average"]}, "tolerance"),
    ],
)
def test_a_bad_claim_is_refused_naming_it(spec, problem):
    with pytest.raises(ValueError, match=f"claim 'bad'.*{problem}"):
        claims.parse_claim({"id": "bad", "text": "t", "where": "w"} | spec)


def test_every_claim_gets_a_verdict_on_a_small_run():
    """Four test pairs (the quick profile): no direction can reach p < 0.05, nothing breaks."""
    small = _frame(*[s.head(4) for s in _on_every_pair("wdualmine") + _peers(MI=-0.2)])
    frame = claims.evaluate_claims(small)
    verdicts = frame.groupby("claim").verdict.first()
    assert set(verdicts.index) == {c.id for c in claims.load_claims()}
    directional = frame[frame.kind != "stays_close"].groupby("claim").verdict.first()
    assert set(directional) == {claims.NOT_SIGNIFICANT, claims.NOT_TESTABLE}
    assert verdicts["pet_cc_tie_asfe"] == claims.SUPPORTED  # closeness needs no significance


# --- vs_peers -------------------------------------------------------------------------------


def test_vs_peers_supported_when_ours_beats_every_form_of_every_peer_on_every_pair():
    asfe_retrained = _on_every_pair("asfe-fusion", MI=-0.3)
    per_pair = _frame(*_on_every_pair("wdualmine"), *_peers(MI=-0.2), *asfe_retrained)
    rows = claims.evaluate_claim(per_pair, _claim("vs_peers", **BEST_MI))
    compared = {r["comparator"] for r in rows if r["role"] == "claim"}
    assert compared == {"adafuse", "published-asfe-fusion", "asfe-fusion"}  # both ASFE forms
    assert rows[0]["verdict"] == claims.SUPPORTED
    one = next(r for r in rows if r["comparator"] == "adafuse")
    assert one["mean_diff"] == pytest.approx(0.2) and one["effect_size"] == 1.0 and one["n"] == N


def test_vs_peers_contradicted_when_one_peer_wins_on_one_pair():
    per_pair = _frame(*_on_every_pair("wdualmine"), *_peers(MI=-0.2))
    per_pair.loc[(per_pair.method == "adafuse") & (per_pair.pair == "PET-MRI"), "MI"] += 0.5
    assert _verdict(per_pair, _claim("vs_peers", **BEST_MI)) == claims.CONTRADICTED


def test_vs_peers_not_significant_when_differences_have_no_direction():
    per_pair = _frame(*_on_every_pair("wdualmine"), *_peers(MI=0.001 * NOISE))
    assert _verdict(per_pair, _claim("vs_peers", **BEST_MI)) == claims.NOT_SIGNIFICANT


def test_vs_peers_not_testable_when_no_form_of_a_peer_was_run():
    per_pair = _frame(
        *_on_every_pair("wdualmine"), *_on_every_pair("published-asfe-fusion", MI=-0.2)
    )
    rows = claims.evaluate_claim(per_pair, _claim("vs_peers", **BEST_MI))
    assert rows[0]["verdict"] == claims.NOT_TESTABLE
    assert {r["missing"] for r in rows if r["comparator"] == "AdaFuse"} == {
        "AdaFuse (no form of it)"
    }
    # ... but a peer that wins still contradicts the claim
    per_pair.loc[per_pair.method == "published-asfe-fusion", "MI"] += 0.5
    assert _verdict(per_pair, _claim("vs_peers", **BEST_MI)) == claims.CONTRADICTED


def test_a_lower_is_better_claim_reads_the_sign_the_other_way():
    spec = BEST_MI | {"metrics": ["EN"], "peers": ["ASFE-Fusion"], "direction": "lower"}
    per_pair = _frame(*_on_every_pair("wdualmine"), *_on_every_pair("asfe-fusion", EN=1.0))
    assert _verdict(per_pair, _claim("vs_peers", **spec)) == claims.SUPPORTED


def test_contradiction_needs_p_below_alpha_over_the_claims_comparisons():
    claim = _claim("vs_peers", **BEST_MI)
    row = {"missing": "", "n": 12, "mean_diff": -0.1, "p_value": 0.03, "effect_size": -0.6}
    assert claims.outcome(claim, row, contradiction_alpha=0.05) == claims.OPPOSITE
    assert claims.outcome(claim, row, contradiction_alpha=0.05 / 6) == claims.UNCLEAR


def test_verdict_order_contradiction_first_then_missing_then_support():
    h, w, o, u, m = claims.HOLDS, claims.WEAK, claims.OPPOSITE, claims.UNCLEAR, claims.MISSING
    assert claims.verdict([h, m, o]) == claims.CONTRADICTED
    assert claims.verdict([h, m]) == claims.NOT_TESTABLE
    assert claims.verdict([]) == claims.NOT_TESTABLE
    assert claims.verdict([h, h]) == claims.SUPPORTED
    assert claims.verdict([h, w]) == claims.WEAKER
    assert claims.verdict([h, w, u]) == claims.NOT_SIGNIFICANT


# --- ablations ------------------------------------------------------------------------------


GCE_MI = {"metrics": ["MI"], "variants": ["no_gce"], "direction": "higher"}


def _ablation(variant: str = "no_gce", **shift: Any) -> pd.DataFrame:
    return _frame(_scores("wdualmine"), _scores("wdualmine", variant=variant, **shift))


@pytest.mark.parametrize(
    "shift, expected",
    [
        ({"MI": -0.05}, claims.SUPPORTED),  # without the expert MI drops on every test pair
        ({"MI": +0.05}, claims.CONTRADICTED),
        ({"MI": 0.001 * NOISE}, claims.NOT_SIGNIFICANT),
    ],
)
def test_ablation_lowers(shift, expected):
    assert _verdict(_ablation(**shift), _claim("ablation_lowers", **GCE_MI)) == expected


def test_ablation_not_testable_without_the_variant():
    per_pair = _ablation("no_we", MI=-0.05)
    rows = claims.evaluate_claim(per_pair, _claim("ablation_lowers", **GCE_MI))
    assert rows[0]["verdict"] == claims.NOT_TESTABLE and rows[0]["missing"] == "no_gce"
    assert rows[0]["pair"] == "CT-MRI"  # the pair of the paper's Table 4
    assert rows[0]["paper_delta"] == pytest.approx(3.6073 - 3.6056)


COLLAPSE = {
    "metrics": ["MI", "CC"],
    "variants": ["no_l_avg"],
    "direction": "higher",
    "min_share_of_paper": 0.5,
}


@pytest.mark.parametrize(
    "shift, expected",
    [
        ({"MI": -0.6, "CC": -0.003}, claims.SUPPORTED),  # the paper: -0.8305 and -0.0032
        ({"MI": -0.1, "CC": -0.003}, claims.WEAKER),  # MI drops, but far less than claimed
        ({"MI": +0.6, "CC": -0.003}, claims.CONTRADICTED),
        ({"MI": 0.001 * NOISE, "CC": 0.001 * NOISE}, claims.NOT_SIGNIFICANT),
    ],
)
def test_collapses(shift, expected):
    per_pair = _ablation("no_l_avg", **shift)
    assert _verdict(per_pair, _claim("collapses", **COLLAPSE)) == expected


def test_collapses_not_testable_without_a_metric():
    per_pair = _ablation("no_l_avg", MI=-0.6, CC=-0.003).drop(columns="CC")
    rows = claims.evaluate_claim(per_pair, _claim("collapses", **COLLAPSE))
    assert rows[0]["verdict"] == claims.NOT_TESTABLE
    assert {r["missing"] for r in rows} == {"", "metric CC"}


# --- stays_close and plain averaging ----------------------------------------------------------


KEEPS_CC = {"metrics": ["CC"], "methods": ["average"], "tolerance": 0.001}


@pytest.mark.parametrize(
    "shift, expected",
    [
        ({"CC": 0.0005}, claims.SUPPORTED),  # within the tolerance, however consistent
        ({"CC": 0.005}, claims.CONTRADICTED),  # ours 0.005 below averaging on every test pair
        ({"CC": 0.01 * NOISE}, claims.NOT_SIGNIFICANT),  # far on average, but only noise
    ],
)
def test_stays_close_to_average(shift, expected):
    per_pair = _frame(*_on_every_pair("wdualmine"), *_on_every_pair("average", **shift))
    assert _verdict(per_pair, _claim("stays_close", **KEEPS_CC)) == expected


def test_stays_close_not_testable_without_averaging_on_a_pair():
    per_pair = _frame(*_on_every_pair("wdualmine"), _scores("average", "CT-MRI"))
    rows = claims.evaluate_claim(per_pair, _claim("stays_close", **KEEPS_CC))
    assert rows[0]["verdict"] == claims.NOT_TESTABLE
    assert [r["pair"] for r in rows if r["missing"]] == ["PET-MRI", "SPECT-MRI"]


def test_stays_close_across_ablation_variants():
    spec = {"metrics": ["CC"], "variants": ["no_gce", "no_we"], "tolerance": 0.001}
    per_pair = _frame(
        _scores("wdualmine"), _scores("wdualmine", variant="no_gce", CC=0.0002),
        _scores("wdualmine", variant="no_we", CC=-0.0004),
    )  # fmt: skip
    assert _verdict(per_pair, _claim("stays_close", **spec)) == claims.SUPPORTED


def test_plain_averaging_is_set_beside_each_comparison_with_the_peers():
    """Averaging scoring the paper's W-DUALMINE CC and more than its MI, as measured here."""
    average = [_scores("average", p, CC=0.8308 - 0.83, MI=3.7254 - 3.6) for p in PAIRS]
    per_pair = _frame(*_on_every_pair("wdualmine", MI=-0.9), *_peers(MI=-0.5), *average)
    frame = claims.evaluate_claims(per_pair, [_claim("vs_peers", **BEST_MI)])
    beside = frame[frame.role == "averaging"].set_index("pair")
    assert list(beside.index) == list(PAIRS) and set(beside.comparator) == {"average"}
    assert beside.loc["CT-MRI", "mean_diff"] == pytest.approx(-1.0254)  # ours minus average
    assert beside.loc["CT-MRI", "paper_subject_mean"] == 3.6059
    assert (frame.verdict == claims.CONTRADICTED).all()  # both peers beat ours by 0.4
    text = claims.claims_markdown(frame, per_pair)
    assert "CT-MRI: average 3.7254" in text and "the paper's W-DUALMINE 3.6059" in text
    summary = "\n".join(claims.averaging_against_paper(per_pair))
    assert "CC 0.8308 vs 0.8308 (equal to four decimals)" in summary
    assert "MI 3.7254 vs 3.6059 (+0.1195)" in summary


def test_the_papers_own_tables_are_checked_too():
    """Table 2 gives ASFE-Fusion the higher CC on PET-MRI: the paper's own claim fails there."""
    per_pair = _frame(*_on_every_pair("wdualmine"), *_peers())
    spec = BEST_MI | {"metrics": ["CC"]}
    frame = claims.evaluate_claims(per_pair, [_claim("vs_peers", **spec)])
    failing = frame[(frame.role == "claim") & (frame.paper_outcome == claims.OPPOSITE)]
    assert set(zip(failing.pair, failing.comparator, strict=True)) == {
        ("PET-MRI", "published-asfe-fusion")
    }
    assert "PET-MRI vs ASFE-Fusion: Δ -0.0003 ✗" in claims.claims_markdown(frame, per_pair)


# --- the report -----------------------------------------------------------------------------


def test_the_report_opens_with_the_claims_after_what_was_run(tmp_path, params):
    per_pair = pd.concat(
        [_per_pair(m, "CT-MRI", "full", e) for m, e in [("wdualmine", 4.3), ("average", 4.2)]]
    )
    section = claims.claims_section(per_pair, tmp_path / "tables")
    text = markdown.render_report(params, per_pair, {"claims": section}, {}, {}, [], tmp_path)
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads[:3] == ["## What was run", "## Claims", "## Agreement with the paper"]
    assert "| `best_mi` Higher MI than both peers" in text
    assert "**not testable here**<br>not run: AdaFuse (no form of it) on CT-MRI" in text
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    cells = {len(re.findall(r"(?<!\\)\|", row)) for row in rows}  # unescaped pipes only
    assert cells == {7} and len(rows) == 1 + len(claims.load_claims())  # header + one per claim
    written = pd.read_csv(tmp_path / "tables" / "claims.csv")
    assert set(written.claim) == {c.id for c in claims.load_claims()}
    assert set(written.verdict) <= set(claims.VERDICTS)
    assert (tmp_path / "tables" / "claims.md").read_text() == section
