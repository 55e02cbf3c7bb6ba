# Training: every learned method on every pair, plus the ablation variants (configuration only).
# A rerun of an interrupted training (`--rerun-incomplete`, a SLURM retry) continues from its
# checkpoint, kept beside the model folder, when settings, code and data are unchanged
# (`medfuse train`'s default).


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
        unpack(stage1_model),
        prepared=PREPARED_MANIFEST,
        tracking=TRACKING_STAMP,
        profile=profile_file(),
    output:
        "results/models/{method}/{pair}/{variant}/model.pt",
    params:
        settings=method_settings,
        train=PARAMS["train"],
        pairs=lambda wc: PARAMS["experiments"]["pairs"] if wc.pair == ALL_PAIRS else wc.pair,
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


# A two-stage method's first stage (DM-FNet's diffusion U-Net): trained once on every pair's
# training images, from the method's `stage1` settings only, so a change of the second stage's
# settings never retrains it.
rule train_stage1:
    input:
        prepared=PREPARED_MANIFEST,
        tracking=TRACKING_STAMP,
        profile=profile_file(),
    output:
        "results/stage1/{method}/model.pt",
    params:
        settings=lambda wc: PARAMS["methods"][wc.method]["stage1"],
        train=PARAMS["train"],
        pairs=PARAMS["experiments"]["pairs"],
        seed=PARAMS["seed"],
        out_dir=subpath(output[0], parent=True),
        profile=PROFILE_ARG,
    log:
        "logs/train_stage1/{method}.log",
    threads: 2
    resources:
        mem_mb=8000,
    conda:
        CONDA_ENV
    shell:
        "medfuse train {params.profile} --method {wildcards.method} --stage1 --pair all"
        " --out {params.out_dir} > {log} 2>&1"
