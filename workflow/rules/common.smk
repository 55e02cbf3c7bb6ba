# Configuration shared by every rule: params.yaml validated and merged with the profile overlay
# by the same loader the CLI uses, so both see exactly the same settings.

import shlex

from medfuse.config import job_params, load_params, method_config
from medfuse.plan import ALL_PAIRS, fusion_jobs, has_stage1, stage1_dir, stage1_methods

PROFILE = config.get("profile")
PARAMS = load_params("params.yaml", profile=PROFILE)
PROFILE = PARAMS["profile"]
# Every rule's command starts with this, so the CLI merges the same profile overlay.
PROFILE_ARG = f"--profile {shlex.quote(PROFILE)}"

DATASETS = PARAMS["data"]["datasets"]
PREPARE = PARAMS["data"]["prepare"]
PREPARED_DIR = PREPARE["out_dir"]
PREPARED_MANIFEST = f"{PREPARED_DIR}/manifest.csv"
RAW_DIR = PARAMS["data"]["raw_dir"]


wildcard_constraints:
    dataset="|".join(DATASETS),


FUSE_JOBS = fusion_jobs(PARAMS)
# (method, pair, variant) -> the job, for the rules' input functions.
JOBS = {(job.method, job.pair, job.variant): job for job in FUSE_JOBS}
STAGE1_METHODS = stage1_methods(PARAMS)
CONVENTIONS = PARAMS["evaluate"]["conventions"]
METHODS = sorted({job.method for job in FUSE_JOBS})
TRACKING_STAMP = "results/tracking/store.json"


wildcard_constraints:
    method="|".join(METHODS),
    pair="|".join([*PARAMS["experiments"]["pairs"], ALL_PAIRS]),
    variant="[A-Za-z0-9_]+",
    convention="|".join(CONVENTIONS),


def method_settings(wc):
    """The merged settings a job reads: a change to them reruns exactly that job."""
    return method_config(PARAMS, wc.method, wc.variant)


def fuse_inputs(wc):
    inputs = {"prepared": PREPARED_MANIFEST, "tracking": TRACKING_STAMP}
    section = PARAMS["methods"][wc.method]
    if section["kind"] == "learned":
        inputs["model"] = str(JOBS[wc.method, wc.pair, wc.variant].model_dir / "model.pt")
    if section["kind"] in ("published", "pretrained"):
        inputs["released"] = f"{RAW_DIR}/{section['dataset']}"
    return inputs


def stage1_model(wc):
    """A two-stage method's training starts from its trained first stage."""
    if has_stage1(PARAMS, wc.method):
        return {"stage1": str(stage1_dir(wc.method) / "model.pt")}
    return {}


# One software environment for every rule (the package pins everything it needs).
CONDA_ENV = "../../environment.yml"


def profile_file():
    return f"workflow/profiles/{PROFILE}/params.yaml"
