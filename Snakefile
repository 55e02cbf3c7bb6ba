# W-DUALMINE reproduction: `snakemake --cores 4 all` (paper profile) or
# `snakemake --profile workflow/profiles/quick all` (tiny sizes, same code paths).
# Every rule calls one `medfuse` command; settings come from params.yaml + the profile overlay.

from snakemake.utils import min_version

min_version("9.0")

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        REPORT_OUTPUTS,
