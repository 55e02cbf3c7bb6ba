# Tables 1-5, Figures 3-6 and results/report.md from every evaluation.

REPORT_OUTPUTS = ["results/report.md", "results/tables/table1.csv", "results/figures/fig6_radar.png"]


rule report:
    input:
        metrics=[
            f"results/metrics/{c}/{job.method}/{job.pair}/{job.variant}.csv"
            for job in FUSE_JOBS
            for c in CONVENTIONS
        ],
        fused=[str(job.fused_dir) for job in FUSE_JOBS],
        profile=profile_file(),
    output:
        REPORT_OUTPUTS,
    params:
        experiments=PARAMS["experiments"],
        evaluate=PARAMS["evaluate"],
        profile=PROFILE_ARG,
    log:
        "logs/report.log",
    threads: 1
    conda:
        CONDA_ENV
    shell:
        "medfuse report {params.profile} > {log} 2>&1"
