# Training: every learned method on every pair, plus the ablation variants (configuration only).


rule init_tracking:
    output:
        TRACKING_STAMP,
    params:
        tracking=PARAMS["tracking"],
        profile=PROFILE_ARG,
    log:
        "logs/init_tracking.log",
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "medfuse init-tracking {params.profile} --stamp {output} > {log} 2>&1"


rule train:
    input:
        prepared=PREPARED_MANIFEST,
        tracking=TRACKING_STAMP,
        profile=profile_file(),
    output:
        "results/models/{method}/{pair}/{variant}/model.pt",
    params:
        settings=method_settings,
        train=PARAMS["train"],
        seed=lambda wc: job_params(PARAMS, wc.variant)["seed"],
        out_dir=subpath(output[0], parent=True),
        profile=PROFILE_ARG,
    log:
        "logs/train/{method}/{pair}/{variant}.log",
    threads: 2
    resources:
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "medfuse train {params.profile} --method {wildcards.method} --pair {wildcards.pair}"
        " --variant {wildcards.variant} --out {params.out_dir} > {log} 2>&1"
