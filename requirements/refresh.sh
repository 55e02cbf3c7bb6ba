#!/usr/bin/env bash
# Regenerate the pinned environment with uv (`pip install uv==0.13.9`), for CPython 3.11 on
# Linux x86_64 (glibc >= 2.28), from the ranges in pyproject.toml (base + the `dev` extra):
#   requirements/lock.txt       every dependency, exact versions (what CI and the README install)
#   requirements/lock-cuda.txt  PyPI torch's CUDA runtime, exact versions: a constraints file,
#                               so it installs nothing where torch is the CPU wheel
# Pins already in the files are kept; `bash requirements/refresh.sh --upgrade` moves every
# package to the newest version the ranges allow. No hashes: torch's CPU wheel and PyPI's CUDA
# wheel are different files of one version (2.13.0), and a hash would refuse one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 -q
        --custom-compile-command "bash requirements/refresh.sh")
uv pip compile pyproject.toml --extra dev --excludes requirements/cuda-runtime.in \
    "${target[@]}" -o requirements/lock.txt "$@"
grep -E '^torch==' requirements/lock.txt | cut -d' ' -f1 \
    | uv pip compile - --constraint requirements/lock.txt "${target[@]}" \
        -o requirements/lock-cuda.txt "$@"
