"""The jobs the workflow runs and where their outputs live: one place for both workflow tools.

The Snakefile expands its rules from these functions; dvc.yaml expands the same lists of
params.yaml with foreach/matrix; tests/test_workflow_dag.py checks that the two DAGs agree.

A learned model is trained per modality pair, except a `unified` method's (DM-FNet's head),
which is trained once on the training images of every pair in `experiments.pairs` and stored
under the pseudo-pair `all`; every pair's fusion then reads that one model. A method with a
`stage1` section (DM-FNet's diffusion U-Net) first trains that stage into `stage1_dir(method)`,
whose weights every training of the method reuses (its variants included).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medfuse.config import canonical_method, method_config, seeded_variant
from medfuse.errors import ConfigError, DataError

RESULTS = Path("results")
# The files of a model folder: written by training, read by fusion, the report and the snapshot.
WEIGHTS = "model.pt"
META = "model.json"
HISTORY = "history.csv"
# The pair name of a model trained on the training images of every pair.
ALL_PAIRS = "all"


@dataclass(frozen=True)
class Job:
    method: str
    pair: str
    variant: str = "full"
    # The pair the model was trained on: `pair`, or ALL_PAIRS for a unified method's model.
    trained_on: str | None = None
    # The results folder (`medfuse report --results DIR` reads another one).
    root: Path = RESULTS

    @property
    def model_dir(self) -> Path:
        return model_dir(self.method, self.trained_on or self.pair, self.variant, self.root)

    @property
    def fused_dir(self) -> Path:
        return self.root / "fused" / self.method / self.pair / self.variant

    def metrics_stem(self, convention: str) -> Path:
        """Prefix of the evaluation outputs: <stem>.csv (per pair) and <stem>.json (summary)."""
        return self.root / "metrics" / convention / self.method / self.pair / self.variant


def model_dir(method: str, trained_on: str, variant: str, root: Path = RESULTS) -> Path:
    """results/models/<method>/<pair or ALL_PAIRS>/<variant>/: model.pt, model.json, history."""
    return root / "models" / canonical_method(method) / trained_on / variant


def checkpoint_path(model_folder: Path) -> Path:
    """A training's checkpoint: beside its model folder (<folder>.checkpoint.pt), not in it, so
    that it outlives DVC and Snakemake removing the folder before they rerun the training, and
    the rerun can continue from it."""
    folder = model_folder if model_folder.name else model_folder.absolute()
    return folder.with_name(f"{folder.name}.checkpoint.pt")


# Where older versions kept the checkpoint (inside the model folder); moved on the next resume.
LEGACY_CHECKPOINT = "checkpoint.pt"


def weights_meta(weights: Path) -> dict[str, Any]:
    """model.json beside the weights (what built them: method, config, epochs, seed, precision,
    MLflow run), or {} when there is none; a weights file of another name has <name>.json."""
    meta_path = weights.with_name(META) if weights.name == WEIGHTS else weights.with_suffix(".json")
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_path}: invalid JSON ({exc})") from exc


def job_of_fused_dir(fused_dir: str | Path) -> Job:
    """The job whose fusions are in `fused_dir` (<root>/fused/<method>/<pair>/<variant>)."""
    parts = Path(fused_dir).parts
    if len(parts) < 4 or parts[-4] != "fused":
        raise DataError(
            f"{fused_dir}: not a results/fused/<method>/<pair>/<variant> folder; give --out PREFIX"
        )
    method, pair, variant = parts[-3:]
    return Job(method, pair, variant, root=Path(*parts[:-4]))


def stage1_dir(method: str, root: Path = RESULTS) -> Path:
    """Where a two-stage method's first stage (e.g. DM-FNet's diffusion U-Net) is trained."""
    return root / "stage1" / canonical_method(method)


def is_unified(params: Mapping[str, Any], method: str, variant: str = "full") -> bool:
    """Whether `method` (as `variant` sets it) trains one model on every pair's images."""
    return bool(method_config(params, method, variant).get("unified", False))


def has_stage1(params: Mapping[str, Any], method: str) -> bool:
    return "stage1" in params["methods"][canonical_method(method)]


def trained_on(params: Mapping[str, Any], method: str, pair: str, variant: str = "full") -> str:
    """The pair folder of the model that fuses `pair` with `method`'s `variant`."""
    return ALL_PAIRS if is_unified(params, method, variant) else pair


def _ablation_jobs(params: Mapping[str, Any]) -> list[Job]:
    exp = params["experiments"]
    method = canonical_method(exp["ablation_method"])
    pair = exp["ablation_pair"]
    return [Job(method, pair, v, trained_on(params, method, pair, v)) for v in exp["ablations"]]


def trained_methods(exp: Mapping[str, Any]) -> list[str]:
    """The methods trained here per pair: `learned`, plus the peers only when opted in (the
    paper scored the peers from their authors' published images and never retrained them)."""
    return [canonical_method(m) for m in [*exp["learned"], *exp["retrained_peers"]]]


def _seed_jobs(params: Mapping[str, Any]) -> list[Job]:
    """The full model of each of `seed_methods` again with every extra seed, on `seed_pairs`."""
    exp = params["experiments"]
    if params["seed"] in exp["extra_seeds"]:
        raise ConfigError(
            f"experiments.extra_seeds: {params['seed']} is `seed`, whose run is the full model "
            "itself; list other seeds"
        )
    return [
        Job(m, pair, seeded_variant("full", seed))
        for m in map(canonical_method, exp["seed_methods"])
        for pair in exp["seed_pairs"]
        for seed in exp["extra_seeds"]
    ]


def _check_lists(params: Mapping[str, Any]) -> None:
    """`learned` trains per pair and `unified` once for all pairs (dvc.yaml has one stage group
    for each): a method in the wrong list would be trained the wrong way by DVC."""
    exp = params["experiments"]
    seeded = exp["seed_methods"] if exp["extra_seeds"] else []
    for method in seeded:  # dvc.yaml trains them per pair, as `learned`
        if canonical_method(method) not in trained_methods(exp):
            raise ConfigError(
                f"experiments.seed_methods: {method!r} is not trained per pair here; "
                "list it in experiments.learned (or retrained_peers) too"
            )
    for key, unified in (("learned", False), ("unified", True)):
        for method in exp[key]:
            if is_unified(params, method) != unified:
                setting = "true" if not unified else "false or absent"
                raise ConfigError(
                    f"experiments.{key}: {method!r} has methods.{method}.unified {setting}; "
                    f"list it in experiments.{'learned' if not unified else 'unified'}"
                )
    for method in exp["unified"]:
        if not has_stage1(params, method):  # dvc.yaml trains a first stage for each
            raise ConfigError(
                f"experiments.unified: {method!r} has no methods.{method}.stage1 section"
            )


def fusion_jobs(params: Mapping[str, Any], root: Path = RESULTS) -> list[Job]:
    """Every method (trained, unified, pretrained, published or classical) on every pair,
    plus the ablations and the extra seeds, with their outputs under `root`."""
    _check_lists(params)
    exp = params["experiments"]
    names = [*trained_methods(exp), *exp["unified"], *exp["classical"], *exp["pretrained"]]
    methods = [canonical_method(m) for m in [*names, *exp["published"]]]
    full = [Job(m, p, "full", trained_on(params, m, p)) for m in methods for p in exp["pairs"]]
    jobs = full + _ablation_jobs(params) + _seed_jobs(params)
    return [replace(job, root=Path(root)) for job in jobs]


def training_jobs(params: Mapping[str, Any]) -> list[Job]:
    """One job per model to train (a unified model once, whatever the pairs that read it)."""
    jobs = {
        (job.method, job.trained_on or job.pair, job.variant): None
        for job in fusion_jobs(params)
        if is_learned(params, job.method)
    }
    return [Job(m, pair, variant, pair) for m, pair, variant in jobs]


def stage1_methods(params: Mapping[str, Any]) -> list[str]:
    """The methods whose first stage the workflow trains."""
    return sorted({job.method for job in training_jobs(params) if has_stage1(params, job.method)})


def model_folders(params: Mapping[str, Any], root: Path = RESULTS) -> list[tuple[str, Job, Path]]:
    """(model name, training job, folder) of every model the workflow trains under `root`: each
    training job's, then each first stage's, named `<method> (first stage)`, on ALL_PAIRS."""
    folders = [
        (j.method, j, model_dir(j.method, j.pair, j.variant, root)) for j in training_jobs(params)
    ]
    folders += [
        (f"{m} (first stage)", Job(m, ALL_PAIRS, "full", ALL_PAIRS), stage1_dir(m, root))
        for m in stage1_methods(params)
    ]
    return folders


def is_learned(params: Mapping[str, Any], method: str) -> bool:
    return params["methods"][canonical_method(method)]["kind"] == "learned"
