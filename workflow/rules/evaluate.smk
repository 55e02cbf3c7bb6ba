# Fusion of each pair's test split by every method, then its evaluation under each convention.


rule fuse:
    input:
        unpack(fuse_inputs),
    output:
        directory("results/fused/{method}/{pair}/{variant}"),
    params:
        settings=method_settings,
        output_settings=PARAMS["output"],
        profile=PROFILE_ARG,
    log:
        "logs/fuse/{method}/{pair}/{variant}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        CONDA_ENV
    shell:
        "medfuse fuse {params.profile} --method {wildcards.method} --variant {wildcards.variant}"
        " --pair {wildcards.pair} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        fused="results/fused/{method}/{pair}/{variant}",
        prepared=PREPARED_MANIFEST,
        tracking=TRACKING_STAMP,
    output:
        per_pair="results/metrics/{convention}/{method}/{pair}/{variant}.csv",
        mean_std="results/metrics/{convention}/{method}/{pair}/{variant}.summary.csv",
        summary="results/metrics/{convention}/{method}/{pair}/{variant}.json",
    params:
        stem=subpath(output.per_pair, strip_suffix=".csv"),
        profile=PROFILE_ARG,
    log:
        "logs/evaluate/{convention}/{method}/{pair}/{variant}.log",
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "medfuse evaluate {params.profile} --pair {wildcards.pair} --fused {input.fused}"
        " --convention {wildcards.convention} --out {params.stem} --jobs {threads} > {log} 2>&1"
