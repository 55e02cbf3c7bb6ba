# Data stage: download (manifest + base URL, verified) -> prepare (paired, converted, validated).


# The manifest (sha256 per file) alone defines the files, so it is what is tracked: the source
# (base_url, a mirror) and data.download (workers, retries, time-outs) are no params, so
# changing them reruns neither the download nor anything after it.
rule download:
    input:
        manifest=lambda wc: DATASETS[wc.dataset]["manifest"],
    output:
        directory(f"{RAW_DIR}/{{dataset}}"),
    params:
        profile=PROFILE_ARG,
    log:
        "logs/download/{dataset}.log",
    threads: 1
    resources:
        downloads=1,
    conda:
        CONDA_ENV
    shell:
        "medfuse download {params.profile} --dataset {wildcards.dataset} --out {output} > {log} 2>&1"


rule prepare:
    input:
        raw=f"{RAW_DIR}/aanlib",
        profile=profile_file(),
    output:
        manifest=PREPARED_MANIFEST,
    params:
        settings=PREPARE,
        seed=PARAMS["seed"],
        profile=PROFILE_ARG,
    log:
        "logs/prepare.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "medfuse prepare {params.profile} > {log} 2>&1"
