#!/usr/bin/env bash
# The W-DUALMINE distance study (docs/wdualmine.md, "Why the reproduction differs"): short
# paper-profile CT-MRI trainings, one open point changed at a time by an overlay of this folder,
# each fused and scored on the 24 test pairs with the paper's convention. base.yaml (the settings
# the study started from) goes under every overlay.
#   bash docs/study/run.sh OUT_DIR [NAME ...]     (default: every *.yaml here, in study order)
# Needs `medfuse prepare` done (paper profile). Epochs: $STUDY_EPOCHS (default 10).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: run.sh OUT_DIR [NAME ...]}; shift
epochs=${STUDY_EPOCHS:-10}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(baseline seed1 head_0.01 head_0 lr_1e-4 avg_x4 head_avg bf16 widths_x2)
base=docs/study/base.yaml
medfuse init-tracking --stamp "$out/tracking.json"
for name in "${names[@]}"; do
    overlay=docs/study/$name.yaml
    variant=full
    [ "$name" = seed1 ] && variant=full_seed1
    run=$out/$name
    [ -f "$run/metrics.json" ] && continue
    start=$(date +%s)
    medfuse train --overlay "$base" --overlay "$overlay" --pair CT-MRI --variant "$variant" --epochs "$epochs" \
        --out "$run/model" > "$run.train.log" 2>&1
    medfuse fuse --overlay "$base" --overlay "$overlay" --method wdualmine --variant "$variant" --pair CT-MRI \
        --model "$run/model/model.pt" --out "$run/fused" > "$run.fuse.log" 2>&1
    medfuse evaluate --overlay "$base" --overlay "$overlay" --pair CT-MRI --fused "$run/fused" --convention paper \
        --out "$run/metrics" --jobs 2 > "$run.evaluate.log" 2>&1
    echo "$name $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
done
