"""The jobs the workflow runs and where their outputs live: one place for both workflow tools.

The Snakefile expands its rules from these functions; dvc.yaml expands the same lists of
params.yaml with foreach/matrix; tests/test_workflow.py checks that the two DAGs agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfuse.config import canonical_method, seeded_variant
from medfuse.errors import ConfigError

RESULTS = Path("results")


@dataclass(frozen=True)
class Job:
    method: str
    pair: str
    variant: str = "full"

    @property
    def model_dir(self) -> Path:
        return RESULTS / "models" / self.method / self.pair / self.variant

    @property
    def fused_dir(self) -> Path:
        return RESULTS / "fused" / self.method / self.pair / self.variant

    def metrics_stem(self, convention: str) -> Path:
        """Prefix of the evaluation outputs: <stem>.csv (per pair) and <stem>.json (summary)."""
        return RESULTS / "metrics" / convention / self.method / self.pair / self.variant


def _ablation_jobs(exp: Mapping[str, Any]) -> list[Job]:
    method = canonical_method(exp["ablation_method"])
    return [Job(method, exp["ablation_pair"], v) for v in exp["ablations"]]


def trained_methods(exp: Mapping[str, Any]) -> list[str]:
    """The methods trained here: `learned`, plus the peers only when opted in (the paper scored
    the peers from their authors' published images and never retrained them)."""
    return [canonical_method(m) for m in [*exp["learned"], *exp["retrained_peers"]]]


def _seed_jobs(params: Mapping[str, Any]) -> list[Job]:
    """The full model of each `learned` method again with every extra seed, on `seed_pairs`."""
    exp = params["experiments"]
    if params["seed"] in exp["extra_seeds"]:
        raise ConfigError(
            f"experiments.extra_seeds: {params['seed']} is `seed`, whose run is the full model "
            "itself; list other seeds"
        )
    return [
        Job(m, pair, seeded_variant("full", seed))
        for m in map(canonical_method, exp["learned"])
        for pair in exp["seed_pairs"]
        for seed in exp["extra_seeds"]
    ]


def fusion_jobs(params: Mapping[str, Any]) -> list[Job]:
    """Every method (trained, published or classical) on every pair, plus the ablations and the
    extra seeds."""
    exp = params["experiments"]
    names = [*trained_methods(exp), *exp["classical"], *exp["published"]]
    methods = [canonical_method(m) for m in names]
    full = [Job(m, p) for m in methods for p in exp["pairs"]]
    return full + _ablation_jobs(exp) + _seed_jobs(params)


def is_learned(params: Mapping[str, Any], method: str) -> bool:
    return params["methods"][canonical_method(method)]["kind"] == "learned"
