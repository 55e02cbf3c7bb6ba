# Configuration shared by every rule: params.yaml validated and merged with the profile overlay
# by the same loader the CLI uses, so both see exactly the same settings.

import shlex

from medfuse.config import job_params, load_params, method_config
from medfuse.plan import fusion_jobs, is_learned

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
PUBLISHED_DIRS = [
    f"{RAW_DIR}/{m['dataset']}" for m in PARAMS["methods"].values() if m["kind"] == "published"
]


wildcard_constraints:
    dataset="|".join(DATASETS),


FUSE_JOBS = fusion_jobs(PARAMS)
CONVENTIONS = PARAMS["evaluate"]["conventions"]
METHODS = sorted({job.method for job in FUSE_JOBS})
TRACKING_STAMP = "results/tracking/store.json"


wildcard_constraints:
    method="|".join(METHODS),
    pair="|".join(PARAMS["experiments"]["pairs"]),
    variant="[A-Za-z0-9_]+",
    convention="|".join(CONVENTIONS),


def method_settings(wc):
    """The merged settings a job reads: a change to them reruns exactly that job."""
    return method_config(PARAMS, wc.method, wc.variant)


def fuse_inputs(wc):
    inputs = {"prepared": PREPARED_MANIFEST, "tracking": TRACKING_STAMP}
    if is_learned(PARAMS, wc.method):
        inputs["model"] = f"results/models/{wc.method}/{wc.pair}/{wc.variant}/model.pt"
    kind = PARAMS["methods"][wc.method]["kind"]
    if kind == "published":
        inputs["published"] = f"{RAW_DIR}/{PARAMS['methods'][wc.method]['dataset']}"
    return inputs


# One software environment for every rule (the package pins everything it needs).
CONDA_ENV = "../../environment.yml"


def profile_file():
    return f"workflow/profiles/{PROFILE}/params.yaml"
